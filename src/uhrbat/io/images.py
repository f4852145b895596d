"""Pillow-side image sources and the geometry every source shares.

An *image source* has `.size` -> (width, height) of the original image and
`.square(side) -> PIL.Image` giving the image padded to a centred square with the CLIP mean
colour and resized to `side x side` RGB, exactly as the reference does it (§2.2).

This module holds the sources decoded by Pillow (`PILSource`: in memory, bit-exact with the
reference; `JPEGDraftSource`: a DCT-reduced decode of a large JPEG), the padding / reduced
geometry helpers and the value conversion (band selection, high-bit stretch). The reader that
picks a source for a path or bytes is `uhrbat.io.sources.open_image` (exported as
`uhrbat.io.open_image`); GDAL rasters are `uhrbat.io.raster.RasterSource`.

Geometry is the same for every source: the image is placed on a `max(W, H)` square at
`((L - W) // 2, (L - H) // 2)` and the square is resampled to `side`. Only images whose padded
square exceeds `exact_max_pixels` (or, for elongated images, `EXACT_PAD_RATIO` x the image and
`REDUCED_CANVAS_PIXELS`) are resampled from a reduced intermediate (>= `oversample` x the
target), which changes pixel values slightly but never the geometry.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from uhrbat.errors import ImageLoadError
from uhrbat.io.formats import check_file

PAD_RGB = (122, 116, 104)  # tuple(int(m * 255)) of the CLIP mean, as in the reference

#: Refuse inputs with more full-resolution pixels than this (decompression-bomb guard).
DEFAULT_MAX_PIXELS = 1_500_000_000
#: Images whose padded square has at most this many pixels are resampled exactly like the
#: reference (full decode, pad, one bicubic resize). Larger ones use a reduced intermediate.
EXACT_MAX_PIXELS = 16_000 * 16_000
#: Percentile stretch (low, high) for 16-bit / float / integer data.
DEFAULT_STRETCH = (2.0, 98.0)
#: The reduced intermediate is at least this many times the requested side.
DEFAULT_OVERSAMPLE = 2.0
#: The exact path pads to an L x L canvas. For an elongated image that canvas can dwarf the
#: image (1 x 16000 -> a 768 MB square), so the exact path is taken only while the square is at
#: most this many times the image, or no bigger than `REDUCED_CANVAS_PIXELS`.
EXACT_PAD_RATIO = 4
#: The largest canvas the reduced path builds for the 4032-px level: (oversample x 4032)^2.
REDUCED_CANVAS_PIXELS = (2 * 4032) ** 2

_PIL_LOCK = threading.RLock()


def exact_fits(size: tuple[int, int], exact_max_pixels: int | None) -> bool:
    """Is padding the whole image to its square (the reference's exact path) affordable?"""
    w, h = size
    L = max(w, h)
    if w == h or exact_max_pixels is None:
        return True
    return L * L <= exact_max_pixels and (L * L <= EXACT_PAD_RATIO * w * h or L * L <= REDUCED_CANVAS_PIXELS)


class NotARasterError(ImageLoadError):
    """GDAL does not recognise the file as a raster (used to fall back to other readers)."""


@runtime_checkable
class ImageSource(Protocol):
    @property
    def size(self) -> tuple[int, int]: ...

    def square(self, side: int) -> Image.Image: ...


# ----------------------------------------------------------------------------- geometry helpers
def pad_to_square(image: Image.Image, fill: tuple[int, int, int] = PAD_RGB) -> Image.Image:
    """Paste `image` centred on a `max(W, H)` square canvas filled with `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def pad_offsets(size: tuple[int, int]) -> tuple[int, int, int]:
    """(L, ox, oy): square side and where the image's top-left corner sits on it."""
    w, h = size
    side = max(w, h)
    return side, (side - w) // 2, (side - h) // 2


def reduced_scale(size: tuple[int, int], side: int, oversample: float = DEFAULT_OVERSAMPLE) -> float:
    """Scale (<= 1) of the intermediate needed to resample the square to `side` well."""
    L = max(size)
    return min(1.0, oversample * side / L)


def reduced_geometry(
    full_size: tuple[int, int], reduced_size: tuple[int, int]
) -> tuple[int, int, int, int, tuple[float, float, float, float]]:
    """Canvas for resampling the padded square from a reduced copy of the image.

    The reduced copy (`reduced_size`) covers the whole original (`full_size`). Returns
    `(cw, ch, px0, py0, box)`: paste the copy at `(px0, py0)` on a `cw x ch` pad-coloured canvas;
    the original's `L x L` square is then the float `box` of that canvas, so
    `canvas.resize((side, side), BICUBIC, box=box)` has the reference geometry without
    materialising the full square.
    """
    W, H = full_size
    L, ox, oy = pad_offsets(full_size)
    w_i, h_i = reduced_size
    # The nominal scale is the long axis's: it is never clamped to 1 px, and it alone decides
    # how big the L x L square becomes (~ L * g), whatever the aspect ratio.
    g = w_i / W if W >= H else h_i / H
    # An axis reduced below one pixel keeps the nominal scale (the strip is 1 px wide there).
    sx = w_i / W if W * g >= 1 else g
    sy = h_i / H if H * g >= 1 else g
    cw, ch = math.ceil(L * sx) + 2, math.ceil(L * sy) + 2
    px0, py0 = math.floor(ox * sx) + 1, math.floor(oy * sy) + 1
    bx, by = px0 - ox * sx, py0 - oy * sy
    return cw, ch, px0, py0, (bx, by, min(cw, bx + L * sx), min(ch, by + L * sy))


def square_from_reduced(
    image: Image.Image,
    full_size: tuple[int, int],
    side: int,
    fill: tuple[int, int, int] = PAD_RGB,
) -> Image.Image:
    """`pad_to_square(original).resize((side, side))` geometry from a reduced RGB copy."""
    cw, ch, px0, py0, box = reduced_geometry(full_size, image.size)
    return padded_resize(image, (cw, ch), (px0, py0), side, box, fill)


#: Bytes of one band of the virtual canvas `padded_resize` builds at a time.
BAND_BYTES = 8 * 2**20


def padded_resize(
    image: Image.Image,
    canvas_size: tuple[int, int],
    offset: tuple[int, int],
    side: int,
    box: tuple[float, float, float, float] | None = None,
    fill: tuple[int, int, int] = PAD_RGB,
) -> Image.Image:
    """`canvas.resize((side, side), BICUBIC, box=box)` as two explicit 1-D bicubic passes,
    horizontal then vertical, where `canvas` is a `canvas_size` RGB image filled with `fill` and
    `image` pasted at `offset` — without ever materialising the canvas (for a 1 x 100,000 strip
    it would be ~all padding; issue 18).

    The result is bit for bit `canvas.resize((side, ch), box=(bx0, 0, bx1, ch))` followed by
    `.resize((side, side), box=(0, by0, side, by1))`: Pillow's own two-pass algorithm with its
    8-bit intermediate (a single `resize` call may run the passes in the other order, a
    difference of a level or two on a few pixels). Both passes run on bands: the horizontal one
    on bands of canvas rows that hold image pixels (padding-only rows give padding-only
    intermediate rows), keeping only the intermediate columns the image reaches; the vertical
    one on bands of those columns (the others are padding in the output). Every band is resized
    with the full pass's box and sizes, so its filter coefficients are the full pass's, and
    padding-only pixels come out as `fill` exactly (normalised coefficients keep a constant).
    Memory: the output, the image's reach in the intermediate and one band (`BAND_BYTES`).
    Used for the reduced path only; the reference's exact path keeps Pillow's single call."""
    cw, ch = canvas_size
    px, py = offset
    w, h = image.size
    bx0, by0, bx1, by1 = box if box is not None else (0.0, 0.0, float(cw), float(ch))
    out = Image.new("RGB", (side, side), fill)
    # Canvas columns / rows the image occupies (clipped to the canvas).
    ix0, ix1, iy0, iy1 = max(px, 0), min(px + w, cw), max(py, 0), min(py + h, ch)
    if ix1 <= ix0 or iy1 <= iy0:  # the image is off the canvas: all padding
        return out
    image = image if image.mode in ("RGB", "RGBX") else image.convert("RGB")  # RGBX: converted per band
    # Intermediate columns whose horizontal filter reaches an image column (bicubic support 2,
    # widened by the downscale factor), with a margin: extra columns are computed, not guessed.
    scale = (bx1 - bx0) / side
    support = 2.0 * max(scale, 1.0)
    c0 = max(0, math.floor((ix0 - support - bx0) / scale - 0.5) - 2)
    c1 = min(side, math.ceil((ix1 + support - bx0) / scale + 0.5) + 2)
    if c1 <= c0:
        return out
    # Pass 1: rows of the canvas that hold image pixels -> intermediate rows, columns c0..c1.
    strip = Image.new("RGB", (c1 - c0, iy1 - iy0))
    rows = max(1, BAND_BYTES // (4 * cw))
    for r in range(iy0, iy1, rows):
        n = min(rows, iy1 - r)
        band = Image.new("RGB", (cw, n), fill)
        band.paste(image.crop((0, r - py, w, r - py + n)), (px, 0))
        hz = band.resize((side, n), Image.Resampling.BICUBIC, box=(bx0, 0, bx1, n))
        strip.paste(hz.crop((c0, 0, c1, n)), (0, r - iy0))
        del band, hz
    # Pass 2: columns c0..c1 of the intermediate (padding above / below the strip) -> output.
    cols = max(1, BAND_BYTES // (4 * ch))
    for c in range(c0, c1, cols):
        k = min(cols, c1 - c)
        band = Image.new("RGB", (k, ch), fill)
        band.paste(strip.crop((c - c0, 0, c - c0 + k, iy1 - iy0)), (0, iy0))
        out.paste(band.resize((k, side), Image.Resampling.BICUBIC, box=(0, by0, k, by1)), (c, 0))
        del band
    return out


# ----------------------------------------------------------------------------- value conversion
def percentile_range(values: np.ndarray, stretch: Sequence[float] | None, dtype: Any = None) -> tuple[float, float]:
    """(lo, hi) for mapping `values` (finite, valid samples of one band) to 0..255.

    `stretch=(p_lo, p_hi)` uses those percentiles; `None` uses the dtype's full range for
    integer types and min/max for floats.
    """
    dtype = np.dtype(dtype if dtype is not None else values.dtype)
    if stretch is None:
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            return float(max(info.min, 0) if info.min >= 0 else info.min), float(info.max)
        stretch = (0.0, 100.0)
    v = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    if v.size == 0:
        return 0.0, 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = np.percentile(v.astype(np.float64, copy=False), [float(stretch[0]), float(stretch[1])])
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # percentiles of +-1e308 data can overflow
        lo, hi = float(v.min()), float(v.max())
    if not hi > lo:  # constant data: fall back to the full range (ints) or mid-grey (floats)
        if np.issubdtype(dtype, np.integer):
            return percentile_range(values, None, dtype)
        return constant_range(lo)
    return lo, hi


def constant_range(value: float) -> tuple[float, float]:
    """(lo, hi) around a constant band, so that it maps to mid-grey (128) at any magnitude.

    A fixed +-0.5 vanishes in float64 above ~1e16 (lo == hi: the division by zero of issue 18),
    so the half-width grows with the value: the smallest power of two that changes it."""
    half = max(0.5, math.ulp(value) * 2.0) if math.isfinite(value) else 0.5
    return value - half, value + half


def stretch_to_uint8(band: np.ndarray, lo: float, hi: float, rows: int = 1024) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255] (clipped, NaN -> 0), in row chunks to bound memory.

    Computed in float32 when lo and hi are distinct, finite float32 numbers (every ordinary
    raster), else in float64 (|values| near 1e16 and above, or float64 extremes); a range
    that is still empty or not finite maps every finite value to mid-grey (128)."""
    out = np.empty(band.shape, dtype=np.uint8)
    lo, hi = float(lo), float(hi)
    # A span past float64's range (-1e308 .. 1e308) is stretched on halved values.
    pre = 0.5 if math.isfinite(lo) and math.isfinite(hi) and not math.isfinite(hi - lo) else 1.0
    lo, span = lo * pre, hi * pre - lo * pre
    degenerate = not (math.isfinite(lo) and math.isfinite(span) and span > 0)
    with np.errstate(over="ignore"):
        f32 = (
            not degenerate
            and pre == 1.0
            and np.isfinite(np.float32(255.0 / span))
            and np.float32(lo) != np.float32(hi)
            and np.isfinite(np.float32(lo))
            and np.isfinite(np.float32(hi))
        )
    dtype = np.float32 if f32 else np.float64
    scale = 0.0 if degenerate else 255.0 / span
    flat = band.reshape(-1, band.shape[-1]) if band.ndim > 1 else band.reshape(1, -1)
    dst = out.reshape(flat.shape)
    for r0 in range(0, flat.shape[0], rows):
        x = flat[r0 : r0 + rows].astype(dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            if degenerate:  # finite -> 128, NaN -> 0, +-inf -> 255 / 0 (as below)
                x = np.where(np.isfinite(x), dtype(127.5), x)
            else:
                if pre != 1.0:
                    x *= pre
                x -= lo
                x *= scale
        np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        np.clip(x, 0, 255, out=x)
        np.rint(x, out=x)
        dst[r0 : r0 + rows] = x.astype(np.uint8)
    return out


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(im: Image.Image, *, stretch: Sequence[float] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit / 32-bit / float images are mapped linearly: with `stretch=None` (default) over the
    full 16-bit range (or min..max for other types); with `stretch=(p_lo, p_hi)` between those
    percentiles. Alpha is composited over the pad colour.
    """
    if im.mode in _HIGH_BIT_MODES:
        arr = np.asarray(im)
        if stretch is None:
            a64 = arr.astype(np.float64)
            fin = a64[np.isfinite(a64)]
            lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
            if im.mode.startswith("I;16") and hi <= 65535:
                lo, hi = 0.0, 65535.0
            span = hi - lo
            with np.errstate(over="ignore", invalid="ignore"):
                ok = span > 0 and math.isfinite(span)
                scaled = (a64 - lo) / span * 255.0 if ok else np.zeros_like(a64)
                out = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).round().clip(0, 255).astype("uint8")
        else:
            sample = arr[:: max(1, arr.shape[0] // 1024), :: max(1, arr.shape[1] // 1024)]
            lo, hi = percentile_range(sample.ravel(), stretch)
            out = stretch_to_uint8(arr, lo, hi)
        im = Image.fromarray(out, mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, PAD_RGB)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def parse_bands(bands: Any) -> tuple[int, ...] | None:
    """`"4,3,2"`, `[4, 3, 2]` or `None` -> tuple of ints (no range check here)."""
    if bands is None:
        return None
    if isinstance(bands, str):
        parts = [p for p in bands.replace(" ", "").split(",") if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ImageLoadError(f"bands must be comma-separated band numbers, got {bands!r}") from None
    if isinstance(bands, int):
        return (bands,)
    out = []
    for b in bands:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise ImageLoadError(f"bands must be integers (1-based), got {list(bands)!r}")
        out.append(int(b))
    return tuple(out)


def check_bands(bands: tuple[int, ...], count: int, what: str) -> None:
    if len(bands) not in (1, 3) or any(b < 1 or b > count for b in bands):
        raise ImageLoadError(
            f"{what}: unsupported band list {list(bands)} for an image with {count} band(s); "
            f"give 1 (grey) or 3 (R,G,B) band numbers between 1 and {count}"
        )


def _select_pil_bands(
    im: Image.Image, bands: tuple[int, ...], stretch: Sequence[float] | None, what: str
) -> Image.Image:
    """Pick channels (1-based) of a decoded Pillow image and build an RGB image from them."""
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if (im.mode == "PA" or "transparency" in im.info) else "RGB")
    elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    names = im.getbands()
    check_bands(bands, len(names), what)
    alpha = im.getchannel("A") if "A" in names else None
    chans = [im.getchannel(names[b - 1]) for b in bands]
    chans = [to_rgb(c, stretch=stretch).getchannel(0) if c.mode in _HIGH_BIT_MODES else c for c in chans]
    if len(chans) == 1:
        chans = chans * 3
    out = Image.merge("RGB", chans)
    if alpha is not None:
        bg = Image.new("RGB", out.size, PAD_RGB)
        bg.paste(out, mask=alpha)
        out = bg
    return out


def convert_pil(
    im: Image.Image, *, bands: Any = None, stretch: Sequence[float] | None = DEFAULT_STRETCH, what: str = "image"
) -> Image.Image:
    """Decoded Pillow image -> RGB with band selection and high-bit stretch."""
    sel = parse_bands(bands)
    if sel is not None:
        return _select_pil_bands(im, sel, stretch, what)
    return to_rgb(im, stretch=stretch)


# ----------------------------------------------------------------------------- Pillow guard
@contextmanager
def pil_pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Set Pillow's decompression-bomb limit for the duration of one open (not globally).

    Our own check (`max_pixels`) runs first with a clear message; Pillow's guard is set to the
    same number (or off when `None`) only inside this block and restored afterwards.
    """
    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else int(max_pixels)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def pil_open(path: Any, max_pixels: int | None, formats: Sequence[str] | None = None) -> Image.Image:
    """`Image.open` (header only) with Pillow's guard set to `max_pixels` for this open only.

    The guard is a process-wide setting, so it is changed under a lock and restored at once;
    decoding (`.load()`) happens after the lock is released. `formats` restricts the Pillow
    plugins tried (untrusted input: only the one its magic bytes name).
    """
    with pil_pixel_limit(max_pixels):
        return Image.open(path, formats=None if formats is None else list(formats))


def pixel_limit_error(path: Any, max_pixels: int | None, e: BaseException) -> ImageLoadError:
    """Pillow's decompression-bomb guard fired: the same one-line message as ours.

    Pillow's own text is left out: it names its threshold (twice `max_pixels`), not ours."""
    limit = "no" if max_pixels is None else f"{int(max_pixels):,}"
    found = re.search(r"\((\d+) pixels\)", str(e))  # "Image size (N pixels) exceeds limit of 2L pixels"
    has = f" has {int(found.group(1)):,} pixels, which" if found else ""
    return ImageLoadError(
        f"image {path}{has} exceeds the pixel limit of {limit} pixels (max_pixels; "
        f"pass max_pixels=None or --max-pixels 0 to lift it)"
    )


def check_pixel_limit(path: Any, size: tuple[int, int], max_pixels: int | None) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageLoadError(
            f"image {path} has {w}x{h} = {w * h:,} pixels, above the limit of {int(max_pixels):,} "
            f"(max_pixels; pass max_pixels=None or --max-pixels 0 to lift it)"
        )


# ----------------------------------------------------------------------------- sources
class PILSource:
    """A decoded RGB image held in memory."""

    georef = None
    #: Why `georef` is None when the file has one we could not read (e.g. a GeoTIFF without rasterio).
    georef_note: str | None = None
    #: How messages name the image (its path or upload name), when it came from a file.
    label: str | None = None
    #: The window of a larger scene this source shows (`uhrbat.io.regions.Region`), or None.
    region = None

    def __init__(
        self,
        image: Image.Image,
        *,
        exact_max_pixels: int | None = EXACT_MAX_PIXELS,
        oversample: float = DEFAULT_OVERSAMPLE,
    ) -> None:
        self.image = image if image.mode == "RGB" else image.convert("RGB")
        self._padded: Image.Image | None = None
        self.exact_max_pixels = exact_max_pixels
        self.oversample = oversample

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def _exact(self) -> bool:
        return exact_fits(self.image.size, self.exact_max_pixels)

    def padded_square(self) -> Image.Image | None:
        """The padded full-resolution square that `square(side)` resizes in one bicubic Pillow
        call (`square(side) == padded_square().resize((side, side))`), or None when the source
        is resampled from a reduced copy instead (gated encoding resizes windows of it)."""
        if not self._exact():
            return None
        if self._padded is None:
            self._padded = pad_to_square(self.image)
        return self._padded

    def square(self, side: int) -> Image.Image:
        padded = self.padded_square()
        if padded is not None:
            # Pillow's default filter for RGB is bicubic (with antialias), as in the reference.
            return padded.resize((side, side))
        # Extremely elongated and huge (e.g. 1 x 20000): never materialise the L x L square.
        g = reduced_scale(self.image.size, side, self.oversample)
        w, h = self.image.size
        small = self.image.resize((max(1, round(w * g)), max(1, round(h * g))), Image.Resampling.BICUBIC)
        return square_from_reduced(small, (w, h), side)


class JPEGDraftSource:
    """A large JPEG decoded at a reduced DCT scale (1/2, 1/4, 1/8) per requested side."""

    georef = None
    #: Why `georef` is None when the file has one we could not read (e.g. a GeoTIFF without rasterio).
    georef_note: str | None = None
    region = None

    def __init__(
        self,
        path: Path,
        size: tuple[int, int],
        *,
        bands: Any = None,
        stretch: Sequence[float] | None = DEFAULT_STRETCH,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        oversample: float = DEFAULT_OVERSAMPLE,
        formats: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.label = str(self.path)  # how messages name the file (an upload's name, not its temp copy)
        self._size = size
        self.bands, self.stretch, self.max_pixels, self.oversample = bands, stretch, max_pixels, oversample
        self.formats = formats
        self._cache: tuple[float, Image.Image] | None = None  # (scale, reduced RGB image)

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    def reduced(self, g: float) -> Image.Image:
        """The whole image at a scale >= `g` (cached: the largest one decoded so far)."""
        if self._cache is not None and self._cache[0] >= g:
            return self._cache[1]
        W, H = self._size
        try:
            with pil_open(self.path, self.max_pixels, self.formats) as im:
                rw, rh = im.size  # raw (pre-EXIF-rotation) size
                im.draft(None, (max(1, math.ceil(rw * g)), max(1, math.ceil(rh * g))))
                im.load()
                im = ImageOps.exif_transpose(im)
                img = convert_pil(im, bands=self.bands, stretch=self.stretch, what=str(self.path))
        except ImageLoadError:
            raise
        except Exception as e:  # OSError, SyntaxError, ValueError from the decoder
            raise ImageLoadError(f"corrupt or unreadable image {self.label}: {e}") from e
        scale = min(img.size[0] / W, img.size[1] / H)
        self._cache = (scale, img)
        return img

    def square(self, side: int) -> Image.Image:
        g = reduced_scale(self._size, side, self.oversample)
        img = self.reduced(g)
        if img.size == self._size and exact_fits(self._size, EXACT_MAX_PIXELS):
            return pad_to_square(img).resize((side, side))
        return square_from_reduced(img, self._size, side)


# ----------------------------------------------------------------------------- readers
def load_pil(
    path: str | os.PathLike,
    *,
    bands: Any = None,
    stretch: Sequence[float] | None = DEFAULT_STRETCH,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = None,
    crop: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """Decode an image file to RGB, honouring EXIF orientation; typed errors for bad files.

    `crop` (x0, y0, x1, y1 of the upright image) is cut *before* the value conversion, so the
    percentile stretch of high-bit data is the crop's own, as for the crop saved as a file."""
    p = check_file(path)
    try:
        with pil_open(p, max_pixels, formats) as im:
            check_pixel_limit(p, im.size, max_pixels)
            im.load()
            im = ImageOps.exif_transpose(im)
            if crop is not None:
                im = im.crop(crop)
            return convert_pil(im, bands=bands, stretch=stretch, what=f"image {p}")
    except ImageLoadError:
        raise
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"not an image file (or an unsupported format): {p}") from e
    except Image.DecompressionBombError as e:
        raise pixel_limit_error(p, max_pixels, e) from e
    except MemoryError as e:
        raise ImageLoadError(f"image {p} is too large to decode in the available memory") from e
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError) as e:
        raise ImageLoadError(f"corrupt or unreadable image {p}: {' '.join(str(e).split())}") from e


def __getattr__(name: str) -> Any:
    if name == "open_image":  # the reader moved out of this module (it dispatches to GDAL too)
        raise AttributeError("open_image is uhrbat.io.open_image (uhrbat.io.sources), not uhrbat.io.images")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
