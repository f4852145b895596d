"""`render_overlay`: size, legend, kept-token colours, merged outlines, heatmap, caption metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uhrbat.io.images import open_image
from uhrbat.io.overlay import PANEL_BG, heat_lut, render_overlay, scale_colours
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
    res = render_overlay(src, _tokens(), _relevance(), "Where is the pond?", "In the north-west corner.", out,
                         max_side=800)
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
    hot, cold = view[240, 360], view[40, 40]  # relevance peak at grid (x=36, y=24) of 48
    assert hot.sum() > cold.sum() + 150
    plain = render_overlay(src, [], None, "q", "a", None, max_side=480)
    pv = np.asarray(plain.image)[y0:y1, x0:x1].astype(int)
    assert np.ptp(pv) == 0  # no relevance, no tokens: just the (dimmed) image


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
