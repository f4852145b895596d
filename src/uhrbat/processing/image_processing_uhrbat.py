"""`UhrBatImageProcessor`: image -> padded square pyramid -> normalised 336-px tiles.

Vectorised per scale (one resize and one table lookup per channel and tile row, written
straight into the output tensor, no per-tile processor calls) and bit-exact with the
reference's CLIPImageProcessor path: uint8 -> float64 * (1/255) -> float32 -> (x - mean) / std.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from uhrbat.io.images import ImageSource, open_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"


class UhrBatImageProcessor:
    """Builds the multiscale tile tensor of one or more images.

    Output `pixel_values` is `[B, T, 3, tile, tile]` float32 with `T = sum_s (s // tile)^2`
    tiles, scale-ascending, row-major inside a scale (228 tiles for the default pyramid).
    """

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        scales: Sequence[int] = (672, 1344, 2688, 4032),
        tile_size: int = 336,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        **_: Any,
    ) -> None:
        self.scales = [int(s) for s in scales]
        self.tile_size = int(tile_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]

    # ---------------------------------------------------------------- core
    def _lut(self) -> np.ndarray:
        """`[3, 256]` float32: the normalised value of every uint8 level per channel.

        Computed with exactly CLIPImageProcessor's rounding (uint8 -> float64 * (1/255) ->
        float32 -> (x - mean) / std in float32), so a table lookup is bit-identical to it."""
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std

    def tiles_for_square(self, square: Any, out: np.ndarray | None = None) -> np.ndarray:
        """`square`: PIL image side x side -> `[g*g, 3, tile, tile]` float32, row-major tiles."""
        arr = np.asarray(square.convert("RGB") if square.mode != "RGB" else square)
        g = arr.shape[0] // self.tile_size
        t = self.tile_size
        lut = self._lut()
        if out is None:
            out = np.empty((g * g, 3, t, t), dtype=np.float32)
        view = out.reshape(g, g, 3, t, t)
        for r in range(g):  # one row of tiles at a time; the remainder past g*t is dropped
            band = arr[r * t : (r + 1) * t, : g * t].reshape(t, g, t, 3).transpose(1, 3, 0, 2)  # (c, C, y, x)
            for ch in range(3):
                view[r, :, ch] = lut[ch][band[:, ch]]
        return out

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

    def __call__(self, images: Any, return_tensors: str | None = "pt") -> dict[str, torch.Tensor]:
        if not isinstance(images, (list, tuple)):
            images = [images]
        t = self.tile_size
        pixel_values = torch.empty((len(images), self.num_tiles(), 3, t, t), dtype=torch.float32)
        sizes = [self.pyramid(im, out=pixel_values[i])[1] for i, im in enumerate(images)]
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes, dtype=torch.long)}

    def num_tiles(self) -> int:
        return sum((s // self.tile_size) ** 2 for s in self.scales)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": type(self).__name__,
            "scales": self.scales,
            "tile_size": self.tile_size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides: Any) -> "UhrBatImageProcessor":
        """Read our `preprocessor_config.json`, or a CLIPImageProcessor one (mean/std only)."""
        path = Path(directory) / CONFIG_NAME
        data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        kwargs = {k: data[k] for k in ("scales", "tile_size", "image_mean", "image_std") if k in data}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kwargs)
