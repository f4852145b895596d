"""Which blocks of a pyramid scale Pillow can resize on their own, bit for bit.

A scale's canvas is `square.resize((side, side))` (bicubic) of the padded full-resolution square.
Gated encoding needs only some of its tiles, and `square.resize((n, n), box=...)` of the
square's window under a block of tiles is far cheaper than the whole canvas. Pillow resamples
in two 1-D passes whose integer filter coefficients are a function of each output pixel's
centre, `in0 + (x + 0.5) * scale`, with the box's corners rounded to float32. The block equals
the same pixels of the whole canvas exactly when its coefficients (and taps) are the whole
resize's ones for the same output rows and columns; they differ when a corner is not a float32
(the 4032 scale of a square whose side is not a multiple of 3: `L / 12` per tile) and, very
rarely, by one unit when the two centres round differently.

`block_size` finds, per scale, the smallest block of `k x k` tiles (`k` divides the grid) for
which every block's coefficients equal the whole resize's, with a replica of Pillow's
`precompute_coeffs` + `normalize_coeffs_8bpc` (`src/libImaging/Resample.c`: IEEE doubles, the
8-bit path's 22-bit fixed point). `k` equal to the grid is the whole canvas, always exact.
Measured over square sides 300-40,000: the 672/1344/2688 scales take single tiles, 4032 single
tiles when the side is a multiple of 3 and 3 x 3 blocks otherwise (one side in 700 needed the
whole canvas). The replica assumes Pillow's C evaluates `a + b * c` without fused
multiply-adds, as x86-64 builds do (its baseline has no FMA); `tests/test_gated_pixels.py` checks
the blocks against the whole canvas pixel for pixel.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["block_box", "block_size", "pillow_bicubic_coefficients"]

_PRECISION_BITS = 32 - 8 - 2  # Pillow's 8-bit resampling precision
_SUPPORT = 2.0  # the bicubic filter's support


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's `bicubic_filter` (a = -0.5), term by term in its order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pillow_bicubic_coefficients(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The integer taps Pillow's bicubic resize of one axis uses.

    Args:
        in_size: input pixels along the axis.
        in0, in1: the box along the axis (Pillow rounds them to float32).
        out_size: output pixels.
    Returns:
        `(first, coeffs)`: `[out_size]` int64 first input pixel of each output pixel's taps, and
        `[out_size, ksize]` int64 fixed-point coefficients (zeros past the taps).
    """
    in0, in1 = np.float32(in0), np.float32(in1)
    scale = float(np.float32(in1 - in0)) / out_size  # (double)(in1 - in0) / outSize, in1 - in0 in float
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1
    inv = 1.0 / filterscale
    center = float(in0) + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    taps = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    k = np.zeros((out_size, ksize))
    total = np.zeros(out_size)
    for x in range(ksize):  # the taps of every output pixel at once, summed in Pillow's order
        w = np.where(x < taps, _bicubic(((x + xmin).astype(np.float64) - center + 0.5) * inv), 0.0)
        k[:, x] = w
        total = total + w
    k = np.divide(k, total[:, None], out=k.copy(), where=total[:, None] != 0.0)
    scaled = k * (1 << _PRECISION_BITS)
    coeffs = np.where(k < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, coeffs


def _same_taps(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    """Do two tap tables weigh every input pixel the same (a zero tap counts for nothing)?"""
    (fa, ka), (fb, kb) = a, b
    if ka.shape != kb.shape:
        return False
    if np.array_equal(fa, fb):
        return np.array_equal(ka, kb)
    shift = fb - fa  # compare on a common window per output pixel
    if np.abs(shift).max() > 1:
        return False
    width = ka.shape[1] + 2
    base = np.minimum(fa, fb)
    rows = np.arange(ka.shape[0])[:, None]
    da, db = np.zeros((ka.shape[0], width), np.int64), np.zeros((ka.shape[0], width), np.int64)
    cols = np.arange(ka.shape[1])[None]
    da[rows, (fa - base)[:, None] + cols] = ka
    db[rows, (fb - base)[:, None] + cols] = kb
    return np.array_equal(da, db)


def block_box(index: int, k: int, tile: int, side: int, length: int) -> tuple[float, float]:
    """`(in0, in1)` along one axis of the square (`length` px) under block `index` of `k` tiles."""
    return index * k * tile * length / side, (index + 1) * k * tile * length / side


@lru_cache(maxsize=256)
def block_size(length: int, side: int, tile: int) -> int:
    """Smallest `k` (dividing the scale's grid) such that resizing the square's window under any
    block of `k x k` tiles gives exactly those pixels of the whole `side x side` resize of the
    `length x length` square; the grid itself (the whole canvas) when no smaller block does."""
    grid = side // tile
    whole = pillow_bicubic_coefficients(length, 0.0, float(length), side)
    for k in (k for k in range(1, grid) if grid % k == 0):
        n = k * tile
        if all(
            _same_taps(
                pillow_bicubic_coefficients(length, *block_box(i, k, tile, side, length), n),
                (whole[0][i * n : (i + 1) * n], whole[1][i * n : (i + 1) * n]),
            )
            for i in range(grid // k)
        ):
            return k
    return grid
