"""Regions: ask about one window of a scene at native resolution (issue 21).

A region is given one of three ways (the options vocabulary's `region`, `region_crs`,
`region_file` / `region_geojson`):

* pixels of the full raster, `region=[x0, y0, x1, y1]` (or `"x0,y0,x1,y1"`): whole pixels, edges
  (x1, y1 exclusive), x right, y down;
* map coordinates, the same four numbers with `region_crs="EPSG:..."` (any CRS pyproj knows):
  the box is transformed (edges densified) to the raster's CRS and the bounding box of the
  result is taken, snapped outwards to whole pixels (a box on pixel edges maps exactly onto them);
* a GeoJSON file (`region_file`, local callers only) or object / text (`region_geojson`): the
  bounding box of its Polygon / MultiPolygon geometries (in a Feature, FeatureCollection,
  GeometryCollection or bare); RFC 7946 coordinates are WGS84 longitude/latitude unless a legacy
  `crs` member names another CRS. Pixels outside the polygons are padding (a mask).

`parse_region(...)` checks the syntax (a `RegionRequest`, before any image is opened);
`resolve_region(request, size, georef)` places it on an image (a `Region`). Errors are one
`RegionError` line each, before any model runs: malformed, empty or inverted boxes, an unknown
CRS, map coordinates or GeoJSON for an image without georeference, unreadable / invalid GeoJSON,
and a region entirely outside the image. A region *partly* outside is clipped to the image,
and `Region.note` says so (callers print it and put it in their output: never silent).

The reader (`uhrbat.io.open_image(..., region=...)`) returns a source of the window: its `size`
is the window's, `square(side)` is the window's padded square, exactly as if the window had been
cut into its own file (same pixels, same percentile stretch computed over the window, see
`uhrbat.io.sources`); `source.region` is the `Region` (offset and scale to the scene, the scene's
size and georeference), and `source.georef` the window's own georeference, so kept tokens,
GeoJSON and overlays come out in the scene's coordinates (`uhrbat.io.geo.scene_mapping`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uhrbat.errors import RegionError
from uhrbat.io.geo import GeoRef, short_gdal_message

#: Snapping tolerance (pixels): map boxes within this of a pixel edge land on it.
SNAP_EPS = 1e-6
#: Points per box edge when a map box is transformed between CRSs (curved edges).
DENSIFY = 21
#: Largest region GeoJSON accepted (bytes) and largest vertex count.
MAX_GEOJSON_BYTES = 16 * 2**20
MAX_VERTICES = 1_000_000
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_POLYGONAL = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class RegionRequest:
    """A region as given, validated for syntax only (see the module docstring).

    kind: "pixels", "map" or "geojson"; `bounds` (x0, y0, x1, y1) in pixels or in `crs`
    units; `polygons`: for "geojson", a list of polygons (each a list of rings, each an
    `[n, 2]` array in `crs`); `label`: how messages name it."""

    kind: str
    bounds: tuple[float, float, float, float]
    crs: Any = None
    polygons: tuple = ()
    label: str = "region"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "bounds": list(self.bounds)}
        if self.crs is not None:
            d["crs"] = _crs_name(self.crs)
        return d

    def key(self) -> list[Any]:
        """Plain values that identify the request (for cache keys): kind, bounds, the CRS as WKT
        and a SHA-256 of the polygons' vertices."""
        h = hashlib.sha256()
        for poly in self.polygons:
            h.update(b"P")
            for ring in poly:
                a = np.ascontiguousarray(ring, dtype=np.float64)
                h.update(f"R{a.shape}".encode())
                h.update(a.data)
        crs = None if self.crs is None else self.crs.to_wkt()
        return [self.kind, [float(v) for v in self.bounds], crs, h.hexdigest() if self.polygons else None]


@dataclass(frozen=True)
class Region:
    """A request placed on an image: the window `pixels = (x0, y0, x1, y1)` of the scene
    (whole pixels, clipped to it), the scene's size and georeference, the polygons (in scene
    pixels) outside which pixels are padding, and a note when the request was clipped."""

    pixels: tuple[int, int, int, int]
    scene_size: tuple[int, int]
    scene_georef: GeoRef | None = None
    polygons: tuple = ()
    note: str | None = None
    request: RegionRequest | None = field(default=None, compare=False)

    @property
    def size(self) -> tuple[int, int]:
        x0, y0, x1, y1 = self.pixels
        return x1 - x0, y1 - y0

    @property
    def scene_mapping(self) -> tuple[float, float, float, float]:
        """(x0, y0, sx, sy): window pixel (x, y) is scene pixel (x0 + sx x, y0 + sy y)."""
        return float(self.pixels[0]), float(self.pixels[1]), 1.0, 1.0

    @property
    def georef(self) -> GeoRef | None:
        """The window's own georeference (the scene's transform shifted to the window)."""
        if self.scene_georef is None:
            return None
        return self.scene_georef.shifted(self.pixels[0], self.pixels[1])

    @property
    def masked(self) -> bool:
        return bool(self.polygons)

    def mask(self, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        """`[h, w]` bool, True inside the polygons, for the window resampled to `shape`
        (default: the window at native resolution); pixel centres decide (GDAL's rule). None
        when the region has no polygons."""
        if not self.polygons:
            return None
        from affine import Affine
        from rasterio.features import geometry_mask

        w, h = self.size
        oh, ow = shape if shape is not None else (h, w)
        # out pixel -> scene pixel
        t = Affine.translation(self.pixels[0], self.pixels[1]) * Affine.scale(w / ow, h / oh)
        shapes = [{"type": "Polygon", "coordinates": [ring.tolist() for ring in poly]} for poly in self.polygons]
        return geometry_mask(shapes, out_shape=(oh, ow), transform=t, invert=True)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pixels": list(self.pixels)}
        if self.scene_georef is not None:
            x0, y0, x1, y1 = self.pixels
            X, Y = self.scene_georef.pixel_to_crs([x0, x1, x1, x0], [y0, y0, y1, y1])
            d["bounds_crs"] = [float(X.min()), float(Y.min()), float(X.max()), float(Y.max())]
        if self.request is not None:
            d["request"] = self.request.to_dict()
        if self.polygons:
            d["masked"] = True
        if self.note:
            d["note"] = self.note
        return d


def paint_outside(image: Any, region: Region) -> Any:
    """`image` (RGB, the window at any resolution) with the pixels outside the region's
    polygons painted in the pad colour; unchanged when the region has none."""
    if not region.masked:
        return image
    from PIL import Image

    from uhrbat.io.images import PAD_RGB

    inside = region.mask(image.size[::-1]).astype(np.uint8) * np.uint8(255)
    out = Image.new("RGB", image.size, PAD_RGB)
    out.paste(image, mask=Image.fromarray(inside, "L"))
    return out


# ----------------------------------------------------------------------------- parsing
def parse_region(
    region: Any = None,
    *,
    region_crs: Any = None,
    region_file: str | os.PathLike | None = None,
    region_geojson: Any = None,
) -> RegionRequest | None:
    """The options vocabulary's region fields -> a `RegionRequest` (None when none is given).

    region: `[x0, y0, x1, y1]` or `"x0,y0,x1,y1"`; pixels, or map coordinates with `region_crs`.
    region_file: a GeoJSON file (read here; local paths only: a server sends `region_geojson`).
    region_geojson: a GeoJSON object (dict) or its text.
    At most one of region / region_file / region_geojson; `region_crs` only with `region`.
    An already parsed `RegionRequest` is returned as it is."""
    if isinstance(region, RegionRequest) and region_crs is None and region_file is None and region_geojson is None:
        return region
    given = [
        n
        for n, v in (("region", region), ("region_file", region_file), ("region_geojson", region_geojson))
        if v is not None
    ]
    if len(given) > 1:
        raise RegionError(f"give one region, not {' and '.join(given)}")
    if region_crs is not None and region is None:
        what = f"the GeoJSON ({given[0]})" if given else "no region"
        raise RegionError(
            f"region_crs={region_crs!r} applies to region=[x0, y0, x1, y1] only, but {what} was given; a GeoJSON "
            f"names its CRS itself (WGS84, or a legacy 'crs' member)"
        )
    if region_file is not None:
        return _geojson_request(_read_geojson_file(region_file), f"region file {region_file}")
    if region_geojson is not None:
        return _geojson_request(_load_geojson_text(region_geojson, "region_geojson"), "region_geojson")
    if region is None:
        return None
    label = f"region {_show(region)}"
    vals = _four_numbers(region, label)
    crs = None if region_crs is None else parse_crs(region_crs)
    if crs is None and any(v != math.floor(v) for v in vals):
        raise RegionError(
            f"{label}: pixel regions are whole pixels (x0,y0,x1,y1 integers); for map coordinates give region_crs"
        )
    x0, y0, x1, y1 = vals
    _check_order(x0, y0, x1, y1, label)
    if crs is None:
        return RegionRequest("pixels", (x0, y0, x1, y1), label=label)
    return RegionRequest("map", (x0, y0, x1, y1), crs=crs, label=f"{label} in {_crs_name(crs)}")


def region_numbers(region: Any) -> tuple[float, float, float, float]:
    """The four numbers of `region` (`[x0, y0, x1, y1]` or `"x0,y0,x1,y1"`), finite, checked for
    syntax only (`RegionError`)."""
    return _four_numbers(region, f"region {_show(region)}")


def _show(v: Any) -> str:
    text = v if isinstance(v, str) else ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _four_numbers(region: Any, label: str) -> tuple[float, float, float, float]:
    if isinstance(region, str):
        parts = [p.strip() for p in region.strip().strip("[]()").split(",")]
        if len(parts) != 4 or not all(re.fullmatch(_NUM, p) for p in parts):
            raise RegionError(f"{label}: give four comma-separated numbers x0,y0,x1,y1 (left, top, right, bottom)")
        vals = [float(p) for p in parts]
    elif isinstance(region, (list, tuple)) or (isinstance(region, np.ndarray) and region.ndim == 1):
        if len(region) != 4 or any(isinstance(v, bool) or not isinstance(v, (int, float, np.number)) for v in region):
            raise RegionError(f"{label}: give four numbers [x0, y0, x1, y1] (left, top, right, bottom)")
        vals = [float(v) for v in region]
    else:
        raise RegionError(f"region must be [x0, y0, x1, y1] or 'x0,y0,x1,y1', got {type(region).__name__}")
    if not all(math.isfinite(v) for v in vals):
        raise RegionError(f"{label}: coordinates must be finite numbers")
    return vals[0], vals[1], vals[2], vals[3]


def _check_order(x0: float, y0: float, x1: float, y1: float, label: str) -> None:
    for a, b, axis in ((x0, x1, "x"), (y0, y1, "y")):
        if b == a:
            raise RegionError(f"{label} is empty: {axis}1 == {axis}0 ({a:g}); a region needs x1 > x0 and y1 > y0")
        if b < a:
            raise RegionError(
                f"{label} is inverted: {axis}1 ({b:g}) < {axis}0 ({a:g}); give x0,y0,x1,y1 as left, top, right, bottom "
                f"(for map coordinates: min x, min y, max x, max y)"
            )


def parse_crs(value: Any) -> Any:
    """`"EPSG:32617"`, WKT, a PROJ string, ... -> a `rasterio.crs.CRS`; `RegionError` if unknown."""
    try:
        from rasterio.crs import CRS
    except ImportError:
        raise RegionError(
            "map-coordinate regions need rasterio: install the geo extra (pip install 'uhrbat[geo]')"
        ) from None
    if isinstance(value, CRS):
        return value
    try:
        crs = CRS.from_user_input(value)
    except Exception as e:  # CRSError and GDAL errors
        raise RegionError(
            f"unknown CRS {_show(str(value))!r} ({short_gdal_message(e)}); give e.g. 'EPSG:4326'"
        ) from None
    with warnings.catch_warnings():  # rasterio 1.4 deprecates is_valid (a warning on every CLI run otherwise)
        warnings.simplefilter("ignore")
        valid = crs.is_valid
    if not valid:
        raise RegionError(f"unknown CRS {_show(str(value))!r}; give e.g. 'EPSG:4326'")
    return crs


def _crs_name(crs: Any) -> str:
    try:
        epsg = crs.to_epsg()
    except Exception:  # noqa: BLE001 - a CRS pyproj cannot match
        epsg = None
    return f"EPSG:{epsg}" if epsg else crs.to_string()


# ----------------------------------------------------------------------------- GeoJSON
def _read_geojson_file(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise RegionError(f"region file {p} is not a regular file")
        if size > MAX_GEOJSON_BYTES:
            raise RegionError(f"region file {p} has {size:,} bytes, above the {MAX_GEOJSON_BYTES:,}-byte limit")
        text = p.read_bytes()
    except RegionError:
        raise
    except (OSError, ValueError) as e:
        raise RegionError(f"cannot read region file {p}: {getattr(e, 'strerror', None) or e}") from None
    return _load_geojson_text(text, f"region file {p}")


def _load_geojson_text(obj: Any, label: str) -> Any:
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, (bytes, bytearray)):
        if len(obj) > MAX_GEOJSON_BYTES:
            raise RegionError(f"{label} has {len(obj):,} bytes, above the {MAX_GEOJSON_BYTES:,}-byte limit")
        try:
            obj = bytes(obj).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise RegionError(f"{label} is not UTF-8 text, so not GeoJSON") from None
    if not isinstance(obj, str):
        raise RegionError(f"{label} must be a GeoJSON object or its text, got {type(obj).__name__}")
    if len(obj) > MAX_GEOJSON_BYTES:
        raise RegionError(f"{label} has {len(obj):,} characters, above the {MAX_GEOJSON_BYTES:,} limit")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(obj, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise RegionError(f"{label} is not valid JSON ({' '.join(str(e).split())[:120]})") from None


def _geojson_request(obj: Any, label: str) -> RegionRequest:
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise RegionError(f"{label} is not a GeoJSON object (no 'type' member)")
    crs = _legacy_crs(obj, label)
    polygons: list[list[np.ndarray]] = []
    _collect(obj, polygons, label, depth=0)
    if not polygons:
        raise RegionError(
            f"{label} holds no Polygon or MultiPolygon geometry; a region needs an area (points and lines have none)"
        )
    pts = np.concatenate([ring for poly in polygons for ring in poly])
    bounds = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
    _check_order(*bounds, label)
    return RegionRequest("geojson", bounds, crs=crs, polygons=tuple(tuple(p) for p in polygons), label=label)


def _legacy_crs(obj: dict, label: str) -> Any:
    member = obj.get("crs")
    if member is None:
        return parse_crs("OGC:CRS84")  # RFC 7946: WGS84 longitude, latitude
    name = member.get("properties", {}).get("name") if isinstance(member, dict) else None
    if not isinstance(name, str):
        raise RegionError(f"{label}: its 'crs' member must be {{'type': 'name', 'properties': {{'name': ...}}}}")
    m = re.fullmatch(r"urn:ogc:def:crs:EPSG::?(\d+)", name.strip(), re.IGNORECASE)
    crs = parse_crs(f"EPSG:{m.group(1)}" if m else name)
    if name.strip().upper() in ("URN:OGC:DEF:CRS:OGC:1.3:CRS84", "OGC:CRS84"):
        return parse_crs("OGC:CRS84")
    return crs


def _collect(obj: Any, out: list, label: str, depth: int) -> None:
    if depth > 8 or not isinstance(obj, dict):
        raise RegionError(f"{label}: invalid GeoJSON (expected an object with a 'type')")
    typ = obj.get("type")
    member = {"FeatureCollection": "features", "GeometryCollection": "geometries"}.get(typ)
    if member is not None:
        items = obj.get(member)
        if not isinstance(items, list):
            raise RegionError(f"{label}: a {typ} needs a '{member}' list")
        for item in items:
            _collect(item, out, label, depth + 1)
    elif typ == "Feature":
        if obj.get("geometry") is not None:
            _collect(obj["geometry"], out, label, depth + 1)
    elif typ in _POLYGONAL:
        coords = obj.get("coordinates")
        for poly in [coords] if typ == "Polygon" else (coords if isinstance(coords, list) else [None]):
            out.append(_polygon(poly, label))
            if sum(len(r) for p in out for r in p) > MAX_VERTICES:
                raise RegionError(f"{label} has more than {MAX_VERTICES:,} vertices")
    elif typ in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        pass  # no area: ignored (an error if nothing else is there)
    else:
        raise RegionError(f"{label}: unknown GeoJSON type {_show(str(typ))}")


def _polygon(rings: Any, label: str) -> list[np.ndarray]:
    if not isinstance(rings, list) or not rings:
        raise RegionError(f"{label}: a Polygon needs a list of linear rings")
    out = []
    for ring in rings:
        try:
            arr = np.asarray(ring, dtype=np.float64)
        except (TypeError, ValueError):
            raise RegionError(f"{label}: polygon coordinates must be [x, y] number pairs") from None
        if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 4:
            raise RegionError(f"{label}: a linear ring needs >= 4 [x, y] positions")
        arr = arr[:, :2]
        if not np.isfinite(arr).all():
            raise RegionError(f"{label}: polygon coordinates must be finite numbers")
        out.append(arr)
    return out


# ----------------------------------------------------------------------------- placing on an image
def resolve_region(
    request: RegionRequest, size: tuple[int, int], georef: GeoRef | None, *, image: str = "the image"
) -> Region:
    """Place `request` on an image of `size` (W, H) with `georef` (None: not georeferenced).

    Returns the window in whole pixels, clipped to the image (with a note) when it sticks out;
    `RegionError` when it lies entirely outside, or map coordinates meet an image without
    georeference, or the CRSs cannot be transformed."""
    W, H = int(size[0]), int(size[1])
    polygons: tuple = ()
    if request.kind == "pixels":
        fx0, fy0, fx1, fy1 = request.bounds
    else:
        if georef is None or georef.crs is None:
            raise RegionError(
                f"{request.label} is in map coordinates, but {image} "
                f"{'has no CRS' if georef is not None else 'is not georeferenced'}; give the region in pixels "
                f"(x0,y0,x1,y1 of the {W}x{H} image)"
            )
        if request.kind == "map":
            xs, ys = _box_outline(request.bounds)
            X, Y = _to_image_crs(xs, ys, request.crs, georef, request.label)
            px, py = georef.crs_to_pixel(X, Y)
        else:
            parts = []
            for poly in request.polygons:
                rings = []
                for ring in poly:
                    xs, ys = _densify_ring(ring)
                    X, Y = _to_image_crs(xs, ys, request.crs, georef, request.label)
                    rings.append(np.stack(georef.crs_to_pixel(X, Y), axis=1))
                parts.append(tuple(rings))
            polygons = tuple(parts)
            pts = np.concatenate([r for p in polygons for r in p])
            px, py = pts[:, 0], pts[:, 1]
        if not (np.isfinite(px).all() and np.isfinite(py).all()):
            raise RegionError(f"{request.label} has points with no position in {image}'s CRS")
        fx0, fy0, fx1, fy1 = float(px.min()), float(py.min()), float(px.max()), float(py.max())
    x0, y0 = math.floor(fx0 + SNAP_EPS), math.floor(fy0 + SNAP_EPS)
    x1, y1 = math.ceil(fx1 - SNAP_EPS), math.ceil(fy1 - SNAP_EPS)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # a sub-pixel map box still covers its pixel
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if cx1 <= cx0 or cy1 <= cy0:
        extent = f"pixels 0,0,{W},{H}"
        if georef is not None and request.kind != "pixels":
            X, Y = georef.pixel_to_crs([0, W, W, 0], [0, 0, H, H])
            extent += f"; {georef.crs_name} {X.min():.10g},{Y.min():.10g},{X.max():.10g},{Y.max():.10g}"
        raise RegionError(f"{request.label} lies outside {image} ({extent})")
    note = None
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        note = (
            f"{request.label} extends past {image} ({W}x{H} px, pixels {x0},{y0},{x1},{y1}); clipped to pixels "
            f"{cx0},{cy0},{cx1},{cy1}"
        )
    return Region((cx0, cy0, cx1, cy1), (W, H), georef, polygons, note, request)


def _box_outline(b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = b
    t = np.linspace(0.0, 1.0, DENSIFY)
    xs = np.concatenate([x0 + (x1 - x0) * t, np.full(DENSIFY, x1), x1 - (x1 - x0) * t, np.full(DENSIFY, x0)])
    ys = np.concatenate([np.full(DENSIFY, y0), y0 + (y1 - y0) * t, np.full(DENSIFY, y1), y1 - (y1 - y0) * t])
    return xs, ys


def _densify_ring(ring: np.ndarray, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    a, b = ring[:-1], ring[1:]
    t = np.arange(k)[None, :, None] / k
    pts = (a[:, None, :] + (b - a)[:, None, :] * t).reshape(-1, 2)
    pts = np.concatenate([pts, ring[-1:]])
    return pts[:, 0], pts[:, 1]


def _to_image_crs(
    xs: np.ndarray, ys: np.ndarray, crs: Any, georef: GeoRef, label: str
) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.crs import CRS
    from rasterio.warp import transform

    dst = georef.crs if isinstance(georef.crs, CRS) else parse_crs(georef.crs)
    if dst == crs:
        return xs, ys
    try:
        X, Y = transform(crs, dst, xs.tolist(), ys.tolist())
    except Exception as e:  # CPLE_* errors: no operation between the CRSs, points off the projection
        raise RegionError(
            f"{label} cannot be transformed to the image CRS {georef.crs_name} ({short_gdal_message(e)})"
        ) from None
    return np.asarray(X, np.float64), np.asarray(Y, np.float64)


__all__ = ["Region", "RegionRequest", "parse_crs", "parse_region", "region_numbers", "resolve_region"]
