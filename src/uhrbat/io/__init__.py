"""Image input/output: one reader for every entry point (`open_image`, `open_image_bytes`, with
two trust levels: see `uhrbat.io.sources`), `decode_section` for bounding concurrent decodes,
token geometry and GeoJSON (`uhrbat.io.geo`), overlays (`uhrbat.io.overlay`). `RasterSource`
needs `rasterio`."""

from uhrbat.io.decoding import decode_section, set_decode_concurrency
from uhrbat.io.geo import (
    GeoRef,
    pixel_boxes,
    token_regions,
    tokens_geojson,
    tokens_with_boxes,
    write_geojson,
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
from uhrbat.io.sources import open_image, open_image_bytes

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_STRETCH",
    "EXACT_MAX_PIXELS",
    "PAD_RGB",
    "GeoRef",
    "ImageSource",
    "JPEGDraftSource",
    "PILSource",
    "RasterSource",
    "decode_section",
    "load_pil",
    "open_image",
    "open_image_bytes",
    "pad_to_square",
    "pixel_boxes",
    "render_overlay",
    "set_decode_concurrency",
    "to_rgb",
    "token_regions",
    "tokens_geojson",
    "tokens_with_boxes",
    "write_geojson",
]


def __getattr__(name: str):  # lazy: rasterio / the overlay renderer only when used
    if name == "RasterSource":
        from uhrbat.io.raster import RasterSource

        return RasterSource
    if name == "render_overlay":
        from uhrbat.io.overlay import render_overlay

        return render_overlay
    raise AttributeError(name)
