"""The one image reader: `open_image` (paths, PIL images, sources) and `open_image_bytes` (uploads).

Two trust levels, chosen by the caller:

* ``trust="local"`` (the default; the CLI, evaluation and training on the user's own paths):
  every format Pillow or GDAL reads, including GDAL VRT mosaics and ``/vsi*`` virtual paths
  (``/vsicurl/https://...``, ``/vsizip/...``), sidecar files (``.aux.xml``, ``.ovr``, world
  files) and JPEG2000.
* ``trust="untrusted"`` (the demo, the server, batch inputs marked untrusted, and *always*
  `open_image_bytes`): the path must name a regular local file (no ``/vsi*``, no URL); the
  format is decided from the magic bytes and must be PNG, JPEG or TIFF (GeoTIFF, COG, BigTIFF);
  Pillow may only use that format's plugin and GDAL only that format's driver (`PNG`, `JPEG`,
  `GTiff`), with directory listing, sidecars (PAM ``.aux.xml``, ``.ovr``, ``.msk``, world files)
  and VRT raw bands off, so a file can neither name another file nor reach the network.
  Uploaded bytes are written to a private temporary file (mode 0600 in a fresh 0700
  directory): user input never names a path.

Who uses which: `local` — `uhrbat ask` / `chat`, evaluation, `prepare-sft`, `uhrbat masks`,
training, and `open_image(path)` by default; `untrusted` — the demo and `uhrbat serve` (uploads
and fetched URLs, through `open_image_bytes`), `uhrbat batch --untrusted`, and any caller passing
`trust="untrusted"`.

Memory and time are bounded by the work, not by the file, at both levels:

* the pixel limit (`max_pixels`) is checked from the header before any pixel is decoded
  (PNG EXIF orientation is read from chunk headers, never by decoding);
* images up to `exact_max_pixels` (256 MP) are decoded in full and resampled exactly like the
  reference; elongated ones never materialise more than a (2 x 4032)^2 canvas;
* larger JPEGs use a DCT-reduced decode (progressive ones, whose reduced decode still buffers
  every coefficient, are refused); larger PNGs are streamed once in row bands through GDAL
  (needs rasterio) into a copy reduced to what the 4032-px pyramid needs; large GeoTIFFs are
  read decimated (overviews). A failure in those paths is an error, never a silent full decode.

TIFFs, at both levels, have their strip / tile tables checked before any decoder sees them
(`uhrbat.io.tiff`: blocks inside the file, none in the header or an IFD, tables as long as the
image needs): an inconsistent file is one `ImageLoadError`, never seconds of garbage decoding.

Regions (`region=`, `region_crs=`, `region_file=`, `region_geojson=`; `uhrbat.io.regions`)
read one window at native resolution, exactly as if it had been cut into its own file. What is
bounded: a TIFF / COG window decodes only the window's blocks (the pixel limit applies to the
window; a window too big for the pyramid is read decimated, from overviews, so memory follows
the output, never the raster); PNG / JPEG up to `exact_max_pixels` are decoded whole by Pillow
and cropped (the limit applies to the whole image); bigger ones go through GDAL, which decodes
rows forward up to the window's last row and keeps only the window (memory bounded by the
window; the limit applies to the rows decoded).

Wrap untrusted decodes in `uhrbat.io.decode_section()` to bound how many run at once.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from uhrbat.errors import ImageLoadError, RegionError
from uhrbat.io.formats import (
    PIL_FORMATS,
    SUFFIX,
    UNTRUSTED_FORMATS,
    check_file,
    describe_head,
    jpeg_is_progressive,
    png_header,
    read_head,
    sniff,
)
from uhrbat.io.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_OVERSAMPLE,
    DEFAULT_STRETCH,
    EXACT_MAX_PIXELS,
    ImageSource,
    JPEGDraftSource,
    PILSource,
    check_pixel_limit,
    convert_pil,
    load_pil,
    pil_open,
    pixel_limit_error,
)
from uhrbat.io.regions import RegionRequest, paint_outside, parse_region, resolve_region
from uhrbat.io.tiff import check_tiff_layout

Trust = Literal["local", "untrusted"]
#: Untrusted progressive JPEGs above this many pixels are refused: libjpeg keeps every DCT
#: coefficient (~6 bytes per pixel for colour) besides the decoded image.
UNTRUSTED_PROGRESSIVE_MAX_PIXELS = 64_000_000
#: GeoTIFF tags (ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory).
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
_ACCEPTED = "PNG, JPEG or TIFF/GeoTIFF"


def rasterio_available() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def open_image(
    image: str | os.PathLike | Image.Image | ImageSource,
    *,
    trust: Trust = "local",
    bands: Any = None,
    stretch: Sequence[float] | None = DEFAULT_STRETCH,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exact_max_pixels: int | None = EXACT_MAX_PIXELS,
    oversample: float = DEFAULT_OVERSAMPLE,
    region: Any = None,
    region_crs: Any = None,
    region_file: str | os.PathLike | None = None,
    region_geojson: Any = None,
) -> ImageSource:
    """Turn a path, a PIL image or an existing source into an `ImageSource`.

    trust: "local" (the user's own files: every format, VRT, /vsi*) or "untrusted" (PNG / JPEG /
        TIFF only, decided from the magic bytes; nothing outside the file is read). See the
        module docstring.
    bands: 1-based band numbers, 1 (grey) or 3 (R,G,B), e.g. `(4, 3, 2)` or `"4,3,2"`.
    stretch: (low, high) percentiles for 16-bit / float / non-uint8 data (`None`: full range).
    max_pixels: refuse inputs with more full-resolution pixels (`None`: no limit). Rasters with
        internal overviews are exempt: they are only ever read decimated.
    exact_max_pixels: images up to this size are resampled exactly like the reference; above
        it, a reduced intermediate (>= `oversample` x the side) is used. `None`: always exact
        (a full decode, whatever the size).
    region, region_crs, region_file, region_geojson: read only a window of the image, at native
        resolution (`uhrbat.io.regions`): pixels `[x0, y0, x1, y1]`, the same in map coordinates
        with `region_crs`, or a GeoJSON file / object. The source is then the window, exactly as
        if it had been cut into its own file; `source.region` places it in the scene. Bad
        regions raise `RegionError` before any pixel is decoded (beyond the header).
    """
    if trust not in ("local", "untrusted"):
        raise ImageLoadError(f"trust must be 'local' or 'untrusted', got {trust!r}")
    request = parse_region(region, region_crs=region_crs, region_file=region_file, region_geojson=region_geojson)
    if isinstance(image, Image.Image):
        if request is None:
            return PILSource(
                convert_pil(image, bands=bands, stretch=stretch),
                exact_max_pixels=exact_max_pixels,
                oversample=oversample,
            )
        reg = resolve_region(request, image.size, None)
        src = PILSource(
            paint_outside(convert_pil(image.crop(reg.pixels), bands=bands, stretch=stretch), reg),
            exact_max_pixels=exact_max_pixels,
            oversample=oversample,
        )
        src.region = reg
        return src
    if isinstance(image, (str, os.PathLike)):
        opts = {
            "bands": bands,
            "stretch": stretch,
            "max_pixels": max_pixels,
            "exact_max_pixels": exact_max_pixels,
            "oversample": oversample,
            "region": request,
        }
        return _open_path(image, trust, opts)
    if isinstance(image, ImageSource):
        if request is not None:
            raise RegionError(
                "a region is read from the image file (or a PIL image), not from an already opened source; "
                "pass the path to open_image(..., region=...)"
            )
        return image
    raise ImageLoadError(f"unsupported image input of type {type(image).__name__}")


def open_image_bytes(
    data: bytes | bytearray | memoryview, *, filename: str | None = None, **read_opts: Any
) -> ImageSource:
    """An image from uploaded bytes; always `trust="untrusted"` (see the module docstring).

    The bytes go to a private temporary file that lives as long as the returned source needs
    it. `filename` is only used in error messages. `read_opts`: as `open_image`.
    """
    name = repr(filename if filename else "upload")
    if read_opts.pop("trust", "untrusted") != "untrusted":
        raise ImageLoadError("open_image_bytes always reads untrusted input; use open_image for local files")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageLoadError(f"image bytes expected for {name}, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageLoadError(f"the uploaded image {name} is empty")
    kind = sniff(data[:32])
    if kind not in UNTRUSTED_FORMATS:
        raise ImageLoadError(
            f"the uploaded image {name} is {describe_head(data[:32])}, which is not accepted "
            f"from untrusted input; send a {_ACCEPTED} file"
        )
    tmp = tempfile.mkdtemp(prefix="uhrbat-upload-")  # mode 0700: private to this process's user
    path = os.path.join(tmp, "upload" + SUFFIX[kind])
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        del data
        src = open_image(path, trust="untrusted", **read_opts)
    except ImageLoadError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        msg = str(e).replace(os.path.realpath(path), name).replace(path, name)
        raise ImageLoadError(msg) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    src.label = name  # later messages name the upload, not the private copy
    if isinstance(src, PILSource):
        shutil.rmtree(tmp, ignore_errors=True)  # decoded in memory: the file is no longer needed
    else:  # lazy sources re-read the file for each square: remove it with the source
        weakref.finalize(src, shutil.rmtree, tmp, True)
    return src


# ----------------------------------------------------------------------------- paths
def _refuse_virtual(raw: str) -> None:
    if raw.startswith("/vsi") or "://" in raw:
        raise ImageLoadError(
            f"untrusted input must be a local file path, got {raw!r}; GDAL virtual paths "
            f"(/vsi...) and URLs are only read with trust='local'"
        )


def _open_path(image: str | os.PathLike, trust: Trust, opts: dict[str, Any]) -> ImageSource:
    raw = os.fspath(image)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if "\x00" in raw:  # os.stat / realpath / GDAL would raise a bare ValueError (or truncate the name)
        raise ImageLoadError(f"image path contains a NUL byte, which no file name can: {raw!r}")
    untrusted = trust == "untrusted"
    if untrusted:
        _refuse_virtual(raw)
    elif raw.startswith("/vsi"):  # a GDAL virtual file system path: only GDAL can read it
        if not rasterio_available():
            raise ImageLoadError(
                f"{raw}: GDAL virtual paths need rasterio; install the geo extra (pip install 'uhrbat[geo]')"
            )
        from uhrbat.io.raster import RasterSource

        return RasterSource(raw, **opts)
    p = check_file(raw)
    if untrusted:  # decide everything on the real file, and hand GDAL a plain absolute path
        p = check_file(os.path.realpath(p))
    kind = sniff(read_head(p))
    if untrusted and kind not in UNTRUSTED_FORMATS:
        raise ImageLoadError(
            f"image {p} is {describe_head(read_head(p))}, which is not accepted from untrusted "
            f"input; send a {_ACCEPTED} file"
        )
    return _open_file(p, kind, trust, **opts)


def _open_file(
    p: Path,
    kind: str | None,
    trust: Trust,
    *,
    bands: Any,
    stretch: Any,
    max_pixels: int | None,
    exact_max_pixels: int | None,
    oversample: float,
    region: RegionRequest | None = None,
) -> ImageSource:
    untrusted = trust == "untrusted"
    rkw = {
        "bands": bands,
        "stretch": stretch,
        "max_pixels": max_pixels,
        "exact_max_pixels": exact_max_pixels,
        "oversample": oversample,
        "trust": trust,
        "region": region,
    }
    formats = PIL_FORMATS.get(kind) if untrusted else None
    if kind == "tiff":  # before any decoder: strip / tile tables that point into the header, ...
        check_tiff_layout(p, strict=untrusted)
    have_gdal = rasterio_available()
    if kind in ("tiff", "jp2") and have_gdal:
        from uhrbat.io.raster import RasterSource, wants_raster_reader

        # A region of a georeferenced or high-bit TIFF is a window read; plain 8-bit TIFFs are
        # cropped from Pillow's decode like PNG / JPEG below.
        if wants_raster_reader(p, exact_max_pixels, trust=trust):
            return RasterSource(p, **rkw)
    # Pillow: header only (cheap), then decide how to decode.
    try:
        with pil_open(p, max_pixels, formats=formats) as im:
            size, fmt = im.size, im.format
            geotiff = kind == "tiff" and any(t in getattr(im, "tag_v2", {}) for t in _GEOTIFF_TAGS)
            if fmt == "PNG":
                with open(p, "rb") as f:
                    _, interlaced, orientation = png_header(f)
            else:  # JPEG / TIFF / WebP ... keep EXIF in the header: getexif() decodes nothing
                interlaced, orientation = False, int(im.getexif().get(0x0112, 1) or 1)
    except UnidentifiedImageError as e:
        if have_gdal and not untrusted:
            from uhrbat.io.images import NotARasterError
            from uhrbat.io.raster import RasterSource

            try:
                return RasterSource(p, **rkw)
            except NotARasterError:
                pass
        raise ImageLoadError(f"not an image file (or an unsupported format): {p}") from e
    except Image.DecompressionBombError as e:
        raise pixel_limit_error(p, max_pixels, e) from e
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, KeyError, IndexError, struct.error) as e:
        raise ImageLoadError(f"corrupt or unreadable image {p}: {_one_line(e)}") from e
    if orientation in (5, 6, 7, 8):
        size = (size[1], size[0])
    check_pixel_limit(p, size, max_pixels)
    w, h = size
    if untrusted and fmt in ("JPEG", "MPO") and w * h > UNTRUSTED_PROGRESSIVE_MAX_PIXELS:
        with open(p, "rb") as f:
            if jpeg_is_progressive(f):
                raise ImageLoadError(
                    f"image {p} is a progressive JPEG of {w}x{h} = {w * h:,} pixels, above the limit of "
                    f"{UNTRUSTED_PROGRESSIVE_MAX_PIXELS:,} for untrusted progressive JPEGs (decoding one buffers "
                    f"every DCT coefficient); send it as a baseline JPEG, PNG or tiled GeoTIFF"
                )
    if exact_max_pixels is None or w * h <= exact_max_pixels:
        # Decoded in full (the pixel limit is the whole image's: Pillow decodes every row), then
        # a region is cropped before the value conversion (its stretch is the window's own).
        reg = None if region is None else resolve_region(region, (w, h), None, image=f"image {p}")
        img = load_pil(
            p,
            bands=bands,
            stretch=stretch,
            max_pixels=max_pixels,
            formats=formats,
            crop=None if reg is None else reg.pixels,
        )
        src = PILSource(
            img if reg is None else paint_outside(img, reg), exact_max_pixels=exact_max_pixels, oversample=oversample
        )
        src.label = str(p)
        src.region = reg
        if geotiff and not have_gdal:
            _note_geotiff_without_rasterio(src, p)
        return src
    # Too big to decode in full: a reduced decode, or a clear refusal. Never a silent full decode.
    limit = f"{exact_max_pixels:,}"
    if region is not None:  # a window of a huge PNG / JPEG: GDAL decodes rows forward, keeps the window
        if orientation != 1 or interlaced or not have_gdal:
            why = (
                "an EXIF rotation"
                if orientation != 1
                else "interlacing"
                if interlaced
                else "no rasterio (install the geo extra: pip install 'uhrbat[geo]')"
            )
            raise ImageLoadError(
                f"image {p} has {w}x{h} = {w * h:,} pixels (above exact_max_pixels, {limit}); a region of it is "
                f"read through GDAL, which is not possible with {why}; convert it to a tiled GeoTIFF, or pass "
                f"exact_max_pixels=None to decode it in full"
            )
        from uhrbat.io.raster import RasterSource

        return RasterSource(p, **rkw)
    if fmt in ("JPEG", "MPO"):
        with open(p, "rb") as f:
            progressive = jpeg_is_progressive(f)
        if progressive:
            raise ImageLoadError(
                f"image {p} is a progressive JPEG of {w}x{h} = {w * h:,} pixels; above exact_max_pixels "
                f"({limit}) it would be decoded reduced, but a progressive decode buffers every DCT coefficient "
                f"(~{6 * w * h / 2**30:.1f} GB); convert it to a baseline JPEG or a tiled GeoTIFF, or pass "
                f"exact_max_pixels=None to decode it in full"
            )
        src = JPEGDraftSource(
            p, size, bands=bands, stretch=stretch, max_pixels=max_pixels, oversample=oversample, formats=formats
        )
        src.reduced(min(1.0, 256 / max(size)))  # validate the file now (tiny decode)
        return src
    if interlaced:
        raise ImageLoadError(
            f"image {p} is an interlaced PNG of {w}x{h} = {w * h:,} pixels, above exact_max_pixels ({limit}); "
            f"interlaced PNGs cannot be streamed in bounded memory: save it non-interlaced or as a tiled "
            f"GeoTIFF, or pass exact_max_pixels=None to decode it in full"
        )
    if orientation != 1:
        raise ImageLoadError(
            f"image {p} has {w}x{h} = {w * h:,} pixels (above exact_max_pixels, {limit}) and an EXIF rotation, "
            f"which only a full decode applies; pass exact_max_pixels=None to decode it in full"
        )
    if not have_gdal:
        raise ImageLoadError(
            f"image {p} has {w}x{h} = {w * h:,} pixels, above exact_max_pixels ({limit}); such {fmt} files are "
            f"streamed through GDAL: install the geo extra (pip install 'uhrbat[geo]'), or pass "
            f"exact_max_pixels=None to decode it in full with Pillow (~{4 * w * h / 2**30:.1f} GB)"
        )
    from uhrbat.io.raster import RasterSource

    return RasterSource(p, **rkw)  # GDAL failures are ImageLoadErrors: no fallback to a full decode


def _note_geotiff_without_rasterio(src: PILSource, p: Path) -> None:
    note = (
        f"{p} is a GeoTIFF, but rasterio is not installed, so its georeference was not read: install the "
        f"geo extra (pip install 'uhrbat[geo]') for CRS / WGS84 output; coordinates are image pixels"
    )
    src.georef_note = note
    warnings.warn(note, stacklevel=3)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


__all__ = ["Trust", "open_image", "open_image_bytes", "rasterio_available"]
