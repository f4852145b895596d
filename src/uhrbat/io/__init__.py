"""Image input/output: one reader for every entry point (`open_image`, `open_image_bytes`, with
two trust levels: see `uhrbat.io.sources`; `region=` reads one window, `uhrbat.io.regions`),
`decode_section` for bounding concurrent decodes, token geometry, GeoJSON and the pixel-space
file (`uhrbat.io.geo`), overlays (`uhrbat.io.overlay`), map files (relevance COG, world files:
`uhrbat.io.mapfiles`). `RasterSource` and the map files need `rasterio`."""

from uhrbat.io.decoding import decode_section, set_decode_concurrency
from uhrbat.io.geo import (
    PIXEL_JSON_SUFFIX,
    GeoRef,
    kept_tokens_document,
    map_ready,
    pixel_boxes,
    token_regions,
    tokens_geojson,
    tokens_pixel_json,
    tokens_with_boxes,
    write_geojson,
    write_pixel_json,
)
from uhrbat.io.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_STRETCH,
    EXACT_MAX_PIXELS,
    PAD_RGB,
    ImageSource,
    JPEGDraftSource,
    PILSource,
    load_pil,
    pad_to_square,
    to_rgb,
)
from uhrbat.io.regions import Region, RegionRequest, parse_region, resolve_region
from uhrbat.io.sources import open_image, open_image_bytes

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_STRETCH",
    "EXACT_MAX_PIXELS",
    "PAD_RGB",
    "PIXEL_JSON_SUFFIX",
    "GeoRef",
    "ImageSource",
    "JPEGDraftSource",
    "PILSource",
    "RasterSource",
    "Region",
    "RegionRequest",
    "decode_section",
    "kept_tokens_document",
    "load_pil",
    "map_ready",
    "open_image",
    "open_image_bytes",
    "pad_to_square",
    "parse_region",
    "pixel_boxes",
    "render_overlay",
    "resolve_region",
    "set_decode_concurrency",
    "to_rgb",
    "token_regions",
    "tokens_geojson",
    "tokens_pixel_json",
    "tokens_with_boxes",
    "write_geojson",
    "write_overlay_georef",
    "write_pixel_json",
    "write_relevance_geotiff",
]


def __getattr__(name: str):  # lazy: rasterio / the overlay renderer only when used
    if name == "RasterSource":
        from uhrbat.io.raster import RasterSource

        return RasterSource
    if name == "render_overlay":
        from uhrbat.io.overlay import render_overlay

        return render_overlay
    if name in ("write_relevance_geotiff", "write_overlay_georef"):
        from uhrbat.io import mapfiles

        return getattr(mapfiles, name)
    raise AttributeError(name)
