"""Overlay: what the model looked at, as one PNG a user can paste into a report.

`render_overlay` draws, over a downsampled view of the original image (no padding):

* the query relevance of the base (smallest) scale as a heatmap (inferno-like colours, stronger
  where the model attended more; normalised to the image area);
* every kept token as a box in its scale's colour (translucent fill + opaque 1-px outline;
  coarse scales first so fine ones stay visible);
* every merged token's member cells outlined in a lighter tint of its scale's colour;
* a legend (one swatch per scale with kept / merged counts, the heatmap colour bar) and the
  question / answer as a caption, in Pillow's built-in font (no files, no network).

Scale colours (Okabe–Ito, colour-blind safe) are assigned by rank of the scale: see
`scale_colours`.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from uhrbat.io.geo import TokenRegion, token_regions
from uhrbat.io.images import pad_offsets

#: Kept-token colours by rank of the scale (smallest scale first).
KEPT_COLOURS: list[tuple[int, int, int]] = [
    (0, 114, 178),  # blue
    (0, 158, 115),  # bluish green
    (230, 159, 0),  # orange
    (204, 121, 167),  # reddish purple
    (86, 180, 233),  # sky blue
    (240, 228, 66),  # yellow
]
PANEL_BG = (24, 24, 28)
PANEL_FG = (235, 235, 235)
MUTED_FG = (170, 170, 175)
_INFERNO = [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
            (250, 193, 39), (252, 255, 164)]


def scale_colours(scales: Sequence[int]) -> dict[int, dict[str, tuple[int, int, int]]]:
    """`{scale: {"kept": rgb, "merged": rgb}}` for the given scales (ascending rank)."""
    out = {}
    for i, s in enumerate(sorted(set(int(s) for s in scales))):
        c = KEPT_COLOURS[i % len(KEPT_COLOURS)]
        tint = tuple(int(round(v + (255 - v) * 0.55)) for v in c)
        out[s] = {"kept": c, "merged": tint}  # type: ignore[dict-item]
    return out


def heat_lut() -> np.ndarray:
    """256 x 3 uint8 colour map used for relevance."""
    anchors = np.asarray(_INFERNO, dtype=np.float64)
    xs = np.linspace(0, 1, len(anchors))
    t = np.linspace(0, 1, 256)
    return np.stack([np.interp(t, xs, anchors[:, i]) for i in range(3)], 1).round().astype(np.uint8)


@dataclass
class OverlayResult:
    path: str | None
    size: tuple[int, int]
    view_box: tuple[int, int, int, int]  # where the image view sits in the overlay
    legend_box: tuple[int, int, int, int]
    caption_box: tuple[int, int, int, int]
    colours: dict[int, dict[str, tuple[int, int, int]]]
    counts: dict[int, dict[str, int]] = field(default_factory=dict)
    image: Image.Image | None = None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _relevance_view(relevance: dict[int, Any], size: tuple[int, int], side: int, crop: tuple[int, int, int, int]) -> tuple[np.ndarray, int] | None:
    """Base-scale relevance resampled onto the view: float (h, w) in [0, 1], and the scale used."""
    if not relevance:
        return None
    scale = min(int(s) for s in relevance)
    m = _to_numpy(relevance[scale] if scale in relevance else relevance[str(scale)])
    if m.ndim == 2:
        m = m[None]
    tiles = m.shape[0]
    g = int(round(math.sqrt(tiles)))
    if g * g != tiles:
        raise ValueError(f"relevance at scale {scale} has {tiles} tiles, not a square grid")
    n = m.shape[-1]
    grid = m.reshape(g, g, m.shape[-2], n).transpose(0, 2, 1, 3).reshape(g * m.shape[-2], g * n)
    covered = (g * 336) / scale  # fraction of the square the tiles cover
    span = max(1, round(side * covered))
    im = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32), mode="F").resize((span, span), Image.Resampling.BILINEAR)
    full = np.zeros((side, side), np.float32)
    full[:span, :span] = np.asarray(im)[:side, :side]
    x0, y0, x1, y1 = crop
    v = full[y0:y1, x0:x1]
    lo, hi = float(v.min()), float(v.max())
    v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    return v, scale


def _paint_labels(rgb: np.ndarray, rects_by_id: list[list[tuple[int, int, int, int]]], colour: Sequence[int],
                  fill_alpha: float | None) -> int:
    """Outline (and optionally fill) labelled rectangles: every id gets its own boundary."""
    h, w, _ = rgb.shape
    if not rects_by_id:
        return 0
    lab = np.zeros((h, w), np.int32)
    for i, rects in enumerate(rects_by_id, start=1):
        for X0, Y0, X1, Y1 in rects:
            lab[Y0:Y1, X0:X1] = i
    inside = lab > 0
    edge = np.zeros_like(inside)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[0, :] = edge[-1, :] = True
    edge[:, 0] = edge[:, -1] = True
    edge &= inside
    col = np.asarray(colour, np.float32)
    if fill_alpha:
        body = inside & ~edge
        rgb[body] = (rgb[body] * (1 - fill_alpha) + col * fill_alpha).round().astype(np.uint8)
    rgb[edge] = np.asarray(colour, np.uint8)
    return int(edge.sum())


def _view_rect(box: Sequence[float], k: float, dx: float, dy: float, w: int, h: int) -> tuple[int, int, int, int]:
    x0 = int(math.floor(box[0] * k - dx + 0.5))
    y0 = int(math.floor(box[1] * k - dy + 0.5))
    x1 = int(math.floor(box[2] * k - dx + 0.5))
    y1 = int(math.floor(box[3] * k - dy + 0.5))
    x0, y0 = min(max(x0, 0), w - 1), min(max(y0, 0), h - 1)
    x1, y1 = max(min(x1, w), x0 + 1), max(min(y1, h), y0 + 1)
    return x0, y0, x1, y1


def render_overlay(
    source: Any,
    tokens: Sequence[Any],
    relevance: dict[int, Any] | None,
    question: str,
    answer: str,
    out_path: str | os.PathLike | None,
    max_side: int = 1600,
    *,
    heat_alpha: float = 0.55,
    fill_alpha: float = 0.3,
    min_width: int = 720,
    title: str | None = None,
) -> OverlayResult:
    """Render the overlay PNG (see the module docstring) to `out_path` (None: don't write).

    `source` is an ImageSource (anything with `.size` and `.square(side)`); `tokens` the
    `KeptToken`s of an `AskResult`; `relevance` its `scale -> [tiles, 24, 24]` map (or None).
    The image view's long side is `max_side` px (small images are upsampled so the finest
    tokens stay visible).
    """
    W, H = (int(v) for v in source.size)
    L, ox, oy = pad_offsets((W, H))
    side = int(max_side)
    k = side / L
    vw, vh = max(1, round(W * k)), max(1, round(H * k))
    cx0, cy0 = min(round(ox * k), side - vw), min(round(oy * k), side - vh)
    crop = (cx0, cy0, cx0 + vw, cy0 + vh)
    view = source.square(side).convert("RGB").crop(crop)
    rgb = (np.asarray(view, dtype=np.float32) * 0.85).round().astype(np.uint8)

    heat = _relevance_view(relevance, (W, H), side, crop) if relevance else None
    if heat is not None:
        v, _ = heat
        lut = heat_lut()
        hc = lut[(v * 255).round().astype(np.int32)].astype(np.float32)
        a = (heat_alpha * (0.25 + 0.75 * v))[..., None]
        rgb = (rgb.astype(np.float32) * (1 - a) + hc * a).round().astype(np.uint8)
    rgb = np.ascontiguousarray(rgb)

    regions = token_regions(tokens, (W, H))
    scales = sorted({int(t.scale) for t in tokens}) or sorted(int(s) for s in (relevance or {}))
    colours = scale_colours(scales)
    counts = {s: {"kept": 0, "merged": 0, "dropped": 0} for s in scales}
    dx, dy = cx0 - ox * k, cy0 - oy * k
    by_scale: dict[int, list[TokenRegion]] = {s: [] for s in scales}
    for r in regions:
        by_scale[int(r.token.scale)].append(r)
    for t in tokens:
        counts[int(t.scale)]["merged" if getattr(t, "merged", False) else "kept"] += 1
    n_dropped = len(tokens) - len(regions)
    for s in scales:  # merged outlines first, coarse to fine
        merged = [[_view_rect(rc, k, dx, dy, vw, vh) for rc in r.rects] for r in by_scale[s] if r.merged]
        _paint_labels(rgb, merged, colours[s]["merged"], None)
    for s in scales:  # kept tokens on top, coarse to fine
        kept = [[_view_rect(r.box, k, dx, dy, vw, vh)] for r in by_scale[s] if not r.merged]
        _paint_labels(rgb, kept, colours[s]["kept"], fill_alpha)

    # ---------------------------------------------------------------- layout
    cw = max(vw, min_width)
    fs = 16 if cw >= 1000 else 14
    font, small = _font(fs), _font(fs - 2)
    pad = 12
    line_h = fs + 8
    legend_rows = max(1, len(scales)) + 2
    wrap_chars = max(20, int((cw - 2 * pad) / (fs * 0.55)))
    cap_lines: list[str] = []
    for label, text in (("Q: ", question or ""), ("A: ", answer or "")):
        wrapped = textwrap.wrap(" ".join(str(text).split()), width=wrap_chars - 3) or [""]
        if len(wrapped) > 8:
            wrapped = wrapped[:8]
            wrapped[-1] = wrapped[-1][: max(0, wrap_chars - 5)] + " ..."
        cap_lines += [label + wrapped[0]] + ["   " + w for w in wrapped[1:]]
    legend_h = pad + legend_rows * line_h
    caption_h = pad + len(cap_lines) * line_h + pad
    ch = vh + legend_h + caption_h
    canvas = Image.new("RGB", (cw, ch), PANEL_BG)
    vx = (cw - vw) // 2
    canvas.paste(Image.fromarray(rgb, mode="RGB"), (vx, 0))
    d = ImageDraw.Draw(canvas)

    y = vh + pad
    legend_box = (0, vh, cw, vh + legend_h)
    d.text((pad, y), title or "Kept visual tokens (boxes) and merged groups (outlines) per scale", fill=PANEL_FG, font=font)
    y += line_h
    sw = fs
    for s in scales:
        c = colours[s]
        d.rectangle([pad, y + 2, pad + sw, y + 2 + sw], fill=c["kept"])
        d.text((pad + sw + 8, y), f"{s} px: {counts[s]['kept']} kept", fill=PANEL_FG, font=font)
        x2 = pad + sw + 8 + 190
        d.rectangle([x2, y + 2, x2 + sw, y + 2 + sw], outline=c["merged"], width=2)
        d.text((x2 + sw + 8, y), f"{counts[s]['merged']} merged", fill=PANEL_FG, font=font)
        y += line_h
    # heatmap colour bar
    if heat is not None:
        bar_w = min(240, cw - 2 * pad - 200)
        lut = heat_lut()
        bar = np.repeat(lut[np.linspace(0, 255, max(2, bar_w)).astype(int)][None], sw, axis=0)
        d.text((pad, y), "relevance", fill=PANEL_FG, font=font)
        bx = pad + 100
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar), mode="RGB"), (bx, y + 2))
        d.text((bx + bar_w + 8, y), f"low to high (scale {heat[1]} px)", fill=MUTED_FG, font=small)
    else:
        d.text((pad, y), "relevance: not available", fill=MUTED_FG, font=small)
    if n_dropped:
        d.text((cw - pad - 260, y), f"{n_dropped} token(s) over padding not shown", fill=MUTED_FG, font=small)
    y = vh + legend_h
    d.line([(pad, y), (cw - pad, y)], fill=(70, 70, 76), width=1)
    caption_box = (0, y, cw, ch)
    y += pad
    for line in cap_lines:
        d.text((pad, y), line, fill=PANEL_FG, font=font)
        y += line_h

    path = None
    if out_path is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("question", str(question or ""))
        info.add_itxt("answer", str(answer or ""))
        info.add_text("Software", "uhrbat")
        canvas.save(out_path, format="PNG", pnginfo=info, compress_level=3)
        path = str(out_path)
    return OverlayResult(path, canvas.size, (vx, 0, vx + vw, vh), legend_box, caption_box, colours, counts, canvas)
