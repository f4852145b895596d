"""The MCP tools in process (the official `mcp` client on the server object): allowed paths,
the scene table's bounds, and that every bad call is a one-line tool error, never a dead server."""

from __future__ import annotations

import base64
import io
import os
import string
from pathlib import Path

import pytest

pytest.importorskip("mcp")

import anyio
from mcp import Client
from PIL import Image

from conftest import ASSETS
from uhrbat.errors import CheckpointError
from uhrbat.mcp import adapter
from uhrbat.mcp.scenes import SceneHandleError, SceneTable
from uhrbat.mcp.server import build_server
from uhrbat.mcp.service import PipelineLoader, SceneService, ServiceOptions

TIFF = ASSETS / "aerial" / "neon_osbs_400.tif"


def _text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def _error(result, *fragments: str) -> str:
    assert result.is_error, result
    text = _text(result)
    assert "\n" not in text, text
    for f in fragments:
        assert f in text, text
    return text


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """(allowed folder with a small PNG, a folder outside it with another)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    Image.new("RGB", (300, 200), (30, 90, 30)).save(allowed / "field.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(outside / "secret.png")
    return allowed, outside


def _serve(pipeline, allowed: Path, **options) -> SceneService:
    return SceneService(pipeline, ServiceOptions(allowed_paths=[str(allowed)], max_new_tokens=3, **options))


def _run(service: SceneService, scenario) -> None:
    async def main() -> None:
        with anyio.fail_after(120):
            async with Client(build_server(service)) as client:
                await scenario(client)

    anyio.run(main)


def test_paths_resolve_symlinks_and_stay_inside(folders, tiny_pipeline) -> None:
    allowed, outside = folders
    os.symlink(outside / "secret.png", allowed / "link-out.png")  # a link out of the folder
    os.symlink(allowed / "field.png", allowed / "link-in.png")  # a link inside it
    (allowed / "pic.bmp").write_bytes(_bmp())
    service = _serve(lambda: tiny_pipeline, allowed)

    async def scenario(c: Client) -> None:
        escapes = (str(outside / "secret.png"), "link-out.png", "../outside/secret.png", str(allowed / "link-out.png"))
        for path in escapes:
            _error(await c.call_tool("open_scene", {"path": path}), "outside the allowed folders", str(allowed))
        for path in ("field.png", "link-in.png", str(allowed / "field.png")):
            res = await c.call_tool("open_scene", {"path": path})
            assert not res.is_error, _text(res)
            assert (res.structured_content["width"], res.structured_content["height"]) == (300, 200)
        # Inside the folder, but the untrusted reader takes PNG, JPEG and TIFF only.
        _error(await c.call_tool("open_scene", {"path": "pic.bmp"}), "not accepted from untrusted input")
        _error(await c.call_tool("open_scene", {"path": "missing.png"}), "missing.png")

    _run(service, scenario)


def test_table_is_bounded_and_ids_are_unguessable(folders, tiny_pipeline) -> None:
    allowed, _ = folders
    service = _serve(lambda: tiny_pipeline, allowed, max_scenes=2)

    async def scenario(c: Client) -> None:
        a = (await c.call_tool("open_scene", {"path": "field.png"})).structured_content["id"]
        b = (await c.call_tool("open_scene", {"path": "field.png"})).structured_content["id"]
        assert a != b  # the same file twice: two handles
        _error(await c.call_tool("open_scene", {"path": "field.png"}), "2 scenes are open", "close_scene")
        await c.call_tool("close_scene", {"scene_id": a})
        assert not (await c.call_tool("open_scene", {"path": "field.png"})).is_error
        _error(await c.call_tool("close_scene", {"scene_id": a}), "unknown scene id")

    _run(service, scenario)
    table = SceneTable(max_scenes=1000)
    ids = {table.add("x", object()).id for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 22 and set(i) <= set(string.ascii_letters + string.digits + "-_") for i in ids)


def test_idle_scenes_expire() -> None:
    now = [0.0]
    table = SceneTable(max_scenes=2, ttl_s=10, clock=lambda: now[0])
    a, b = table.add("a", object()), table.add("b", object())
    now[0] = 8
    table.get(a.id)  # use restarts the idle clock
    now[0] = 15
    assert table.ids() == [a.id]
    with pytest.raises(SceneHandleError, match="expired after 10 s unused"):
        table.get(b.id)
    assert table.expires_in(a) == pytest.approx(3)
    now[0] = 100
    assert len(table) == 0


def test_bad_arguments_are_one_line_tool_errors(folders, tiny_pipeline) -> None:
    allowed, _ = folders
    service = _serve(lambda: tiny_pipeline, allowed)

    async def scenario(c: Client) -> None:
        sid = (await c.call_tool("open_scene", {"path": "field.png"})).structured_content["id"]
        bad = [
            ({"budgets": "8"}, "1 budgets", "2 scales"),
            ({"budgets": [8.0, 16]}, "budget 8.0 is not an integer"),
            ({"budgets": "8,-1"}, "negative"),
            ({"budgets": [0, 0]}, "all"),
            ({"selector": "segments"}, "selector must be one of kmeans, topk"),
            ({"region": [400, 0, 500, 10]}, "lies outside image", "(pixels 0,0,300,200)"),
            ({"region": [0, 0, 10.5, 10]}, "whole pixels"),
            ({"region": [10, 0, 5, 10]}, "is inverted"),
            ({"region": [0, 0, 10, 10], "region_crs": "EPSG:4326"}, "map coordinates", "not georeferenced"),
            ({"region": [0, 0, 10, 10], "region_crs": "EPSG:99999999"}, "unknown CRS"),
            ({"region_crs": "EPSG:4326"}, "applies to region"),
            ({"question": "  "}, "empty"),
            ({"question": "Is <image> here?"}, "<image>"),
        ]
        bad += [
            ({"scene_id": 5}, "invalid arguments: scene_id: Input should be a valid string (got 5)"),
            ({"max_regions": -1}, "max_regions: Input should be greater than or equal to 0 (got -1)"),
            ({"region": [1, 2]}, "region: List should have at least 4 items"),
        ]
        for args, *fragments in bad:
            _error(await c.call_tool("ask", {"scene_id": sid, "question": "Q?", **args}), *fragments)
        _error(await c.call_tool("look", {"scene_id": sid, "region": [0, 300, 5, 305]}), "lies outside image")
        _error(await c.call_tool("ask", {"scene_id": sid}), "invalid arguments: question: Field required")
        # None of them prepared the scene or counted as a question; a good one still runs.
        desc = (await c.call_tool("describe_scene", {"scene_id": sid})).structured_content
        assert desc["questions_asked"] == 0 and not desc["prepared"] and desc["last_cache"] is None
        ok = await c.call_tool("ask", {"scene_id": sid, "question": "Q?", "selector": "topk", "budgets": [2, 3]})
        assert not ok.is_error, _text(ok)
        assert ok.structured_content["regions_total"] == 5
        assert ok.structured_content["settings"].startswith("budgets 2,3, selector topk")

    _run(service, scenario)


def test_model_and_internal_errors_keep_the_server_up(folders, tiny_pipeline, monkeypatch) -> None:
    allowed, _ = folders

    def fail() -> None:
        raise CheckpointError("no config.json in /nowhere")

    broken = _serve(PipelineLoader(fail), allowed)

    async def no_model(c: Client) -> None:
        sid = (await c.call_tool("open_scene", {"path": "field.png"})).structured_content["id"]  # needs no model
        _error(await c.call_tool("ask", {"scene_id": sid, "question": "Q?"}), "model could not be loaded", "/nowhere")
        assert not (await c.call_tool("look", {"scene_id": sid})).is_error

    _run(broken, no_model)

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter, "ask", crash)
    service = _serve(lambda: tiny_pipeline, allowed)

    async def internal(c: Client) -> None:
        sid = (await c.call_tool("open_scene", {"path": "field.png"})).structured_content["id"]
        _error(await c.call_tool("ask", {"scene_id": sid, "question": "Q?"}), "internal error: RuntimeError: boom")
        assert not (await c.call_tool("describe_scene", {"scene_id": sid})).is_error

    _run(service, internal)


def test_look_is_bounded_and_shows_the_last_question(tmp_path: Path, tiny_pipeline) -> None:
    Image.new("RGB", (3000, 500), (60, 60, 140)).save(tmp_path / "strip.png")
    service = _serve(lambda: tiny_pipeline, tmp_path)

    async def scenario(c: Client) -> None:
        sid = (await c.call_tool("open_scene", {"path": "strip.png"})).structured_content["id"]
        plain = await c.call_tool("look", {"scene_id": sid})
        assert _image(plain).size == (1024, 171)
        await c.call_tool("ask", {"scene_id": sid, "question": "What colour is the strip?"})
        seen = await c.call_tool("look", {"scene_id": sid})
        im = _image(seen)
        assert max(im.size) <= 1024
        assert "'What colour is the strip?'" in _text(seen) and "3000x500 px" in _text(seen)

    _run(service, scenario)


def test_geotiff_facts(tiny_pipeline) -> None:
    service = _serve(lambda: tiny_pipeline, TIFF.parent)
    info = service.open_scene(TIFF.name)
    assert info.crs == "EPSG:32617" and info.bands == [1, 2, 3]
    assert info.bounds == pytest.approx([404211.9, 3285102.9, 404251.9, 3285142.9])


def _image(result) -> Image.Image:
    (img,) = [c for c in result.content if c.type == "image"]
    im = Image.open(io.BytesIO(base64.b64decode(img.data)))
    assert im.format == "PNG"
    return im


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="BMP")
    return buf.getvalue()


def test_evidence_is_the_most_relevant_kept_tokens(tiny_pipeline) -> None:
    service = _serve(lambda: tiny_pipeline, TIFF.parent)
    sid = service.open_scene(TIFF.name).id
    full, _ = service.ask(sid, "Where are the trees?", max_regions=0)
    top, text = service.ask(sid, "Where are the trees?", max_regions=3)  # the same question: the same tokens
    ranked = full.evidence["features"]
    assert len(ranked) == full.regions_total - full.evidence["tokens_in_padding_dropped"]
    scores = [f["properties"]["score"] for f in ranked]
    assert scores == sorted(scores, reverse=True)
    assert [f["id"] for f in top.evidence["features"]] == [f["id"] for f in ranked[:3]]
    assert [f["geometry"] for f in top.evidence["features"]] == [f["geometry"] for f in ranked[:3]]
    assert sorted(f["id"] for f in ranked) == sorted(set(f["id"] for f in ranked))  # ids: tokens' own indices
    assert top.regions_returned == 3 and "the 3 most relevant are in" in text
    assert top.cache == "hit" and top.question_number == 2  # (the shared pipeline may have seen this file before)
