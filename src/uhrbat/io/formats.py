"""File checks and header-only format facts, read without decoding a single pixel.

* `check_file(path)`: the path exists, is a *regular* file and is readable (a FIFO, device,
  socket or directory is refused at once, never opened: opening a FIFO would block forever);
* `sniff(head)`: the format from the magic bytes (`"png"`, `"jpeg"`, `"tiff"`, `"jp2"`, ...);
  `UNTRUSTED_FORMATS` is the allow-list for untrusted input (see `uhrbat.io.sources`);
* `png_header(f)`: size, interlace and the EXIF orientation of a PNG from its chunk headers
  (IDAT payloads are skipped with `seek`, never inflated). Pillow's `getexif()` would decode
  the whole image for PNG, which is exactly what a header read must not do;
* `jpeg_is_progressive(f)`: progressive JPEGs buffer every DCT coefficient even in a reduced
  (draft) decode, so big ones are refused rather than decoded.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from uhrbat.errors import ImageLoadError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Formats accepted from untrusted input, decided from the magic bytes. Each has one decoder
#: that never reads another file: Pillow's PNG / JPEG / TIFF plugins and GDAL's PNG / GTiff
#: drivers. JPEG2000, WebP, GIF, BMP, VRT and everything else GDAL knows are local-only.
UNTRUSTED_FORMATS = ("png", "jpeg", "tiff")
#: Pillow plugin names and GDAL driver names allowed per untrusted format.
PIL_FORMATS = {"png": ("PNG",), "jpeg": ("JPEG", "MPO"), "tiff": ("TIFF",)}
GDAL_DRIVERS = {"png": ("PNG",), "jpeg": ("JPEG",), "tiff": ("GTiff",)}
#: A canonical suffix per format, for temporary copies of uploaded bytes.
SUFFIX = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif"}
_MAX_PNG_CHUNKS = 100_000


def check_file(path: str | os.PathLike, what: str = "image") -> Path:
    """The path as `Path`, after checking it names an existing, readable, regular file."""
    p = Path(path)
    if "\x00" in os.fspath(p):
        raise ImageLoadError(f"{what} path contains a NUL byte, which no file name can: {os.fspath(p)!r}")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ImageLoadError(f"{what} not found: {p}") from None
    except (OSError, ValueError) as e:  # ValueError: a path the OS cannot take (too long, ...)
        raise ImageLoadError(f"cannot access {what} {p}: {getattr(e, 'strerror', None) or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(f"{what} path is a directory, not a file: {p}")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise ImageLoadError(f"{what} path is {kind}, not a regular file: {p}; give the path of an image file")
    if not os.access(p, os.R_OK):
        raise ImageLoadError(f"{what} is not readable (permission denied): {p}")
    return p


def read_head(p: Path, n: int = 32) -> bytes:
    """The first `n` bytes of a regular file (non-blocking open: a FIFO swapped in cannot hang us)."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ImageLoadError(f"cannot read image {p}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageLoadError(f"image path is not a regular file: {p}")
        return os.read(fd, n)
    except OSError as e:
        raise ImageLoadError(f"cannot read image {p}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def sniff(head: bytes) -> str | None:
    """Format name from the first bytes of a file, or None when unknown."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "jp2"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    return None


def describe_head(head: bytes) -> str:
    """A short human name for an unrecognised or refused file, from its first bytes."""
    kind = sniff(head)
    if kind is not None:
        return {"jp2": "JPEG 2000", "webp": "WebP", "gif": "GIF", "bmp": "BMP"}.get(kind, kind.upper())
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<"):  # <VRTDataset ...>, <?xml ...>, HTML
        return "XML/text (e.g. a GDAL VRT)"
    if not head:
        return "an empty file"
    return "an unknown format"


def png_header(f: BinaryIO) -> tuple[tuple[int, int], bool, int]:
    """((width, height), interlaced, exif_orientation) of a PNG, from chunk headers only.

    Walks the chunk list with `seek` (no inflate): the eXIf chunk may come after IDAT, where
    Pillow only finds it by decoding the image.
    """
    f.seek(0)
    if f.read(8) != PNG_MAGIC:
        raise ValueError("not a PNG signature")
    hdr = f.read(8)
    if len(hdr) < 8 or hdr[4:8] != b"IHDR":
        raise ValueError("PNG without an IHDR chunk")
    ihdr = f.read(13)
    if len(ihdr) < 13:
        raise ValueError("truncated PNG header")
    w, h = struct.unpack(">II", ihdr[:8])
    interlaced = ihdr[12] == 1
    f.seek(4, os.SEEK_CUR)  # CRC
    orientation = 1
    for _ in range(_MAX_PNG_CHUNKS):
        hdr = f.read(8)
        if len(hdr) < 8:
            break
        n, typ = struct.unpack(">I", hdr[:4])[0], hdr[4:8]
        if typ == b"IEND":
            break
        if typ == b"eXIf" and n <= 1 << 20:
            data = f.read(n)
            exif = Image.Exif()
            try:
                exif.load(data)
                orientation = int(exif.get(0x0112, 1) or 1)
            except (ValueError, KeyError, TypeError, SyntaxError, OSError, struct.error):  # malformed eXIf
                orientation = 1
            f.seek(4, os.SEEK_CUR)
            continue
        f.seek(n + 4, os.SEEK_CUR)
    return (w, h), interlaced, orientation


def png_ends_with_iend(f: BinaryIO) -> bool:
    """Does the PNG's chunk list reach IEND with every chunk inside the file (no inflate)?
    A cheap truncation check; files with more than 100,000 chunks are assumed complete."""
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if f.read(8) != PNG_MAGIC:
        raise ValueError("not a PNG signature")
    pos = 8
    for _ in range(_MAX_PNG_CHUNKS):
        f.seek(pos)
        hdr = f.read(8)
        if len(hdr) < 8:
            return False
        n = struct.unpack(">I", hdr[:4])[0]
        pos += 12 + n
        if pos > size:
            return False
        if hdr[4:8] == b"IEND":
            return True
    return True


def jpeg_is_progressive(f: BinaryIO, max_bytes: int = 1 << 22) -> bool:
    """True when the first frame header (SOFn) of a JPEG is progressive (SOF2/6/10/14)."""
    f.seek(2)
    end = max_bytes
    while f.tell() < end:
        b = f.read(1)
        if not b:
            return False
        if b != b"\xff":
            continue
        m = f.read(1)
        while m == b"\xff":
            m = f.read(1)
        if not m:
            return False
        marker = m[0]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xC0, 0xC1, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCD, 0xCF):
            return False
        if marker in (0xC2, 0xC6, 0xCA, 0xCE):
            return True
        ln = f.read(2)
        if len(ln) < 2:
            return False
        f.seek(struct.unpack(">H", ln)[0] - 2, os.SEEK_CUR)
    return False


__all__ = [
    "UNTRUSTED_FORMATS",
    "check_file",
    "describe_head",
    "jpeg_is_progressive",
    "png_ends_with_iend",
    "png_header",
    "read_head",
    "sniff",
]
