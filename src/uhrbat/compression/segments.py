"""Segment-id masks (SAM-style) for the `segments` selector (method §4.2, §4.3).

Ids are global per image: 0 = background / no mask, 1..M = segments; a segment spanning several
tiles is one group at that scale. Two per-scale formats are accepted:

* **tile format** (what the reference's `build_multiscale_tile_masks.py` writes and its loader
  reads): one 24×24 id map per 336-px tile, tiles in row-major order, as `[g², 24, 24]`,
  `[g², 576]` or `[g²·576]`, or as a dict `{"masks"|"tile_masks": [...], "coords"|"tile_coords":
  [(r, c), ...]}`. Extra tiles are trimmed to g², as the reference does;
* **full-grid format** (what the reference README's `build_multiscale_token_masks.py` writes,
  which the reference's own loader cannot read): `[S/14, S/14]`, the whole-image token grid,
  cut here into row-major 24×24 tiles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uhrbat.configuration.geometry import CLIP_336_14
from uhrbat.errors import MaskError

__all__ = ["load_mask_file", "segment_ids_for_scale"]

_MASK_KEYS = ("masks", "tile_masks")
_COORD_KEYS = ("coords", "tile_coords")


def _as_int_tensor(value: Any, scale: int) -> Tensor:
    """Integer tensor from a tensor / array / nested list; integral floats are accepted."""
    try:
        if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
            t = torch.stack([torch.as_tensor(v) for v in value])
        else:
            t = torch.as_tensor(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise MaskError(f"scale {scale}: mask is not a rectangular array of ids ({e})") from e
    if t.dtype == torch.bool:
        return t.long()
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not torch.equal(t, t.round()):
            raise MaskError(f"scale {scale}: segment ids must be integers, got {t.dtype} values")
    elif t.is_complex():
        raise MaskError(f"scale {scale}: segment ids must be integers, got {t.dtype}")
    return t.long()


def _tiles_from_dict(mask: Mapping[str, Any], scale: int, grid: int, side: int) -> Tensor:
    """`[T, side, side]` tile masks of a reference dict, put in row-major tile order."""
    key = next((k for k in _MASK_KEYS if k in mask), None)
    if key is None:
        raise MaskError(f"scale {scale}: mask dict has none of the keys {list(_MASK_KEYS)} (got {sorted(mask)})")
    tiles = _as_int_tensor(mask[key], scale)
    if tiles.dim() == 2 and tiles.shape[1] == side * side:
        tiles = tiles.view(-1, side, side)
    if tiles.dim() != 3 or tiles.shape[1:] != (side, side):
        raise MaskError(f"scale {scale}: tile masks have shape {tuple(tiles.shape)}, expected [T, {side}, {side}]")
    ckey = next((k for k in _COORD_KEYS if k in mask), None)
    if ckey is None or mask[ckey] is None:
        return tiles
    try:
        coords = torch.as_tensor(mask[ckey], dtype=torch.int64).reshape(-1, 2)
    except (RuntimeError, TypeError, ValueError) as e:
        raise MaskError(f"scale {scale}: tile coords are not (row, col) pairs ({e})") from e
    if coords.shape[0] != tiles.shape[0]:
        raise MaskError(f"scale {scale}: {tiles.shape[0]} tile masks but {coords.shape[0]} tile coords")
    # Place every tile by its (row, col); tiles outside the g×g grid are the extra ones the
    # reference trims. Every grid cell must be covered exactly once.
    inside = (coords >= 0).all(1) & (coords < grid).all(1)
    flat = coords[inside, 0] * grid + coords[inside, 1]
    if flat.numel() < grid * grid or torch.unique(flat).numel() != flat.numel():
        raise MaskError(f"scale {scale}: tile coords do not cover the {grid}x{grid} tile grid exactly once")
    out = tiles.new_empty(grid * grid, side, side)
    out[flat] = tiles[inside]
    return out


def segment_ids_for_scale(
    mask: Any, scale: int, tile_size: int = CLIP_336_14.tile_size, patch_size: int = CLIP_336_14.patch_size
) -> Tensor:
    """Per-token segment ids of one scale.

    Args:
        mask: tile format (`[g², t, t]`, `[g², t²]`, `[g²·t²]`, or the reference dict with
            `masks`/`tile_masks` and optional `coords`/`tile_coords`), or full-grid format
            `[S/p, S/p]`; g = scale / tile_size, t = tile_size / patch_size. Tensors, arrays
            or nested lists of integer ids >= 0.
        scale: pyramid side S in pixels.
        tile_size, patch_size: tile side in pixels and ViT patch size.

    Returns:
        `[g²·t²]` int64 ids, tile-major then row-major within a tile (the token order of the
        selection functions).

    Raises:
        MaskError: naming the scale and the shape, when the mask fits neither format or holds
            negative / non-integer ids.
    """
    if tile_size <= 0 or patch_size <= 0 or tile_size % patch_size or scale % tile_size or scale <= 0:
        raise MaskError(
            f"scale {scale}: needs scale % tile_size == 0 and tile_size % patch_size == 0 "
            f"(tile_size={tile_size}, patch_size={patch_size})"
        )
    side = tile_size // patch_size
    grid = scale // tile_size
    per_tile = side * side
    if isinstance(mask, Mapping):
        m = _tiles_from_dict(mask, scale, grid, side)
    elif isinstance(mask, Sequence) and not isinstance(mask, (str, bytes)) and len(mask) == 0:
        raise MaskError(f"scale {scale}: empty mask")
    else:
        m = _as_int_tensor(mask, scale)
    full = grid * side
    shape = tuple(m.shape)
    if m.dim() == 2 and shape == (full, full) and not (shape[0] >= grid * grid and shape[1] == per_tile):
        # Full-grid format: cut the whole-image token grid into row-major tiles.
        ids = m.reshape(grid, side, grid, side).permute(0, 2, 1, 3).reshape(-1)
    elif (m.dim() == 3 and shape[1:] == (side, side)) or (m.dim() == 2 and shape[1] == per_tile):
        if shape[0] < grid * grid:
            raise MaskError(f"scale {scale}: mask of shape {list(shape)} has {shape[0]} tiles, expected {grid * grid}")
        ids = m[: grid * grid].reshape(-1)  # the reference trims extra tiles
    elif m.dim() == 1 and m.numel() >= grid * grid * per_tile and m.numel() % per_tile == 0:
        ids = m[: grid * grid * per_tile]
    else:
        raise MaskError(
            f"scale {scale}: mask of shape {list(shape)} is neither the tile format "
            f"[{grid * grid}, {side}, {side}] / [{grid * grid}, {per_tile}] / [{grid * grid * per_tile}] "
            f"nor the full-grid format [{full}, {full}]"
        )
    if ids.numel() and int(ids.min()) < 0:
        raise MaskError(f"scale {scale}: segment ids must be >= 0 (0 = background), got {int(ids.min())}")
    return ids.contiguous()


def load_mask_file(
    path: str | os.PathLike[str], *, tile_size: int = CLIP_336_14.tile_size, patch_size: int = CLIP_336_14.patch_size
) -> dict[int, Tensor]:
    """Read one image's per-scale segment masks.

    Formats:
        * safetensors with keys `scale.{S}` (this package's format), any accepted layout;
        * a reference `.pt` file: `{"scales": {S: {"tile_masks": [...], "tile_coords": [...]}}}`
          (tile format) or `{"scales": {S: Tensor[S/14, S/14]}}` (full-grid format); read with
          `torch.load(weights_only=True)`, so no code in the file runs.

    Returns:
        `{S: [g²·576] int64 ids}`, already validated with `segment_ids_for_scale`.

    Raises:
        MaskError: missing / unreadable file, a pixel-level SAM cache, or a bad mask.
    """
    p = Path(path)
    if not p.is_file():
        raise MaskError(f"mask file not found: {p}")
    raw: Mapping[Any, Any]
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            raw = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("scale.")}
            if not raw:
                raise MaskError(f"{p}: no 'scale.{{S}}' tensors (keys: {sorted(tensors)[:8]})")
        else:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
            if isinstance(data, Mapping) and "annotations" in data and "scales" not in data:
                raise MaskError(
                    f"{p}: this is a pixel-level SAM cache (RLE annotations); convert it to per-scale token masks first"
                )
            raw = data.get("scales", data) if isinstance(data, Mapping) else None  # type: ignore[assignment]
            if not isinstance(raw, Mapping):
                raise MaskError(f"{p}: expected a dict {{'scales': {{S: mask}}}}, got {type(data).__name__}")
    except MaskError:
        raise
    except Exception as e:  # unreadable, truncated, pickled code refused by weights_only, ...
        raise MaskError(f"cannot read mask file {p}: {type(e).__name__}: {e}") from e
    out: dict[int, Tensor] = {}
    for key, value in raw.items():
        try:
            scale = int(key)
        except (TypeError, ValueError):
            raise MaskError(f"{p}: scale key {key!r} is not an integer") from None
        try:
            out[scale] = segment_ids_for_scale(value, scale, tile_size, patch_size)
        except MaskError as e:
            raise MaskError(f"{p}: {e}") from e
    if not out:
        raise MaskError(f"{p}: no per-scale masks found")
    return out
