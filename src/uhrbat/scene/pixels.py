"""Where a scene's tile pixels come from, and the content identity of a pyramid.

A pyramid is a function of its padded squares (uint8 canvases, one per scale) and the image
processor's settings; its content digest is a SHA-256 of both, so the read options (bands,
stretch, window, pixel limit) are part of it. Tiles are cut from the canvases on demand, so a
scene can encode more tiles later without decoding the image again (`Canvases`, about 75 MB
for the 672/1344/2688/4032 pyramid); `PyramidTiles` serves an already tiled `[T, 3, t, t]`
tensor (the processor's `pixel_values`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from uhrbat.scene.keys import digest
from uhrbat.scene.scene import SceneGeometry

__all__ = ["Canvases", "PyramidTiles", "TilePixels", "read_pyramid"]


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


def read_pyramid(
    source: Any, image_processor: Any, full: Iterable[int], keep: Iterable[int] = ()
) -> tuple[Tensor, Canvases, str]:
    """Decode every scale of `source` once.

    Returns `(tiles, canvases, content)`: the float tiles `[T, 3, t, t]` of the scales in `full`
    (concatenated in scale order), the canvases of the scales in `keep` (to encode more of their
    tiles later), and the pyramid's content digest. Scales are read one at a time, so at most one
    canvas that is not kept is held.
    """
    full, keep = set(full), set(keep)
    t = image_processor.tile_size
    counts = {s: (s // t) ** 2 for s in image_processor.scales}
    tiles = torch.empty((sum(counts[s] for s in full), 3, t, t), dtype=torch.float32)
    kept: dict[int, np.ndarray] = {}
    hashes = []
    off = 0
    for s in image_processor.scales:
        canvas = image_processor.canvas(source.square(s))
        hashes.append(hashlib.sha256(np.ascontiguousarray(canvas).data).hexdigest())
        if s in full:
            image_processor.tiles_for_canvas(canvas, out=tiles[off : off + counts[s]].numpy())
            off += counts[s]
        if s in keep:
            kept[s] = canvas
    content = digest("pyramid", image_processor.settings(), hashes)
    return tiles, Canvases(image_processor, kept), content
