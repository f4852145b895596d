"""Regions end to end (issue 21): the vocabulary, a region as a child scene of the pipeline, exact
equivalence with the window cut into its own file (PNG and GeoTIFF, pixels and map coordinates,
topk and K-Means), the cache, outputs in the scene's coordinates, and bad regions refused
before the model loads (CLI exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from uhrbat.cli.main import app
from uhrbat.errors import ConfigError, RegionError
from uhrbat.io import geo
from uhrbat.options import MAX_ZOOM, ReadOptions, SelectionOptions, options_table
from uhrbat.pipeline import UhrBatPipeline
from uhrbat.scene.origin import Origin, open_source

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402
from rasterio.windows import Window  # noqa: E402

T = from_origin(500000.0, 6000000.0, 0.5, 0.5)
QUESTION = "How many trees are there?"
WIN = (130, 61, 611, 402)  # a window of the 700 x 520 scenes below (x0, y0, x1, y1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """A PNG and a georeferenced GeoTIFF of the same random pixels, and WIN cut into its own
    file of each kind (what an image editor / gdal_translate -srcwin make)."""
    d = tmp_path_factory.mktemp("regions")
    rng = np.random.default_rng(21)
    # structure (a gradient) plus noise, so tokens are not all alike
    y, x = np.mgrid[0:520, 0:700]
    arr = np.stack([(x * 0.3) % 256, (y * 0.4) % 256, (x + y) % 256], -1) + rng.integers(0, 60, (520, 700, 3))
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(d / "scene.png")
    x0, y0, x1, y1 = WIN
    Image.fromarray(arr[y0:y1, x0:x1]).save(d / "cut.png")
    profile = dict(driver="GTiff", width=700, height=520, count=3, dtype="uint8", crs="EPSG:32633", transform=T)
    with rasterio.open(d / "scene.tif", "w", **profile, tiled=True, blockxsize=128, blockysize=128) as ds:
        ds.write(arr.transpose(2, 0, 1))
    with rasterio.open(d / "scene.tif") as ds:
        w = Window(x0, y0, x1 - x0, y1 - y0)
        cut = dict(profile, width=x1 - x0, height=y1 - y0, transform=ds.window_transform(w))
        with rasterio.open(d / "cut.tif", "w", **cut) as out:
            out.write(ds.read(window=w))
    return {"png": d / "scene.png", "cut.png": d / "cut.png", "tif": d / "scene.tif", "cut.tif": d / "cut.tif"}


@pytest.fixture(scope="module")
def fresh(tiny_checkpoint):
    """A pipeline without a scene cache: every answer is computed from its own pixels."""
    return UhrBatPipeline.from_pretrained(
        tiny_checkpoint, budgets=[8, 16], kmeans_clusters=8, kmeans_iters=5, scene_cache=False
    )


def map_box(win) -> list[float]:
    """WIN's pixel edges in the GeoTIFF's CRS (min x, min y, max x, max y)."""
    X0, Y1 = T * (win[0], win[3])
    X1, Y0 = T * (win[2], win[1])
    return [X0, Y1, X1, Y0]


def on_scene(box) -> list[float]:
    """A pixel box of the cut file in the scene's pixels (WIN's offset added)."""
    return [box[0] + WIN[0], box[1] + WIN[1], box[2] + WIN[0], box[3] + WIN[1]]


def kept(res) -> list[tuple]:
    return [(t.scale, t.tile, t.row, t.col, t.score, t.merged, t.group, tuple(t.members)) for t in res.tokens]


# ----------------------------------------------------------------------------- the vocabulary
def test_vocabulary_region_and_zoom() -> None:
    r = ReadOptions.of(region=" 10, 20 ,30,40 ")
    assert r.region == (10, 20, 30, 40) and r.region_request().kind == "pixels" and r.region_text() == "10,20,30,40"
    m = ReadOptions.of(region=[500000.5, 6e6, 500100, 6000100.25], region_crs="EPSG:32633")
    assert m.region_request().kind == "map" and m.region_text() == "500000.5,6000000,500100,6000100.25"
    assert r.without_region().region_request() is None and r.without_region().region is None
    for given, message in [
        ({"region": "1,2,3"}, "four comma-separated numbers"),
        ({"region": "0.5,0,5,9"}, "whole pixels"),
        ({"region": "5,0,5,9"}, "is empty"),
        ({"region": "0,9,5,2"}, "is inverted"),
        ({"region_crs": "EPSG:4326"}, "applies to region"),
        ({"region": "0,0,5,5", "region_crs": "EPSG:99999999"}, "unknown CRS"),
        ({"region": "0,0,5,5", "region_file": "aoi.geojson"}, "give one region"),
        ({"region_file": "/nonexistent/aoi.geojson"}, "cannot read region file"),
    ]:
        with pytest.raises(RegionError, match=message) as e:
            ReadOptions.of(**given)
        assert "\n" not in str(e.value)
    assert SelectionOptions.of(zoom=2).zoom == 2 and SelectionOptions.of().resolve(_Config()).zoom == 0
    for bad, message in [(-1, ">= 0"), (MAX_ZOOM + 1, f"<= {MAX_ZOOM}"), (1.5, "integer"), (True, "integer")]:
        with pytest.raises(ConfigError, match=message):
            SelectionOptions.of(zoom=bad)
    table = options_table()
    for name, flag in [("region", "--region"), ("region_crs", "--region-crs"), ("region_file", "--region-file")]:
        assert f"| `{name}` | `{flag}` |" in table
    assert "| `region_geojson` | (no flag) |" in table and "| `zoom` | `--zoom` |" in table


class _Config:
    scales, budgets, selector, kmeans_clusters, kmeans_iters, kmeans_mode, seed = [672], [8], "topk", 0, 1, "fast", 0


def test_every_command_that_reads_images_takes_the_region_flags() -> None:
    from click.testing import CliRunner as ClickRunner  # noqa: F401 - typer's runner wraps click's
    from typer.main import get_command

    commands = get_command(app).commands
    for name in ("ask", "chat", "batch", "eval"):
        flags = {o for p in commands[name].params for o in getattr(p, "opts", [])}
        assert {"--region", "--region-crs", "--region-file", "--zoom"} <= flags, name
    flags = {o for p in commands["ask"].params for o in getattr(p, "opts", [])}
    assert "--relevance-tif" in flags


def test_model_generate_refuses_zoom(tiny_pipeline) -> None:
    """zoom reads windows of the file; the model gets tiles: refused there, never ignored."""
    from uhrbat.modeling.modeling_uhrbat import selection_options

    with pytest.raises(ConfigError, match="zoom=1 reads windows of the image file.*UhrBatPipeline"):
        selection_options(None, None, None, None, None, None, None, None, None, 1)


# ----------------------------------------------------------------------------- exact equivalence
@pytest.mark.parametrize("selector", ["topk", "kmeans"])
@pytest.mark.parametrize("kind", ["png", "tif"])
def test_region_equals_the_window_cut_into_its_own_file(scenes, fresh, kind, selector) -> None:
    """Same kept tokens (scales, positions, scores, merged flags, groups) and the same generated
    ids as the cut file; boxes offset by the window's origin; map boxes the same."""
    cut = fresh.ask(str(scenes[f"cut.{kind}"]), QUESTION, max_new_tokens=6, selector=selector)
    region = fresh.ask(str(scenes[kind]), QUESTION, max_new_tokens=6, selector=selector, region=list(WIN))
    assert kept(region) == kept(cut) and region.generated_ids == cut.generated_ids and region.answer == cut.answer
    assert region.region["pixels"] == list(WIN) and region.image_size == cut.image_size == (481, 341)
    boxes = geo.tokens_with_boxes(region.tokens, region.window_source)
    cut_boxes = geo.tokens_with_boxes(cut.tokens, open_source(scenes[f"cut.{kind}"]))
    for b, c in zip(boxes, cut_boxes):
        if c["box_px"] is None:
            assert b["box_px"] is None
            continue
        assert b["box_px"] == pytest.approx(on_scene(c["box_px"]), abs=1e-3)
        if kind == "tif":  # the same place on the map, full precision
            assert b["box_crs"] == pytest.approx(c["box_crs"], abs=1e-6)
            x0, y0, x1, y1 = map_box(WIN)
            assert x0 - 1e-6 <= b["box_crs"][0] and b["box_crs"][2] <= x1 + 1e-6
    if kind == "tif":
        assert region.region["bounds_crs"] == pytest.approx(map_box(WIN))
        by_map = fresh.ask(
            str(scenes["tif"]), QUESTION, max_new_tokens=6, selector=selector,
            region=map_box(WIN), region_crs="EPSG:32633",
        )  # fmt: skip
        assert by_map.region["pixels"] == list(WIN)
        assert kept(by_map) == kept(cut) and by_map.generated_ids == cut.generated_ids


def test_region_of_an_opened_scene_and_of_a_pil_image(scenes, fresh) -> None:
    scene = fresh.open(str(scenes["png"]))
    via_scene = fresh.ask(scene, QUESTION, max_new_tokens=4, selector="topk", region=list(WIN))
    with Image.open(scenes["png"]) as im:
        via_pil = fresh.ask(im.convert("RGB"), QUESTION, max_new_tokens=4, selector="topk", region=list(WIN))
    cut = fresh.ask(str(scenes["cut.png"]), QUESTION, max_new_tokens=4, selector="topk")
    assert kept(via_scene) == kept(via_pil) == kept(cut)
    child = fresh.open(str(scenes["png"]), region=list(WIN))  # a child scene prepared once
    assert child.region.pixels == WIN and child.size == (481, 341) and child.origin.image == str(scenes["png"])
    assert kept(fresh.ask(child, QUESTION, max_new_tokens=4, selector="topk")) == kept(cut)
    with pytest.raises(ConfigError, match="bands apply when the pipeline reads the image file"):
        fresh.ask(scene, QUESTION, max_new_tokens=4, bands="1,2,3")
    from uhrbat.io.sources import open_image

    with pytest.raises(RegionError, match="a region is read from the image file"):
        fresh.ask(open_image(scenes["png"]), QUESTION, max_new_tokens=4, region=list(WIN))


def test_bad_regions_raise_before_any_compute(scenes, fresh, monkeypatch) -> None:
    from uhrbat.scene.manager import SceneManager

    def no_encoding(*a, **k):
        raise AssertionError("encoded a scene for a bad region")

    monkeypatch.setattr(SceneManager, "_encode", no_encoding)
    for region, crs, message in [
        ([800, 0, 900, 10], None, r"lies outside image .*scene.png \(pixels 0,0,700,520\)"),
        ([0, 0, 10, 10], "EPSG:4326", "in map coordinates, but image .* is not georeferenced"),
        ([10, 0, 5, 10], None, "is inverted"),
        ([0, 0, 10, 10], "EPSG:0", "unknown CRS"),
    ]:
        with pytest.raises(RegionError, match=message):
            fresh.ask(str(scenes["png"]), QUESTION, max_new_tokens=2, region=region, region_crs=crs)
    with pytest.raises(RegionError, match="selector segments needs the segment masks of the window"):
        fresh.ask(str(scenes["png"]), QUESTION, max_new_tokens=2, region=list(WIN), selector="segments")


# ----------------------------------------------------------------------------- the cache
def test_follow_up_on_the_same_region_reads_no_pixel(scenes, tiny_checkpoint, monkeypatch) -> None:
    pipe = UhrBatPipeline.from_pretrained(tiny_checkpoint, budgets=[8, 16], selector="topk")
    first = pipe.ask(str(scenes["tif"]), QUESTION, max_new_tokens=4, region=list(WIN))
    assert first.reuse["features"] == "miss"
    reads = []
    monkeypatch.setattr(Origin, "open", lambda self, region=None: reads.append(region) or 1 / 0)
    again = pipe.ask(str(scenes["tif"]), "Is there a road?", max_new_tokens=4, region=list(WIN))
    assert reads == [] and again.reuse["features"] == "hit" and again.timings["tiles"] == 0.0
    assert again.region["pixels"] == list(WIN) and again.window_source.size == (481, 341)
    # its outputs still land on the scene: the window's place is known without its pixels
    boxes = [t for t in geo.tokens_with_boxes(again.tokens, again.window_source) if t["box_px"] is not None]
    assert boxes and all(len(t["box_crs"]) == 4 for t in boxes)  # tokens in the padding have no box
    x0, y0, x1, y1 = map_box(WIN)
    assert all(x0 - 1e-6 <= t["box_crs"][0] and t["box_crs"][2] <= x1 + 1e-6 for t in boxes)  # on the window
    # the same window asked in map coordinates is another request: read again, features reused
    monkeypatch.undo()
    by_map = pipe.ask(str(scenes["tif"]), QUESTION, max_new_tokens=4, region=map_box(WIN), region_crs="EPSG:32633")
    assert by_map.reuse["features"] == "hit" and kept(by_map) == kept(first)


# ----------------------------------------------------------------------------- command line
runner = CliRunner()


def ask_cli(*args: str):
    return runner.invoke(app, ["ask", *args])


def ask_main(capsys, *args: str) -> tuple[int, str]:
    """`uhrbat ask ...` through the console entry point (its error handling: one `error:` line,
    exit code 2); (exit code, stdout + stderr)."""
    from uhrbat.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["ask", *args])
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_cli_region_json_geojson_and_map_files(scenes, tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    common = ["--model", str(tiny_checkpoint), "--selector", "topk", "--max-new-tokens", "3", "--json"]
    r = ask_cli(
        str(scenes["tif"]), QUESTION, *common, "--region", ",".join(map(str, WIN)),
        "--geojson", str(out / "kept.geojson"), "--explain", str(out / "overlay.png"),
        "--relevance-tif", str(out / "relevance.tif"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    cut = ask_cli(str(scenes["cut.tif"]), QUESTION, *common)
    ref = json.loads(cut.stdout.strip().splitlines()[-1])
    assert payload["answer"] == ref["answer"] and payload["region"]["pixels"] == list(WIN)
    assert [t.get("box_crs") for t in payload["tokens"]] == [t.get("box_crs") for t in ref["tokens"]]
    assert any(t.get("box_crs") for t in payload["tokens"])  # tokens in the padding have no box
    for t, c in zip(payload["tokens"], ref["tokens"]):
        if c["box_px"] is None:
            assert t["box_px"] is None
            continue
        assert t["box_px"] == pytest.approx(on_scene(c["box_px"]), abs=1e-3)
    fc = json.loads((out / "kept.geojson").read_text())
    assert fc["image"]["size"] == [700, 520] and fc["image"]["region"]["pixels"] == list(WIN)
    # The relevance COG: in the scene's CRS, on the window (its cells touch the window).
    with rasterio.open(out / "relevance.tif") as ds:
        assert ds.crs.to_epsg() == 32633 and ds.count == 1 and ds.dtypes[0] == "float32"
        X0, Y0, X1, Y1 = map_box(WIN)
        cell = ds.transform.a
        b = ds.bounds
        assert X0 - cell <= b.left < X0 + cell and X1 - cell < b.right <= X1 + cell
        assert Y0 - cell <= b.bottom < Y0 + cell and Y1 - cell < b.top <= Y1 + cell
        assert np.isfinite(ds.read(1)).all()
    # The overlay's world file + CRS sidecar place its image view on the window.
    assert (out / "overlay.pgw").exists() and (out / "overlay.png.aux.xml").exists()
    with rasterio.open(out / "overlay.png") as ds:
        assert ds.crs.to_epsg() == 32633
        ox0, oy1 = ds.transform * (0, 0)  # the picture's top-left corner is the window's (no padding at the left)
        assert ox0 == pytest.approx(X0, abs=ds.transform.a) and oy1 == pytest.approx(Y1, abs=-ds.transform.e * 200)


def test_cli_bad_regions_exit_2_before_the_model_loads(scenes, tmp_path, capsys) -> None:
    missing_model = str(tmp_path / "no-model")  # loading it would fail: the region must fail first
    for args, message in [
        (["--region", "800,0,900,10"], "lies outside image"),
        (["--region", "0,0,10,10", "--region-crs", "EPSG:4326"], "is not georeferenced"),
        (["--region", "10,0,5,10"], "is inverted"),
        (["--region", "0,0,10,10", "--region-crs", "EPSG:0"], "unknown CRS"),
        (["--region-crs", "EPSG:4326"], "applies to region"),
        (["--relevance-tif", str(tmp_path / "r.tif")], "cannot get a relevance GeoTIFF"),
        (["--geojson", str(tmp_path / "k.geojson")], "cannot be written as GeoJSON"),
    ]:
        code, output = ask_main(capsys, str(scenes["png"]), QUESTION, "--model", missing_model, *args)
        assert code == 2, (args, output)
        lines = [ln for ln in output.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], output
        assert "loading" not in output
    r = ask_cli(str(scenes["png"]), QUESTION, "--model", missing_model, "--region", "0,0,10")
    assert r.exit_code == 2 and "Invalid value for '--region'" in r.output and "four comma-separated" in r.output
    r = ask_cli(str(scenes["png"]), QUESTION, "--model", missing_model, "--zoom", str(MAX_ZOOM + 1))
    assert r.exit_code == 2 and "Invalid value for '--zoom'" in r.output


def test_cli_region_file_geojson_polygon(scenes, tiny_checkpoint, tmp_path, capsys) -> None:
    """A GeoJSON file (WGS84): its polygon's bounding box is the window, pixels outside it are padding."""
    from uhrbat.io.sources import open_image

    src = open_image(scenes["tif"])
    lon, lat = src.georef.pixel_to_wgs84([200, 500, 350, 200], [100, 150, 380, 100])  # a triangle
    aoi = {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in zip(lon, lat)]]}
    (tmp_path / "aoi.geojson").write_text(json.dumps({"type": "Feature", "geometry": aoi, "properties": {}}))
    r = ask_cli(
        str(scenes["tif"]), QUESTION, "--model", str(tiny_checkpoint), "--selector", "topk",
        "--max-new-tokens", "2", "--json", "--region-file", str(tmp_path / "aoi.geojson"),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    region = json.loads(r.stdout.strip().splitlines()[-1])["region"]
    x0, y0, x1, y1 = region["pixels"]
    assert region["masked"] and abs(x0 - 200) <= 1 and abs(y0 - 100) <= 1 and abs(x1 - 500) <= 1 and abs(y1 - 380) <= 1
    code, output = ask_main(
        capsys, str(scenes["tif"]), QUESTION, "--model", str(tiny_checkpoint), "--zoom", "1",
        "--region-file", str(tmp_path / "aoi.geojson"),
    )  # fmt: skip
    assert code == 2 and "zoom looks inside a box region only" in output


# ----------------------------------------------------------------------------- batch and eval rows
def test_batch_rows_carry_their_own_region(scenes, tiny_checkpoint, tmp_path) -> None:
    rows = [
        {"id": "whole", "image": str(scenes["tif"]), "question": QUESTION},
        {"id": "win", "image": str(scenes["tif"]), "question": QUESTION, "region": list(WIN)},
        {
            "id": "map",
            "image": str(scenes["tif"]),
            "question": QUESTION,
            "region": ",".join(map(str, map_box(WIN))),
            "region_crs": "EPSG:32633",
        },  # fmt: skip
        {"id": "outside", "image": str(scenes["tif"]), "question": QUESTION, "region": [900, 0, 950, 50]},
        {"id": "bad", "image": str(scenes["tif"]), "question": QUESTION, "region": "1,2,3"},
        {"image": str(scenes["tif"]), "question": QUESTION, "region": [0, 0, 100, 100]},
        {"image": str(scenes["tif"]), "question": QUESTION, "region": [0, 0, 100, 101]},
    ]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(
        app,
        ["batch", "--input", str(tmp_path / "list.jsonl"), "--out", str(tmp_path / "run"), "--model",
         str(tiny_checkpoint), "--selector", "topk", "--max-new-tokens", "2", "--no-progress",
         "--geojson-dir", str(tmp_path / "kept")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = {d["id"]: d for d in map(json.loads, (tmp_path / "run" / "predictions.jsonl").read_text().splitlines())}
    assert len(got) == 7  # rows without an id: the region is part of the derived id
    assert "region" not in got["whole"] and got["whole"]["image_size"] == [700, 520]
    assert got["win"]["region"]["pixels"] == list(WIN) and got["win"]["image_size"] == [481, 341]
    assert got["map"]["region"]["pixels"] == list(WIN) and got["map"]["answer"] == got["win"]["answer"]
    assert "lies outside image" in got["outside"]["error"] and got["outside"]["answer"] is None
    assert "four comma-separated numbers" in got["bad"]["error"]
    fc = json.loads((tmp_path / "kept" / "win.geojson").read_text())
    x0, y0, x1, y1 = WIN
    assert fc["features"] and fc["image"] == str(scenes["tif"])  # batch names the row's image here
    for f in fc["features"]:  # in the scene's pixels, inside the window
        bx0, by0, bx1, by1 = f["properties"]["box_px"]
        assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1


def test_eval_rows_region_field(scenes, tmp_path) -> None:
    from uhrbat.evaluation.loaders import _row_region
    from uhrbat.evaluation.records import ImageRef, RowError, Sample
    from uhrbat.evaluation.runner import _image_input

    assert _row_region({"question": "q"}) == {}
    assert _row_region({"region": [1, 2, 30, 40]}) == {"region": "1,2,30,40"}
    assert _row_region({"region": "1,2,3,4", "region_crs": "EPSG:32633"}) == {
        "region": "1,2,3,4",
        "region_crs": "EPSG:32633",
    }
    with pytest.raises(RowError, match="whole pixels"):
        _row_region({"region": "1.5,2,3,4"})
    s = Sample(
        id="a", row=0, images=[ImageRef(path=str(scenes["tif"]))], question="q", answer="A", region="130,61,611,402"
    )
    src = _image_input(s, {})
    assert src.region.pixels == WIN and src.origin.image == str(scenes["tif"])
    whole = Sample(id="b", row=1, images=[ImageRef(path=str(scenes["tif"]))], question="q", answer="A")
    assert _image_input(whole, {}) == str(scenes["tif"])
    assert _image_input(whole, {"region": "0,0,10,10"}).region.pixels == (0, 0, 10, 10)  # the run's region
    with pytest.raises(RegionError, match="lies outside"):
        _image_input(whole, {"region": "900,0,950,10"})


# ----------------------------------------------------------------------------- MCP
def test_mcp_ask_and_look_about_a_region(scenes, tiny_pipeline) -> None:
    pytest.importorskip("mcp")
    from uhrbat.mcp.service import SceneService, ServiceOptions

    service = SceneService(lambda: tiny_pipeline, ServiceOptions([str(scenes["tif"].parent)], max_new_tokens=2))
    sid = service.open_scene(scenes["tif"].name).id
    out, text = service.ask(sid, QUESTION, region=list(WIN), max_regions=0)
    assert out.region["pixels"] == list(WIN) and f"window [{', '.join(map(str, WIN))}]" in text
    assert out.evidence["image"]["region"]["pixels"] == list(WIN)
    x0, y0, x1, y1 = WIN
    for f in out.evidence["features"]:  # evidence in the scene's pixels, inside the window
        bx0, by0, bx1, by1 = f["properties"]["box_px"]
        assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1
    again, _ = service.ask(sid, "Is there a road?", region=list(WIN))
    assert again.cache == "hit"
    png, text = service.look(sid, region=list(WIN))
    assert "Where the model looked" in text and f"window {list(WIN)}" in text
    png, text = service.look(sid, region=[0, 0, 100, 100])
    assert text.startswith("No question has been asked about the window [0, 0, 100, 100]")
    with pytest.raises(RegionError, match="lies outside"):
        service.ask(sid, QUESTION, region=[900, 0, 950, 10])


# ----------------------------------------------------------------------------- HTTP (uhrbat serve, the demo)
def _data_url(path: Path) -> str:
    import base64

    media = "image/tiff" if path.suffix == ".tif" else "image/png"
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode()


def _conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def http(tiny_pipeline):
    """The real server (`uhrbat serve`'s app) on loopback with the tiny model, and the real
    `openai` client."""
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

    opts = ServeOptions(model_name="tiny", batch_wait_s=0.0)
    with serve_in_thread(create_app(ChatService(tiny_pipeline, opts)), opts) as url:
        yield openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=120)


def _ask_http(client, image: Path, question: str = QUESTION, **extra):
    msg = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": question}],
    }
    return client.chat.completions.create(
        model="tiny", messages=[msg], max_tokens=6, extra_body={"selector": "topk", "return_tokens": True, **extra}
    )


@pytest.mark.parametrize("kind", ["png", "tif"])
def test_http_region_equals_the_cut_file(scenes, http, fresh, kind) -> None:
    """extra_body `region` (and, for the GeoTIFF, the same window in map coordinates and as a
    GeoJSON object): the answer and kept tokens of the window cut into its own file, the boxes in
    the scene's pixels and map coordinates."""
    cut = fresh.chat(str(scenes[f"cut.{kind}"]), _conversation(QUESTION), max_new_tokens=6, selector="topk")
    cut_boxes = geo.tokens_with_boxes(cut.tokens, open_source(scenes[f"cut.{kind}"]))
    asks = [{"region": list(WIN)}]
    if kind == "tif":
        X0, Y0, X1, Y1 = map_box(WIN)
        ring = [[X0, Y0], [X1, Y0], [X1, Y1], [X0, Y1], [X0, Y0]]
        legacy = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
        asks += [
            {"region": ",".join(map(str, map_box(WIN))), "region_crs": "EPSG:32633"},
            {"region_geojson": {"type": "Feature", "crs": legacy, "properties": {},
                                "geometry": {"type": "Polygon", "coordinates": [ring]}}},
        ]  # fmt: skip
    for extra in asks:
        r = _ask_http(http, scenes[kind], **extra)
        ext = r.model_extra["uhrbat"]
        assert r.choices[0].message.content == cut.answer, extra
        assert ext["region"]["pixels"] == list(WIN) and ext["image_size"] == [481, 341]
        got = ext["tokens"]
        assert [(t["scale"], t["tile"], t["row"], t["col"]) for t in got] == [
            (t.scale, t.tile, t.row, t.col) for t in cut.tokens
        ]
        for t, c in zip(got, cut_boxes):
            if c["box_px"] is None:
                assert t["box_px"] is None
                continue
            assert t["box_px"] == pytest.approx(on_scene(c["box_px"]), abs=1e-3)
            if kind == "tif":
                assert t["box_crs"] == pytest.approx(c["box_crs"], abs=1e-6)
        if kind == "tif":
            assert ext["geojson"]["image"]["region"]["pixels"] == list(WIN)
            assert ext["geojson"]["image"]["size"] == [700, 520]


def test_http_bad_regions_are_one_line_400s(scenes, http) -> None:
    import openai

    point = {"type": "Point", "coordinates": [15.0, 54.0]}
    for image, extra, param, message in [
        ("png", {"region": [800, 0, 900, 10]}, None, "lies outside image 'upload.png' (pixels 0,0,700,520)"),
        ("tif", {"region": [800, 0, 900, 10]}, None, "lies outside image 'upload.tif' (pixels 0,0,700,520)"),
        ("png", {"region": [0, 0, 10, 10], "region_crs": "EPSG:4326"}, None, "is not georeferenced"),
        ("png", {"region": [10, 0, 5, 10]}, "region", "is inverted"),
        ("png", {"region": "1,2,3"}, "region", "four comma-separated numbers"),
        ("png", {"region": [0.5, 0, 5, 9]}, "region", "whole pixels"),
        ("png", {"region": [0, 0, 5, 5], "region_crs": "EPSG:0"}, "region_crs", "unknown CRS"),
        ("png", {"region_crs": "EPSG:4326"}, "region_crs", "applies to region"),
        ("png", {"region_geojson": point}, "region_geojson", "holds no Polygon"),
        ("png", {"region_geojson": "{not json"}, "region_geojson", "is not valid JSON"),
        ("png", {"region": [0, 0, 5, 5], "region_geojson": point}, "region_geojson", "give one region"),
        ("png", {"region_file": "/etc/aoi.geojson"}, "region_file", "send the GeoJSON itself as region_geojson"),
        ("png", {"zoom": -1}, "zoom", "zoom must be >= 0"),
        ("png", {"zoom": MAX_ZOOM + 1}, "zoom", f"zoom must be <= {MAX_ZOOM}"),
        ("png", {"zoom": "2"}, "zoom", "valid integer"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            _ask_http(http, scenes[image], **extra)
        err = e.value.response.json()["error"]
        assert message in err["message"] and "\n" not in err["message"], (extra, err)
        assert err["param"] == param and err["type"] == "invalid_request_error", (extra, err)
        assert "/tmp" not in err["message"] and "uhrbat-upload" not in err["message"]  # never a server path


def test_demo_passes_a_region_through_the_chat_service(scenes, tiny_pipeline) -> None:
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from uhrbat.serving import ChatService
    from uhrbat.serving.demo import create_app, demo_options

    app = create_app(ChatService(tiny_pipeline, demo_options("tiny")))
    with TestClient(app) as client:
        form = {"question": QUESTION, "max_new_tokens": "3", "region": ",".join(map(str, map_box(WIN)))}
        r = client.post(
            "/api/ask",
            files={"image": ("scene.tif", scenes["tif"].read_bytes(), "image/tiff")},
            data={**form, "region_crs": "EPSG:32633"},
        )
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["region"]["pixels"] == list(WIN) and data["image_size"] == [481, 341] and data["georeferenced"]
        gj = client.get("/" + data["geojson_url"]).json()
        assert gj["image"]["region"]["pixels"] == list(WIN) and gj["image"]["size"] == [700, 520]
        r = client.post(
            "/api/ask",
            files={"image": ("scene.png", scenes["png"].read_bytes(), "image/png")},
            data={**form, "region_crs": "EPSG:32633"},
        )
        assert r.status_code == 400 and "is not georeferenced" in r.json()["error"]["message"]
