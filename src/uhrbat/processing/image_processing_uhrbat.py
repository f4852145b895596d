"""`UhrBatImageProcessor`: image -> padded square pyramid -> normalised tiles.

A transformers `BaseImageProcessor` (so `AutoImageProcessor`, `save_pretrained` and the hub
work as for any VLM) whose core is vectorised per scale: one resize and one table lookup per
channel and tile row, written straight into the output tensor, no per-tile processor calls.
Bit-exact with the reference's CLIPImageProcessor path:
uint8 -> float64 * (1/255) -> float32 -> (x - mean) / std.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from uhrbat.configuration.geometry import TokenGeometry
from uhrbat.errors import ConfigError
from uhrbat.io.images import ImageSource
from uhrbat.io.sources import open_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SCALES = (672, 1344, 2688, 4032)


class UhrBatImageProcessorKwargs(ImagesKwargs, total=False):
    """The pyramid settings `from_pretrained(..., scales=..., tile_size=..., patch_size=...)` may override."""

    scales: list[int]
    tile_size: int
    patch_size: int


class UhrBatImageProcessor(BaseImageProcessor):
    r"""Builds the multiscale tile tensor of one or more images.

    Args:
        scales: square pyramid sides in pixels, ascending (default 672/1344/2688/4032).
        tile_size: side of a tile, the vision tower's input (336).
        patch_size: the vision tower's patch (14); a tile holds `(tile_size // patch_size)^2` tokens.
        image_mean / image_std: per-channel normalisation (CLIP's).

    Output `pixel_values` is `[B, T, 3, tile, tile]` float32 with `T = sum_s (s // tile)^2`
    tiles, scale-ascending, row-major inside a scale (228 tiles for the default pyramid), and
    `image_sizes` `[B, 2]` the original (width, height).
    """

    valid_kwargs = UhrBatImageProcessorKwargs
    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        scales: Sequence[int] = DEFAULT_SCALES,
        tile_size: int = 336,
        patch_size: int = 14,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        **_ignored: Any,
    ) -> None:
        # `_ignored`: a CLIPImageProcessor config (reference checkpoints) also lists resize/crop
        # settings; the pyramid's pad-and-resize replaces them, only mean/std carry over.
        super().__init__()
        self.scales = [int(s) for s in scales]
        self.tile_size = int(tile_size)
        self.patch_size = int(patch_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        TokenGeometry(self.tile_size, self.patch_size)  # validates the sides (ConfigError)
        if not self.scales or any(s < self.tile_size for s in self.scales):
            raise ConfigError(f"every scale must be >= tile_size {self.tile_size}, got {self.scales}")

    @property
    def geometry(self) -> TokenGeometry:
        """Tile and patch sides (the model config's `geometry`)."""
        return TokenGeometry(self.tile_size, self.patch_size)

    @property
    def tokens_per_side(self) -> int:
        """Patch tokens per tile side (24 for 336 / 14)."""
        return self.geometry.tokens_per_side

    @property
    def tokens_per_tile(self) -> int:
        return self.geometry.tokens_per_tile

    def settings(self) -> dict[str, Any]:
        """The constructor arguments (what `save_pretrained` writes)."""
        return {
            "scales": list(self.scales),
            "tile_size": self.tile_size,
            "patch_size": self.patch_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    # ---------------------------------------------------------------- core
    def _lut(self) -> np.ndarray:
        """`[3, 256]` float32: the normalised value of every uint8 level per channel.

        Computed with exactly CLIPImageProcessor's rounding (uint8 -> float64 * (1/255) ->
        float32 -> (x - mean) / std in float32), so a table lookup is bit-identical to it."""
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std

    @staticmethod
    def canvas(square: Any) -> np.ndarray:
        """A padded square (PIL image, side x side) -> its RGB pixels `[side, side, 3]` uint8."""
        return np.asarray(square.convert("RGB") if square.mode != "RGB" else square)

    def tiles_for_canvas(
        self, canvas: np.ndarray, tiles: Sequence[int] | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """`canvas` `[side, side, 3]` uint8 -> `[n, 3, tile, tile]` float32 normalised tiles: every
        tile in row-major order, or the row-major indices `tiles`. The remainder past g*tile is
        dropped."""
        t = self.tile_size
        g = canvas.shape[0] // t
        lut = self._lut()
        if tiles is None:
            if out is None:
                out = np.empty((g * g, 3, t, t), dtype=np.float32)
            view = out.reshape(g, g, 3, t, t)
            for r in range(g):  # one row of tiles at a time
                band = canvas[r * t : (r + 1) * t, : g * t].reshape(t, g, t, 3).transpose(1, 3, 0, 2)  # (c, C, y, x)
                for ch in range(3):
                    view[r, :, ch] = lut[ch][band[:, ch]]
            return out
        if out is None:
            out = np.empty((len(tiles), 3, t, t), dtype=np.float32)
        for k, i in enumerate(tiles):
            r, c = divmod(int(i), g)
            block = canvas[r * t : (r + 1) * t, c * t : (c + 1) * t].transpose(2, 0, 1)  # (C, y, x)
            for ch in range(3):
                out[k, ch] = lut[ch][block[ch]]
        return out

    def tiles_for_square(self, square: Any, out: np.ndarray | None = None) -> np.ndarray:
        """`square`: PIL image side x side -> `[g*g, 3, tile, tile]` float32, row-major tiles."""
        return self.tiles_for_canvas(self.canvas(square), out=out)

    def pyramid(self, image: Any, out: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image (path, PIL image or ImageSource) -> (`[T, 3, tile, tile]`, (W, H))."""
        source: ImageSource = open_image(image)
        t = self.tile_size
        if out is None:
            out = torch.empty((self.num_tiles(), 3, t, t), dtype=torch.float32)
        arr = out.numpy()
        off = 0
        for s in self.scales:
            n = (s // t) ** 2
            self.tiles_for_square(source.square(s), out=arr[off : off + n])
            off += n
        return out, tuple(source.size)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **_: Any) -> BatchFeature:
        """One image or a list (paths, PIL images or ImageSources) -> `BatchFeature` with
        `pixel_values` `[B, T, 3, tile, tile]` float32 and `image_sizes` `[B, 2]` (W, H)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        t = self.tile_size
        pixel_values = torch.empty((len(images), self.num_tiles(), 3, t, t), dtype=torch.float32)
        sizes = [self.pyramid(im, out=pixel_values[i])[1] for i, im in enumerate(images)]
        data = {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.long)}
        return BatchFeature(data=data, tensor_type=None if return_tensors in (None, "pt") else return_tensors)

    def num_tiles(self) -> int:
        """Tiles per image over the whole pyramid."""
        return sum((s // self.tile_size) ** 2 for s in self.scales)
