"""`render_overlay`: size, legend, kept-token colours, merged outlines, heatmap, caption metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uhrbat.io.overlay import (
    PANEL_BG,
    heat_lut,
    legend_labels,
    printable,
    render_overlay,
    scale_colours,
)
from uhrbat.io.sources import open_image
from uhrbat.results import KeptToken

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


def _tokens() -> list[KeptToken]:
    toks = []
    for s, cells in ((672, [(0, 12, 5), (3, 4, 4)]), (1344, [(5, 10, 10), (6, 2, 2)]), (4032, [(70, 12, 12)])):
        for i, (t, r, c) in enumerate(cells):
            toks.append(KeptToken(s, t, r, c, 0.9, False, i, [t * 576 + r * 24 + c]))
    members = [1 * 576 + 20 * 24 + c for c in range(5, 9)] + [2 * 576 + 3 * 24 + 3]
    toks.append(KeptToken(672, 1, 20, 5, 0.1, True, 9, members))
    return toks


def _relevance() -> dict[int, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    m = torch.exp(-((xx - 36) ** 2 + (yy - 24) ** 2) / 50.0)
    return {672: m.reshape(2, 24, 2, 24).permute(0, 2, 1, 3).reshape(4, 24, 24)}


def _count(region: np.ndarray, rgb) -> int:
    return int(np.all(region == np.asarray(rgb, np.uint8), axis=-1).sum())


def test_overlay_size_legend_colours_and_caption(tmp_path) -> None:
    src = open_image(Image.new("RGB", (900, 600), (128, 128, 128)))
    out = tmp_path / "ov.png"
    res = render_overlay(
        src, _tokens(), _relevance(), "Where is the pond?", "In the north-west corner.", out, max_side=800
    )
    assert out.exists()
    with Image.open(out) as im:
        assert im.size == res.size and im.mode == "RGB"
        assert im.text["question"] == "Where is the pond?" and im.text["answer"] == "In the north-west corner."
        a = np.asarray(im)
    # The image view: long side = max_side, aspect kept.
    x0, y0, x1, y1 = res.view_box
    assert (x1 - x0, y1 - y0) == (800, 533) and res.size[0] == 800 and res.size[1] > 533
    view = a[y0:y1, x0:x1]
    colours = scale_colours([672, 1344, 4032])
    assert res.colours == colours
    for s in (672, 1344, 4032):  # every scale's kept-token colour is drawn on the view
        assert _count(view, colours[s]["kept"]) > 0, s
    assert _count(view, colours[672]["merged"]) > 20  # merged group outlined
    assert res.counts[672] == {"kept": 2, "merged": 1, "dropped": 0}
    # Legend: one swatch per scale in the kept colour (a solid square) and a merged-outline swatch.
    lx0, ly0, lx1, ly1 = res.legend_box
    legend = a[ly0:ly1, lx0:lx1]
    for s in (672, 1344, 4032):
        assert _count(legend, colours[s]["kept"]) >= 100, s
        assert _count(legend, colours[s]["merged"]) > 0
    lut = heat_lut()
    assert _count(legend, lut[-1]) > 0 and _count(legend, lut[0]) > 0  # relevance colour bar
    # Caption area holds text (light pixels on the dark panel).
    cx0, cy0, cx1, cy1 = res.caption_box
    caption = a[cy0:cy1, cx0:cx1].astype(int)
    assert (caption.min(axis=-1) > 180).sum() > 200
    assert _count(a[cy0:cy1], PANEL_BG) > caption.shape[0] * caption.shape[1] // 2


def test_heatmap_follows_relevance(tmp_path) -> None:
    src = open_image(Image.new("RGB", (480, 480), (128, 128, 128)))
    res = render_overlay(src, [], _relevance(), "q", "a", None, max_side=480)
    x0, y0, x1, y1 = res.view_box
    assert (x1 - x0, y1 - y0) == (480, 480)
    view = np.asarray(res.image)[y0:y1, x0:x1].astype(int)
    plain = render_overlay(src, [], None, "q", "a", None, max_side=480)
    pv = np.asarray(plain.image)[y0:y1, x0:x1].astype(int)
    assert np.ptp(pv) == 0  # no relevance, no tokens: just the (desaturated) image
    hot, cold = view[240, 360], view[40, 40]  # relevance peak at grid (x=36, y=24) of 48
    assert hot[0] - hot[2] > 80  # warm (red over blue) where the model attended
    assert cold.tolist() == pv[40, 40].tolist()  # lowest relevance: the image untouched


def test_heatmap_never_darkens_like_a_shadow() -> None:
    """Over dark forest-like pixels a dark colour map read as shadow; the warm map is translucent
    and transparent at low relevance."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)
    arr[:120] //= 4  # a dark half, like conifer canopy
    src = open_image(Image.fromarray(arr))
    rel = {672: torch.rand(4, 24, 24, generator=torch.Generator().manual_seed(0))}
    res = render_overlay(src, [], rel, "q", "a", None, max_side=240)
    x0, y0, x1, y1 = res.view_box
    with_heat = np.asarray(res.image)[y0:y1, x0:x1].astype(int)
    plain = np.asarray(render_overlay(src, [], None, "q", "a", None, max_side=240).image)[y0:y1, x0:x1].astype(int)
    # Every colour of the map has red >= 210, so blending never lowers red below min(base, 210):
    # a pixel can turn warm, never dark grey.
    assert (with_heat[..., 0] >= np.minimum(plain[..., 0], 210) - 1).all()
    assert (np.abs(with_heat - plain).sum(-1) > 30).mean() > 0.3  # and the heat is actually shown


def test_coarser_scale_stays_visible_under_finer_one() -> None:
    """2688-px boxes under 4032-px boxes covering the same ground keep most of their outline."""
    src = open_image(Image.new("RGB", (2000, 2000), (90, 120, 80)))
    toks = []
    for t, r, c in ((0, 3, 3), (10, 12, 7), (33, 20, 20)):  # 2688: g = 8
        toks.append(KeptToken(2688, t, r, c, 0.9, False, 0, [t * 576 + r * 24 + c]))
    # Every 4032 cell (g = 12) that overlaps those 2688 cells is kept too: in 4032-square pixels a
    # 2688 cell at X spans [1.5 X, 1.5 X + 21), the 4032 cells start at multiples of 14.
    for t in list(toks):
        X, Y = (t.tile % 8 * 24 + t.col) * 14, (t.tile // 8 * 24 + t.row) * 14
        for gy in range(int(1.5 * Y) // 14, -(-(int(1.5 * Y) + 21) // 14)):
            for gx in range(int(1.5 * X) // 14, -(-(int(1.5 * X) + 21) // 14)):
                tile, row, col = (gy // 24) * 12 + gx // 24, gy % 24, gx % 24
                toks.append(KeptToken(4032, tile, row, col, 0.9, False, 1, [tile * 576 + row * 24 + col]))
    assert len(toks) >= 3 + 3 * 4
    res = render_overlay(src, toks, None, "q", "a", None, max_side=1600)
    x0, y0, x1, y1 = res.view_box
    view = np.asarray(res.image)[y0:y1, x0:x1]
    c2688, c4032 = res.colours[2688]["kept"], res.colours[4032]["kept"]
    assert _count(view, c4032) > 0
    k = 1600 / 2000
    for t in toks[:3]:
        bx = round((t.tile % 8 * 24 + t.col) * 14 * 2000 / 2688 * k)
        by = round((t.tile // 8 * 24 + t.row) * 14 * 2000 / 2688 * k)
        side = round(14 * 2000 / 2688 * k)
        ring = np.concatenate(
            [
                view[by, bx : bx + side],
                view[by + side - 1, bx : bx + side],
                view[by : by + side, bx],
                view[by : by + side, bx + side - 1],
            ]
        )
        assert np.all(ring == np.asarray(c2688, np.uint8), axis=-1).mean() > 0.75, (t, ring)


def test_legend_names_the_scale_of_merged_groups() -> None:
    counts = {672: {"kept": 3, "merged": 2}, 4032: {"kept": 10, "merged": 0}}
    labels = legend_labels([672, 4032], counts)
    assert labels == [("672 px: 3 kept", "672 px: 2 merged groups"), ("4032 px: 10 kept", "4032 px: 0 merged groups")]


def test_caption_control_characters_become_visible_escapes(tmp_path) -> None:
    assert printable("a\x1b[31mb\u200bc\n\td\x00") == "a\\x1b[31mb\\u200bc d\\x00"
    assert printable("naïve 東京 ok") == "naïve 東京 ok"
    src = open_image(Image.new("RGB", (64, 64), (128, 128, 128)))
    res = render_overlay(src, [], None, "q\x07?", "\x1b[2Jcleared", tmp_path / "c.png", max_side=64)
    with Image.open(res.path) as im:
        assert im.text["answer"] == "\x1b[2Jcleared"  # metadata keeps the raw text


def test_caption_escapes_what_the_font_cannot_draw() -> None:
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=14)  # Pillow's built-in FreeType font: basic Latin only
    except TypeError:
        pytest.skip("Pillow without FreeType")
    assert printable("a\u6771b \ufffd ok", font) == "a\\u6771b \\ufffd ok"
    assert printable("How many trees?", font) == "How many trees?"


def test_overlay_with_another_token_geometry() -> None:
    """224-px tiles of 14-px patches: 16 x 16 tokens per tile, 3 x 3 tiles at 672."""
    src = open_image(Image.new("RGB", (672, 672), (128, 128, 128)))
    tok = KeptToken(672, 4, 0, 0, 0.9, False, 0, [4 * 256], tile_size=224, patch_size=14)  # centre tile
    rel = {672: torch.zeros(9, 16, 16)}
    rel[672][4] = 1.0
    res = render_overlay(src, [tok], rel, "q", "a", None, max_side=672)
    x0, y0, x1, y1 = res.view_box
    view = np.asarray(res.image)[y0:y1, x0:x1].astype(int)
    c = res.colours[672]["kept"]
    assert tuple(view[224, 224]) == c and tuple(view[224 + 13, 224 + 13]) == c  # the 14-px cell at (224, 224)
    assert view[336, 336, 0] - view[336, 336, 2] > 80 and view[100, 100, 0] == view[100, 100, 2]  # heat on tile 4
    with pytest.raises(ValueError, match="16 per side"):
        render_overlay(src, [tok], {672: torch.zeros(4, 24, 24)}, "q", "a", None, max_side=672)


def test_overlay_on_real_geotiff_and_odd_shapes(tmp_path) -> None:
    pytest.importorskip("rasterio")
    src = open_image(ASSETS / "aerial" / "rmnp_rgb_geotiff.tif")
    res = render_overlay(src, _tokens(), _relevance(), "How many lakes?", "Two.", tmp_path / "a.png", max_side=600)
    assert res.view_box[2] - res.view_box[0] == 600 and res.view_box[3] == round(373 * 600 / 485)
    tall = open_image(Image.new("RGB", (1, 20000), (200, 0, 0)))
    res = render_overlay(tall, _tokens(), _relevance(), "q" * 500, "a", tmp_path / "b.png", max_side=400)
    assert res.size[0] >= 400 and res.view_box[3] == 400  # long caption wrapped, narrow view centred
    one = open_image(Image.new("RGB", (1, 1), (0, 0, 0)))
    assert render_overlay(one, [], None, "", "", tmp_path / "c.png", max_side=64).size[0] >= 64
