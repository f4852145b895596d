"""Where a scene's tile pixels come from, and the content identity of a pyramid.

A pyramid is a function of the image processor's settings and either its padded full-resolution
square (sources that resize it exactly like the reference, in one Pillow call per scale: every
image that fits in memory) or else its canvases (uint8, one per scale, resampled from a reduced
copy). Its content digest is a SHA-256 of those (with Pillow's version for a square), so the
read options (bands, stretch, window, pixel limit) are part of it.

A partly encoded scene keeps what its finer tiles come from: `SquareTiles` resizes only the
square's windows under the tiles a question needs (`uhrbat.scene.blocks`: bit for bit the tiles
of the whole canvas), so gated encoding never builds a fine canvas it does not need;
`Canvases` cuts tiles from kept canvases (about 75 MB for the 672/1344/2688/4032 pyramid) for
the other sources. `PyramidTiles` serves an already tiled `[T, 3, t, t]` tensor (the processor's
`pixel_values`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import PIL
import torch
from PIL import Image
from torch import Tensor

from uhrbat.scene.blocks import block_box, block_size
from uhrbat.scene.keys import digest
from uhrbat.scene.scene import SceneGeometry

__all__ = [
    "CONTENT_FORMAT",
    "Canvases",
    "PyramidTiles",
    "SquareTiles",
    "TilePixels",
    "pixels_from_tensors",
    "read_pyramid",
]

#: Version of the content digest's definition (part of every source fingerprint).
CONTENT_FORMAT = 2


class TilePixels(Protocol):
    def tiles(self, scale: int, tiles: Tensor) -> Tensor:
        """`[n, 3, t, t]` float32 normalised tiles `tiles` (indices) of `scale`."""
        ...


class PyramidTiles:
    """Tiles of a whole pyramid already cut: `pixel_values` `[T, 3, t, t]`, scales ascending."""

    def __init__(self, pixel_values: Tensor, geometry: SceneGeometry) -> None:
        self.pixel_values = pixel_values
        self.offsets, off = {}, 0
        for s in geometry.scales:
            self.offsets[s] = off
            off += geometry.num_tiles(s)

    def tiles(self, scale: int, tiles: Tensor) -> Tensor:
        return self.pixel_values[self.offsets[scale] + tiles.to(self.pixel_values.device)]


class Canvases:
    """uint8 padded squares `[S, S, 3]` of some scales of one source; tiles cut on demand."""

    def __init__(self, image_processor: Any, squares: dict[int, np.ndarray]) -> None:
        self.image_processor = image_processor
        self.squares = squares

    def tiles(self, scale: int, tiles: Tensor) -> Tensor:
        if scale not in self.squares:
            raise KeyError(f"no pixels of scale {scale} were kept")
        idx = [int(i) for i in tiles.tolist()]
        return torch.from_numpy(self.image_processor.tiles_for_canvas(self.squares[scale], idx))

    def tensors(self) -> dict[str, Tensor]:
        """Store item (memory only): `canvas.{S}` uint8 tensors."""
        # PIL's pixels arrive read-only; the store's tensors own their memory.
        return {f"canvas.{s}": torch.from_numpy(a if a.flags.writeable else a.copy()) for s, a in self.squares.items()}

    @classmethod
    def from_tensors(cls, image_processor: Any, item: dict[str, Tensor]) -> Canvases:
        return cls(image_processor, {int(k.split(".", 1)[1]): v.numpy() for k, v in item.items()})

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.squares.values())


class SquareTiles:
    """Tiles resized on demand from the padded full-resolution RGB square (`L x L`), a block of
    `k x k` tiles per Pillow call (`uhrbat.scene.blocks.block_size`; the whole canvas of a scale
    where no smaller block is exact, kept for later calls)."""

    def __init__(self, image_processor: Any, square: Image.Image) -> None:
        if square.mode != "RGB" or square.size[0] != square.size[1]:
            raise ValueError(f"a padded RGB square is needed, got {square.mode} {square.size}")
        self.image_processor = image_processor
        self.square = square
        self._canvases: dict[int, np.ndarray] = {}

    def tiles(self, scale: int, tiles: Tensor) -> Tensor:
        ip, length = self.image_processor, self.square.size[0]
        t = ip.tile_size
        grid = scale // t
        idx = [int(i) for i in tiles.tolist()]
        k = block_size(length, scale, t)
        if k == grid:
            if scale not in self._canvases:
                self._canvases[scale] = ip.canvas(self.square.resize((scale, scale), Image.Resampling.BICUBIC))
            return torch.from_numpy(ip.tiles_for_canvas(self._canvases[scale], idx))
        out = np.empty((len(idx), 3, t, t), dtype=np.float32)
        blocks: dict[tuple[int, int], list[int]] = {}  # (block row, block col) -> rows of `out`
        for n, i in enumerate(idx):
            r, c = divmod(i, grid)
            blocks.setdefault((r // k, c // k), []).append(n)
        for (br, bc), rows in blocks.items():
            x0, x1 = block_box(bc, k, t, scale, length)
            y0, y1 = block_box(br, k, t, scale, length)
            block = ip.canvas(self.square.resize((k * t, k * t), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1)))
            local = [(idx[n] // grid - br * k) * k + idx[n] % grid - bc * k for n in rows]
            out[rows] = ip.tiles_for_canvas(block, local)
        return torch.from_numpy(out)

    def tensors(self) -> dict[str, Tensor]:
        """Store item (memory only): the square as a `[L, L, 3]` uint8 tensor."""
        return {"square": torch.from_numpy(np.array(self.square))}

    @classmethod
    def from_tensors(cls, image_processor: Any, item: dict[str, Tensor]) -> SquareTiles:
        arr = np.ascontiguousarray(item["square"].numpy())
        side = arr.shape[0]
        # Shares the stored pixels (no copy of a possibly large square per question).
        return cls(image_processor, Image.frombuffer("RGB", (side, side), arr, "raw", "RGB", 0, 1))

    @property
    def nbytes(self) -> int:
        return self.square.size[0] * self.square.size[1] * 3


def pixels_from_tensors(image_processor: Any, item: dict[str, Tensor]) -> TilePixels:
    """A stored pixel item (`SquareTiles.tensors()` or `Canvases.tensors()`) back."""
    if "square" in item:
        return SquareTiles.from_tensors(image_processor, item)
    return Canvases.from_tensors(image_processor, item)


def square_digest(square: Image.Image, band_bytes: int = 8 * 2**20) -> str:
    """SHA-256 of a square's RGB pixels, read in bands of rows (no whole copy)."""
    h = hashlib.sha256()
    width, height = square.size
    rows = max(1, band_bytes // (3 * width))
    for y in range(0, height, rows):
        h.update(square.crop((0, y, width, min(height, y + rows))).tobytes())
    return h.hexdigest()


def read_pyramid(
    source: Any, image_processor: Any, full: Iterable[int], keep: Iterable[int] = ()
) -> tuple[Tensor, TilePixels, str]:
    """Read the scales of `source` that are needed now.

    Returns `(tiles, pixels, content)`: the float tiles `[T, 3, t, t]` of the scales in `full`
    (concatenated in scale order), where more tiles of the scales in `keep` come from later
    (`SquareTiles` when the source has an exact padded square - no canvas of those scales is
    built -, else `Canvases` of them), and the pyramid's content digest. Scales are read one at
    a time, so at most one canvas that is not kept is held.
    """
    full, keep = set(full), set(keep)
    t = image_processor.tile_size
    counts = {s: (s // t) ** 2 for s in image_processor.scales}
    tiles = torch.empty((sum(counts[s] for s in full), 3, t, t), dtype=torch.float32)
    padded = getattr(source, "padded_square", None)
    square = padded() if padded is not None else None
    if square is not None and square.mode != "RGB":
        square = None
    kept: dict[int, np.ndarray] = {}
    hashes = []
    off = 0
    for s in image_processor.scales:
        if square is not None and s not in full:
            continue  # its tiles come from the square when a question needs them
        canvas = image_processor.canvas(source.square(s))
        if square is None:
            hashes.append(hashlib.sha256(np.ascontiguousarray(canvas).data).hexdigest())
        if s in full:
            image_processor.tiles_for_canvas(canvas, out=tiles[off : off + counts[s]].numpy())
            off += counts[s]
        if s in keep and square is None:
            kept[s] = canvas
    if square is not None:
        content = digest("pyramid-square", image_processor.settings(), PIL.__version__, square_digest(square))
        pixels: TilePixels = SquareTiles(image_processor, square) if keep else Canvases(image_processor, {})
    else:
        content = digest("pyramid", image_processor.settings(), hashes)
        pixels = Canvases(image_processor, kept)
    return tiles, pixels, content
