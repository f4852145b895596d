"""Hostile image files for the untrusted-input tests (seeded), and a forking worker that opens
each one in a child process with a time limit and reports its peak memory.

`make_corpus(root, seed, ...)` writes the files and returns `[(path, trusts)]`; `run_worker(items)`
runs `open_image(path, trust=...)` + `square(side)` per item in a fresh fork of a worker that
has already imported uhrbat (so a child costs milliseconds) and returns one dict per item:
`{"path", "trust", "status": "ok" | "error" | "crash" | "timeout", "message", "peak_mb", "seconds"}`.
Used by tests/test_untrusted*.py and benchmarks/untrusted_decode.py.
`peak_mb` is the child's VmHWM minus its VmRSS at fork time: what this file cost.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BOTH = ("local", "untrusted")
UNTRUSTED = ("untrusted",)


# ----------------------------------------------------------------------------- builders
def _chunk(typ: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + typ + data + struct.pack(">I", zlib.crc32(typ + data) & 0xFFFFFFFF)


def png_bytes(
    w: int, h: int, *, color: int = 2, interlace: int = 0, rows: int | None = None, fill: int = 0x80, extra: bytes = b""
) -> bytes:
    """A PNG written by hand: any header (even a lying one), constant rows (`rows` of them)."""
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    if w * bpp > 1 << 24:  # a lying header over a few bytes of data
        w_rows, rows = 64, 1
    else:
        w_rows = w
    row = b"\x00" + bytes([fill]) * (w_rows * bpp)
    c = zlib.compressobj(9)
    n = h if rows is None else rows
    block = row * max(1, min(n, (1 << 22) // max(1, len(row))))
    parts, done = [], 0
    while done < n:
        k = min(n - done, len(block) // len(row))
        parts.append(c.compress(block[: k * len(row)]))
        done += k
    parts.append(c.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
    )


def _noise(w: int, h: int, rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, ch) if ch > 1 else (h, w), dtype=np.uint8)
    return Image.fromarray(arr, mode)


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_with_size(data: bytes, w: int, h: int) -> bytes:
    """Patch the first SOF header of a JPEG to claim `w x h`."""
    b = bytearray(data)
    i = 2
    while i < len(b) - 9:
        if b[i] == 0xFF and b[i + 1] in (0xC0, 0xC1, 0xC2):
            b[i + 5 : i + 9] = struct.pack(">HH", h, w)
            return bytes(b)
        if b[i] == 0xFF and b[i + 1] not in (0x00, 0xFF, 0xD8):
            i += 2 + struct.unpack(">H", bytes(b[i + 2 : i + 4]))[0]
        else:
            i += 1
    return bytes(b)


def tiff_strip(w: int, h: int, compression: int = 1, data: bytes = b"\x00" * 64) -> bytes:
    """A minimal one-strip 8-bit grey little-endian TIFF claiming `w x h` (data may be short)."""
    entries = [
        (256, 4, 1, w),
        (257, 4, 1, h),
        (258, 3, 1, 8),
        (259, 3, 1, compression),
        (262, 3, 1, 1),
        (273, 4, 1, 0),
        (277, 3, 1, 1),
        (278, 4, 1, h),
        (279, 4, 1, len(data)),
    ]
    ifd_off = 8
    data_off = ifd_off + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_off) + struct.pack("<H", len(entries)))
    for tag, typ, cnt, val in entries:
        val = data_off if tag == 273 else val
        out += struct.pack("<HHI", tag, typ, cnt) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
    out += struct.pack("<I", 0) + data
    return bytes(out)


def vrt_raw(target: str, w: int = 64, h: int = 16) -> bytes:
    return (
        f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><VRTRasterBand dataType="Byte" band="1" '
        f'subClass="VRTRawRasterBand"><SourceFilename relativetoVRT="0">{target}</SourceFilename>'
        f"<ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>{w}</LineOffset>"
        f"</VRTRasterBand></VRTDataset>"
    ).encode()


def vrt_source(target: str, w: int = 64, h: int = 64) -> bytes:
    return (
        f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}"><VRTRasterBand dataType="Byte" band="1">'
        f'<SimpleSource><SourceFilename relativeToVRT="0">{target}</SourceFilename><SourceBand>1</SourceBand>'
        f"</SimpleSource></VRTRasterBand></VRTDataset>"
    ).encode()


# ----------------------------------------------------------------------------- corpus
def make_corpus(root: Path, seed: int, url: str, secret: Path, n_mutants: int = 18) -> list[tuple[Path, tuple]]:
    """~300 hostile files under `root`. `url`: a loopback URL that must never be fetched;
    `secret`: a file that must never be read through an upload."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    items: list[tuple[Path, tuple]] = []

    def add(name: str, data: bytes, trusts: tuple = BOTH) -> None:
        p = root / name
        p.write_bytes(data)
        items.append((p, trusts))

    bases = {
        "rgb.png": _save(_noise(97, 61, rng), "PNG"),
        "rgba.png": _save(_noise(40, 70, rng, "RGBA"), "PNG"),
        "grey.png": _save(_noise(64, 64, rng, "L"), "PNG"),
        "pal.png": _save(_noise(50, 30, rng).convert("P"), "PNG"),
        "g16.png": _save(Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)), "PNG"),
        "inter.png": png_bytes(80, 50, interlace=1),  # claims Adam7 over plain rows: corrupt
        "base.jpg": _save(_noise(120, 90, rng), "JPEG", quality=80),
        "prog.jpg": _save(_noise(120, 90, rng), "JPEG", quality=80, progressive=True),
        "plain.tif": _save(_noise(70, 50, rng), "TIFF"),
        "lzw.tif": _save(_noise(70, 50, rng), "TIFF", compression="tiff_lzw"),
        "cmyk.tif": _save(Image.new("CMYK", (30, 20), (0, 200, 230, 20)), "TIFF"),
    }
    try:
        import rasterio
        from rasterio.transform import from_origin

        for name, kw in (
            ("geo.tif", {"tiled": True, "blockxsize": 16, "blockysize": 16}),
            ("big.tif", {"BIGTIFF": "YES"}),
            ("f32.tif", {}),
        ):
            dtype = "float32" if name == "f32.tif" else "uint8"
            with rasterio.open(
                root / name,
                "w",
                driver="GTiff",
                width=48,
                height=40,
                count=3,
                dtype=dtype,
                crs="EPSG:32633",
                transform=from_origin(500000, 6000000, 10, 10),
                **kw,
            ) as ds:
                ds.write(rng.integers(0, 255, (3, 40, 48)).astype(dtype))
            bases[name] = (root / name).read_bytes()
    except ImportError:
        pass
    for name, data in bases.items():
        add(name, data)
        stem, ext = name.rsplit(".", 1)
        for i in range(n_mutants):  # mutants: untrusted only (the decoders are the same at both levels)
            b = bytearray(data)
            kind = i % 3
            if kind == 0:  # truncated
                cut = int(rng.integers(1, max(2, len(b) - 1)))
                out = bytes(b[:cut])
            elif kind == 1:  # bit flips, header-heavy
                for _ in range(int(rng.integers(1, 8))):
                    pos = int(rng.integers(0, min(len(b), 512) if rng.random() < 0.7 else len(b)))
                    b[pos] ^= 1 << int(rng.integers(0, 8))
                out = bytes(b)
            else:  # random bytes overwritten in a range
                pos = int(rng.integers(0, len(b)))
                n = int(rng.integers(1, 32))
                b[pos : pos + n] = rng.integers(0, 256, min(n, len(b) - pos), dtype=np.uint8).tobytes()
                out = bytes(b)
            add(f"{stem}_m{i}.{ext}", out, UNTRUSTED)

    # Lying headers: huge, elongated, overflowing.
    for w, h in (
        (1, 100_000),
        (100_000, 1),
        (1, 2_147_483_647),
        (2_147_483_647, 2_147_483_647),
        (65535, 65535),
        (30000, 30000),
        (0, 10),
        (40000, 20000),
        (3, 9000),
    ):
        add(f"claim_{w}x{h}.png", png_bytes(w, h, rows=min(h, 4)))
    add("elong_1x100000.png", png_bytes(1, 100_000))
    add("elong_100000x1.png", png_bytes(100_000, 1))
    add("elong_2x300000.png", png_bytes(2, 300_000))
    add("inter_big.png", png_bytes(17000, 17000, interlace=1, rows=2))
    jpg = bases["base.jpg"]
    for w, h in ((65000, 65000), (60000, 20000), (1, 60000), (30000, 30000)):
        add(f"claim_{w}x{h}.jpg", jpeg_with_size(jpg, w, h))
    add("claim_prog_30000.jpg", jpeg_with_size(bases["prog.jpg"], 30000, 30000))
    for w, h, comp in ((20000, 20000, 1), (40000, 30000, 8), (1, 1_000_000, 1), (100000, 100000, 5)):
        add(f"claim_{w}x{h}_c{comp}.tif", tiff_strip(w, h, comp))

    # Files that reference other files or the network: only formats we refuse.
    http = f"/vsicurl/{url}/x.png"
    add("vrt_raw.png", vrt_raw(str(secret)), UNTRUSTED)
    add("vrt_raw.tif", vrt_raw(str(secret)), UNTRUSTED)
    add("vrt_curl.png", vrt_source(http), UNTRUSTED)
    add("vrt_curl.jpg", b"\n  " + vrt_source(http), UNTRUSTED)
    add("vrt_rel.png", vrt_source(secret.name), UNTRUSTED)
    add("vrt_bom.png", b"\xef\xbb\xbf" + vrt_raw(str(secret)), UNTRUSTED)
    add("polyglot_png_vrt.png", bases["rgb.png"][:8] + vrt_source(http), UNTRUSTED)
    add("polyglot_tiff_vrt.tif", b"II*\x00" + vrt_source(http), UNTRUSTED)
    add("png_then_vrt.png", bases["rgb.png"] + vrt_source(http), UNTRUSTED)
    add("gdal_xml.aux.xml", b"<PAMDataset></PAMDataset>", UNTRUSTED)
    # Other formats: fine locally, refused from strangers.
    add("img.gif", _save(_noise(20, 20, rng).convert("P"), "GIF"))
    add("img.bmp", _save(_noise(20, 20, rng), "BMP"))
    add("img.webp", _save(_noise(20, 20, rng), "WEBP"))
    add("zero.png", b"")
    add("text.png", b"hello, not an image\n")
    add("zip.png", b"PK\x03\x04" + bytes(60))
    add("html.jpg", b"<html><img src='http://127.0.0.1/'></html>")
    # Not regular files.
    fifo = root / "fifo.png"
    os.mkfifo(fifo)
    items.append((fifo, BOTH))
    d = root / "dir.png"
    d.mkdir()
    items.append((d, BOTH))
    link = root / "link_to_fifo.png"
    link.symlink_to(fifo)
    items.append((link, BOTH))
    items.append((Path("/dev/zero"), BOTH))
    items.append((root / "missing.png", BOTH))
    items.append((Path(http), UNTRUSTED))
    items.append((Path("/vsimem/x.png"), UNTRUSTED))
    return items


# ----------------------------------------------------------------------------- worker
_WORKER = r"""
import importlib.util, json, os, signal, sys, time, types
# Import uhrbat.io without the package __init__ (which loads torch): a lighter parent forks faster.
_pkg = types.ModuleType("uhrbat")
_pkg.__path__ = list(importlib.util.find_spec("uhrbat").submodule_search_locations)
sys.modules["uhrbat"] = _pkg
from uhrbat.errors import ImageLoadError
from uhrbat.io import open_image
try:  # load GDAL, register its drivers and import the raster reader once, before forking
    import rasterio
    import uhrbat.io.raster
    with rasterio.Env():
        pass
except ImportError:
    pass

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0

timeout, sides = float(sys.argv[1]), [int(x) for x in sys.argv[2].split(",")]
for line in sys.stdin:
    path, trust = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        signal.alarm(int(timeout) + 1)
        base = status("VmRSS")
        t = time.time()
        try:
            src = open_image(path, trust=trust)
            for side in sides:
                src.square(side)
            res = {"status": "ok", "message": ""}
        except ImageLoadError as e:
            res = {"status": "error", "message": str(e)}
        except BaseException as e:
            res = {"status": "crash", "message": f"{type(e).__name__}: {e}"}
        res.update(peak_mb=status("VmHWM") - base, seconds=time.time() - t)
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    t0 = time.time()
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() - t0 > timeout + 3:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    with os.fdopen(r, "rb") as f:
        raw = f.read()
    res = json.loads(raw) if raw else {"status": "timeout", "message": "", "peak_mb": 0.0,
                                       "seconds": time.time() - t0}
    res.update(path=path, trust=trust)
    print(json.dumps(res), flush=True)
"""


def run_worker(
    items: list[tuple[Path, str]], *, timeout: float = 20.0, side: int | tuple[int, ...] = 336
) -> list[dict]:
    """Open every (path, trust) in its own forked child and build its square(s) of `side`;
    see the module docstring."""
    sides = ",".join(str(s) for s in ((side,) if isinstance(side, int) else side))
    lines = "".join(json.dumps([str(p), t]) + "\n" for p, t in items)
    env = dict(os.environ, OMP_NUM_THREADS="1", GDAL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(timeout), sides],
        input=lines,
        text=True,
        check=False,
        capture_output=True,
        env=env,
        timeout=timeout * len(items) + 60,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fuzz worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
