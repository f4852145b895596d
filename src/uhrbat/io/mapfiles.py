"""Map files a GIS opens in place (issue 23): the relevance map as a Cloud-Optimized GeoTIFF
in the scene's CRS, and a world file + CRS sidecar for the `--explain` overlay PNG.

* `write_relevance_geotiff(path, relevance, source)`: one float32 band, one pixel per token
  cell of the chosen scale (default: the base scale, where the model's attention is measured;
  the finer scales' maps are its bilinear upsampling), covering the cells that touch the image
  (cells entirely in the square padding are dropped, so the raster's outer edge is within one
  cell of the image's). Its transform is the image's georeference composed with the cell grid,
  so it lands on the scene (for a region: on the window, in the scene's CRS).
* `write_overlay_georef(png_path, overlay, source)`: `<name>.pgw` (world file: the PNG's pixel
  size, rotation and the centre of its top-left pixel, in CRS units) and `<name>.png.aux.xml`
  (the CRS, as GDAL's PAM sidecar), so QGIS / GDAL place the overlay's image view on the scene
  (the legend and caption below it fall outside the scene).

Both need a georeferenced source (`NotGeoreferencedError` otherwise, one line) and `rasterio`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry
from uhrbat.errors import NotGeoreferencedError
from uhrbat.io.geo import GeoRef, _georef_of, _label
from uhrbat.io.images import pad_offsets


def _need_georef(source: Any, what: str) -> GeoRef:
    georef = _georef_of(source)
    if georef is None:
        why = getattr(source, "georef_note", None) or "it has no georeference"
        raise NotGeoreferencedError(
            f"{_label(source)} cannot get {what}: {why}; map outputs need a georeferenced image (GeoTIFF / COG)"
        )
    return georef


def map_file_ready(source: Any, what: str = "a relevance GeoTIFF") -> GeoRef:
    """The georeference map files of `source` are written in, or `NotGeoreferencedError` (one
    line): call it before the model runs (`uhrbat ask --relevance-tif`)."""
    return _need_georef(source, what)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def relevance_grid(
    relevance: dict[Any, Any], size: tuple[int, int], *, scale: int | None = None, geometry: TokenGeometry = CLIP_336_14
) -> tuple[np.ndarray, tuple[float, float, float, float, float, float], int]:
    """`(grid, transform, scale)`: one scale's relevance `[tiles, n, n]` as a `[rows, cols]`
    float32 grid of token cells over an image of `size`, cropped to the cells touching it, and
    the affine `(a, b, c, d, e, f)` from grid pixels to image pixels."""
    if not relevance:
        raise ValueError("no relevance map: ask with return_relevance=True")
    scales = sorted(int(s) for s in relevance)
    scale = scales[0] if scale is None else int(scale)
    if scale not in scales:
        raise ValueError(f"no relevance at scale {scale}; available: {scales}")
    m = _to_numpy(relevance[scale] if scale in relevance else relevance[str(scale)])
    n = geometry.tokens_per_side
    g = int(round(math.sqrt(m.shape[0])))
    if m.ndim != 3 or g * g != m.shape[0] or m.shape[1:] != (n, n):
        raise ValueError(f"relevance at scale {scale} must be [tiles, {n}, {n}] over a square grid, got {m.shape}")
    grid = m.reshape(g, g, n, n).transpose(0, 2, 1, 3).reshape(g * n, g * n)
    W, H = size
    L, ox, oy = pad_offsets((W, H))
    cell = L * geometry.patch_size / scale  # image pixels per token cell
    c0, r0 = max(0, math.floor(ox / cell)), max(0, math.floor(oy / cell))
    c1, r1 = min(g * n, math.ceil((ox + W) / cell)), min(g * n, math.ceil((oy + H) / cell))
    crop = np.ascontiguousarray(grid[r0:r1, c0:c1], dtype=np.float32)
    return crop, (cell, 0.0, c0 * cell - ox, 0.0, cell, r0 * cell - oy), scale


def write_relevance_geotiff(
    path: str | os.PathLike,
    relevance: dict[Any, Any],
    source: Any,
    *,
    scale: int | None = None,
    geometry: TokenGeometry | None = None,
    tags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one scale's relevance as a float32 COG in the source's CRS; returns
    `{"path", "scale", "shape", "transform", "crs"}`. `tags`: extra metadata (e.g. the
    question). See the module docstring."""
    import rasterio
    from affine import Affine

    georef = _need_georef(source, "a relevance GeoTIFF")
    geometry = geometry or CLIP_336_14
    grid, cell_t, scale = relevance_grid(relevance, tuple(source.size), scale=scale, geometry=geometry)
    transform = Affine(*georef.coefficients) * Affine(*cell_t)
    h, w = grid.shape
    meta = {"uhrbat_relevance_scale": str(scale), "uhrbat_token_cell_px": f"{cell_t[0]:.6f}"}
    meta.update({f"uhrbat_{k}": str(v) for k, v in (tags or {}).items()})
    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(
            path,
            "w",
            driver="COG",
            width=w,
            height=h,
            count=1,
            dtype="float32",
            crs=georef.crs,
            transform=transform,
            compress="deflate",
        ) as ds:
            ds.write(grid, 1)
            ds.update_tags(**meta)
            ds.set_band_description(1, f"query relevance at scale {scale}")
    return {
        "path": str(path),
        "scale": scale,
        "shape": [h, w],
        "transform": list(transform)[:6],
        "crs": georef.crs_name,
    }


def overlay_transform(overlay: Any, source: Any) -> tuple[float, float, float, float, float, float]:
    """Affine `(a, b, c, d, e, f)` from overlay-PNG pixel edges to the source's CRS."""
    from affine import Affine

    georef = _need_georef(source, "a georeferenced overlay")
    return tuple(Affine(*georef.coefficients) * Affine(*overlay.pixel_transform))[:6]  # type: ignore[return-value]


def write_overlay_georef(png_path: str | os.PathLike, overlay: Any, source: Any) -> tuple[Path, Path]:
    """Write the world file (`.pgw`) and GDAL's CRS sidecar (`.png.aux.xml`) next to an overlay
    PNG rendered by `uhrbat.io.overlay.render_overlay` from `source`; returns both paths."""
    from xml.sax.saxutils import escape

    georef = _need_georef(source, "a georeferenced overlay")
    a, b, c, d, e, f = overlay_transform(overlay, source)
    png = Path(png_path)
    world = png.with_suffix(".pgw")
    # World files give the centre of the top-left pixel: A, D, B, E, C, F.
    cx, cy = c + 0.5 * a + 0.5 * b, f + 0.5 * d + 0.5 * e
    world.write_text("\n".join(repr(float(v)) for v in (a, d, b, e, cx, cy)) + "\n", encoding="ascii")
    aux = png.with_name(png.name + ".aux.xml")
    wkt = georef.crs.to_wkt() if hasattr(georef.crs, "to_wkt") else str(georef.crs)
    aux.write_text(f"<PAMDataset>\n  <SRS>{escape(wkt)}</SRS>\n</PAMDataset>\n", encoding="utf-8")
    return world, aux


__all__ = ["map_file_ready", "overlay_transform", "relevance_grid", "write_overlay_georef", "write_relevance_geotiff"]
