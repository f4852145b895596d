"""The demo's map view: uploaded georeferenced scenes and the Web-Mercator tiles cut from them.

`POST /api/map` (`uhrbat.serving.demo`) hands an uploaded file to `MapScenes.add`, which opens it
with the untrusted reader (the same allow-list, block and pixel limits as a question's image),
and keeps it only when it can be put on a map: a GDAL raster whose georeference transforms to
WGS84. Anything else gets the reason (`NotMappable`) and the page keeps its image view. A kept
scene is a private hard link of the upload (0700 folder) plus what the tiles need (bands,
percentile stretch and palette exactly as the model's reader chose them, WGS84 bounds, zoom
range); nothing else of it stays in memory.

`MapScenes.tile(id, z, x, y)` renders one 256-px PNG of the `WebMercatorQuad` grid with
rio-tiler (reprojection, overview choice, masks -> transparency) from that file and nothing else:
the id is the only thing the client names, an unknown id, a zoom outside the scene's range or a
tile off the scene is a 404, GDAL runs with the untrusted environment (no sidecars, no network),
and at most `tile_workers` tiles are read at once (each read is bounded by GDAL's warp memory and
block cache, never by the raster). The store holds at most `max_scenes` scenes and `max_bytes`
bytes of files; the least recently used go first.

A question about a kept scene (`scene_spool`) gets its own `Spool` over the same bytes (a hard
link, same SHA-256), so the engine reads it exactly as an upload and the scene cache recognises it.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from uhrbat.errors import ImageLoadError, UhrBatError
from uhrbat.io.geo import short_gdal_message
from uhrbat.serving.uploads import Spool

#: Side of a map tile in pixels (Leaflet's default grid).
TILE_SIZE = 256
#: Tiles read at the same time (the demo's limit; a browser asks for a dozen at once).
TILE_WORKERS = 2
#: Tiles are 404 below the zoom at which the whole scene fits in about this many tiles across:
#: coarser tiles would read (decimate) the whole raster for a few pixels of it.
MIN_ZOOM_TILES = 1


class NotMappable(UhrBatError):
    """An upload the map view cannot show (not georeferenced, CRS not transformable to WGS84,
    not a GDAL raster); the page keeps its image view and shows the reason."""


class UnknownScene(UhrBatError):
    """A map scene id that is not (or no longer) kept."""


class NoTile(UhrBatError):
    """A tile request the scene has no tile for (zoom out of range, off the scene)."""


@dataclass(frozen=True)
class MapScene:
    """One kept upload (see the module docstring). `bounds`: WGS84 west, south, east, north."""

    id: str
    label: str  # the client's file name, for messages
    path: str  # private hard link of the upload
    driver: str
    size: tuple[int, int]
    bands: tuple[int, ...]
    stretch: tuple[tuple[float, float], ...] | None  # per band, for non-8-bit data
    palette: bool
    crs: str | None
    bounds: tuple[float, float, float, float]
    minzoom: int
    maxzoom: int
    nbytes: int
    sha256: str
    head: bytes

    def info(self, tile_url: str) -> dict[str, Any]:
        """What the page needs to show the scene (`tile_url`: the template, `{z}/{x}/{y}`)."""
        return {
            "id": self.id,
            "georeferenced": True,
            "name": self.label,
            "size": list(self.size),
            "crs": self.crs,
            "bounds": list(self.bounds),
            "minzoom": self.minzoom,
            "maxzoom": self.maxzoom,
            "tile_size": TILE_SIZE,
            "tiles": tile_url,
        }


def _gdal_env() -> Any:
    import rasterio

    from uhrbat.io.raster import DEFAULT_GDAL_CACHE_MB, UNTRUSTED_GDAL_ENV

    return rasterio.Env(GDAL_CACHEMAX=DEFAULT_GDAL_CACHE_MB, GDAL_PAM_ENABLED="NO", **UNTRUSTED_GDAL_ENV)


class MapScenes:
    """The kept scenes and their tiles (see the module docstring)."""

    def __init__(self, *, max_scenes: int = 8, max_bytes: int = 2 * 2**30) -> None:
        self.max_scenes = int(max_scenes)
        self.max_bytes = int(max_bytes)
        self._scenes: OrderedDict[str, MapScene] = OrderedDict()
        self._lock = threading.Lock()
        self._root = tempfile.mkdtemp(prefix="uhrbat-map-")  # mode 0700
        weakref.finalize(self, shutil.rmtree, self._root, True)  # also at interpreter exit

    # ------------------------------------------------------------------ scenes
    def add(self, spool: Spool, read_opts: dict[str, Any]) -> MapScene:
        """Open the upload with the untrusted reader and keep it if it can be mapped; the spool
        is consumed either way. Raises `NotMappable` (the reason) or the reader's error."""
        from uhrbat.io import decode_section

        sha, head, nbytes, label = spool.sha256, spool.head, spool.size, spool.label
        if nbytes > self.max_bytes:
            spool.discard()
            raise NotMappable(
                f"{label!r} ({nbytes / 2**20:,.0f} MB) is larger than the map view keeps "
                f"({self.max_bytes / 2**20:,.0f} MB)"
            )
        with decode_section():
            source = spool.open(**read_opts)  # allow-list, limits and georeference, as for a question
        sid = secrets.token_hex(16)  # unguessable: the demo has no accounts to scope ids by
        path = os.path.join(self._root, sid + os.path.splitext(spool.path)[1])
        try:
            facts = self._inspect(source, repr(label))
            _link_or_copy(spool.path, path)  # before the source goes: its folder goes with it
        finally:
            del source
        try:
            facts.update(self._grid(path, facts["driver"]))
        except BaseException:
            _remove(path)
            raise
        scene = MapScene(id=sid, label=label, path=path, nbytes=nbytes, sha256=sha, head=head, **facts)
        with self._lock:
            self._scenes[sid] = scene
            while len(self._scenes) > self.max_scenes or sum(s.nbytes for s in self._scenes.values()) > self.max_bytes:
                _, old = self._scenes.popitem(last=False)
                _remove(old.path)
        return scene

    @staticmethod
    def _inspect(source: Any, name: str) -> dict[str, Any]:
        from uhrbat.errors import GeoTransformError, NotGeoreferencedError
        from uhrbat.io.geo import map_ready
        from uhrbat.io.raster import RasterSource

        if not isinstance(source, RasterSource) or source.georef is None:
            raise NotMappable(f"{name} is not georeferenced: the map view needs a GeoTIFF")
        try:
            georef = map_ready(source)
        except (NotGeoreferencedError, GeoTransformError) as e:
            raise NotMappable(str(e)) from None
        if source.mode not in ("bands", "palette"):
            raise NotMappable(
                f"{name} is a {source.mode.upper()} raster: the map view shows RGB, grey or palette rasters"
            )
        stretch = (
            None if source.stretch_ranges is None else tuple((float(a), float(b)) for a, b in source.stretch_ranges)
        )
        return {
            "driver": source.driver,
            "size": tuple(int(v) for v in source.size),
            "bands": tuple(int(b) for b in source.bands),
            "stretch": stretch,
            "palette": source.mode == "palette",
            "crs": georef.crs_name,
        }

    @staticmethod
    def _grid(path: str, driver: str) -> dict[str, Any]:
        """The scene's zoom range and WGS84 bounds on the Web-Mercator grid."""
        try:
            import rio_tiler  # noqa: F401
        except ImportError as e:
            raise NotMappable(f"the map view needs rio-tiler ({e}); pip install 'uhrbat[serve]'") from None

        with _reader(path, driver) as r:
            maxzoom = int(r.maxzoom)
            bounds = tuple(float(v) for v in r.get_geographic_bounds(r.tms.rasterio_geographic_crs))
            long_side = max(r.width, r.height)
        if not all(math.isfinite(v) for v in bounds):
            raise NotMappable("the scene's corners have no position on the Web-Mercator map")
        # the zoom at which the scene's long side spans about MIN_ZOOM_TILES tiles
        levels = math.ceil(math.log2(max(1.0, long_side / (TILE_SIZE * MIN_ZOOM_TILES))))
        return {"bounds": bounds, "minzoom": max(0, maxzoom - levels), "maxzoom": maxzoom}

    def get(self, sid: str) -> MapScene:
        with self._lock:
            scene = self._scenes.get(sid)
            if scene is None:
                raise UnknownScene("unknown or expired map scene; upload the image again")
            self._scenes.move_to_end(sid)
            return scene

    def scene_spool(self, sid: str) -> Spool:
        """A `Spool` of the scene's bytes for one question (the engine consumes and discards it)."""
        scene = self.get(sid)
        return _SceneSpool(scene)

    def close(self) -> None:
        with self._lock:
            self._scenes.clear()
        shutil.rmtree(self._root, ignore_errors=True)

    # ------------------------------------------------------------------ tiles
    def tile(self, sid: str, z: int, x: int, y: int) -> bytes:
        """One PNG tile (RGBA; transparent off the scene / under its mask). `UnknownScene` or
        `NoTile` for requests the scene cannot answer."""
        scene = self.get(sid)
        if not scene.minzoom <= z <= scene.maxzoom:
            raise NoTile(f"no tiles at zoom {z}: this scene has zooms {scene.minzoom} to {scene.maxzoom}")
        if not (0 <= x < 2**z and 0 <= y < 2**z):
            raise NoTile(f"tile {z}/{x}/{y} is off the map grid")
        from rasterio.errors import RasterioError
        from rio_tiler.errors import RioTilerError

        try:
            with _reader(scene.path, scene.driver) as r:
                if not r.tile_exists(x, y, z):
                    raise NoTile(f"tile {z}/{x}/{y} is outside the scene")
                how = "nearest" if scene.palette else "bilinear"  # class indexes must never be blended
                img = r.tile(
                    x, y, z, tilesize=TILE_SIZE, indexes=scene.bands, resampling_method=how, reproject_method=how
                )
                colormap = r.colormap if scene.palette else None
        except (RasterioError, RioTilerError) as e:  # e.g. a corrupt block the opening checks did not touch
            raise ImageLoadError(
                f"tile {z}/{x}/{y} of {scene.label!r} cannot be read ({short_gdal_message(e)})"
            ) from None
        if scene.stretch is not None:
            img.rescale(in_range=scene.stretch)  # the model's own percentile stretch, to 0..255
        return img.render(img_format="PNG", colormap=colormap or None)


@contextlib.contextmanager
def _reader(path: str, driver: str) -> Iterator[Any]:
    """rio-tiler's `Reader` over the kept file: GDAL in the untrusted environment, only the
    driver the untrusted reader accepted it with. A raster without overviews is expected (the
    zoom range stops where a tile would read the whole raster), so rio-tiler's warning is not
    repeated for every tile."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning
    from rio_tiler.errors import NoOverviewWarning
    from rio_tiler.io import Reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoOverviewWarning)
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with _gdal_env(), rasterio.open(path, driver=driver) as ds, Reader(None, dataset=ds) as r:
            yield r


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _SceneSpool(Spool):
    """A `Spool` whose file is a hard link of a kept scene (same bytes, same SHA-256)."""

    def __init__(self, scene: MapScene) -> None:
        super().__init__(scene.label)
        self.close()
        tmp = self.path + ".tmp"
        _link_or_copy(scene.path, tmp)
        os.replace(tmp, self.path)
        self.size, self.head, self._digest = scene.nbytes, scene.head, scene.sha256

    @property
    def sha256(self) -> str:
        return self._digest


__all__ = ["TILE_SIZE", "TILE_WORKERS", "MapScene", "MapScenes", "NoTile", "NotMappable", "UnknownScene"]
