"""Where the evidence is: kept / merged visual tokens -> boxes in the original image, polygons in
the image CRS and in WGS84, and RFC 7946 GeoJSON.

Geometry (the inverse of the processor's pad-and-resize, §2.2 of the method notes). With the
original image `W x H`, square side `L = max(W, H)` and pad offsets `ox = (L - W) // 2`,
`oy = (L - H) // 2`, a token at scale `S` (grid `g = S // tile`), tile `t = r * g + c`, patch
`(row, col)` covers the square pixels

    x in [(c * n + col) * p, +p) * L / S,   y in [(r * n + row) * p, +p) * L / S

with patch side `p`, tile side `tile` and `n = tile // p` tokens per tile side: the token geometry
of the model config that each `KeptToken` carries (`tile_size`, `patch_size`; 336 / 14 / 24 for
CLIP ViT-L/14-336).

and, in the original image, those minus `(ox, oy)`, clipped to `[0, W] x [0, H]`. Boxes are
float pixel-edge coordinates (x right, y down, origin at the top-left corner of pixel (0, 0)).
A cell entirely inside the square padding is dropped.

Merged tokens: a merged token is the mean of its group's members, and K-Means groups use
*tile-local* xy, so members can be far apart. We therefore keep the individual member cells
(GeoJSON: a MultiPolygon of the cells, with horizontally adjacent cells of one row joined into
one rectangle) and report the union bounding box separately (`box_px`); pass
`merged_geometry="bbox"` to write the union box as the geometry instead. A non-merged token is
its own single cell.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry
from uhrbat.errors import GeoError, GeoTransformError, NotGeoreferencedError

#: Suffix of the pixel-space kept-token file written for images without a georeference.
PIXEL_JSON_SUFFIX = ".pixels.json"


# ----------------------------------------------------------------------------- georeference
def transform_problem(coefficients: Sequence[float]) -> str | None:
    """Why an affine pixel->CRS transform `(a, b, c, d, e, f)` is unusable, or None.

    Non-finite coefficients (a NaN / inf pixel scale or origin) and singular transforms (zero
    pixel size: no inverse, every pixel on one point) cannot place pixels on a map."""
    try:
        a, b, c, d, e, f = (float(v) for v in coefficients)
    except (TypeError, ValueError):
        return f"the pixel-to-map transform is not six numbers: {coefficients!r}"
    if not all(math.isfinite(v) for v in (a, b, c, d, e, f)):
        return f"its pixel-to-map transform has non-finite values ({a}, {b}, {c}, {d}, {e}, {f})"
    det = a * e - b * d
    if not math.isfinite(det) or det == 0:
        return f"its pixel-to-map transform is singular (pixel size {a} x {e}, rotation {b}, {d})"
    return None


def short_gdal_message(e: BaseException) -> str:
    """One short line from a GDAL / PROJ error (their text can embed a whole PROJJSON CRS)."""
    msg = " ".join(str(e).split()) or type(e).__name__
    cut = msg.find(" from '{")
    if cut > 0:
        msg = msg[:cut]
    return msg if len(msg) <= 160 else msg[:157] + "..."


@dataclass(frozen=True)
class GeoRef:
    """CRS + affine pixel->CRS transform of a raster (pixel-edge coordinates, GDAL convention).

    `crs` is a `rasterio.crs.CRS` (or anything `rasterio`/`pyproj` accept: "EPSG:32617", WKT);
    `transform` an `affine.Affine` or a 6-tuple `(a, b, c, d, e, f)`:
    `X = a*x + b*y + c`, `Y = d*x + e*y + f`. A non-finite or singular transform is refused
    (`GeoError`): readers treat such a file as not georeferenced, with a note (issue 18).
    `wgs84_error`: set by `checked_wgs84` when the CRS cannot be transformed to WGS84; every
    WGS84 conversion then raises `GeoTransformError` with it, while CRS coordinates still work.
    """

    crs: Any
    transform: Any
    wgs84_error: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        problem = transform_problem(tuple(self.transform)[:6])
        if problem:
            raise GeoError(f"unusable georeference: {problem}")

    @property
    def coefficients(self) -> tuple[float, float, float, float, float, float]:
        t = self.transform
        return tuple(float(v) for v in (tuple(t)[:6]))  # type: ignore[return-value]

    @property
    def crs_name(self) -> str | None:
        if self.crs is None:
            return None
        to_epsg = getattr(self.crs, "to_epsg", None)
        epsg = to_epsg() if callable(to_epsg) else None
        if epsg:
            return f"EPSG:{epsg}"
        to_string = getattr(self.crs, "to_string", None)
        return to_string() if callable(to_string) else str(self.crs)

    def pixel_to_crs(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        a, b, c, d, e, f = self.coefficients
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        return a * x + b * y + c, d * x + e * y + f

    def crs_to_pixel(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Image-CRS coordinates -> (fractional) pixel-edge coordinates: the inverse transform."""
        a, b, c, d, e, f = self.coefficients
        det = a * e - b * d
        X = np.asarray(X, dtype=np.float64) - c
        Y = np.asarray(Y, dtype=np.float64) - f
        return (e * X - b * Y) / det, (a * Y - d * X) / det

    def shifted(self, x0: float, y0: float, sx: float = 1.0, sy: float = 1.0) -> GeoRef:
        """The georeference of a window whose pixel (0, 0) is this raster's `(x0, y0)` and whose
        pixels are `sx x sy` of this raster's (the window transform)."""
        a, b, c, d, e, f = self.coefficients
        t = (a * sx, b * sy, a * x0 + b * y0 + c, d * sx, e * sy, d * x0 + e * y0 + f)
        try:
            from affine import Affine

            t = Affine(*t)
        except ImportError:  # pragma: no cover - affine comes with rasterio
            pass
        return GeoRef(self.crs, t, self.wgs84_error)

    def crs_to_wgs84(self, X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Image-CRS coordinates -> (longitude, latitude) in WGS84 degrees.

        Raises `NotGeoreferencedError` without a CRS and `GeoTransformError` when the CRS cannot
        be transformed (never a raw GDAL / PROJ exception) or a point has no WGS84 position."""
        if self.crs is None:
            raise NotGeoreferencedError("this image has an affine transform but no CRS; WGS84 is unknown")
        if self.wgs84_error:
            raise GeoTransformError(self.wgs84_error)
        X = np.asarray(X, dtype=np.float64)
        Y = np.asarray(Y, dtype=np.float64)
        try:
            from rasterio.warp import transform as _warp

            lon, lat = _warp(self.crs, "EPSG:4326", X.ravel().tolist(), Y.ravel().tolist())
        except ImportError:  # pragma: no cover - rasterio is what produces GeoRefs
            from pyproj import Transformer

            crs = self.crs.to_wkt() if hasattr(self.crs, "to_wkt") else self.crs
            try:
                tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
                lon, lat = tr.transform(X.ravel(), Y.ravel())
            except Exception as e:  # pyproj.exceptions.CRSError / ProjError
                raise GeoTransformError(self._wgs84_message(e)) from None
        except Exception as e:  # rasterio's CPLE_* errors (CPLE_NotSupportedError, ...)
            raise GeoTransformError(self._wgs84_message(e)) from None
        lon = np.asarray(lon, dtype=np.float64).reshape(X.shape)
        lat = np.asarray(lat, dtype=np.float64).reshape(X.shape)
        if not (np.isfinite(lon).all() and np.isfinite(lat).all()):
            raise GeoTransformError(
                f"some points have no WGS84 position in CRS {self.crs_name} (outside the area where it is "
                f"defined); use CRS or pixel coordinates"
            )
        return lon, lat

    def _wgs84_message(self, e: BaseException) -> str:
        return (
            f"the image CRS {self.crs_name} cannot be transformed to WGS84 longitude/latitude "
            f"({short_gdal_message(e)}); use CRS coordinates (box_crs, coordinates='crs') or pixel boxes (--json)"
        )

    def checked_wgs84(self, size: tuple[int, int]) -> GeoRef:
        """This georeference, with `wgs84_error` set when the corners and centre of a `size`
        raster cannot be transformed to WGS84 (found at open time, said once, never a crash later)."""
        if self.crs is None or self.wgs84_error:
            return self
        W, H = size
        try:
            self.pixel_to_wgs84([0, W, W, 0, W / 2], [0, 0, H, H, H / 2])
        except GeoTransformError as e:
            return GeoRef(self.crs, self.transform, str(e))
        return self

    def pixel_to_wgs84(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.crs_to_wgs84(*self.pixel_to_crs(x, y))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"crs": self.crs_name, "transform": list(self.coefficients)}
        if self.wgs84_error:
            d["wgs84_error"] = self.wgs84_error
        return d


def map_ready(source: Any) -> GeoRef:
    """The georeference of `source` when map output in WGS84 (GeoJSON) is possible; otherwise
    `NotGeoreferencedError` / `GeoTransformError` with one line saying why and what to use
    instead. Call it before the model runs (e.g. for `--geojson`) to fail early."""
    georef = _georef_of(source)
    if georef is None or georef.crs is None:
        why = getattr(source, "georef_note", None) or (
            "it has an affine transform but no CRS" if georef is not None else "it has no georeference"
        )
        raise NotGeoreferencedError(
            f"{_label(source)} cannot be written as GeoJSON: {why}. GeoJSON coordinates are WGS84 "
            f"longitude/latitude (RFC 7946), and pixel coordinates there would be misplaced by GIS tools; "
            f"use --json (pixel boxes) or write_pixel_json (a {PIXEL_JSON_SUFFIX} file)"
        )
    if georef.wgs84_error:
        raise GeoTransformError(f"{_label(source)} cannot be written as GeoJSON: {georef.wgs84_error}")
    return georef


def _label(source: Any) -> str:
    label = getattr(source, "label", None) or getattr(source, "path", None)
    return f"image {label}" if label else "this image"


# ----------------------------------------------------------------------------- token -> boxes
def _size_of(source: Any) -> tuple[int, int]:
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return int(source[0]), int(source[1])
    size = getattr(source, "size", None) or getattr(source, "image_size", None)
    if size is None:
        raise TypeError(f"need an image source or (width, height), got {type(source).__name__}")
    return int(size[0]), int(size[1])


def _georef_of(source: Any) -> GeoRef | None:
    return None if isinstance(source, (tuple, list)) else getattr(source, "georef", None)


def geometry_of(token: Any) -> TokenGeometry:
    """The token geometry a token carries (`KeptToken.tile_size` / `patch_size`); CLIP-336/14
    for records without it."""
    return TokenGeometry(
        int(getattr(token, "tile_size", CLIP_336_14.tile_size)),
        int(getattr(token, "patch_size", CLIP_336_14.patch_size)),
    )


def square_cells(scale: int, flat: Iterable[int], geometry: TokenGeometry = CLIP_336_14) -> np.ndarray:
    """Flat positions (tile * tokens_per_tile + row * tokens_per_side + col) at `scale` ->
    `[n, 4]` boxes (x0, y0, x1, y1) in pixels of the `scale x scale` square."""
    flat = np.asarray(list(flat) if not isinstance(flat, np.ndarray) else flat, dtype=np.int64).reshape(-1)
    g = geometry.grid(scale)
    n, p = geometry.tokens_per_side, geometry.patch_size
    if g < 1:
        raise ValueError(f"scale {scale} is smaller than one {geometry.tile_size}-px tile")
    if flat.size and (flat.min() < 0 or flat.max() >= g * g * geometry.tokens_per_tile):
        raise ValueError(f"token position out of range for scale {scale} ({g * g} tiles): {flat.min()}..{flat.max()}")
    tile, rc = np.divmod(flat, geometry.tokens_per_tile)
    row, col = np.divmod(rc, n)
    tr, tc = np.divmod(tile, g)
    x0 = (tc * n + col) * p
    y0 = (tr * n + row) * p
    return np.stack([x0, y0, x0 + p, y0 + p], axis=1).astype(np.float64)


def image_cells(
    scale: int, flat: Iterable[int], size: tuple[int, int], geometry: TokenGeometry = CLIP_336_14
) -> tuple[np.ndarray, np.ndarray]:
    """Cells of `flat` positions in original-image pixels, clipped: (`[n, 4]` boxes, keep mask).

    `keep[i]` is False when cell i lies entirely in the square padding (its box is then empty).
    """
    W, H = size
    L = max(W, H)
    ox, oy = (L - W) // 2, (L - H) // 2
    cells = square_cells(scale, flat, geometry) * L / int(scale)  # integer product first: exact at edges
    cells -= np.array([ox, oy, ox, oy], dtype=np.float64)
    cells[:, 0] = np.clip(cells[:, 0], 0, W)
    cells[:, 2] = np.clip(cells[:, 2], 0, W)
    cells[:, 1] = np.clip(cells[:, 1], 0, H)
    cells[:, 3] = np.clip(cells[:, 3], 0, H)
    keep = (cells[:, 2] > cells[:, 0]) & (cells[:, 3] > cells[:, 1])
    return cells, keep


def token_members(token: Any) -> list[int]:
    """Flat positions a token stands for (its own position when `members` is empty)."""
    members = list(getattr(token, "members", None) or [])
    if not members:
        members = [geometry_of(token).flat(token.tile, token.row, token.col)]
    return members


@dataclass
class TokenRegion:
    """Where one kept / merged token lies in the original image."""

    index: int  # position in the token list
    token: Any  # KeptToken
    box: tuple[float, float, float, float]  # union bbox of the in-image cells, pixels
    cells: np.ndarray  # [k, 4] clipped member cells inside the image, pixels
    n_members: int
    n_in_padding: int = 0
    rects: list[tuple[float, float, float, float]] = field(default_factory=list)  # cells joined by row

    @property
    def merged(self) -> bool:
        return bool(getattr(self.token, "merged", False))

    def geometry_rects(self, merged_geometry: str = "cells") -> list[tuple[float, float, float, float]]:
        if self.merged and merged_geometry == "cells":
            return self.rects
        return [self.box]


def join_rects(cells: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Join horizontally adjacent cells of the same row into rectangles (exact union per row)."""
    if len(cells) == 0:
        return []
    order = np.lexsort((cells[:, 0], cells[:, 3], cells[:, 1]))
    out: list[list[float]] = []
    for x0, y0, x1, y1 in cells[order].tolist():
        if out and out[-1][1] == y0 and out[-1][3] == y1 and x0 <= out[-1][2] + 1e-9:
            out[-1][2] = max(out[-1][2], x1)
        else:
            out.append([x0, y0, x1, y1])
    return [tuple(r) for r in out]  # type: ignore[misc]


def token_regions(tokens: Sequence[Any], source: Any) -> list[TokenRegion]:
    """Regions of `tokens` in the original image of `source` (an ImageSource or (W, H)).

    Tokens entirely inside the square padding are omitted (`TokenRegion.index` links back).
    """
    size = _size_of(source)
    out = []
    for i, tok in enumerate(tokens):
        members = token_members(tok)
        cells, keep = image_cells(int(tok.scale), members, size, geometry_of(tok))
        inside = cells[keep]
        if len(inside) == 0:
            continue
        box = (
            float(inside[:, 0].min()),
            float(inside[:, 1].min()),
            float(inside[:, 2].max()),
            float(inside[:, 3].max()),
        )
        rects = join_rects(inside) if getattr(tok, "merged", False) else [box]
        out.append(TokenRegion(i, tok, box, inside, len(members), int((~keep).sum()), rects))
    return out


def scene_mapping(source: Any) -> tuple[float, float, float, float]:
    """`(x0, y0, sx, sy)`: source pixel `(x, y)` is scene pixel `(x0 + sx * x, y0 + sy * y)`.

    A source opened with a region (`uhrbat.io.regions`) is a window of a larger scene; every
    pixel output (`box_px`, pixel files) is in the scene's pixels, so it can be laid over the
    full image. `(0, 0, 1, 1)` for a whole image."""
    region = None if isinstance(source, (tuple, list)) else getattr(source, "region", None)
    if region is None:
        return 0.0, 0.0, 1.0, 1.0
    return region.scene_mapping


def _scene_box(box: Sequence[float], m: tuple[float, float, float, float]) -> list[float]:
    x0, y0, sx, sy = m
    return [
        round(x0 + sx * box[0], 3),
        round(y0 + sy * box[1], 3),
        round(x0 + sx * box[2], 3),
        round(y0 + sy * box[3], 3),
    ]


def _scene_size(source: Any) -> tuple[int, int]:
    region = None if isinstance(source, (tuple, list)) else getattr(source, "region", None)
    return tuple(region.scene_size) if region is not None else _size_of(source)  # type: ignore[return-value]


def _crs_box(georef: GeoRef, box: Sequence[float]) -> list[float]:
    """The bounding box, in the image CRS, of a pixel box's corners (full precision)."""
    X, Y = georef.pixel_to_crs([box[0], box[2], box[2], box[0]], [box[1], box[1], box[3], box[3]])
    return [float(X.min()), float(Y.min()), float(X.max()), float(Y.max())]


def pixel_boxes(tokens: Sequence[Any], source: Any) -> list[list[float] | None]:
    """Per token (same order): `[x0, y0, x1, y1]` in the scene's pixels (the original image's;
    a region's offset added, see `scene_mapping`), or None when the token lies entirely in the
    padding. Merged tokens: the union box of their members."""
    boxes: list[list[float] | None] = [None] * len(tokens)
    m = scene_mapping(source)
    for r in token_regions(tokens, source):
        boxes[r.index] = _scene_box(r.box, m)
    return boxes


def tokens_with_boxes(tokens: Sequence[Any], source: Any) -> list[dict[str, Any]]:
    """`token.to_dict()` plus `box_px` (see `pixel_boxes`) and, for georeferenced sources,
    `box_crs` (the pixel box's corners' bounding box in the image CRS, full precision) — for
    `ask --json`."""
    georef = _georef_of(source)
    m = scene_mapping(source)
    boxes: list[tuple[float, float, float, float] | None] = [None] * len(tokens)
    for r in token_regions(tokens, source):
        boxes[r.index] = r.box
    out = []
    for tok, box in zip(tokens, boxes):
        d = tok.to_dict() if hasattr(tok, "to_dict") else dict(vars(tok))
        d["box_px"] = None if box is None else _scene_box(box, m)
        if georef is not None and box is not None:
            d["box_crs"] = _crs_box(georef, box)
        out.append(d)
    return out


# ----------------------------------------------------------------------------- polygons
def rect_ring(rect: Sequence[float], densify: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Closed ring of a pixel rectangle (x0, y0, x1, y1), optionally with `densify` extra points
    per edge (useful before a non-affine reprojection of large boxes)."""
    x0, y0, x1, y1 = (float(v) for v in rect)
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    xs, ys = [], []
    for (ax, ay), (bx, by) in zip(corners[:-1], corners[1:]):
        for k in range(densify + 1):
            t = k / (densify + 1)
            xs.append(ax + (bx - ax) * t)
            ys.append(ay + (by - ay) * t)
    xs.append(x0)
    ys.append(y0)
    return np.asarray(xs), np.asarray(ys)


def _ccw(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    area2 = float(np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]))
    return (xs[::-1], ys[::-1]) if area2 < 0 else (xs, ys)


def ring_coords(
    rect: Sequence[float], space: str, georef: GeoRef | None, densify: int = 0, ndigits: int | None = None
) -> list[list[float]]:
    """One rectangle as a GeoJSON linear ring in `space`: 'pixel', 'crs' or 'wgs84'."""
    xs, ys = rect_ring(rect, densify)
    if space == "pixel":
        pass
    elif georef is None:
        raise ValueError("this image has no georeference; only pixel coordinates are available")
    elif space == "crs":
        xs, ys = georef.pixel_to_crs(xs, ys)
        xs, ys = _ccw(xs, ys)
    elif space == "wgs84":
        xs, ys = georef.pixel_to_wgs84(xs, ys)
        xs, ys = _ccw(xs, ys)
    else:
        raise ValueError(f"unknown coordinate space {space!r} (pixel, crs, wgs84)")
    if ndigits is not None:
        return [[round(float(x), ndigits), round(float(y), ndigits)] for x, y in zip(xs, ys)]
    return [[float(x), float(y)] for x, y in zip(xs, ys)]


def region_geometry(
    region: TokenRegion,
    space: str,
    georef: GeoRef | None,
    *,
    merged_geometry: str = "cells",
    densify: int = 0,
    ndigits: int | None = None,
) -> dict[str, Any]:
    """GeoJSON geometry of a region: Polygon (one rectangle) or MultiPolygon."""
    rects = region.geometry_rects(merged_geometry)
    polys = [[ring_coords(r, space, georef, densify, ndigits)] for r in rects]
    if len(polys) == 1:
        return {"type": "Polygon", "coordinates": polys[0]}
    return {"type": "MultiPolygon", "coordinates": polys}


# ----------------------------------------------------------------------------- GeoJSON
_DIGITS = {"wgs84": 9, "crs": 4}


def _token_properties(reg: TokenRegion, georef: GeoRef | None, m: tuple[float, float, float, float]) -> dict:
    tok = reg.token
    props: dict[str, Any] = {
        "index": reg.index,
        "scale": int(tok.scale),
        "score": float(tok.score),
        "status": "merged" if reg.merged else "kept",
        "merged": reg.merged,
        "kept": not reg.merged,
        "group": int(tok.group),
        "tile": int(tok.tile),
        "row": int(tok.row),
        "col": int(tok.col),
        "n_members": reg.n_members,
        "members_in_padding": reg.n_in_padding,
        "box_px": _scene_box(reg.box, m),
    }
    if georef is not None:
        props["box_crs"] = _crs_box(georef, reg.box)
    return props


def _image_info(source: Any) -> dict[str, Any]:
    """The scene a document describes: size, CRS / transform (the scene's, also for a region),
    path, and the region (window) when there is one."""
    region = None if isinstance(source, (tuple, list)) else getattr(source, "region", None)
    georef = region.scene_georef if region is not None else _georef_of(source)
    info: dict[str, Any] = {"size": list(_scene_size(source)), **({} if georef is None else georef.to_dict())}
    path = getattr(source, "path", None)
    if path is not None:
        info["path"] = str(path)
    if region is not None:
        info["region"] = region.to_dict()
    return info


def legacy_crs_member(georef: GeoRef) -> dict[str, Any]:
    """The GeoJSON 2008 `crs` member naming the image CRS: GDAL, QGIS and most GIS read it, so
    a `coordinates="crs"` file lands where it should (RFC 7946 dropped the member)."""
    epsg = georef.crs_name if (georef.crs_name or "").startswith("EPSG:") else None
    if epsg:
        name = f"urn:ogc:def:crs:EPSG::{epsg.split(':', 1)[1]}"
    else:
        to_wkt = getattr(georef.crs, "to_wkt", None)
        name = to_wkt() if callable(to_wkt) else str(georef.crs)
    return {"type": "name", "properties": {"name": name}}


def tokens_geojson(
    tokens: Sequence[Any],
    source: Any,
    *,
    coordinates: str = "auto",
    merged_geometry: str = "cells",
    densify: int = 0,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The FeatureCollection `write_geojson` writes (see there).

    Only map coordinates: an image without a georeference raises `NotGeoreferencedError`
    (GeoJSON is read as WGS84 longitude/latitude by every GIS; pixel coordinates would be placed
    off the globe, issue 23): use `tokens_pixel_json` for a pixel-space file, or `kept_tokens_document`
    to get whichever fits the image."""
    if merged_geometry not in ("cells", "bbox"):
        raise ValueError(f"merged_geometry must be 'cells' or 'bbox', got {merged_geometry!r}")
    if coordinates not in ("auto", "wgs84", "crs"):
        raise GeoError(
            f"GeoJSON coordinates must be 'auto', 'wgs84' or 'crs', got {coordinates!r}; pixel coordinates are "
            f"written by tokens_pixel_json / write_pixel_json (a {PIXEL_JSON_SUFFIX} file), never as GeoJSON"
        )
    georef = _georef_of(source)
    if coordinates == "crs":
        if georef is None or georef.crs is None:
            map_ready(source)  # raises NotGeoreferencedError with the reason
    else:
        georef = map_ready(source)
        coordinates = "wgs84"
    assert georef is not None
    ndigits = _DIGITS[coordinates]
    m = scene_mapping(source)
    regions = token_regions(tokens, source)
    features = []
    for reg in regions:
        geom = region_geometry(
            reg, coordinates, georef, merged_geometry=merged_geometry, densify=densify, ndigits=ndigits
        )
        features.append(
            {"type": "Feature", "id": reg.index, "geometry": geom, "properties": _token_properties(reg, georef, m)}
        )
    fc: dict[str, Any] = {"type": "FeatureCollection"}
    if coordinates == "crs":
        fc["crs"] = legacy_crs_member(georef)
    all_pts = [p for f in features for p in _points(f["geometry"])]
    if all_pts:
        arr = np.asarray(all_pts)
        fc["bbox"] = [float(v) for v in (arr[:, 0].min(), arr[:, 1].min(), arr[:, 0].max(), arr[:, 1].max())]
    fc["coordinate_space"] = coordinates
    if coordinates == "crs":
        fc["coordinate_note"] = (
            f"coordinates are in the image CRS {georef.crs_name} (named by the legacy 'crs' member; not RFC 7946 WGS84)"
        )
    fc["image"] = _image_info(source)
    fc["merged_geometry"] = merged_geometry
    fc["tokens_total"] = len(tokens)
    fc["tokens_in_padding_dropped"] = len(tokens) - len(regions)
    if properties:
        fc.update({k: v for k, v in properties.items() if k not in ("type", "features", "crs")})
    fc["features"] = features
    return fc


def _points(geom: dict[str, Any]) -> list[list[float]]:
    if geom["type"] == "Polygon":
        return [p for ring in geom["coordinates"] for p in ring]
    return [p for poly in geom["coordinates"] for ring in poly for p in ring]


def _dump(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    except ValueError as e:  # a NaN / inf slipped into a coordinate: never write invalid JSON
        raise GeoError(f"refusing to write {path}: {e}") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_geojson(
    path: str | os.PathLike,
    tokens: Sequence[Any],
    source: Any,
    *,
    coordinates: str = "auto",
    merged_geometry: str = "cells",
    densify: int = 0,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the kept / merged tokens as an RFC 7946 GeoJSON FeatureCollection; returns it.

    coordinates: 'auto' / 'wgs84' (longitude/latitude; the image must be georeferenced with a
        CRS that transforms to WGS84, else `NotGeoreferencedError` / `GeoTransformError` before
        anything is written: check early with `map_ready(source)`), or 'crs' (the image CRS,
        named by the legacy `crs` member that GDAL / QGIS read; not RFC 7946).
    merged_geometry: 'cells' (MultiPolygon of a merged token's member cells) or 'bbox'.
    properties: extra top-level members (e.g. question, answer, model).
    Each feature has properties scale, score, status ('kept' | 'merged'), merged, kept, group,
    tile, row, col, n_members, members_in_padding, box_px (scene pixels) and box_crs (image CRS,
    full precision). For a region the coordinates are the scene's and `image.region` names the
    window. Images without a georeference: `write_pixel_json`.
    """
    fc = tokens_geojson(
        tokens, source, coordinates=coordinates, merged_geometry=merged_geometry, densify=densify, properties=properties
    )
    _dump(path, fc)
    return fc


# ----------------------------------------------------------------------------- pixel-space file
PIXEL_FORMAT = "uhrbat.pixel-boxes/1"


def tokens_pixel_json(
    tokens: Sequence[Any], source: Any, *, properties: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Kept / merged tokens in scene pixels, in a document no GIS reads as GeoJSON.

    `{"format": "uhrbat.pixel-boxes/1", "coordinate_space": "pixel", "coordinate_note": ...,
    "image": {...}, "tokens_total", "tokens_in_padding_dropped", "tokens": [...]}`: one entry per
    token outside the padding with the GeoJSON feature's properties (`box_px`, ...) and
    `rects_px` (a merged token's member cells joined by row; the box otherwise). Pixels are
    edges, x right, y down, origin at the scene's top-left corner. No `type` /
    `coordinates` members: a GIS tool refuses the file instead of placing pixels on the globe."""
    georef = _georef_of(source)
    m = scene_mapping(source)
    regions = token_regions(tokens, source)
    why = getattr(source, "georef_note", None) or (
        "the image has no georeference"
        if georef is None
        else georef.wgs84_error or ("it has no CRS" if georef.crs is None else "written in pixels on request")
    )
    doc: dict[str, Any] = {
        "format": PIXEL_FORMAT,
        "coordinate_space": "pixel",
        "coordinate_note": (
            "scene pixels (x right, y down, origin at the top-left corner of the image), NOT longitude/latitude: " + why
        ),
        "image": _image_info(source),
        "tokens_total": len(tokens),
        "tokens_in_padding_dropped": len(tokens) - len(regions),
    }
    if properties:
        doc.update({k: v for k, v in properties.items() if k not in ("format", "tokens", "type")})
    doc["tokens"] = [
        {**_token_properties(reg, georef, m), "rects_px": [_scene_box(r, m) for r in reg.geometry_rects("cells")]}
        for reg in regions
    ]
    return doc


def write_pixel_json(
    path: str | os.PathLike, tokens: Sequence[Any], source: Any, *, properties: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write `tokens_pixel_json` to `path` (name it `*.pixels.json`, `PIXEL_JSON_SUFFIX`); returns it."""
    doc = tokens_pixel_json(tokens, source, properties=properties)
    _dump(path, doc)
    return doc


def kept_tokens_document(
    tokens: Sequence[Any],
    source: Any,
    *,
    properties: dict[str, Any] | None = None,
    untransformable: Literal["raise", "pixels"] = "raise",
) -> tuple[dict[str, Any], str]:
    """`(document, suffix)` for an output folder of many images (batch, demo downloads):
    GeoJSON in WGS84 and ".geojson" when `map_ready(source)` holds; the pixel file and
    `PIXEL_JSON_SUFFIX` (its `coordinate_note` says why) for an image without georeference. The
    suffix names the format, so a pixel file is never saved where a GIS expects GeoJSON.

    A georeferenced image whose CRS cannot be transformed to WGS84 raises `GeoTransformError`
    (batch: that row's GeoJSON error), or with `untransformable="pixels"` gets the pixel file too
    (the demo's download, whose note names the problem)."""
    try:
        map_ready(source)
    except NotGeoreferencedError:
        return tokens_pixel_json(tokens, source, properties=properties), PIXEL_JSON_SUFFIX
    except GeoTransformError:
        if untransformable == "raise":
            raise
        return tokens_pixel_json(tokens, source, properties=properties), PIXEL_JSON_SUFFIX
    return tokens_geojson(tokens, source, properties=properties), ".geojson"


#: Alias (the name `uhrbat ask --json` uses).
token_pixel_boxes = pixel_boxes
