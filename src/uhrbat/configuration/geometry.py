"""Token geometry: how a visual token's (scale, tile, row, col) maps to pixels.

A scale `S` is cut into `g = S // tile_size` tiles per side; each tile holds
`tokens_per_side = tile_size // patch_size` patch tokens per side. A token's flat position at
a scale is `tile * tokens_per_tile + row * tokens_per_side + col` (row-major tiles, row-major
patches). CLIP ViT-L/14-336 (every released checkpoint) gives 336 / 14 = 24 tokens per side;
the model config (`UhrBatConfig.geometry`) is the source of truth for any other tower.
"""

from __future__ import annotations

from dataclasses import dataclass

from uhrbat.errors import ConfigError


@dataclass(frozen=True)
class TokenGeometry:
    """Tile side and patch side in pixels (defaults: CLIP ViT-L/14-336)."""

    tile_size: int = 336
    patch_size: int = 14

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.tile_size < self.patch_size or self.tile_size % self.patch_size:
            raise ConfigError(f"tile_size {self.tile_size} must be a positive multiple of patch_size {self.patch_size}")

    @property
    def tokens_per_side(self) -> int:
        """Patch tokens per tile side (24 for 336 / 14)."""
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2

    def grid(self, scale: int) -> int:
        """Tiles per side at `scale` (remainder pixels are dropped, as in the reference)."""
        return int(scale) // self.tile_size

    def flat(self, tile: int, row: int, col: int) -> int:
        """Flat position of patch (`row`, `col`) of `tile`."""
        return int(tile) * self.tokens_per_tile + int(row) * self.tokens_per_side + int(col)

    def unflat(self, flat: int) -> tuple[int, int, int]:
        """(tile, row, col) of a flat position."""
        tile, rc = divmod(int(flat), self.tokens_per_tile)
        row, col = divmod(rc, self.tokens_per_side)
        return tile, row, col


class HasTokenGeometry:
    """Mixin for the config and the processor, which both carry `tile_size` and `patch_size`
    (ints; not annotated here so that no config machinery takes them for fields of the mixin)."""

    @property
    def geometry(self) -> TokenGeometry:
        """Tile and patch sides: how kept tokens map back to pixels (GeoJSON, overlays)."""
        return TokenGeometry(self.tile_size, self.patch_size)

    @property
    def tokens_per_side(self) -> int:
        """Patch tokens per tile side (24 for 336 / 14)."""
        return self.geometry.tokens_per_side

    @property
    def tokens_per_tile(self) -> int:
        return self.geometry.tokens_per_tile


#: The geometry of every released checkpoint (CLIP ViT-L/14-336: 24 x 24 tokens per tile).
CLIP_336_14 = TokenGeometry(336, 14)
