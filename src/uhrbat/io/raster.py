"""GeoTIFF / COG / JPEG2000 (any GDAL raster) as an `ImageSource`, via `rasterio`.

`RasterSource.square(side)` reads the raster *decimated* (`out_shape`), so GDAL serves it from
internal overviews (COG, JPEG2000 resolution levels, `gdaladdo`) or streams the blocks: a
20,000 x 20,000 scene is never decoded at full resolution. The read goes to an intermediate at
`oversample` x the requested side, which is placed on the pad-coloured square with exactly the
reference geometry (`uhrbat.io.images.square_from_reduced`) and resampled to `side` with Pillow's
bicubic filter. Small rasters (padded square <= `exact_max_pixels`) are read once at full
resolution and resampled exactly like `PILSource`.

Bands: 1-based, 1 (grey) or 3 (R,G,B) numbers; by default the R,G,B colour-interpreted bands,
else 1,2,3 (or band 1 as grey, or the palette expanded). Non-uint8 data is stretched to 8-bit
per band between the `stretch` percentiles, computed once from a <= `stats_side`-px decimated
read (an overview when there is one), ignoring nodata / masked / non-finite samples.
Nodata, alpha and internal masks become the pad colour (alpha blends).

Huge PNGs (GDAL's PNG driver can only decode forward, and a decimated read restarts the decode
again and again) are streamed once, in row bands, into a copy reduced by an integer factor to
what the largest pyramid level needs (`stream_side`, 4032 px, x `oversample`), which is kept.

`trust="untrusted"` (see `uhrbat.io.sources`): the file must be a regular local file whose
magic bytes name PNG, JPEG or TIFF, and only that format's GDAL driver may open it, with
directory listing, PAM / world-file / `.ovr` / `.msk` sidecars, VRT raw bands and network access
off (`UNTRUSTED_GDAL_ENV`); TIFF strips / tiles above `UNTRUSTED_MAX_BLOCK_BYTES` are refused.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window

from uhrbat.errors import ImageLoadError, RegionError
from uhrbat.io.formats import GDAL_DRIVERS, UNTRUSTED_FORMATS, check_file, describe_head, read_head, sniff
from uhrbat.io.geo import GeoRef, transform_problem
from uhrbat.io.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_OVERSAMPLE,
    DEFAULT_STRETCH,
    EXACT_MAX_PIXELS,
    PAD_RGB,
    NotARasterError,
    PILSource,
    check_bands,
    check_pixel_limit,
    parse_bands,
    percentile_range,
    reduced_scale,
    square_from_reduced,
    stretch_to_uint8,
)
from uhrbat.io.regions import Region, RegionRequest, paint_outside, resolve_region

try:  # GDAL errors surface as CPLE_* exceptions
    from rasterio._err import CPLE_BaseError as _CPLError
except Exception:  # pragma: no cover
    _CPLError = RasterioError

#: GDAL block cache used for our reads (MB). GDAL's default is 5% of RAM, which would let the
#: cache alone grow past the pyramid's memory budget on a big machine.
DEFAULT_GDAL_CACHE_MB = 64
#: Rasters are read in full (and resampled exactly like `PILSource`) only up to this padded
#: square size; above it they are always read decimated (overviews), whatever `exact_max_pixels`.
RASTER_EXACT_MAX_PIXELS = 8192 * 8192
_READ_ERRORS = (RasterioError, _CPLError, OSError, ValueError, RuntimeError)
#: GDAL configuration for untrusted files: nothing outside the file itself is read.
UNTRUSTED_GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing: no sidecar is ever found
    "GDAL_GEOREF_SOURCES": "INTERNAL",  # no world / .tab / .aux.xml georeference
    "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".uhrbat-network-disabled",  # /vsicurl/ refuses every URL
    "GDAL_HTTP_MAX_RETRY": "0",
    "GDAL_HTTP_TIMEOUT": "1",
    "CPL_VSIL_CURL_USE_HEAD": "NO",
    "GTIFF_IGNORE_READ_ERRORS": "NO",
}
#: An untrusted TIFF whose single strip / tile holds more than this many bytes is refused:
#: GDAL decodes a whole block at once, so a one-strip 1 GP TIFF would cost gigabytes.
UNTRUSTED_MAX_BLOCK_BYTES = 256 * 2**20
#: Formats GDAL can only decode forward: streamed once in row bands instead of read decimated.
SEQUENTIAL_DRIVERS = ("PNG",)
#: The largest pyramid side the streamed copy is made for (the model's biggest scale).
DEFAULT_STREAM_SIDE = 4032


def _gdal_message(e: BaseException) -> str:
    """The most specific one-line message along an exception chain (GDAL's own text)."""
    msgs = []
    seen = set()
    first = True
    while e is not None and id(e) not in seen and (first or isinstance(e, (RasterioError, _CPLError))):
        seen.add(id(e))
        first = False
        m = " ".join(str(e).split())
        if m and "See previous exception" not in m:
            msgs.append(m)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return msgs[-1] if msgs else "read failed"


def _env(cache_mb: int, trust: str = "local") -> rasterio.Env:
    extra = UNTRUSTED_GDAL_ENV if trust == "untrusted" else {}
    return rasterio.Env(GDAL_CACHEMAX=int(cache_mb), GDAL_PAM_ENABLED="NO", **extra)


def _open(path: Path | str, driver: str | None = None, overviews: bool = True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        if overviews:
            return rasterio.open(path, driver=driver)
        return rasterio.open(path, driver=driver, OVERVIEW_LEVEL="NONE")


def untrusted_driver(path: Path | str) -> tuple[Path, str]:
    """(real path, the one GDAL driver allowed) for an untrusted file; ImageLoadError otherwise."""
    raw = os.fspath(path)
    if raw.startswith("/vsi") or "://" in raw:
        raise ImageLoadError(
            f"untrusted input must be a local file path, got {raw!r}; GDAL virtual paths "
            f"(/vsi...) and URLs are only read with trust='local'"
        )
    p = check_file(os.path.realpath(check_file(raw)))  # checked before realpath: a NUL byte is a clear error
    head = read_head(p)
    kind = sniff(head)
    if kind not in UNTRUSTED_FORMATS:
        raise ImageLoadError(
            f"image {p} is {describe_head(head)}, which is not accepted from untrusted input; "
            f"send a PNG, JPEG or TIFF/GeoTIFF file"
        )
    return p, GDAL_DRIVERS[kind][0]


def read_georef(ds: Any, label: str = "raster") -> tuple[GeoRef | None, str | None]:
    """(georeference, note) of an open dataset.

    `(None, None)`: not georeferenced. `(None, note)`: the file has a georeference we refuse to
    use (a NaN / inf / singular pixel-to-map transform, issue 18): the image is read as not
    georeferenced and `note` says so. A CRS that cannot be transformed to WGS84 is kept (CRS
    coordinates still work) with `GeoRef.wgs84_error` set, found here at open time."""
    crs = ds.crs
    transform = ds.transform
    if transform.is_identity:
        gcps, gcp_crs = ds.gcps
        if not gcps:
            return None, None
        transform, problem = _affine_from_gcps(gcps)
        if problem:
            return None, _ignored(label, problem)
        crs = gcp_crs
    problem = transform_problem(tuple(transform)[:6])
    if problem:
        return None, _ignored(label, problem)
    return GeoRef(crs=crs, transform=transform).checked_wgs84((int(ds.width), int(ds.height))), None


def _affine_from_gcps(gcps: Sequence[Any]) -> tuple[Any, str | None]:
    """The least-squares affine transform through ground control points, or (None, why).

    Fitted here rather than with GDAL's GCPsToGeoTransform, whose result rasterio returns even
    when the fit failed (uninitialised numbers for a single GCP, e.g. a GeoTIFF whose pixel
    scale is zero)."""
    from affine import Affine

    pts = np.array([(g.col, g.row, g.x, g.y) for g in gcps], dtype=np.float64)
    if len(pts) < 3:
        return None, f"it has {len(pts)} ground control point(s) and no usable transform (an affine fit needs 3)"
    if not np.isfinite(pts).all():
        return None, "its ground control points have non-finite coordinates"
    A = np.column_stack([pts[:, 0], pts[:, 1], np.ones(len(pts))])
    if np.linalg.matrix_rank(A) < 3:
        return None, "its ground control points are collinear (no affine transform through them)"
    cx = np.linalg.lstsq(A, pts[:, 2], rcond=None)[0]
    cy = np.linalg.lstsq(A, pts[:, 3], rcond=None)[0]
    return Affine(*cx, *cy), None


def _ignored(label: str, problem: str) -> str:
    return f"the georeference of {label} was ignored: {problem}; coordinates are image pixels"


def georef_of(ds: Any) -> GeoRef | None:
    """CRS + affine transform of an open dataset, or None (see `read_georef`)."""
    return read_georef(ds)[0]


def wants_raster_reader(path: Path, exact_max_pixels: int | None = EXACT_MAX_PIXELS, *, trust: str = "local") -> bool:
    """Should a TIFF / JPEG2000 file be read with rasterio rather than Pillow?

    Pillow keeps plain 8-bit photos (<= 4 bands, no geospatial metadata, nodata or overviews,
    small enough to pad in memory) exact and handles CMYK and EXIF orientation; everything else
    goes to GDAL. Files GDAL cannot open go to Pillow (which then reports the error).
    """
    driver = untrusted_driver(path)[1] if trust == "untrusted" else None
    try:
        with _env(DEFAULT_GDAL_CACHE_MB, trust), _open(path, driver) as ds:
            if ds.driver not in ("GTiff", "COG", "JP2OpenJPEG", "JPEG2000", "JP2KAK", "JP2ECW"):
                return True
            plain = (
                read_georef(ds) == (None, None)
                and all(dt == "uint8" for dt in ds.dtypes)
                and ds.count <= 4
                and all(v is None for v in ds.nodatavals)
                and not ds.overviews(1)
                and all(MaskFlags.all_valid in f or MaskFlags.alpha in f for f in ds.mask_flag_enums)
                and (exact_max_pixels is None or ds.width * ds.height <= exact_max_pixels)
                and ds.driver == "GTiff"
            )
            return not plain
    except _READ_ERRORS:
        return False


def _cmyk_to_rgb(c: np.ndarray, m: np.ndarray, y: np.ndarray, k: np.ndarray) -> list[np.ndarray]:
    nk = 255 - k.astype(np.uint16)
    return [(nk - (ch.astype(np.uint16) * nk + 127) // 255).astype(np.uint8) for ch in (c, m, y)]


class RasterSource:
    """A GDAL raster read lazily and decimated; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        bands: Any = None,
        stretch: Sequence[float] | None = DEFAULT_STRETCH,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        exact_max_pixels: int | None = EXACT_MAX_PIXELS,
        oversample: float = DEFAULT_OVERSAMPLE,
        resampling: str = "average",
        stats_side: int = 1024,
        gdal_cache_mb: int = DEFAULT_GDAL_CACHE_MB,
        raster_exact_max_pixels: int = RASTER_EXACT_MAX_PIXELS,
        trust: str = "local",
        stream_side: int = DEFAULT_STREAM_SIDE,
        region: RegionRequest | None = None,
    ) -> None:
        if trust not in ("local", "untrusted"):
            raise ImageLoadError(f"trust must be 'local' or 'untrusted', got {trust!r}")
        self.trust = trust
        self._driver: str | None = None
        if trust == "untrusted":
            path, self._driver = untrusted_driver(path)
        self._gdal_path = os.fspath(path)  # as given: Path() would fold the '//' of '/vsicurl/https://...'
        self.path = Path(path)
        self.label = str(self.path)  # how messages name the file (an upload's name, not its temp copy)
        self.stream_side = int(stream_side)
        self._cache: tuple[float, Image.Image] | None = None  # (scale, reduced RGB copy) of a streamed raster
        self.stretch = None if stretch is None else (float(stretch[0]), float(stretch[1]))
        if self.stretch is not None and not (0 <= self.stretch[0] < self.stretch[1] <= 100):
            raise ImageLoadError(
                f"{self.label}: stretch percentiles must satisfy 0 <= low < high <= 100, got {stretch}"
            )
        self.exact_max_pixels = (
            None if exact_max_pixels is None else min(int(exact_max_pixels), int(raster_exact_max_pixels))
        )
        self.oversample = float(oversample)
        self.resampling = Resampling[resampling] if isinstance(resampling, str) else Resampling(resampling)
        self.stats_side = int(stats_side)
        self.gdal_cache_mb = int(gdal_cache_mb)
        self._full: PILSource | None = None
        self.region: Region | None = None
        self._window: Window | None = None
        try:
            with self._env(), self._dataset() as ds:
                self._inspect(ds, parse_bands(bands), max_pixels, region)
            if self.mode == "bands" and self.dtype != np.uint8:
                # A window read at full resolution is stretched like the same window cut into its own
                # file (which has no overviews): its statistics come from full-resolution samples.
                native = self._window is not None and self._is_exact()
                with self._env(), self._dataset(overviews=not native) as ds:
                    self.stretch_ranges = self._compute_stretch(ds)
        except (ImageLoadError, RegionError):
            raise
        except _READ_ERRORS as e:
            msg = _gdal_message(e)
            if "not recognized" in msg or "not a supported" in msg or "No such" in msg:
                raise NotARasterError(f"not an image or raster file (GDAL: {msg}): {self.label}") from e
            raise ImageLoadError(f"corrupt or unreadable raster {self.label}: {msg}") from e
        # Validate the data now (a small decimated read), so corrupt files fail at open time.
        if self._is_exact():
            full = self._stream(1.0) if self.driver in SEQUENTIAL_DRIVERS else self._read_full()
            self._full = PILSource(full, exact_max_pixels=None)
        elif self.driver in SEQUENTIAL_DRIVERS:
            self._stream(reduced_scale(self._size, self.stream_side, self.oversample))  # one forward pass
        elif self.overview_factors or self._size[0] * self._size[1] <= 64_000_000:
            # A 64-px decimated read: served by the smallest overview, touches the whole extent.
            self._read_checked(
                max(1, round(self._size[0] * 64 / max(self._size))),
                max(1, round(self._size[1] * 64 / max(self._size))),
                resampling=Resampling.nearest,
            )
        else:  # huge and without overviews: only probe the first and last blocks (no full scan)
            self._probe_corners()

    # ------------------------------------------------------------------ metadata
    def _env(self) -> rasterio.Env:
        return _env(self.gdal_cache_mb, self.trust)

    def _dataset(self, overviews: bool = True):
        return _open(self._gdal_path, self._driver, overviews)

    def _check_blocks(self, ds: Any) -> None:
        """Untrusted: refuse strips / tiles so big that decoding one costs gigabytes."""
        bh, bw = ds.block_shapes[0]
        itemsize = max(np.dtype(d).itemsize for d in ds.dtypes)
        nbytes = int(bh) * int(bw) * itemsize * (ds.count if ds.driver == "GTiff" else 1)
        if ds.driver == "GTiff" and nbytes > UNTRUSTED_MAX_BLOCK_BYTES:
            raise ImageLoadError(
                f"raster {self.label} stores its pixels in {bw}x{bh} blocks ({nbytes / 2**20:,.0f} MB each), above "
                f"the {UNTRUSTED_MAX_BLOCK_BYTES // 2**20} MB limit for untrusted TIFFs; send a tiled (COG) or "
                f"striped GeoTIFF"
            )

    def _inspect(
        self, ds: Any, bands: tuple[int, ...] | None, max_pixels: int | None, region: RegionRequest | None
    ) -> None:
        if ds.count < 1:
            raise NotARasterError(f"not a raster (no bands): {self.label}")
        self._size = (int(ds.width), int(ds.height))
        self.count = int(ds.count)
        self.driver = ds.driver
        self.overview_factors = list(ds.overviews(1))
        if self.trust == "untrusted":
            self._check_blocks(ds)
        self.georef, self.georef_note = read_georef(ds, self.label)
        if self.georef_note:
            warnings.warn(self.georef_note, stacklevel=4)
        if region is not None:
            self.region = resolve_region(region, self._size, self.georef, image=f"image {self.label}")
            x0, y0, x1, y1 = self.region.pixels
            self._window = Window(x0, y0, x1 - x0, y1 - y0)
            self.georef = self.region.georef
            # Only the window's blocks are decoded, except by forward-only decoders (PNG, JPEG),
            # which decode every row above the window too: the limit follows what is decoded.
            decoded = self.region.size if ds.driver not in SEQUENTIAL_DRIVERS else (self._size[0], y1)
            self._size = self.region.size
        else:
            decoded = self._size
        if not self.overview_factors:
            check_pixel_limit(self.path, decoded, max_pixels)
        ci = list(ds.colorinterp)
        self.mode = "bands"
        self._lut = None
        if bands is None:
            if ds.count == 1 and ci[0] == ColorInterp.palette:
                self.mode, bands = "palette", (1,)
                cmap = ds.colormap(1)
                lut = np.zeros((max(256, max(cmap) + 1), 4), np.uint8)
                lut[:, 3] = 255
                for k, v in cmap.items():
                    lut[k] = v
                self._lut = lut
            elif all(c in ci for c in (ColorInterp.cyan, ColorInterp.magenta, ColorInterp.yellow, ColorInterp.black)):
                self.mode = "cmyk"
                bands = tuple(
                    ci.index(c) + 1
                    for c in (ColorInterp.cyan, ColorInterp.magenta, ColorInterp.yellow, ColorInterp.black)
                )
            elif all(c in ci for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
                bands = tuple(ci.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue))
            elif ds.count >= 3 and ci[:3].count(ColorInterp.alpha) == 0:
                bands = (1, 2, 3)
            else:
                bands = (1,)
        else:
            check_bands(bands, ds.count, f"raster {self.label}")
        self.bands = tuple(bands)
        self.dtype = np.dtype(ds.dtypes[self.bands[0] - 1])
        dtypes = {ds.dtypes[b - 1] for b in self.bands}
        if len(dtypes) > 1:
            self.dtype = np.result_type(*[np.dtype(d) for d in dtypes])
        flags = [ds.mask_flag_enums[b - 1] for b in self.bands]
        self._has_mask = any(MaskFlags.all_valid not in f for f in flags)
        self._is_float = np.issubdtype(self.dtype, np.floating)
        self.stretch_ranges: list[tuple[float, float]] | None = None

    def _compute_stretch(self, ds: Any) -> list[tuple[float, float]]:
        if ds.driver in SEQUENTIAL_DRIVERS and not self._is_exact():
            return self._stream_stretch(ds)
        W, H = self._size
        k = min(1.0, self.stats_side / max(W, H))
        shape = (max(1, round(H * k)), max(1, round(W * k)))
        ranges = []
        valid = None
        win = {} if self._window is None else {"window": self._window}
        if self._has_mask:
            valid = np.zeros(shape, bool)
            for b in self.bands:
                valid |= ds.read_masks(b, out_shape=shape, resampling=Resampling.nearest, **win) > 0
        for b in self.bands:
            arr = ds.read(b, out_shape=shape, resampling=Resampling.nearest, **win)
            vals = arr[valid] if valid is not None else arr.ravel()
            ranges.append(percentile_range(vals, self.stretch, dtype=self.dtype))
        return ranges

    @property
    def size(self) -> tuple[int, int]:
        return self._size

    def _is_exact(self) -> bool:
        L = max(self._size)
        return self.exact_max_pixels is None or L * L <= self.exact_max_pixels

    def __repr__(self) -> str:
        return (
            f"RasterSource({str(self.path)!r}, size={self._size}, bands={self.bands}, dtype={self.dtype}, "
            f"overviews={self.overview_factors}, georef={'yes' if self.georef else 'no'}"
            + (f", region={list(self.region.pixels)}" if self.region is not None else "")
            + ")"
        )

    # ------------------------------------------------------------------ reading
    def _probe_corners(self) -> None:
        W, H = self._size
        try:
            with self._env(), self._dataset() as ds:
                bh, bw = ds.block_shapes[0]
                x0, y0 = (0, 0) if self._window is None else (self._window.col_off, self._window.row_off)
                for col, row in ((0, 0), (max(0, W - bw), max(0, H - bh))):
                    ds.read(self.bands[0], window=Window(x0 + col, y0 + row, min(bw, W), min(bh, H)))
        except _READ_ERRORS as e:
            raise ImageLoadError(f"corrupt or unreadable raster {self.label}: {_gdal_message(e)}") from e

    def _read_checked(
        self, w: int, h: int, out: np.ndarray | None = None, resampling: Resampling | None = None
    ) -> np.ndarray:
        """Read the raster at `(h, w)` into `out` (uint8 `(h, w, >=3)`, pre-filled with the pad
        colour; a new RGBX array when None), blending nodata / alpha towards the pad colour."""
        if out is None:
            out = _pad_canvas(w, h)
        try:
            with self._env(), self._dataset() as ds:
                self._read_into(ds, out, resampling or self.resampling, window=self._window)
        except ImageLoadError:
            raise
        except MemoryError:
            raise
        except _READ_ERRORS as e:
            msg = _gdal_message(e)
            raise ImageLoadError(f"corrupt or unreadable raster {self.label}: {msg}") from e
        return out

    def _read_into(
        self, ds: Any, out: np.ndarray, resampling: Resampling, rows: int = 1024, window: Any = None
    ) -> None:
        """Read the raster (or `window` of it) resampled to `out`'s shape; see `_read_checked`."""
        h, w = out.shape[:2]
        shape = (h, w)
        alpha = None
        win = {} if window is None else {"window": window}
        if self.mode == "palette":
            idx = ds.read(1, out_shape=shape, resampling=Resampling.nearest, **win)
            for r0 in range(0, h, rows):
                rgba = self._lut[idx[r0 : r0 + rows]]
                out[r0 : r0 + rows, :, :3] = rgba[..., :3]
            a = self._lut[:, 3]
            if (a < 255).any():
                alpha = a[idx]
            del idx
        elif self.mode == "cmyk":
            arr = ds.read(list(self.bands), out_shape=(4, h, w), resampling=resampling, **win)
            for i, ch in enumerate(_cmyk_to_rgb(*arr)):
                out[..., i] = ch
            del arr
        else:
            finite = None
            for b in dict.fromkeys(self.bands):  # distinct bands, in order
                band = ds.read(b, out_shape=shape, resampling=resampling, **win)
                if self._is_float:
                    fb = np.isfinite(band)
                    finite = fb if finite is None else (finite | fb)
                k = self.bands.index(b)
                b8 = stretch_to_uint8(band, *self.stretch_ranges[k]) if self.stretch_ranges is not None else band
                del band
                targets = [i for i, bb in enumerate(self.bands) if bb == b] if len(self.bands) == 3 else [0, 1, 2]
                for i in targets:
                    out[..., i] = b8
                del b8
            if finite is not None and not finite.all():
                alpha = finite.astype(np.uint8) * np.uint8(255)
        if self._has_mask:
            m = None
            for b in self.bands if self.mode != "cmyk" else self.bands[:1]:
                mb = ds.read_masks(b, out_shape=shape, resampling=Resampling.nearest, **win)
                m = mb if m is None else np.maximum(m, mb, out=m)
            if m is not None and m.min() < 255:
                alpha = m if alpha is None else np.minimum(alpha, m)
        if self.region is not None and self.region.masked:  # outside the region's polygons: padding
            inside = self.region.mask((h, w)).astype(np.uint8) * np.uint8(255)
            alpha = inside if alpha is None else np.minimum(alpha, inside)
        if alpha is not None:
            _blend_pad(out, alpha, rows)

    def _read_full(self) -> Image.Image:
        W, H = self._size
        canvas = self._read_checked(W, H, resampling=Resampling.nearest)
        return Image.frombuffer("RGBX", (W, H), canvas, "raw", "RGBX", 0, 1).convert("RGB")

    # ------------------------------------------------------------------ forward-only (PNG) streaming
    def _row_bands(self, ds: Any, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, all bands of `rows` rows as (count, n, W)), top to bottom. One dataset-level
        read per band of rows: per-band or mask reads would make GDAL's PNG decoder restart."""

        W, H = self._size
        x0, y0 = (0, 0) if self._window is None else (self._window.col_off, self._window.row_off)
        for r0 in range(0, H, rows):
            n = min(rows, H - r0)
            yield r0, ds.read(window=Window(x0, y0 + r0, W, n))

    def _stream_stretch(self, ds: Any) -> list[tuple[float, float]]:
        """Percentile ranges from every `step`-th row and column of one forward pass."""
        W, H = self._size
        step = max(1, round(max(W, H) / self.stats_side))
        rows = max(1, (32 * 2**20) // (W * ds.count * np.dtype(self.dtype).itemsize))
        rows = max(step, rows - rows % step)
        samples: dict[int, list[np.ndarray]] = {b: [] for b in self.bands}
        valid_parts: list[np.ndarray] = []
        for _, arr in self._row_bands(ds, rows):
            sub = arr[:, ::step, ::step]
            valid_parts.append(self._stream_alpha(ds, sub) if self._has_mask else None)
            for b in self.bands:
                samples[b].append(sub[b - 1])
        ranges = []
        for b in self.bands:
            vals = np.concatenate([a.ravel() for a in samples[b]])
            if valid_parts and valid_parts[0] is not None:
                vals = vals[np.concatenate([v.ravel() for v in valid_parts]) > 0]
            ranges.append(percentile_range(vals, self.stretch, dtype=self.dtype))
        return ranges

    def _stream_alpha(self, ds: Any, arr: np.ndarray) -> np.ndarray | None:
        """uint8 alpha (0 = pad) of a (count, n, W) block from its alpha band or nodata values."""
        ci = list(ds.colorinterp)
        if ColorInterp.alpha in ci:
            a = arr[ci.index(ColorInterp.alpha)]
            return (
                a
                if a.dtype == np.uint8
                else (a >> 8).astype(np.uint8)
                if a.dtype == np.uint16
                else (a > 0).astype(np.uint8) * np.uint8(255)
            )
        nod = [ds.nodatavals[b - 1] for b in self.bands]
        if any(v is not None for v in nod):  # valid where any selected band differs from its nodata
            valid = np.zeros(arr.shape[1:], bool)
            for b, v in zip(self.bands, nod, strict=True):
                valid |= arr[b - 1] != v if v is not None else True
            return valid.astype(np.uint8) * np.uint8(255)
        return None

    def _stream(self, g: float, band_bytes: int = 32 * 2**20) -> Image.Image:
        """One forward pass over a sequential raster (PNG), kept as an RGB copy at scale `g2 >= g`.

        Rows come in bands of `n` rows; each band is box-filtered to `m = ceil(g * n)` rows
        (`g2 = m / n`), so band edges fall on output-row edges and the copy equals a box resize
        of the whole image. Memory: one band (~`band_bytes`) plus the copy (~(2 x 4032)^2)."""
        W, H = self._size
        n = max(1, band_bytes // (4 * W))
        if g < 1:
            n = min(max(n, math.ceil(1 / g)), max(1, (256 * 2**20) // (4 * W)))
        g2 = 1.0 if g >= 1 else min(1.0, math.ceil(g * n) / n)
        w2 = max(1, round(W * g2))
        heights = [max(1, round(min(n, H - r0) * g2)) for r0 in range(0, H, n)]
        out = Image.new("RGB", (w2, sum(heights)), PAD_RGB)
        y = 0
        try:
            with self._env(), self._dataset() as ds:
                for (_, arr), m in zip(self._row_bands(ds, n), heights, strict=True):
                    band = self._stream_rgb(ds, arr)
                    del arr
                    if band.size != (w2, m):
                        band = band.resize((w2, m), Image.Resampling.BOX)
                    out.paste(band, (0, y))
                    y += m
        except ImageLoadError:
            raise
        except MemoryError:
            raise
        except _READ_ERRORS as e:
            raise ImageLoadError(f"corrupt or unreadable raster {self.label}: {_gdal_message(e)}") from e
        if self.region is not None:
            out = paint_outside(out, self.region)
        self._cache = (min(out.size[0] / W, out.size[1] / H), out)
        return out

    def _stream_rgb(self, ds: Any, arr: np.ndarray) -> Image.Image:
        """(count, n, W) raw block -> RGB image, alpha / nodata composited over the pad colour."""
        if self.mode == "palette":
            rgba = Image.fromarray(self._lut[arr[0]], "RGBA")
            img, alpha = rgba.convert("RGB"), (rgba.getchannel("A") if (self._lut[:, 3] < 255).any() else None)
        else:
            chans = []
            for b in self.bands if len(self.bands) == 3 else self.bands * 3:
                band = arr[b - 1]
                k = self.bands.index(b)
                b8 = stretch_to_uint8(band, *self.stretch_ranges[k]) if self.stretch_ranges is not None else band
                chans.append(Image.fromarray(np.ascontiguousarray(b8, dtype=np.uint8), "L"))
            img = Image.merge("RGB", chans)
            a = self._stream_alpha(ds, arr) if self._has_mask else None
            alpha = None if a is None or a.min() == 255 else Image.fromarray(np.ascontiguousarray(a), "L")
        if alpha is not None:
            bg = Image.new("RGB", img.size, PAD_RGB)
            bg.paste(img, mask=alpha)
            img = bg
        return img

    def reduced(self, g: float) -> Image.Image:
        """The whole raster (no padding) at scale ~`g` (<= 1) as RGB; nodata as pad colour."""
        if self._cache is not None and self._cache[0] >= g:
            return self._cache[1]
        if self.driver in SEQUENTIAL_DRIVERS:
            return self._stream(g)
        W, H = self._size
        w, h = max(1, round(W * g)), max(1, round(H * g))
        canvas = self._read_checked(w, h)
        return Image.frombuffer("RGBX", (w, h), canvas, "raw", "RGBX", 0, 1).convert("RGB")

    def padded_square(self) -> Image.Image | None:
        """The exact padded square of a raster read whole (see `PILSource.padded_square`), else None."""
        return self._full.padded_square() if self._full is not None else None

    def square(self, side: int) -> Image.Image:
        if self._full is not None:
            return self._full.square(side)
        W, H = self._size
        g = reduced_scale(self._size, side, self.oversample)
        if self.driver in SEQUENTIAL_DRIVERS:  # from the streamed copy (re-streamed only for a bigger side)
            return square_from_reduced(self.reduced(g), self._size, side)
        w, h = max(1, round(W * g)), max(1, round(H * g))
        # The read lands in an RGBX array shared with Pillow (zero-copy); the padded square is
        # resampled from it in bands, never materialised (see `padded_resize`).
        reduced = self._read_checked(w, h)
        im = Image.frombuffer("RGBX", (w, h), reduced, "raw", "RGBX", 0, 1)
        return square_from_reduced(im, self._size, side)


def _pad_canvas(w: int, h: int) -> np.ndarray:
    canvas = np.empty((h, w, 4), np.uint8)
    canvas[..., :3] = PAD_RGB
    canvas[..., 3] = 255
    return canvas


def _blend_pad(out: np.ndarray, alpha: np.ndarray, rows: int = 1024) -> None:
    """out[..., :3] = out * a + pad * (1 - a), in row chunks (a = alpha / 255)."""
    pad = np.asarray(PAD_RGB, np.uint16)
    for r0 in range(0, out.shape[0], rows):
        a = alpha[r0 : r0 + rows]
        if a.min() == 255:
            continue
        a16 = a.astype(np.uint16)[..., None]
        px = out[r0 : r0 + rows, :, :3].astype(np.uint16)
        out[r0 : r0 + rows, :, :3] = ((px * a16 + pad * (255 - a16) + 127) // 255).astype(np.uint8)
