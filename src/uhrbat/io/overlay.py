"""Overlay: what the model looked at, as one PNG a user can paste into a report.

`render_overlay` draws, over a desaturated, slightly lightened view of the original image (no
padding), so that colour always means "the model's", never the scene's:

* the query relevance of the base (smallest) scale as a translucent warm heatmap (light yellow
  to red, more opaque where the model attended more, fully transparent where it did not; a
  dark colour map read as shadow on forest imagery);
* every kept token as a box in its scale's colour: translucent fills first (coarse scales first),
  then outlines from the finest scale to the coarsest, coarser outlines wider, so a scale whose
  tokens lie under a finer scale's (2688 under 4032) stays visible;
* every merged token's member cells as a dashed outline in its scale's colour;
* a legend (per scale: the kept swatch and count, the merged swatch and count, both labelled
  with the scale; the heatmap colour bar) and the question / answer as a caption, in Pillow's
  system's DejaVu Sans or Pillow's built-in font (no downloads). Control characters, and
  characters the font cannot draw, are shown as escapes (`\x1b`), never as missing-glyph boxes.

Scale colours (Okabe–Ito, colour-blind safe, no warm hues so they never read as heat) are
assigned by rank of the scale: see `scale_colours`. Token geometry (tile and patch sides) comes
from the tokens (`KeptToken.tile_size` / `patch_size`, i.e. the model config).
"""

from __future__ import annotations

import math
import os
import textwrap
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry
from uhrbat.io.geo import TokenRegion, geometry_of, token_regions
from uhrbat.io.images import pad_offsets

#: Token colours by rank of the scale (smallest scale first): Okabe–Ito's cool hues, so that no
#: scale can be mistaken for the warm relevance heatmap.
KEPT_COLOURS: list[tuple[int, int, int]] = [
    (0, 114, 178),  # blue
    (0, 158, 115),  # bluish green
    (86, 180, 233),  # sky blue
    (204, 121, 167),  # reddish purple
    (0, 0, 0),  # black
    (255, 255, 255),  # white
]
PANEL_BG = (24, 24, 28)
PANEL_FG = (235, 235, 235)
MUTED_FG = (170, 170, 175)
# Warm, light-to-strong (ColorBrewer YlOrRd without its near-black end): drawn translucent with
# opacity growing with relevance, so low relevance leaves the image as it is.
_WARM = [(255, 255, 178), (254, 217, 118), (254, 178, 76), (253, 141, 60), (240, 59, 32), (210, 16, 32)]


def scale_colours(scales: Sequence[int]) -> dict[int, dict[str, tuple[int, int, int]]]:
    """`{scale: {"kept": rgb, "merged": rgb}}` for the given scales (ascending rank). Merged
    groups use the scale's colour too, drawn dashed."""
    out = {}
    for i, s in enumerate(sorted(set(int(s) for s in scales))):
        c = KEPT_COLOURS[i % len(KEPT_COLOURS)]
        out[s] = {"kept": c, "merged": c}
    return out


def outline_width(rank_from_finest: int) -> int:
    """Outline width in px of a scale's boxes: 1 for the finest scale, 2 for coarser ones."""
    return 1 if rank_from_finest == 0 else 2


def printable(text: str, font: Any = None) -> str:
    """One line of caption text: whitespace runs become one space; control / format / unassigned
    characters, and with `font` every character that font has no glyph for, become visible
    escapes (`\\x1b`, `\\u200b`) instead of missing-glyph boxes."""
    missing = _missing_glyphs(font) if font is not None else None
    out = []
    for ch in " ".join(str(text).split()):
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or (missing is not None and missing(ch)):
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _missing_glyphs(font: Any) -> Any:
    """`ch -> True` when `font` draws `ch` as its missing-glyph box (the glyph of U+FFFF)."""

    def bitmap(ch: str) -> tuple:
        mask = font.getmask(ch)
        return mask.size, bytes(mask)

    notdef = bitmap("\uffff")
    cache: dict[str, bool] = {}

    def missing(ch: str) -> bool:
        if ch not in cache:
            cache[ch] = ch != " " and bitmap(ch) == notdef
        return cache[ch]

    return missing


def heat_lut() -> np.ndarray:
    """256 x 3 uint8 colour map used for relevance (light yellow -> red)."""
    anchors = np.asarray(_WARM, dtype=np.float64)
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
    #: Affine (a, b, c, d, e, f) from overlay pixel edges to the source's pixels (valid inside
    #: `view_box`); `uhrbat.io.mapfiles` composes it with the georeference for a world file.
    pixel_transform: tuple[float, float, float, float, float, float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans when the system has it (wide Unicode coverage), else Pillow's built-in font;
    characters the font cannot draw are escaped by `printable`, never shown as boxes."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _relevance_view(
    relevance: dict[int, Any], side: int, crop: tuple[int, int, int, int], geometry: TokenGeometry
) -> tuple[np.ndarray, int] | None:
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
    if m.shape[-2:] != (geometry.tokens_per_side,) * 2:
        raise ValueError(
            f"relevance tiles are {m.shape[-2]}x{n} tokens but the token geometry has "
            f"{geometry.tokens_per_side} per side ({geometry.tile_size}-px tiles, "
            f"{geometry.patch_size}-px patches)"
        )
    grid = m.reshape(g, g, m.shape[-2], n).transpose(0, 2, 1, 3).reshape(g * m.shape[-2], g * n)
    covered = (g * geometry.tile_size) / scale  # fraction of the square the tiles cover
    span = max(1, round(side * covered))
    im = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32), mode="F").resize(
        (span, span), Image.Resampling.BILINEAR
    )
    full = np.zeros((side, side), np.float32)
    full[:span, :span] = np.asarray(im)[:side, :side]
    x0, y0, x1, y1 = crop
    v = full[y0:y1, x0:x1]
    # Robust range: a handful of extreme tokens would otherwise push everything else to "low".
    lo, hi = (float(q) for q in np.percentile(v, [1, 99.5]))
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    v = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    return v, scale


def _labels(shape: tuple[int, int], rects_by_id: list[list[tuple[int, int, int, int]]]) -> np.ndarray:
    """`[h, w]` int32 label image: 0 outside, i + 1 inside the rectangles of item i."""
    lab = np.zeros(shape, np.int32)
    for i, rects in enumerate(rects_by_id, start=1):
        for X0, Y0, X1, Y1 in rects:
            lab[Y0:Y1, X0:X1] = i
    return lab


def _edges(lab: np.ndarray, width: int = 1, dashed: bool = False) -> np.ndarray:
    """Boolean `[h, w]`: pixels of a labelled item within `width` px of its boundary (every item
    gets its own boundary, also where items touch); `dashed` keeps alternate 2-px runs."""
    edge = np.zeros(lab.shape, bool)
    for d in range(1, width + 1):
        edge[:, :-d] |= lab[:, :-d] != lab[:, d:]
        edge[:, d:] |= lab[:, d:] != lab[:, :-d]
        edge[:-d, :] |= lab[:-d, :] != lab[d:, :]
        edge[d:, :] |= lab[d:, :] != lab[:-d, :]
    edge[:width, :] = edge[-width:, :] = True
    edge[:, :width] = edge[:, -width:] = True
    edge &= lab > 0
    if dashed:
        yy, xx = np.indices(lab.shape)
        edge &= ((yy + xx) // 2) % 2 == 0
    return edge


def _fill(rgb: np.ndarray, lab: np.ndarray, colour: Sequence[int], alpha: float) -> None:
    body = lab > 0
    rgb[body] = (rgb[body] * (1 - alpha) + np.asarray(colour, np.float32) * alpha).round().astype(np.uint8)


def _desaturate(rgb: np.ndarray) -> np.ndarray:
    """Mostly grey, slightly lightened copy of `rgb` (uint8): the scene stays readable while
    every saturated colour on top is the overlay's."""
    x = rgb.astype(np.float32)
    grey = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
    mixed = 0.8 * grey[..., None] + 0.2 * x
    return (40 + mixed * (215 / 255)).round().clip(0, 255).astype(np.uint8)


def legend_labels(scales: Sequence[int], counts: dict[int, dict[str, int]]) -> list[tuple[str, str]]:
    """Per scale, the legend's (kept, merged) labels; both name the scale."""
    return [(f"{s} px: {counts[s]['kept']} kept", f"{s} px: {counts[s]['merged']} merged groups") for s in scales]


def _dashed_swatch(colour: Sequence[int], side: int) -> Image.Image:
    """A legend swatch: the dashed outline merged groups are drawn with, on the panel colour."""
    patch = np.empty((side, side, 3), np.uint8)
    patch[:] = PANEL_BG
    patch[_edges(np.ones((side, side), np.int32), width=2, dashed=True)] = colour
    return Image.fromarray(patch, mode="RGB")


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
    heat_alpha: float = 0.6,
    fill_alpha: float = 0.25,
    min_width: int = 720,
    title: str | None = None,
    geometry: TokenGeometry | None = None,
) -> OverlayResult:
    """Render the overlay PNG (see the module docstring) to `out_path` (None: don't write).

    `source` is an ImageSource (anything with `.size` and `.square(side)`); `tokens` the
    `KeptToken`s of an `AskResult`; `relevance` its `scale -> [tiles, n, n]` map (or None), with
    `n` tokens per tile side. `geometry` (tile and patch sides) defaults to the tokens' own
    (`KeptToken.tile_size` / `patch_size`), else CLIP-336/14. The image view's long side is
    `max_side` px (small images are upsampled so the finest tokens stay visible).
    """
    if geometry is None:
        geometry = geometry_of(tokens[0]) if tokens else CLIP_336_14
    W, H = (int(v) for v in source.size)
    L, ox, oy = pad_offsets((W, H))
    side = int(max_side)
    k = side / L
    vw, vh = max(1, round(W * k)), max(1, round(H * k))
    cx0, cy0 = min(round(ox * k), side - vw), min(round(oy * k), side - vh)
    crop = (cx0, cy0, cx0 + vw, cy0 + vh)
    view = source.square(side).convert("RGB").crop(crop)
    rgb = _desaturate(np.asarray(view))

    heat = _relevance_view(relevance, side, crop, geometry) if relevance else None
    if heat is not None:
        v, _ = heat
        lut = heat_lut()
        hc = lut[(v * 255).round().astype(np.int32)].astype(np.float32)
        a = (heat_alpha * v**0.75)[..., None]  # transparent where relevance is lowest: nothing darkens
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
    shape = (vh, vw)
    kept_lab = {
        s: _labels(shape, [[_view_rect(r.box, k, dx, dy, vw, vh)] for r in by_scale[s] if not r.merged]) for s in scales
    }
    for s in scales:  # translucent fills, coarse to fine (finer fills on top)
        _fill(rgb, kept_lab[s], colours[s]["kept"], fill_alpha)
    for s in reversed(scales):  # merged groups: dashed outlines, fine to coarse
        merged = [[_view_rect(rc, k, dx, dy, vw, vh) for rc in r.rects] for r in by_scale[s] if r.merged]
        if merged:
            rgb[_edges(_labels(shape, merged), dashed=True)] = colours[s]["merged"]
    for rank, s in enumerate(reversed(scales)):  # kept outlines on top, fine to coarse, coarser wider
        rgb[_edges(kept_lab[s], outline_width(rank))] = colours[s]["kept"]

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
        wrapped = textwrap.wrap(printable(text, font), width=wrap_chars - 3) or [""]
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
    if title is None:
        title = "Visual tokens per scale: kept (boxes) and merged groups (dashed outlines)"
        region = getattr(source, "region", None)
        if region is not None:  # a window of a larger scene: say which
            sw, sh = region.scene_size
            title += f"; region {','.join(map(str, region.pixels))} of the {sw}x{sh} scene"
    d.text((pad, y), printable(title, font), fill=PANEL_FG, font=font)
    y += line_h
    sw = fs
    col2 = pad + sw + 8 + max(190, int(d.textlength(f"{max(scales, default=0)} px: 0000 kept", font=font)) + 24)
    for s, (kept_label, merged_label) in zip(scales, legend_labels(scales, counts)):
        c = colours[s]
        d.rectangle([pad, y + 2, pad + sw, y + 2 + sw], fill=c["kept"])
        d.text((pad + sw + 8, y), kept_label, fill=PANEL_FG, font=font)
        canvas.paste(_dashed_swatch(c["merged"], sw), (col2, y + 2))
        d.text((col2 + sw + 8, y), merged_label, fill=PANEL_FG, font=font)
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
    # Overlay pixel p lies on square pixel p - vx + cx0, i.e. source pixel (p - vx + cx0) / k - ox.
    to_source = (1 / k, 0.0, (cx0 - vx) / k - ox, 0.0, 1 / k, cy0 / k - oy)
    return OverlayResult(
        path, canvas.size, (vx, 0, vx + vw, vh), legend_box, caption_box, colours, counts, canvas, to_source
    )
