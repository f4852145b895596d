"""Zoom (issue 21; our training-free addition): window proposals from a constructed relevance map
(hand-checked), connected components, the two passes through the pipeline, the CLI's `--zoom N
--json`, zoom 0 = off, windows held by the scene cache like any scene, and zoom over HTTP."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uhrbat.pipeline import UhrBatPipeline
from uhrbat.scene.origin import Origin
from uhrbat.zoom import Proposal, label_components, propose_windows

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

T = from_origin(500000.0, 6000000.0, 0.5, 0.5)
QUESTION = "Is there a red car?"
W, H = 700, 520


# ----------------------------------------------------------------------------- components
def test_label_components_8_connected_in_first_cell_order() -> None:
    mask = torch.tensor(
        [
            [0, 1, 0, 0, 1],
            [1, 0, 0, 0, 1],
            [0, 0, 1, 0, 0],
            [1, 1, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    expected = torch.tensor(
        [
            [-1, 0, -1, -1, 1],
            [0, -1, -1, -1, 1],  # (0,1) and (1,0) touch at a corner: one area
            [-1, -1, 2, -1, -1],
            [2, 2, -1, -1, -1],  # (2,2) touches (3,1) at a corner
        ]
    )
    assert torch.equal(label_components(mask), expected)
    assert torch.equal(label_components(torch.zeros(3, 4, dtype=torch.bool)), torch.full((3, 4), -1))
    spiral = torch.ones(9, 9, dtype=torch.bool)  # a long winding path is still one area
    spiral[1:8, 1] = spiral[1, 1:8] = spiral[1:8, 7] = spiral[7, 3:8] = spiral[3:7, 3] = spiral[3, 3:6] = False
    assert int(label_components(spiral).max()) == 0


# ----------------------------------------------------------------------------- proposals
def relevance_map(hot: list[tuple[slice, slice, float]], side: int = 48) -> dict[int, torch.Tensor]:
    """A base-scale (672) relevance `[4, 24, 24]` whose 48 x 48 cell grid is 0 except `hot` blocks."""
    grid = torch.zeros(side, side)
    for rows, cols, value in hot:
        grid[rows, cols] = value
    tiles = grid.reshape(2, 24, 2, 24).permute(0, 2, 1, 3).reshape(4, 24, 24)
    return {672: tiles}


def test_one_hot_area_gives_one_window_centred_on_it() -> None:
    # 4800 x 4800 image: one cell of the 672 scale is 4800 * 14 / 672 = 100 px
    rel = relevance_map([(slice(10, 13), slice(30, 33), 1.0)])
    got, note = propose_windows(rel, (4800, 4800), 2, 4032)
    # centre (31.5, 11.5) cells = (3150, 1150) px; side = max(2 x 300, 4800 / 4) = 1200
    assert got == [Proposal((2550, 550, 3750, 1750), 1.0)]
    assert note is not None and "only 1 window" in note
    # the finest scale caps the side; the frame's edge shifts the window inside
    got, _ = propose_windows(relevance_map([(slice(0, 2), slice(0, 2), 1.0)]), (4800, 4800), 1, 1000)
    assert got == [Proposal((0, 0, 1000, 1000), 1.0)]


def test_two_areas_best_first_with_their_share_of_the_mass() -> None:
    rel = relevance_map([(slice(10, 13), slice(30, 33), 1.0), (slice(40, 42), slice(2, 4), 1.0)])
    got, note = propose_windows(rel, (4800, 4800), 2, 4032)
    assert [p.pixels for p in got] == [(2550, 550, 3750, 1750), (0, 3500, 1200, 4700)]
    assert [p.score for p in got] == pytest.approx([9 / 13, 4 / 13]) and note is None
    one, note = propose_windows(rel, (4800, 4800), 1, 4032)
    assert one == got[:1] and note is None


def test_flat_map_and_padding_cells() -> None:
    flat, note = propose_windows(relevance_map([]), (4800, 4800), 3, 4032)
    assert flat == [] and "flat" in note
    # a 4800 x 2400 image fills rows 12..35 of the grid; a hot block in the padding is not seen
    rel = relevance_map([(slice(2, 5), slice(2, 5), 5.0), (slice(20, 22), slice(40, 42), 1.0)])
    got, _ = propose_windows(rel, (4800, 2400), 1, 4032)
    (p,) = got
    assert p.score == 1.0 and p.pixels == (3500, 300, 4700, 1500)  # the block at rows 20-21 (y 800-1000)


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    """A GeoTIFF and a PNG of the same pixels (structure plus noise)."""
    d = tmp_path_factory.mktemp("zoom")
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:H, 0:W]
    arr = np.stack([(x * 0.5) % 256, (y * 0.7) % 256, (x * y) % 256], -1) + rng.integers(0, 40, (H, W, 3))
    arr[300:340, 500:560] = (220, 30, 30)  # a red car
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(d / "scene.png")
    profile = dict(driver="GTiff", width=W, height=H, count=3, dtype="uint8", crs="EPSG:32633", transform=T)
    with rasterio.open(d / "scene.tif", "w", **profile, tiled=True, blockxsize=128, blockysize=128) as ds:
        ds.write(arr.transpose(2, 0, 1))
    return {"png": d / "scene.png", "tif": d / "scene.tif"}


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return UhrBatPipeline.from_pretrained(tiny_checkpoint, budgets=[8, 16], selector="topk")


def kept(res) -> list[tuple]:
    return [(t.scale, t.tile, t.row, t.col, t.score, t.merged) for t in res.tokens]


def test_zoom_answers_from_a_window_equal_to_asking_about_it(scene, tiny_checkpoint) -> None:
    fresh = UhrBatPipeline.from_pretrained(tiny_checkpoint, budgets=[8, 16], selector="topk", scene_cache=False)
    res = fresh.ask(str(scene["tif"]), QUESTION, max_new_tokens=4, zoom=2)
    z = res.zoom
    assert z is not None and z.asked == 2 and 1 <= len(z.windows) <= 2 and z.chosen == 0
    whole = fresh.ask(str(scene["tif"]), QUESTION, max_new_tokens=4)
    assert kept(z.scene) == kept(whole) and z.scene.answer == whole.answer  # pass 1 = the plain question
    for w in z.windows:
        x0, y0, x1, y1 = w.pixels
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and (x1 - x0, y1 - y0) != (W, H) and 0 < w.score <= 1
        direct = fresh.ask(str(scene["tif"]), QUESTION, max_new_tokens=4, region=list(w.pixels))
        assert kept(w.result) == kept(direct) and w.result.answer == direct.answer
        assert w.bounds == pytest.approx(direct.region["bounds_crs"])
    chosen = z.windows[0].result
    assert (
        res.answer == chosen.answer and kept(res) == kept(chosen) and res.region["pixels"] == list(z.windows[0].pixels)
    )
    for k, v in res.timings.items():  # both passes' time
        assert v == pytest.approx(z.scene.timings[k] + sum(w.result.timings[k] for w in z.windows))


def test_zoom_refuses_a_streamer_before_any_compute(scene, pipe) -> None:
    from transformers import TextStreamer

    from uhrbat.errors import ConfigError

    with pytest.raises(ConfigError, match="zoom=1 generates twice .* drop streamer="):
        pipe.ask(str(scene["png"]), QUESTION, max_new_tokens=2, zoom=1, streamer=TextStreamer(pipe.processor.tokenizer))


def test_zoom_0_is_off(scene, tiny_checkpoint) -> None:
    fresh = UhrBatPipeline.from_pretrained(tiny_checkpoint, budgets=[8, 16], selector="topk", scene_cache=False)
    plain = fresh.ask(str(scene["png"]), QUESTION, max_new_tokens=4)
    off = fresh.ask(str(scene["png"]), QUESTION, max_new_tokens=4, zoom=0)
    assert off.zoom is None and off.region is None and "windows" not in off.to_dict()
    assert kept(off) == kept(plain) and off.generated_ids == plain.generated_ids


def test_the_scene_cache_holds_zoom_windows(scene, pipe, monkeypatch) -> None:
    first = pipe.ask(str(scene["tif"]), QUESTION, max_new_tokens=4, zoom=1)
    (w,) = first.zoom.windows
    assert first.zoom.scene.reuse["features"] == "miss" and w.result.reuse["features"] == "miss"
    reads = []
    real_open = Origin.open
    monkeypatch.setattr(Origin, "open", lambda self, region=None: reads.append(region) or real_open(self, region))
    again = pipe.ask(str(scene["tif"]), QUESTION, max_new_tokens=4, zoom=1)
    assert again.zoom.scene.reuse["features"] == "hit" and again.zoom.windows[0].result.reuse["features"] == "hit"
    assert [r for r in reads if r is not None] == []  # the window's child scene was found without reading it
    assert kept(again) == kept(first) and again.answer == first.answer
    # the same window asked as a region is the same child scene
    region = pipe.ask(str(scene["tif"]), "What is in this window?", max_new_tokens=4, region=list(w.pixels))
    assert region.reuse["features"] == "hit" and region.timings["encode"] == 0.0


# ----------------------------------------------------------------------------- command line
def test_cli_zoom_json_names_windows_inside_the_scene(scene, tiny_checkpoint) -> None:
    from typer.testing import CliRunner

    from uhrbat.cli.main import app

    args = ["--model", str(tiny_checkpoint), "--selector", "topk", "--max-new-tokens", "3", "--json"]
    for kind in ("tif", "png"):
        r = CliRunner().invoke(app, ["ask", str(scene[kind]), QUESTION, *args, "--zoom", "1"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout.strip().splitlines()[-1])
        (win,) = out["windows"]
        x0, y0, x1, y1 = win["pixels"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and 0 < win["score"] <= 1 and win["chosen"] is True
        if kind == "tif":  # the window's edges in the scene's CRS
            X0, Y1 = T * (x0, y1)
            X1, Y0 = T * (x1, y0)
            assert win["bounds"] == pytest.approx([X0, Y1, X1, Y0])
        else:
            assert win["bounds"] is None
        assert out["region"]["pixels"] == win["pixels"] and out["answer"] == win["answer"]
        scene_pass = out["zoom"]["scene"]
        assert set(scene_pass["timings"]) >= {"encode", "prefill"} and set(win["timings"]) >= {"encode", "prefill"}
        assert scene_pass["tokens"] and win["tokens"] and out["tokens"]
        for t in win["tokens"]:  # the window's kept tokens, in the scene's pixels, inside the window
            if t["box_px"] is not None:
                bx0, by0, bx1, by1 = t["box_px"]
                assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1
        for k, v in out["timings"].items():
            assert v == pytest.approx(scene_pass["timings"][k] + win["timings"][k], abs=1e-6)
        assert "zoom: 1 window(s) in scene pixels" in r.stderr


# ----------------------------------------------------------------------------- HTTP
def test_http_zoom_equals_the_python_call(scene, tiny_pipeline) -> None:
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    expected = tiny_pipeline.chat(str(scene["png"]), conv, max_new_tokens=4, selector="topk", zoom=1)
    url = "data:image/png;base64," + base64.b64encode(scene["png"].read_bytes()).decode()
    msg = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
    }
    opts = ServeOptions(model_name="tiny", batch_wait_s=0.0)
    with serve_in_thread(create_app(ChatService(tiny_pipeline, opts)), opts) as base:
        client = openai.OpenAI(base_url=base + "v1", api_key="none", max_retries=0, timeout=120)
        ask = {"max_tokens": 4, "extra_body": {"selector": "topk", "zoom": 1, "return_tokens": True}}
        r = client.chat.completions.create(model="tiny", messages=[msg], **ask)
        chunks = list(client.chat.completions.create(model="tiny", messages=[msg], stream=True, **ask))
    ext = r.model_extra["uhrbat"]
    assert r.choices[0].message.content == expected.answer
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.answer
    assert [w["pixels"] for w in ext["windows"]] == [list(w.pixels) for w in expected.zoom.windows]
    assert ext["region"]["pixels"] == ext["windows"][0]["pixels"] and ext["zoom"]["scene"]["answer"]
    x0, y0, x1, y1 = ext["windows"][0]["pixels"]
    assert [(t["scale"], t["tile"], t["row"], t["col"]) for t in ext["tokens"]] == [
        (t.scale, t.tile, t.row, t.col) for t in expected.tokens
    ]
    for t in ext["tokens"]:  # the chosen window's tokens, in the scene's pixels
        if t["box_px"] is not None:
            assert x0 <= t["box_px"][0] < t["box_px"][2] <= x1 and y0 <= t["box_px"][1] < t["box_px"][3] <= y1


def test_http_server_default_zoom(scene, tiny_checkpoint) -> None:
    """`uhrbat serve --zoom 1`: every question zooms unless it asks `zoom: 0`; streamed answers
    equal the plain ones (two concurrent requests still answer alone, each its own length)."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

    pipe = UhrBatPipeline.from_pretrained(tiny_checkpoint, budgets=[8, 16], selector="topk", zoom=1)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    zoomed = pipe.chat(str(scene["png"]), conv, max_new_tokens=5)
    short = pipe.chat(str(scene["png"]), conv, max_new_tokens=2)
    plain = pipe.chat(str(scene["png"]), conv, max_new_tokens=3, zoom=0)
    assert zoomed.zoom is not None and short.zoom is not None and plain.zoom is None
    url = "data:image/png;base64," + base64.b64encode(scene["png"].read_bytes()).decode()
    msg = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
    }
    opts = ServeOptions(model_name="tiny", batch_wait_s=0.2)
    with serve_in_thread(create_app(ChatService(pipe, opts)), opts) as base:
        client = openai.OpenAI(base_url=base + "v1", api_key="none", max_retries=0, timeout=120)

        def ask(max_tokens: int, **extra):
            return client.chat.completions.create(model="tiny", messages=[msg], max_tokens=max_tokens, **extra)

        with ThreadPoolExecutor(2) as pool:  # may share a batch (same options): each still zooms alone
            a, a2 = pool.map(lambda n: ask(n), [5, 2])
        b = ask(3, extra_body={"zoom": 0})
        chunks = list(ask(5, stream=True))
    assert a.choices[0].message.content == zoomed.answer and "windows" in a.model_extra["uhrbat"]
    assert a2.choices[0].message.content == short.answer and a2.usage.completion_tokens <= 2
    assert b.choices[0].message.content == plain.answer and "windows" not in b.model_extra["uhrbat"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == zoomed.answer
