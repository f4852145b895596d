"""Peak memory of building the square pyramid of a huge GeoTIFF through `open_image`.

Builds a W x W 3-band uint8 tiled GeoTIFF with internal overviews in a temporary folder
(written block row by block row, never held in RAM), then, in a fresh child process, opens it
with `uhrbat.io.open_image` and builds the 672 / 1344 / 2688 / 4032 squares with
`.square(side)`, and prints the child's peak resident set size (target: < 1.5 GB for
20,000 x 20,000).

    python benchmarks/pyramid_memory.py                 # 20,000 x 20,000, overviews 2..64
    python benchmarks/pyramid_memory.py --size 40000    # bigger scene
    python benchmarks/pyramid_memory.py --no-overviews  # GDAL streams the full-res blocks
    python benchmarks/pyramid_memory.py --keep DIR      # keep the GeoTIFF in DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = (672, 1344, 2688, 4032)


def build_geotiff(path: Path, size: int, overviews: bool, block: int = 512, compress: str = "deflate") -> float:
    """Write a synthetic `size x size` RGB GeoTIFF (UTM 17N, 0.1 m pixels) strip by strip."""
    import numpy as np
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin

    t0 = time.perf_counter()
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32617",
        transform=from_origin(404000.0, 3290000.0, 0.1, 0.1),
        tiled=True,
        blockxsize=block,
        blockysize=block,
        compress=compress,
        predictor=2 if compress != "none" else 1,
        BIGTIFF="IF_SAFER",
        interleave="pixel",
    )
    if compress == "none":
        profile.pop("compress")
    x = np.arange(size, dtype=np.float32)
    with rasterio.Env(GDAL_CACHEMAX=256, GDAL_NUM_THREADS="ALL_CPUS"):
        with rasterio.open(path, "w", **profile) as ds:
            for r0 in range(0, size, block):
                h = min(block, size - r0)
                y = np.arange(r0, r0 + h, dtype=np.float32)[:, None]
                fields = (
                    128 + 100 * np.sin(x[None, :] / 900.0) * np.cos(y / 700.0),
                    128 + 90 * np.sin((x[None, :] + y) / 1500.0),
                    (x[None, :] // 256 + y // 256) % 2 * 120 + 60,
                )
                strip = np.stack([np.broadcast_to(f, (h, size)) for f in fields]).astype(np.uint8)
                ds.write(strip, window=rasterio.windows.Window(0, r0, size, h))
            if overviews:
                factors = [f for f in (2, 4, 8, 16, 32, 64) if size // f >= 256]
                ds.build_overviews(factors, Resampling.average)
                ds.update_tags(ns="rio_overview", resampling="average")
    return time.perf_counter() - t0


def rss_mb() -> float:
    """This process's resident set size now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(path: str, sides: list[int]) -> dict:
    """Child process: open + squares, report peak RSS (ru_maxrss) and timings."""
    from uhrbat.io.sources import open_image

    base = rss_mb()
    t0 = time.perf_counter()
    src = open_image(path)
    t_open = time.perf_counter() - t0
    per_side = {}
    for s in sides:
        t = time.perf_counter()
        im = src.square(s)
        assert im.size == (s, s) and im.mode == "RGB"
        per_side[s] = round(time.perf_counter() - t, 3)
        del im
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB on Linux
    return {
        "source": repr(src),
        "rss_after_import_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "open_s": round(t_open, 3),
        "square_s": per_side,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--sides", default=",".join(map(str, SIDES)))
    ap.add_argument("--no-overviews", action="store_true")
    ap.add_argument("--compress", default="deflate", help="deflate | lzw | none")
    ap.add_argument("--keep", type=Path, default=None, help="write (or reuse) the GeoTIFF in this folder")
    ap.add_argument("--limit-mb", type=float, default=1500.0)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    if args.measure:
        print(json.dumps(measure(args.measure, sides)))
        return

    with tempfile.TemporaryDirectory(prefix="uhrbat-pyramid-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ov = "noov" if args.no_overviews else "ov"
        path = folder / f"scene_{args.size}_{ov}_{args.compress}.tif"
        if not path.exists():
            print(
                f"writing {args.size}x{args.size} 3-band GeoTIFF ({args.compress}, "
                f"{'no ' if args.no_overviews else ''}overviews) to {path} ...",
                flush=True,
            )
            t = build_geotiff(path, args.size, overviews=not args.no_overviews, compress=args.compress)
            print(f"  written in {t:.1f} s, {path.stat().st_size / 2**20:.0f} MiB on disk", flush=True)
        env = dict(os.environ)
        src_dir = Path(__file__).resolve().parents[1] / "src"
        env["PYTHONPATH"] = f"{src_dir}{os.pathsep}{env.get('PYTHONPATH', '')}"
        out = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), "--sides", args.sides],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(out.returncode)
        r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"source: {r['source']}")
    print(f"open: {r['open_s']:.2f} s; squares: " + ", ".join(f"{s}: {t:.2f} s" for s, t in r["square_s"].items()))
    print(f"RSS after imports: {r['rss_after_import_mb']:.0f} MB")
    ok = r["peak_rss_mb"] < args.limit_mb
    print(
        f"PEAK RSS building the {'/'.join(map(str, sides))} squares of a {args.size}x{args.size} GeoTIFF: "
        f"{r['peak_rss_mb']:.0f} MB ({'<' if ok else '>='} {args.limit_mb:.0f} MB target)"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
