"""Hostile question lists found in a QA pass over `uhrbat batch`: a list that is not UTF-8 and
cells that are not text must be refused / become error rows, never an internal error."""

from __future__ import annotations

import json

import pytest

from uhrbat.batch import read_input
from uhrbat.errors import BatchInputError


@pytest.mark.parametrize("name", ["list.csv", "list.jsonl"])
def test_a_list_that_is_not_utf8_is_refused_naming_the_line(tmp_path, name):
    sep = "," if name.endswith(".csv") else None
    lines = (
        ["id,image,question", "a,s0.png,ok", "b,s0.png,caf\xe9"]
        if sep
        else [
            json.dumps({"id": "a", "image": "s0.png", "question": "ok"}),
            '{"id": "b", "image": "s0.png", "question": "caf\xe9"}',
        ]
    )
    (tmp_path / name).write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    with pytest.raises(BatchInputError) as e:  # was an uncaught UnicodeDecodeError ("internal error")
        read_input(tmp_path / name)
    line = 3 if sep else 2
    assert f"{name}:{line}: not UTF-8 (byte 0xe9)" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("trust", ["local", "untrusted"])
def test_cells_that_are_not_text_become_error_rows(tmp_path, trust):
    rows = [
        {"id": "dict-q", "image": "s0.png", "question": {"a": 1}},  # was TypeError -> internal error
        {"id": "list-q", "image": "s0.png", "question": ["is", "it"]},  # was asked as "['is', 'it']"
        {"id": "bool-q", "image": "s0.png", "question": True},  # was asked as "True"
        {"id": "list-img", "image": ["s0.png"], "question": "q"},
        {"id": "bytes-img", "image": {"bytes": "AAAA"}, "question": "q"},
        {"id": "fine", "image": "s0.png", "question": "q"},
    ]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = {r.id: r for r in read_input(tmp_path / "l.jsonl", trust=trust)}
    assert got["dict-q"].error == "l.jsonl row 1: question must be text, got dict"
    assert got["list-q"].error == "l.jsonl row 2: question must be text, got list"
    assert got["bool-q"].error == "l.jsonl row 3: question must be text, got bool"
    assert got["list-img"].error == "l.jsonl row 4: image must be a file path (text), got list"
    assert "embedded image bytes are not supported" in got["bytes-img"].error
    assert got["fine"].error is None and got["fine"].question == "q"


# ------------------------------------------------------------------------------------ bad rows among good ones
def _georeferenced_tiff(path, crs_wkt: str | None, dtype: str = "uint8", fill: float | None = None):
    import numpy as np
    import rasterio
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    rng = np.random.default_rng(len(str(path)))
    data = rng.integers(0, 255, (3, 64, 64)).astype(dtype) if fill is None else np.full((1, 64, 64), fill, dtype)
    kw = {"crs": CRS.from_wkt(crs_wkt), "transform": from_origin(1000, 2000, 1, 1)} if crs_wkt else {}
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=data.shape[0], dtype=dtype, **kw) as dst:
        dst.write(data)
    return path


# A CRS that PROJ cannot transform to WGS84 (an engineering CRS): building lon/lat GeoJSON fails.
LOCAL_CRS = 'LOCAL_CS["arbitrary",UNIT["metre",1,AUTHORITY["EPSG","9001"]],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'


@pytest.mark.parametrize("trust", ["local", "untrusted"])
def test_bad_rows_among_good_ones_each_become_one_error_row(tmp_path, tiny_checkpoint, trust, capsys):
    """Issue 18 (done-when): a GeoTIFF whose CRS cannot be transformed, a NUL byte in a path and a
    1e20-constant float raster, among good rows: exit 0, one row per id, the good rows answered.
    The CRS and the NUL path are one error row each; the 1e20 raster is no longer an error at all
    (a constant raster of any magnitude decodes to mid-grey, as 5.0 does) and is answered. The bad
    ones come *first*, so the abort rule must hold them back, not stop the run."""
    pytest.importorskip("rasterio")
    from PIL import Image

    from uhrbat.cli.main import main
    from uhrbat.runfiles import read_jsonl

    root = tmp_path / "imgs"
    root.mkdir()
    _georeferenced_tiff(root / "badcrs.tif", LOCAL_CRS)
    with pytest.warns(Warning):  # rasterio: a raster without a geotransform
        _georeferenced_tiff(root / "big.tif", None, dtype="float32", fill=1e20)
    for name, colour in (("good1.png", (200, 30, 30)), ("good2.png", (30, 200, 30))):
        Image.new("RGB", (64, 48), colour).save(root / name)
    rows = [
        {"id": "badcrs", "image": "badcrs.tif", "question": "Is there a road?"},
        {"id": "nul", "image": "good1\x00.png", "question": "Is there a road?"},
        {"id": "big", "image": "big.tif", "question": "Is there a road?"},
        {"id": "good1", "image": "good1.png", "question": "Is there a road?"},
        {"id": "good2", "image": "good2.png", "question": "Is there a road?"},
    ]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["batch", "--input", str(tmp_path / "l.jsonl"), "--image-root", str(root), "--out", str(out)]
    argv += ["--model", str(tiny_checkpoint), "--budgets", "8,16", "--clusters", "8", "--iters", "3"]
    argv += ["--max-new-tokens", "3", "--geojson-dir", str(tmp_path / "geo"), "--no-progress"]
    argv += ["--untrusted"] if trust == "untrusted" else []
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    got = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")[0]}
    assert sorted(got) == sorted(r["id"] for r in rows)  # one row per id
    assert got["good1"]["error"] is None and got["good2"]["error"] is None
    assert "NUL byte" in got["nul"]["error"] and got["nul"]["answer"] is None
    # the bad-CRS image: the model answers and only its GeoJSON fails (a georeferenced image whose CRS
    # cannot reach WGS84 gets no pixel file in its place): one error row that keeps its answer
    bad = got["badcrs"]["error"]
    assert bad.startswith("GeoJSON: ") and "cannot be written as GeoJSON" in bad
    assert got["badcrs"]["answer"] is not None
    # the 1e20 constant raster decodes to a flat image (io: a constant band maps to mid-grey) and is answered
    assert got["big"]["error"] is None and got["big"]["answer"] is not None
    # PNGs and the raster without a geotransform have no georeference: pixel-space files, never .geojson
    assert sorted(p.name for p in (tmp_path / "geo").iterdir()) == [
        "big.pixels.json",
        "good1.pixels.json",
        "good2.pixels.json",
    ]
    err = capsys.readouterr().err
    for rid in ("badcrs", "nul", "big"):
        if got[rid]["error"]:
            assert f"{rid}: {got[rid]['error']}" in err  # each error row logged as it is written
