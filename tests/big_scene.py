"""A large georeferenced COG for region / memory checks, written quickly and small on disk.

`build_cog(path, size=20000)` writes a `size x size` 3-band uint8 Cloud-Optimized GeoTIFF
(UTM 17N, 0.1 m pixels, 512-px deflate tiles, overviews 2..64, computed by GDAL's COG driver) tile row by tile
row, never holding the raster in memory: mostly-constant tiles (a colour per tile from its
position) with structure (a 4-px grid line every 128 px and a diagonal per tile), so it
compresses to a few MB and every window looks different. Used by tests/test_io_regions.py
(slow) and benchmarks/region_memory.py.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

ORIGIN = (404000.0, 3290000.0)
PIXEL = 0.1


def tile_pattern(r0: int, c0: int, h: int, w: int) -> np.ndarray:
    """(3, h, w) uint8 pixels of the scene at rows r0.., columns c0.. (a pure function, so a
    test can recompute any window). Vectorised per row and column: cheap even for full rows."""
    x = np.arange(c0, c0 + w)
    y = np.arange(r0, r0 + h)
    out = np.empty((3, h, w), np.uint8)
    for band, (kx, ky, mod, off, step) in enumerate(
        ((37, 11, 200, 30, 512), (13, 29, 180, 40, 512), (9, 9, 160, 50, 2048))
    ):
        ux, uy = x // step, y // step  # colour = f(tile column) + g(tile row): a small table, gathered
        tx0, ty0 = int(ux[0]), int(uy[0])
        table = (np.arange(ty0, uy[-1] + 1)[:, None] * ky + np.arange(tx0, ux[-1] + 1)[None, :] * kx) % mod + off
        table = table.astype(np.uint8)
        row = table[:, ux - tx0]  # (tile rows, w)
        out[band] = row[uy - ty0]
    out[:, :, (x % 128) < 4] = 250
    out[:, (y % 128) < 4, :] = 250
    rows, cols = _diagonal(x, y)
    out[:, rows, cols] = 250
    return out


def _diagonal(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (row, col) where x % 512 == y % 512, without an (h, w) temporary."""
    xm = x % 512
    by_mod = [np.flatnonzero(xm == m) for m in range(512)]
    rows, cols = [], []
    for i, yy in enumerate(y):
        c = by_mod[int(yy % 512)]
        rows.append(np.full(c.size, i))
        cols.append(c)
    return np.concatenate(rows), np.concatenate(cols)


def build_cog(path: Path, size: int = 20000, block: int = 512) -> float:
    """Write the scene as a COG at `path`; returns seconds taken."""
    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    t0 = time.perf_counter()
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32617",
        transform=from_origin(*ORIGIN, PIXEL, PIXEL),
        tiled=True,
        blockxsize=block,
        blockysize=block,
        compress="deflate",
        zlevel=1,
        BIGTIFF="IF_SAFER",
    )
    with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
        staging = Path(tmp) / "staging.tif"
        with rasterio.Env(GDAL_CACHEMAX=256, GDAL_NUM_THREADS="ALL_CPUS"):
            with rasterio.open(staging, "w", **profile) as ds:
                for r0 in range(0, size, block):
                    h = min(block, size - r0)
                    ds.write(tile_pattern(r0, 0, h, size), window=Window(0, r0, size, h))
            # The COG driver lays out the file and computes the overviews (average) in one copy.
            rio_copy(
                staging,
                path,
                driver="COG",
                COMPRESS="DEFLATE",
                LEVEL=1,
                BLOCKSIZE=block,
                OVERVIEWS="IGNORE_EXISTING",
                OVERVIEW_RESAMPLING="AVERAGE",
            )
    return time.perf_counter() - t0


__all__ = ["ORIGIN", "PIXEL", "build_cog", "tile_pattern"]
