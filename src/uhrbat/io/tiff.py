"""`check_tiff_layout(path)`: refuse a TIFF whose strip / tile table is inconsistent, before
any decoder sees it (issue 18: a 100 x 1,000,000 TIFF whose one strip pointed into its own
header was decoded as garbage after 8 s and 1.5 GB).

Every IFD of the main chain (the full-resolution image, its overviews and internal masks) is
read from its entries alone, with numpy, and checked:

* the strip / tile count matches the image (`ceil(H / RowsPerStrip)` strips or
  `ceil(W / TileWidth) x ceil(H / TileLength)` tiles, times the samples when planar);
* every block that holds data (`bytes > 0`) lies inside the file and after the header, and
  overlaps no IFD's entry table (sparse blocks, offset 0 and 0 bytes, are allowed: GDAL writes
  them for empty areas);
* uncompressed blocks hold at least the bytes their pixels need.

Tables are read only when their size is plausible (the file must be able to hold them, and at
most `MAX_BLOCKS` entries), so the check costs O(table) time and memory, never O(pixels).
This reads raw IFD entries on purpose: a general TIFF library (Pillow, tifffile) interprets or
repairs exactly the fields this check must see as written.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np

from uhrbat.errors import ImageLoadError

#: More strip / tile entries than this in one IFD is refused (32 MB of uint64 offsets).
MAX_BLOCKS = 1 << 22
#: IFDs walked in the main chain (a COG has one per overview level and mask); more is refused.
MAX_IFDS = 256
_MAX_ENTRIES = 4096
# TIFF field types -> (numpy dtype char, size); only the integer types tables use.
_TYPES = {1: ("u1", 1), 3: ("u2", 2), 4: ("u4", 4), 13: ("u4", 4), 16: ("u8", 8), 8: ("i2", 2), 9: ("i4", 4)}
_WIDTH, _HEIGHT, _BPS, _COMPRESSION, _STRIP_OFFSETS, _SPP, _ROWS, _STRIP_BYTES = 256, 257, 258, 259, 273, 277, 278, 279
_PLANAR, _TILE_W, _TILE_H, _TILE_OFFSETS, _TILE_BYTES = 284, 322, 323, 324, 325


class TiffLayoutError(ImageLoadError):
    """A TIFF's structure (IFD chain, strip / tile tables) is inconsistent."""


class _Reader:
    def __init__(self, f, size: int, endian: str, big: bool) -> None:
        self.f, self.size, self.e, self.big = f, size, endian, big

    def read(self, off: int, n: int) -> bytes:
        if off < 0 or off + n > self.size:
            raise TiffLayoutError(f"points past the end of the file (offset {off:,}, {n:,} bytes)")
        self.f.seek(off)
        b = self.f.read(n)
        if len(b) != n:
            raise TiffLayoutError(f"is truncated at offset {off:,}")
        return b

    def unpack(self, fmt: str, off: int) -> tuple:
        return struct.unpack(self.e + fmt, self.read(off, struct.calcsize(self.e + fmt)))


def _ifd(r: _Reader, off: int) -> tuple[dict[int, tuple[int, int, bytes, int]], int, tuple[int, int]]:
    """Entries `{tag: (type, count, inline value bytes, value-field offset)}`, next IFD, span."""
    n_fmt, entry, ptr = ("Q", 20, "Q") if r.big else ("H", 12, "I")
    (n,) = r.unpack(n_fmt, off)
    if n == 0 or n > _MAX_ENTRIES:
        raise TiffLayoutError(f"has an IFD with {n:,} entries at offset {off:,}")
    head = struct.calcsize(r.e + n_fmt)
    raw = r.read(off + head, n * entry)
    entries = {}
    for i in range(n):
        e = raw[i * entry : (i + 1) * entry]
        tag, typ = struct.unpack(r.e + "HH", e[:4])
        count = struct.unpack(r.e + ("Q" if r.big else "I"), e[4 : 12 if r.big else 8])[0]
        entries.setdefault(tag, (typ, count, e[12:] if r.big else e[8:], off + head + i * entry))
    end = off + head + n * entry
    (nxt,) = r.unpack(ptr, end)
    return entries, nxt, (off, end + struct.calcsize(r.e + ptr))


def _values(r: _Reader, entries: dict, tag: int, limit: int = MAX_BLOCKS) -> np.ndarray | None:
    if tag not in entries:
        return None
    typ, count, inline, _ = entries[tag]
    if typ not in _TYPES:
        raise TiffLayoutError(f"stores tag {tag} with field type {typ}, not an integer type")
    dt, size = _TYPES[typ]
    if count > limit or count * size > r.size:
        raise TiffLayoutError(f"declares {count:,} values for tag {tag}, more than the file can hold")
    nbytes = count * size
    if nbytes <= len(inline):
        data = inline[:nbytes]
    else:
        (off,) = struct.unpack(r.e + ("Q" if r.big else "I"), inline[: 8 if r.big else 4])
        data = r.read(off, nbytes)
    return np.frombuffer(data, dtype=np.dtype(dt).newbyteorder(r.e)).astype(np.int64)


def _scalar(r: _Reader, entries: dict, tag: int, default: int | None) -> int | None:
    v = _values(r, entries, tag, limit=64)
    return default if v is None or v.size == 0 else int(v[0])


def check_tiff_layout(path: str | os.PathLike, *, strict: bool = True) -> None:
    """Raise `TiffLayoutError` (an `ImageLoadError`) when the TIFF at `path` is inconsistent;
    see the module docstring. `strict` (untrusted input) also refuses IFDs without a byte-count
    table (old writers; libtiff estimates them) and chains of more than `MAX_IFDS` IFDs; local
    files are checked on their first `MAX_IFDS` IFDs (a long multi-page stack stays readable)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _check(f, size, strict)
    except TiffLayoutError as e:
        raise TiffLayoutError(f"corrupt or unreadable image {p}: inconsistent TIFF structure: it {e}") from None
    except OSError as e:
        raise ImageLoadError(f"cannot read image {p}: {e.strerror or e}") from None


def _check(f, size: int, strict: bool) -> None:
    head = f.read(16)
    if head[:2] not in (b"II", b"MM") or len(head) < 8:
        raise TiffLayoutError("has no TIFF header")
    e = "<" if head[:2] == b"II" else ">"
    (magic,) = struct.unpack(e + "H", head[2:4])
    big = magic == 43
    if magic not in (42, 43) or (big and len(head) < 16):
        raise TiffLayoutError("has no TIFF header")
    r = _Reader(f, size, e, big)
    header_end = 16 if big else 8
    off = struct.unpack(e + "Q", head[8:16])[0] if big else struct.unpack(e + "I", head[4:8])[0]
    seen: set[int] = set()
    ifds = []
    while off:
        if off in seen:
            raise TiffLayoutError(f"has an IFD chain that loops (offset {off:,})")
        if len(seen) >= MAX_IFDS:
            if strict:
                raise TiffLayoutError(f"has more than {MAX_IFDS} IFDs")
            break
        seen.add(off)
        if off < header_end:
            raise TiffLayoutError(f"has an IFD inside its header (offset {off})")
        entries, off, span = _ifd(r, off)
        ifds.append((entries, span))
    if not ifds:
        raise TiffLayoutError("has no IFD")
    spans = [span for _, span in ifds]
    for k, (entries, _) in enumerate(ifds):
        _check_ifd(r, entries, k, header_end, spans, strict)


def _check_ifd(r: _Reader, entries: dict, k: int, header_end: int, spans: list, require_byte_counts: bool) -> None:
    where = "its first image" if k == 0 else f"IFD {k}"
    w, h = _scalar(r, entries, _WIDTH, None), _scalar(r, entries, _HEIGHT, None)
    if not w or not h or w < 0 or h < 0:
        raise TiffLayoutError(f"gives {where} no width / height")
    spp = _scalar(r, entries, _SPP, 1) or 1
    bps = _values(r, entries, _BPS, limit=1 << 16)
    bits = [int(b) for b in bps] if bps is not None and bps.size else [1]
    if len(bits) == 1:
        bits = bits * spp
    planar = _scalar(r, entries, _PLANAR, 1) == 2
    compression = _scalar(r, entries, _COMPRESSION, 1)
    planes = spp if planar else 1
    if _TILE_W in entries or _TILE_OFFSETS in entries:
        tw, th = _scalar(r, entries, _TILE_W, 0), _scalar(r, entries, _TILE_H, 0)
        if not tw or not th or tw < 0 or th < 0:
            raise TiffLayoutError(f"gives {where} tile offsets without a tile size")
        across, down = math.ceil(w / tw), math.ceil(h / th)
        n_blocks = across * down * planes
        offsets_tag, counts_tag, kind = _TILE_OFFSETS, _TILE_BYTES, "tile"
        rows_of = np.full(n_blocks, th, np.int64) if n_blocks <= MAX_BLOCKS else None
        width = tw
    else:
        rps = _scalar(r, entries, _ROWS, h) or h
        rps = min(rps if rps > 0 else h, h)
        down = math.ceil(h / rps)
        n_blocks = down * planes
        offsets_tag, counts_tag, kind = _STRIP_OFFSETS, _STRIP_BYTES, "strip"
        rows_of = None
        if n_blocks <= MAX_BLOCKS:
            rows_of = np.full(down, rps, np.int64)
            rows_of[-1] = h - rps * (down - 1)
            rows_of = np.tile(rows_of, planes)
        width = w
    if n_blocks > MAX_BLOCKS:
        raise TiffLayoutError(f"splits {where} into {n_blocks:,} {kind}s (more than {MAX_BLOCKS:,})")
    offsets = _values(r, entries, offsets_tag)
    if offsets is None:
        raise TiffLayoutError(f"has no {kind} offsets for {where}")
    if offsets.size != n_blocks:
        raise TiffLayoutError(
            f"declares {offsets.size:,} {kind} offset(s) for {where}, but its {w:,} x {h:,} pixels need {n_blocks:,}"
        )
    counts = _values(r, entries, counts_tag)
    if counts is None:
        if require_byte_counts:
            raise TiffLayoutError(f"has no {kind} byte counts for {where}")
        return
    if counts.size != n_blocks:
        raise TiffLayoutError(f"declares {counts.size:,} {kind} byte count(s) for {where}, but {n_blocks:,} offsets")
    data = counts > 0
    if (offsets[data] < header_end).any():
        i = int(np.flatnonzero(data & (offsets < header_end))[0])
        raise TiffLayoutError(f"points {kind} {i} of {where} into its header (offset {int(offsets[i])})")
    ends = offsets + counts
    if (ends[data] > r.size).any() or (offsets[data] < 0).any():
        i = int(np.flatnonzero(data & ((ends > r.size) | (offsets < 0)))[0])
        raise TiffLayoutError(
            f"points {kind} {i} of {where} past the end of the file ({int(offsets[i]):,} + {int(counts[i]):,} bytes "
            f"in a {r.size:,}-byte file)"
        )
    for s0, s1 in spans:
        hit = data & (offsets < s1) & (ends > s0)
        if hit.any():
            i = int(np.flatnonzero(hit)[0])
            raise TiffLayoutError(f"points {kind} {i} of {where} into an IFD (offset {int(offsets[i]):,})")
    if compression == 1 and rows_of is not None:
        bits_per_px = sum(bits[:1]) if planar else sum(bits)
        need = rows_of * math.ceil(width * bits_per_px / 8)
        short = data & (counts < need)
        if short.any():
            i = int(np.flatnonzero(short)[0])
            raise TiffLayoutError(
                f"stores {int(counts[i]):,} bytes in uncompressed {kind} {i} of {where}, whose pixels need "
                f"{int(need[i]):,}"
            )


__all__ = ["MAX_BLOCKS", "TiffLayoutError", "check_tiff_layout"]
