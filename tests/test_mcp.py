"""`uhrbat mcp` with the official `mcp` client: over stdio (the command as an MCP host starts
it), over streamable HTTP, and in process (the same server object, for the error paths)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("mcp")

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from PIL import Image

from conftest import ASSETS, PARITY, ROOT

AERIAL = ASSETS / "aerial"
TIFF = AERIAL / "neon_osbs_400.tif"  # GeoTIFF, EPSG:32617, 400 x 400
PNG = AERIAL / "neon_yell_1249x1035.png"  # no georeference
TOOLS = {"open_scene", "ask", "look", "describe_scene", "close_scene"}
# The tiny reference-format checkpoint (4 scales) with cheap settings: K = budget, 2 Lloyd iterations.
FAST = [
    "--model",
    str(PARITY / "uhrbat_tiny"),
    "--clusters",
    "0",
    "--budgets",
    "4,8,8,8",
    "--iters",
    "2",
    "--max-new-tokens",
    "4",
]


def _env() -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def _png(result) -> Image.Image:
    import base64

    (img,) = [c for c in result.content if c.type == "image"]
    assert img.mime_type == "image/png"
    data = base64.b64decode(img.data)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _tool_error(result, *fragments: str) -> str:
    assert result.is_error, result
    text = _text(result)
    assert "\n" not in text, text  # one line
    for f in fragments:
        assert f in text, text
    return text


# ----------------------------------------------------------------------------- stdio, end to end
def test_stdio_open_ask_twice_look_errors_and_keeps_answering(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64), (10, 120, 40)).save(outside)  # a valid image: refused for where it is
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "uhrbat.cli.main", "mcp", "--allowed-path", str(AERIAL), *FAST],
        env=_env(),
        cwd=str(tmp_path),
    )
    log = tmp_path / "server.log"

    async def scenario() -> None:
        with open(log, "w") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as c:
                tools = {t.name: t for t in (await c.list_tools()).tools}
                assert set(tools) == TOOLS
                ask_schema = tools["ask"].input_schema
                assert ask_schema["required"] == ["scene_id", "question"]
                assert {"region", "region_crs", "budgets", "selector"} <= set(ask_schema["properties"])
                assert ask_schema["properties"]["selector"]["anyOf"][0]["enum"] == ["kmeans", "topk", "divprune", "dpp"]
                assert tools["open_scene"].input_schema["required"] == ["path"]
                out = tools["ask"].output_schema
                assert {"answer", "evidence", "coordinate_space", "cache", "timings"} <= set(out["required"])
                opened = tools["open_scene"].output_schema
                assert {"id", "width", "height", "crs", "bounds", "bands"} <= set(opened["required"])

                tif = await c.call_tool("open_scene", {"path": str(TIFF)})
                assert not tif.is_error, _text(tif)
                info = tif.structured_content
                assert (info["width"], info["height"], info["crs"]) == (400, 400, "EPSG:32617")
                assert info["bands"] == [1, 2, 3] and len(info["bounds"]) == 4
                assert info["bounds"][2] - info["bounds"][0] == pytest.approx(40.0)  # 400 px x 0.1 m
                png = await c.call_tool("open_scene", {"path": PNG.name})  # relative to the allowed folder
                assert not png.is_error, _text(png)
                assert png.structured_content["crs"] is None and png.structured_content["bounds"] is None
                tid, pid = info["id"], png.structured_content["id"]
                assert tid != pid and min(len(tid), len(pid)) >= 22

                plain = await c.call_tool("look", {"scene_id": pid})
                assert not plain.is_error and "No question has been asked" in _text(plain)
                assert _png(plain).size == (1024, 849)  # 1249 x 1035 fitted into 1024

                first = await c.call_tool("ask", {"scene_id": tid, "question": "How many trees are there?"})
                assert not first.is_error, _text(first)
                second = await c.call_tool("ask", {"scene_id": tid, "question": "Is there a road?"})
                assert not second.is_error, _text(second)
                a, b = first.structured_content, second.structured_content
                assert (a["cache"], b["cache"]) == ("miss", "hit")
                assert (a["question_number"], b["question_number"]) == (1, 2)
                assert a["timings"]["encode"] > 0 and a["timings"]["tiles"] > 0
                assert b["timings"]["encode"] == 0 and b["timings"]["tiles"] == 0  # prepared once
                assert b["seconds"] < a["seconds"]
                assert "reused from an earlier question" in _text(second)
                assert a["settings"].startswith("budgets 4,8,8,8, selector kmeans")
                _check_wgs84_evidence(a, info)

                px = await c.call_tool("ask", {"scene_id": pid, "question": "Where are the trees?"})
                assert not px.is_error, _text(px)
                ev = px.structured_content["evidence"]
                assert px.structured_content["coordinate_space"] == ev["coordinate_space"] == "pixel"
                assert "NOT longitude/latitude" in ev["coordinate_note"] and "type" not in ev  # never GeoJSON
                assert ev["format"] == "uhrbat.pixel-boxes/1" and len(ev["tokens"]) > 0
                for t in ev["tokens"]:
                    x0, y0, x1, y1 = t["box_px"]
                    assert 0 <= x0 < x1 <= 1249 and 0 <= y0 < y1 <= 1035

                seen = await c.call_tool("look", {"scene_id": tid})
                assert not seen.is_error and "How many trees" not in _text(seen)
                assert "'Is there a road?'" in _text(seen)  # the last question's overlay
                assert max(_png(seen).size) <= 1024

                _tool_error(
                    await c.call_tool("open_scene", {"path": str(outside)}), "outside the allowed folders", str(AERIAL)
                )
                _tool_error(await c.call_tool("ask", {"scene_id": "not-a-scene", "question": "Q?"}), "unknown scene id")
                _tool_error(
                    await c.call_tool("ask", {"scene_id": tid, "question": "Q?", "budgets": "4,8"}),
                    "2 budgets",
                    "4 scales",
                )
                desc = await c.call_tool("describe_scene", {"scene_id": tid})
                d = desc.structured_content
                assert d["questions_asked"] == 2 and d["prepared"] and d["last_cache"] == "hit"
                assert [q["question"] for q in d["questions"]] == ["How many trees are there?", "Is there a road?"]
                assert d["path"] == os.path.realpath(TIFF)

                closed = await c.call_tool("close_scene", {"scene_id": tid})
                assert closed.structured_content == {"id": tid, "closed": True, "questions_asked": 2}
                _tool_error(await c.call_tool("describe_scene", {"scene_id": tid}), "unknown scene id")
                # Still answering after every error above.
                again = await c.call_tool("ask", {"scene_id": pid, "question": "Is there water?"})
                assert not again.is_error and again.structured_content["cache"] == "hit"

    try:
        anyio.run(scenario)
    except BaseException:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise


def _check_wgs84_evidence(ask: dict, info: dict) -> None:
    """Evidence of a georeferenced scene is longitude/latitude inside the scene's bounds."""
    from pyproj import Transformer

    ev = ask["evidence"]
    assert ask["coordinate_space"] == ev["coordinate_space"] == "wgs84"
    assert ask["regions_total"] == 4 + 8 + 8 + 8 and ask["regions_returned"] == len(ev["features"]) > 0
    scores = [f["properties"]["score"] for f in ev["features"]]
    assert scores == sorted(scores, reverse=True)
    to_wgs84 = Transformer.from_crs(info["crs"], "EPSG:4326", always_xy=True)
    x0, y0, x1, y1 = info["bounds"]
    lons, lats = to_wgs84.transform([x0, x1, x1, x0], [y0, y0, y1, y1])
    for f in ev["features"]:
        rings = f["geometry"]["coordinates"] if f["geometry"]["type"] == "Polygon" else f["geometry"]["coordinates"][0]
        for lon, lat in rings[0]:
            assert min(lons) - 1e-7 <= lon <= max(lons) + 1e-7 and min(lats) - 1e-7 <= lat <= max(lats) + 1e-7


# ----------------------------------------------------------------------------- streamable HTTP
def test_http_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "uhrbat.cli.main", "mcp", "--transport", "http", "--port", "0"]
    cmd += ["--allowed-path", str(AERIAL), *FAST]
    log = tmp_path / "server.log"
    with open(log, "w") as errlog:
        proc = subprocess.Popen(cmd, env={**os.environ, **_env()}, stdout=subprocess.DEVNULL, stderr=errlog)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"on (http://127\.0\.0\.1:\d+/mcp)", log.read_text())
            url = m.group(1) if m else time.sleep(0.2)
        assert url, log.read_text()

        async def scenario() -> None:
            with anyio.fail_after(180):
                await talk()

        async def talk() -> None:
            async with Client(url) as c:
                assert {t.name for t in (await c.list_tools()).tools} == TOOLS
                opened = await c.call_tool("open_scene", {"path": TIFF.name})
                sid = opened.structured_content["id"]
                res = await c.call_tool("ask", {"scene_id": sid, "question": "How many trees?", "max_regions": 3})
                assert not res.is_error, _text(res)
                assert res.structured_content["regions_returned"] == 3 and res.structured_content["cache"] == "miss"
                _tool_error(await c.call_tool("look", {"scene_id": "nope"}), "unknown scene id")
                assert (await c.call_tool("close_scene", {"scene_id": sid})).structured_content["closed"]

        anyio.run(scenario)
        # Loopback: the SDK refuses another Host (DNS rebinding), before any tool runs.
        req = urllib.request.Request(
            url,
            data=b"{}",
            headers={"Host": "attacker.example", "Content-Type": "application/json", "Accept": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 421
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]


# ----------------------------------------------------------------------------- the command line
def test_cli_checks_options_before_starting() -> None:
    from typer.testing import CliRunner

    from uhrbat.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["mcp"])
    assert res.exit_code == 2 and "--allowed-path" in res.output
    res = runner.invoke(app, ["mcp", "--allowed-path", str(AERIAL), "--selector", "segments"])
    assert res.exit_code == 2 and "mask file" in res.output
    res = runner.invoke(app, ["mcp", "--allowed-path", str(TIFF)])
    assert res.exit_code == 2 and "is a file" in res.output
    res = runner.invoke(app, ["mcp", "--allowed-path", str(AERIAL), "--transport", "sse"])
    assert res.exit_code == 2


def test_cli_import_does_not_load_the_sdk() -> None:
    code = "import sys, uhrbat.cli.mcp_cmd; print(sorted(m for m in ('mcp', 'uvicorn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **_env()}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.replace("'", '"')) == []
