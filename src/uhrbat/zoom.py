"""Zoom: look closer where the model looked (issue 21; our training-free addition, not the paper's).

Pass 1 answers the question over the scene (or a region of it). Its base-scale relevance map -
the last prompt token's attention over the coarsest scale's tokens, which UHR-BAT upsamples to
score every finer scale - proposes windows (`propose_windows`):

1. the relevance grid of the cells that touch the image (`uhrbat.io.mapfiles.relevance_grid`;
   cells entirely in the square padding are dropped);
2. high cells: relevance >= mean + one standard deviation of those cells (at most the maximum,
   so the most relevant cell always counts); a flat map proposes nothing, and says so;
3. areas: 8-connected components of the high cells (`label_components`, vectorised in torch);
4. each area's `score`: its share of the grid's relevance mass; areas ranked by it;
5. one window per area, a square centred on the area's relevance-weighted centre, of side
   `max(2 x the area's extent, 1/4 of the frame's long side, one tile)`, at most the finest
   pyramid scale (4,032 px for UHR-BAT: a window no larger is read at native resolution, or
   upsampled) and at most the frame; shifted inside the frame (clipped where the frame is
   narrower). An area larger than the finest scale is clipped to the finest-scale square around
   its relevance centre, its most relevant part. An area whose centre lies in an earlier window
   adds nothing and is skipped, and so is a window that would be the whole frame (pass 1 saw it);
6. at most `zoom` windows.

Pass 2 (`UhrBatPipeline`) asks the same question about every window (child scenes,
`uhrbat.scene.manager.SceneManager.open_window`, in one batch) and answers with the window of the
highest score; every window's answer is kept (`uhrbat.results.ZoomResult`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry
from uhrbat.errors import RegionError

__all__ = ["Proposal", "check_zoomable", "label_components", "propose_windows", "zoom_answers"]


@dataclass(frozen=True)
class Proposal:
    """A window proposed by pass 1, in pixels of the frame pass 1 saw (x1, y1 exclusive)."""

    pixels: tuple[int, int, int, int]
    score: float  # the area's share of the relevance mass


def check_zoomable(image: Any, request: Any = None) -> None:
    """`RegionError` (one line, before any compute) unless zoom can read windows of `image`'s
    scene: its origin must be known (a path, PIL image, or a scene / source opened from one), and
    a region it is asked within (`request`, or the window `image` shows) must be a box."""
    from uhrbat.scene.origin import origin_of

    region = request if request is not None else getattr(getattr(image, "region", None), "request", None)
    if region is not None and region.polygons:
        raise RegionError(
            "zoom looks inside a box region only (a GeoJSON region masks the pixels outside its polygons, which zoom "
            "windows would not keep); give region=[x0, y0, x1, y1] (with region_crs) or zoom=0"
        )
    if origin_of(image) is None:
        raise RegionError(
            "zoom reads windows from the image file: pass the path (or a PIL image), or a scene or source opened "
            "from it (pipe.open(path), uhrbat.scene.origin.open_source(path))"
        )


def label_components(mask: Tensor) -> Tensor:
    """8-connected components of a `[H, W]` bool grid -> `[H, W]` int64 labels (-1 outside the
    mask; components numbered 0.. in order of their first cell, row-major).

    Min-label propagation with pointer jumping: every masked cell starts with its own flat
    index; each round takes the minimum over its 3x3 neighbourhood, then follows labels
    (`label[label]`), until nothing changes - rounds grow with the log of a component's extent
    on compact shapes and at worst with its length, never with the number of cells one by one."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [H, W], got {tuple(mask.shape)}")
    h, w = mask.shape
    n = h * w
    if n == 0 or not bool(mask.any()):
        return torch.full((h, w), -1, dtype=torch.long)
    big = n  # larger than every index: "no label"
    idx = torch.arange(n, dtype=torch.long).view(h, w)
    lab = torch.where(mask, idx, torch.full_like(idx, big))
    flat_mask = mask.reshape(-1)
    while True:
        p = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=big)
        shifted = torch.stack([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        new = torch.where(mask, shifted.amin(dim=0), lab)
        flat = new.reshape(-1)
        # a label is the index of a cell of the same component: follow it (pointer jumping)
        jumped = torch.where(flat_mask, flat[flat.clamp(max=n - 1)], flat).view(h, w)
        if torch.equal(jumped, lab):
            break
        lab = jumped
    roots = lab[mask]
    _, dense = torch.unique(roots, sorted=True, return_inverse=True)  # sorted roots = first-cell order
    out = torch.full((h, w), -1, dtype=torch.long)
    out[mask] = dense
    return out


def propose_windows(
    relevance: dict[Any, Any],
    size: tuple[int, int],
    count: int,
    finest: int,
    *,
    scale: int | None = None,
    geometry: TokenGeometry = CLIP_336_14,
) -> tuple[list[Proposal], str | None]:
    """Up to `count` windows of a `size` (W, H) frame from pass 1's relevance (scale -> `[T, n, n]`,
    `AskResult.relevance`; `scale` defaults to the coarsest), each of side <= `finest` (the
    pyramid's finest scale), best first; and a note when fewer than `count` were found (the
    module docstring gives the rule)."""
    from uhrbat.io.mapfiles import relevance_grid

    W, H = int(size[0]), int(size[1])
    grid, (cell, _, c_off, _, _, r_off), _ = relevance_grid(relevance, (W, H), scale=scale, geometry=geometry)
    g = torch.from_numpy(grid).double()
    finite = torch.isfinite(g)
    if not bool(finite.all()):
        g = torch.where(finite, g, torch.zeros_like(g))
    mean, std = g.mean(), g.std(unbiased=False)
    if g.numel() == 0 or not float(std) > 0:
        return [], "zoom found no high-relevance area (the relevance map is flat); the answer is pass 1's"
    mask = g >= torch.minimum(mean + std, g.max())
    labels = label_components(mask)
    k = int(labels.max()) + 1
    rows, cols = mask.nonzero(as_tuple=True)
    lab, w = labels[rows, cols], g[rows, cols].clamp_min(0)
    mass = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, w)
    cells = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, torch.ones_like(w))
    # relevance-weighted centre (the plain centre when an area holds no positive relevance)
    weight = torch.where(mass[lab] > 0, w, torch.ones_like(w))
    norm = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, weight)
    cx = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, weight * (cols.double() + 0.5)) / norm
    cy = torch.zeros(k, dtype=torch.float64).index_add_(0, lab, weight * (rows.double() + 0.5)) / norm
    c0 = torch.full((k,), g.shape[1], dtype=torch.long).scatter_reduce(0, lab, cols, "amin")
    c1 = torch.full((k,), -1, dtype=torch.long).scatter_reduce(0, lab, cols, "amax") + 1
    r0 = torch.full((k,), g.shape[0], dtype=torch.long).scatter_reduce(0, lab, rows, "amin")
    r1 = torch.full((k,), -1, dtype=torch.long).scatter_reduce(0, lab, rows, "amax") + 1
    total = float(g.clamp_min(0).sum())
    score = mass / total if total > 0 else cells / float(cells.sum())  # shares of the grid's relevance
    order = torch.argsort(score, descending=True, stable=True).tolist()

    long_side = max(W, H)
    lo = max(long_side / 4, float(geometry.tile_size))
    hi = float(min(finest, long_side))
    out: list[Proposal] = []
    for i in order:  # areas, best first; stops at `count` windows
        if len(out) == count:
            break
        x, y = c_off + float(cx[i]) * cell, r_off + float(cy[i]) * cell  # frame pixels
        if any(p.pixels[0] <= x < p.pixels[2] and p.pixels[1] <= y < p.pixels[3] for p in out):
            continue  # already inside a chosen window
        extent = max(int(c1[i] - c0[i]), int(r1[i] - r0[i])) * cell
        side = min(max(2.0 * extent, lo), hi)
        box = (*_span(x, side, W), *_span(y, side, H))
        pixels = (box[0], box[2], box[1], box[3])
        if pixels == (0, 0, W, H):
            continue  # the whole frame: pass 1 saw it
        out.append(Proposal(pixels, float(score[i])))
    note = None
    if len(out) < count:
        found = f"only {len(out)}" if out else "no"
        note = (
            f"zoom found {found} window(s) besides the whole scene for {count} asked "
            f"({k} high-relevance area(s); the rest lie in earlier windows or span the scene)"
        )
        if not out:
            note += "; the answer is pass 1's"
    return out, note


def _span(centre: float, side: float, extent: int) -> tuple[int, int]:
    """[a, b) of length `side` (whole pixels) centred on `centre`, shifted inside [0, extent)."""
    length = min(extent, max(1, int(round(side))))
    a = int(math.floor(centre - length / 2))
    a = min(max(a, 0), extent - length)
    return a, a + length


def zoom_answers(
    answer: Callable[..., tuple[list[Any], list[Any]]],
    images: Sequence[Any],
    prompts: Sequence[str],
    targets: Sequence[tuple[Any, Any, Any]],
    options: Any,
    config: Any,
    masks: Sequence[dict | None] | None = None,
    return_relevance: bool = False,
    progress: Any = None,
) -> list[Any]:
    """Both passes of a zoom question for every row (see the module docstring): `options` the
    request's `ResolvedSelection` (`zoom` windows at most), `answer(images, prompts, targets,
    return_relevance, masks) -> (AskResults, OpenedScenes)` one pipeline pass with zoom off.
    Each row's result is the chosen window's (or pass 1's when no window was found) with
    `timings` summed over both passes and `zoom` (`uhrbat.results.ZoomResult`)."""
    from uhrbat.io.regions import parse_region
    from uhrbat.results import ZoomResult, ZoomWindow
    from uhrbat.selectors import get_selector

    zoom, selector = options.zoom, get_selector(options.selector)
    if selector.needs_masks:
        raise RegionError(
            f"selector {selector.name} needs the segment masks of each zoom window, which a mask file of the image "
            f"does not give; zoom with another selector"
        )
    for _, target, request in targets:  # before any compute: can windows be read from it?
        check_zoomable(target, request)
    first, opened = answer(list(images), list(prompts), list(targets), True, masks)
    asks: list[tuple[int, Any, float]] = []  # (row, window request in scene pixels, score)
    notes: list[str | None] = []
    for i, (res, scene) in enumerate(zip(first, opened)):
        found, note = propose_windows(
            res.relevance, scene.size, zoom, max(config.scales), scale=min(config.scales), geometry=config.geometry
        )
        notes.append(note)
        ox, oy = scene.region.pixels[:2] if scene.region is not None else (0, 0)  # a region's windows: inside it
        for p in found:
            x0, y0, x1, y1 = p.pixels
            asks.append((i, parse_region([x0 + ox, y0 + oy, x1 + ox, y1 + oy]), p.score))
    second: list[Any] = []
    if asks:
        if progress is not None:
            progress("zoom", {"windows": len(asks)})
        second, _ = answer(
            [images[i] for i, _, _ in asks],
            [prompts[i] for i, _, _ in asks],
            [(opened[i], opened[i], request) for i, request, _ in asks],
            return_relevance,
            None,
        )
    out = []
    for i, res in enumerate(first):
        windows = [
            ZoomWindow(tuple(r.region["pixels"]), score, r, r.region.get("bounds_crs"))
            for (row, _, score), r in zip(asks, second)
            if row == i
        ]
        scene_pass = res if return_relevance else dataclasses.replace(res, relevance=None)
        final = windows[0].result if windows else scene_pass
        timings = {k: sum(r.timings.get(k, 0.0) for r in [res, *(w.result for w in windows)]) for k in res.timings}
        info = ZoomResult(scene_pass, windows, 0 if windows else None, zoom, notes[i])
        out.append(dataclasses.replace(final, timings=timings, zoom=info))
    return out
