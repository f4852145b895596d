"""Peak memory and time of asking about a region of a huge COG: open a 2,000-px window of a
generated 20,000 x 20,000 georeferenced COG with overviews (`tests/big_scene.py`) and build
its pyramid tiles with `UhrBatImageProcessor` (672..4032, 228 tiles), in a fresh process,
against the same for the whole scene; and check the region's tiles equal those of the window
cut into its own file (issue 21: target < 1.5 GB peak RSS).

    python benchmarks/region_memory.py                   # 20,000^2, a 2,000-px window
    python benchmarks/region_memory.py --keep /tmp/scenes  # reuse the COG across runs
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from pyramid_memory import rss_mb  # noqa: E402


def measure(path: str, region: list[int] | None, cut: str | None) -> dict:
    """Child process: imports, then open (+ region) and the pyramid; peak RSS (ru_maxrss)."""
    import torch

    from uhrbat.io import open_image
    from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor

    proc = UhrBatImageProcessor()
    base = rss_mb()
    t0 = time.perf_counter()
    src = open_image(path, region=region)
    t_open = time.perf_counter() - t0
    tiles, size = proc.pyramid(src)
    t_tiles = time.perf_counter() - t0 - t_open
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "source": repr(src),
        "size": list(size),
        "tiles": list(tiles.shape),
        "rss_after_import_mb": round(base, 1),
        "peak_rss_mb": round(peak, 1),
        "open_s": round(t_open, 3),
        "tiles_s": round(t_tiles, 3),
    }
    if cut is not None:  # after the peak was taken: the comparison costs a second pyramid
        ref, _ = proc.pyramid(cut)
        out["equal_to_cut_file"] = bool(torch.equal(tiles, ref))
    return out


def cut_window(src: Path, dst: Path, region: list[int]) -> None:
    import rasterio
    from rasterio.windows import Window

    x0, y0, x1, y1 = region
    with rasterio.open(src) as ds:
        w = Window(x0, y0, x1 - x0, y1 - y0)
        data = ds.read(window=w)
        profile = dict(driver="GTiff", width=x1 - x0, height=y1 - y0, count=ds.count, dtype=ds.dtypes[0])
        profile.update(crs=ds.crs, transform=ds.window_transform(w))
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)


def run_child(path: Path, region: list[int] | None, cut: Path | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    args = [sys.executable, __file__, "--measure", str(path)]
    if region is not None:
        args += ["--region", ",".join(map(str, region))]
    if cut is not None:
        args += ["--cut", str(cut)]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000)
    ap.add_argument("--window", type=int, default=2000)
    ap.add_argument("--keep", type=Path, default=None, help="write (or reuse) the COG in this folder")
    ap.add_argument("--limit-mb", type=float, default=1500.0)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--region", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cut", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        region = [int(v) for v in args.region.split(",")] if args.region else None
        print(json.dumps(measure(args.measure, region, args.cut)))
        return

    from big_scene import build_cog

    with tempfile.TemporaryDirectory(prefix="uhrbat-region-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"scene_{args.size}_cog.tif"
        if not path.exists():
            print(f"writing a {args.size}x{args.size} 3-band COG with overviews to {path} ...", flush=True)
            t = build_cog(path, args.size)
            print(f"  written in {t:.1f} s, {path.stat().st_size / 2**20:.0f} MiB on disk", flush=True)
        x0 = y0 = (args.size - args.window) // 2 + 123
        region = [x0, y0, x0 + args.window, y0 + args.window]
        cut = Path(tmp) / "cut.tif"
        cut_window(path, cut, region)
        r = run_child(path, region, cut)
        whole = run_child(path, None, None)
    print(f"region {region}: {r['source']}")
    print(
        f"  open {r['open_s']:.2f} s, pyramid {r['tiles_s']:.2f} s ({r['tiles'][0]} tiles); RSS after imports "
        f"{r['rss_after_import_mb']:.0f} MB, PEAK {r['peak_rss_mb']:.0f} MB; tiles equal to the cut file: "
        f"{r['equal_to_cut_file']}"
    )
    print(
        f"whole scene: open {whole['open_s']:.2f} s, pyramid {whole['tiles_s']:.2f} s; RSS after imports "
        f"{whole['rss_after_import_mb']:.0f} MB, PEAK {whole['peak_rss_mb']:.0f} MB"
    )
    ok = r["peak_rss_mb"] < args.limit_mb and r["equal_to_cut_file"]
    print(
        f"region peak {'<' if ok else '>='} {args.limit_mb:.0f} MB target"
        + ("" if r["equal_to_cut_file"] else "; TILES DIFFER")
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
