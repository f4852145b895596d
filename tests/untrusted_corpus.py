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


def small_geotiff(path: Path, rng: np.random.Generator, dtype: str, *, overviews=(), **profile) -> Path:
    """A 48 x 40 3-band random GeoTIFF (`profile`: crs, transform, tiling, compression ...)."""
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=48, height=40, count=3, dtype=dtype, **profile) as ds:
        ds.write(rng.integers(0, 255, (3, 40, 48)).astype(dtype))
        if overviews:
            ds.build_overviews(list(overviews))
    return path


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
        from rasterio.transform import from_origin

        for name, kw in (
            ("geo.tif", {"tiled": True, "blockxsize": 16, "blockysize": 16}),
            ("big.tif", {"BIGTIFF": "YES"}),
            ("f32.tif", {}),
        ):
            dtype = "float32" if name == "f32.tif" else "uint8"
            small_geotiff(
                root / name, rng, dtype, crs="EPSG:32633", transform=from_origin(500000, 6000000, 10, 10), **kw
            )
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


# ----------------------------------------------------------------------------- structured fuzz
_TIFF_TYPES = {1: "B", 2: "B", 3: "H", 4: "I", 5: "II", 7: "B", 11: "f", 12: "d", 16: "Q"}


def tiff_bytes(entries: list[tuple[int, int, list]], data: bytes = b"", *, big: bool = False) -> bytes:
    """A little-endian TIFF (or BigTIFF) with one IFD of `entries` `(tag, type, values)`, values
    stored inline or after the IFD, then `data` (strip / tile offsets are the caller's: often
    deliberately wrong)."""
    n = len(entries)
    head, entry, cnt_fmt, off_fmt, inline = (16, 20, "Q", "Q", 8) if big else (8, 12, "I", "I", 4)
    ifd_size = (8 if big else 2) + n * entry + (8 if big else 4)
    extra = bytearray()
    body = bytearray()
    out_of_line_base = head + ifd_size
    packed = []
    for tag, typ, values in sorted(entries, key=lambda e: e[0]):
        fmt = _TIFF_TYPES.get(typ, "B")
        vals = [v if isinstance(v, tuple) else (v, 1) if fmt == "II" else (v,) for v in values]
        raw = b"".join(struct.pack("<" + fmt, *v) for v in vals)
        packed.append((tag, typ, len(values), raw))
    for tag, typ, count, raw in packed:
        if len(raw) <= inline:
            val = raw.ljust(inline, b"\x00")
        else:
            val = struct.pack("<" + off_fmt, out_of_line_base + len(extra))
            extra += raw + (b"\x00" if len(raw) & 1 else b"")
        body += struct.pack("<HH" + cnt_fmt, tag, typ, count) + val
    magic = b"II+\x00" + struct.pack("<HHQ", 8, 0, head) if big else b"II*\x00" + struct.pack("<I", head)
    ifd = struct.pack("<" + ("Q" if big else "H"), n) + bytes(body) + struct.pack("<" + off_fmt, 0)
    return magic + ifd + bytes(extra) + data


def _fuzz_tiff(rng: np.random.Generator) -> bytes:
    """A small TIFF whose every structural tag may be valid, odd or hostile (incl. GeoTIFF tags)."""

    def pick(options: list, p_random: float = 0.15, hi: int = 1 << 32) -> int:
        return int(rng.integers(0, hi)) if rng.random() < p_random else options[int(rng.integers(len(options)))]

    w = pick([1, 2, 7, 64, 100, 257, 40000, 1 << 20], hi=1 << 31)
    h = pick([1, 3, 64, 100, 1_000_000, 1 << 24], hi=1 << 31)
    spp = pick([1, 1, 3, 3, 4, 2, 5, 0, 65535], hi=1 << 16)
    bps = pick([8, 8, 16, 1, 4, 32, 64, 12, 0], hi=1 << 16)
    comp = pick([1, 1, 5, 8, 32773, 7, 6, 34887, 50000, 0])
    photo = pick([1, 2, 0, 3, 5, 6, 4, 32844])
    planar = pick([1, 1, 2, 3])
    fmt = pick([1, 1, 2, 3, 4])
    data = bytes(rng.integers(0, 256, int(rng.integers(0, 2048)), dtype=np.uint8))
    tiled = rng.random() < 0.3
    n_blocks = pick([1, 1, 2, 4, 0, 100], p_random=0.05, hi=5000)
    offs = [pick([-1, 0, 8, 3, 1 << 30], p_random=0.3, hi=4096) for _ in range(n_blocks)]
    base = 400  # roughly after the IFD; -1 -> "at the data"
    offs = [base if o == -1 else o for o in offs]
    counts = [pick([len(data), 0, 64, w * h, 1 << 31], p_random=0.3) for _ in range(n_blocks)]
    entries = [
        (256, 4, [w & 0xFFFFFFFF]),
        (257, 4, [h & 0xFFFFFFFF]),
        (258, 3, [bps & 0xFFFF] * max(1, min(spp, 8))),
        (259, 3, [comp & 0xFFFF]),
        (262, 3, [photo & 0xFFFF]),
        (277, 3, [spp & 0xFFFF]),
        (284, 3, [planar & 0xFFFF]),
        (339, 3, [fmt & 0xFFFF] * max(1, min(spp, 8))),
    ]
    if tiled:
        tw = pick([16, 256, 512, 0, 17, 1 << 16], hi=1 << 20)
        entries += [(322, 4, [tw]), (323, 4, [pick([16, 256, 0, 1 << 16], hi=1 << 20)])]
        entries += [(324, 4, [o & 0xFFFFFFFF for o in offs]), (325, 4, [c & 0xFFFFFFFF for c in counts])]
    else:
        entries += [(278, 4, [pick([1, h, 16, 0, 1 << 31], hi=1 << 32) & 0xFFFFFFFF])]
        entries += [(273, 4, [o & 0xFFFFFFFF for o in offs]), (279, 4, [c & 0xFFFFFFFF for c in counts])]
    if photo == 3 or rng.random() < 0.1:  # a colour map, maybe of the wrong length
        entries.append((320, 3, [int(v) for v in rng.integers(0, 65536, pick([768, 3, 0, 48], hi=2000))] or [0]))
    if rng.random() < 0.5:  # GeoTIFF: scale / tiepoint / matrix / keys, some non-finite
        special = [float("nan"), float("inf"), -float("inf"), 0.0, 1e308, -1e-308]

        def dbl() -> float:
            return special[int(rng.integers(len(special)))] if rng.random() < 0.4 else float(rng.normal(0, 1e5))

        entries.append((33550, 12, [dbl(), dbl(), 0.0]))
        entries.append((33922, 12, [0.0, 0.0, 0.0, dbl(), dbl(), 0.0]))
        if rng.random() < 0.3:
            entries.append((34264, 12, [dbl() for _ in range(16)]))
        crs = pick([32617, 4326, 3857, 32767, 0, 65535, 2000, 9999])
        keys = [1, 1, 0, 3, 1024, 0, 1, pick([1, 2, 3, 32767]), 3072, 0, 1, crs, 2048, 0, 1, crs]
        entries.append((34735, 3, [k & 0xFFFF for k in keys]))
    if rng.random() < 0.15:  # duplicate or unknown tags
        entries.append((int(rng.integers(256, 65535)), int(rng.choice([1, 3, 4, 5, 11, 12, 16, 99])), [1]))
    big = rng.random() < 0.15
    if rng.random() < 0.5:  # consistent layout: one strip holding exactly its bytes, so decoders run
        w, h, spp = int(rng.integers(1, 65)), int(rng.integers(1, 65)), int(rng.choice([1, 3, 4]))
        bps = int(rng.choice([8, 8, 16, 32, 1, 4]))
        comp = int(rng.choice([1, 1, 8, 5, 32773]))
        raw = bytes(rng.integers(0, 256, (w * spp * bps + 7) // 8 * h, dtype=np.uint8))
        data = zlib.compress(raw) if comp == 8 else raw if comp == 1 else raw[: int(rng.integers(1, len(raw) + 1))]
        keep = {256: [w], 257: [h], 258: [bps] * spp, 259: [comp], 277: [spp], 278: [h], 284: [1]}
        entries = [e for e in entries if e[0] not in keep and e[0] not in (273, 279, 322, 323, 324, 325)]
        entries += [(t, 4 if t in (256, 257, 278) else 3, v) for t, v in keep.items()]
        entries += [(273, 4, [0]), (279, 4, [len(data)])]
        entries = [(t, ty if ty in _TIFF_TYPES else 1, v) for t, ty, v in entries]
        head = tiff_bytes(entries, b"", big=big)
        entries = [(t, ty, [len(head)] if t == 273 else v) for t, ty, v in entries]
        return tiff_bytes(entries, data, big=big)
    rng.shuffle(entries)
    return tiff_bytes([(t, ty if ty in _TIFF_TYPES else 1, v) for t, ty, v in entries], data, big=big)


def _fuzz_png(rng: np.random.Generator) -> bytes:
    """A PNG with a random IHDR (depth / colour type combinations, sizes, interlace), optional
    PLTE / tRNS / eXIf chunks, zlib or raw IDAT, and broken CRCs or lengths now and then."""
    consistent = rng.random() < 0.5  # a valid header and exact rows: the decoders run to the end
    if consistent:
        color, depth = [(0, 1), (0, 8), (0, 16), (2, 8), (2, 16), (3, 8), (3, 4), (4, 8), (4, 16), (6, 8), (6, 16)][
            int(rng.integers(11))
        ]
        w, h, interlace = int(rng.integers(1, 200)), int(rng.integers(1, 200)), 0
    else:
        w = int(rng.choice([1, 2, 3, 17, 64, 255, 1 << 16, 1 << 31, 0]))
        h = int(rng.choice([1, 2, 5, 64, 300, 100_000, 1 << 31, 0]))
        depth = int(rng.choice([1, 2, 4, 8, 8, 16, 3, 0]))
        color = int(rng.choice([0, 2, 3, 4, 6, 6, 1, 5]))
        interlace = int(rng.choice([0, 0, 1, 2]))
    ihdr = struct.pack(
        ">IIBBBBB", w & 0xFFFFFFFF, h & 0xFFFFFFFF, depth, color, 0, int(rng.choice([0, 0, 1])), interlace
    )
    chunks = [_chunk(b"IHDR", ihdr)]
    if color == 3 or rng.random() < 0.1:
        chunks.append(
            _chunk(b"PLTE", bytes(rng.integers(0, 256, 3 * int(rng.choice([1, 16, 256, 300])), dtype=np.uint8)))
        )
    if rng.random() < 0.2:
        chunks.append(_chunk(b"tRNS", bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))))
    if rng.random() < 0.2:
        chunks.append(
            _chunk(b"eXIf", b"II*\x00" + bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8)))
        )
    if consistent:
        ch = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
        rows, row_len = h, (w * ch * depth + 7) // 8 + 1
        raw = bytearray(rng.integers(0, 256, rows * row_len, dtype=np.uint8).tobytes())
        raw[::row_len] = bytes(rng.integers(0, 5, rows, dtype=np.uint8))  # valid filter types
        raw = bytes(raw)
    else:
        rows = min(max(h, 1), 64)
        row_len = min(max(1, (min(max(w, 1), 4096) * max(depth, 1) * 4 + 7) // 8) + 1, 1 << 14)
        raw = (
            bytes(rng.integers(0, 256, rows * row_len, dtype=np.uint8)) if rng.random() < 0.5 else bytes(rows * row_len)
        )
    payload = zlib.compress(raw) if consistent or rng.random() < 0.8 else raw
    if not consistent and rng.random() < 0.2:
        payload = payload[: int(rng.integers(0, max(1, len(payload))))]
    chunks.append(_chunk(b"IDAT", payload))
    if consistent or rng.random() < 0.85:
        chunks.append(_chunk(b"IEND", b""))
    out = bytearray(b"\x89PNG\r\n\x1a\n" + b"".join(chunks))
    for _ in range(0 if consistent else int(rng.choice([0, 0, 1, 3]))):  # break a CRC or a length
        pos = int(rng.integers(8, len(out)))
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _fuzz_jpeg(rng: np.random.Generator, base: bytes, progressive: bytes) -> bytes:
    """A JPEG with a lying frame size, damaged tables / scan data, or a truncated scan."""
    data = bytearray(progressive if rng.random() < 0.3 else base)
    if rng.random() < 0.5:
        data = bytearray(
            jpeg_with_size(
                bytes(data), int(rng.choice([1, 7, 65535, 30000, 0])), int(rng.choice([1, 9, 65535, 20000, 0]))
            )
        )
    kind = rng.random()
    if kind < 0.4:  # damage inside the first 600 bytes (quantisation / Huffman tables, frame header)
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(2, min(len(data), 600)))
            data[pos] = int(rng.integers(0, 256))
    elif kind < 0.7:
        data = data[: int(rng.integers(2, len(data)))]
    else:
        pos = int(rng.integers(2, len(data)))
        data[pos:pos] = (
            b"\xff"
            + bytes([int(rng.choice([0xC0, 0xC2, 0xC4, 0xDB, 0xDA, 0xD9, 0xE1, 0xDD]))])
            + bytes(rng.integers(0, 256, int(rng.integers(0, 40)), dtype=np.uint8))
        )
    return bytes(data)


def make_fuzz_cases(root: Path, seed: int, n: int = 1200) -> list[tuple[Path, str]]:
    """`n` generated hostile files under `root` (deterministic for a `seed`), as `(path, family)`:
    structured TIFF / GeoTIFF tag fuzz, PNG header / chunk fuzz, JPEG marker / size fuzz, and
    byte-level mutants of real GeoTIFFs (tiled, striped, float, with overviews). Every one must
    open or raise a typed error through the untrusted reader (tests/test_untrusted_fuzz.py,
    benchmarks/untrusted_fuzz.py)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    base_jpg = _save(_noise(96, 64, rng), "JPEG", quality=85)
    prog_jpg = _save(_noise(96, 64, rng), "JPEG", quality=85, progressive=True)
    geo_bases: list[bytes] = []
    try:
        from rasterio.transform import from_origin

        for i, (dtype, kw) in enumerate(
            (
                ("uint8", {"tiled": True, "blockxsize": 16, "blockysize": 16, "compress": "deflate"}),
                ("uint16", {"compress": "lzw"}),
                ("float32", {"tiled": True, "blockxsize": 32, "blockysize": 32}),
                ("uint8", {"nodata": 0}),
            )
        ):
            p = root / f"_base{i}.tif"
            tr = from_origin(404000, 3290000, 0.5, 0.5)
            small_geotiff(p, rng, dtype, crs="EPSG:32617", transform=tr, overviews=(2, 4) if i == 0 else (), **kw)
            geo_bases.append(p.read_bytes())
            p.unlink()
    except ImportError:
        pass
    cases = []
    for i in range(n):
        family = ["tiff", "png", "jpeg", "geotiff"][i % 4] if geo_bases else ["tiff", "png", "jpeg"][i % 3]
        if family == "tiff":
            data, ext = _fuzz_tiff(rng), ".tif"
        elif family == "png":
            data, ext = _fuzz_png(rng), ".png"
        elif family == "jpeg":
            data, ext = _fuzz_jpeg(rng, base_jpg, prog_jpg), ".jpg"
        else:
            b = bytearray(geo_bases[i // 4 % len(geo_bases)])
            for _ in range(int(rng.integers(1, 10))):  # the header / IFDs / GeoTIFF tags: the first ~1 KB
                pos = int(rng.integers(0, min(len(b), 1200)))
                b[pos] = int(rng.integers(0, 256)) if rng.random() < 0.5 else b[pos] ^ (1 << int(rng.integers(0, 8)))
            data, ext = bytes(b), ".tif"
        p = root / f"f{i:05d}_{family}{ext}"
        p.write_bytes(data)
        cases.append((p, family))
    return cases


# ----------------------------------------------------------------------------- worker
_WORKER = r"""
import importlib.util, json, os, signal, sys, time, types
# Import uhrbat.io without the package __init__ (which loads torch): a lighter parent forks faster.
_pkg = types.ModuleType("uhrbat")
_pkg.__path__ = list(importlib.util.find_spec("uhrbat").submodule_search_locations)
sys.modules["uhrbat"] = _pkg
from uhrbat.errors import UhrBatError
from uhrbat.io import open_image
from uhrbat.io.geo import kept_tokens_document, tokens_with_boxes

class _Tok:  # a kept token at the square's centre tile, for the georeference outputs
    scale, tile, row, col, group, score, merged, members = 672, 0, 23, 23, 0, 0.5, False, []
    def to_dict(self):
        return {"scale": 672}
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
            # Georeference outputs (issue 18 items 1 and 6): typed errors or strict JSON only.
            doc, _ = kept_tokens_document([_Tok()], src)
            json.dumps([doc, tokens_with_boxes([_Tok()], src)], allow_nan=False)
            res = {"status": "ok", "message": ""}
        except UhrBatError as e:
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
