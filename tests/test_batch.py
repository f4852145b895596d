"""`uhrbat batch`: input lists, error rows, resumability (SIGKILL), GeoJSON/Parquet, local vs Ray."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ASSETS
from uhrbat.batch import BatchConfig, images_rows, read_input, row_id, run_batch
from uhrbat.batch.inputs import BatchRow
from uhrbat.errors import BatchInputError
from uhrbat.runfiles import read_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SELECTION = {"budgets": [8, 16], "kmeans_clusters": 8, "kmeans_iters": 3}
GEOTIFF = ASSETS / "aerial" / "neon_osbs_400.tif"


def _png(path: Path, seed: int, size=(300, 220)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """tiles/a.png, tiles/b.png, tiles/sub/c.png, a corrupt and an oversized PNG."""
    root = tmp_path_factory.mktemp("archive")
    for i, name in enumerate(["tiles/a.png", "tiles/b.png", "tiles/sub/c.png"]):
        _png(root / name, i)
    (root / "tiles" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _png(root / "big" / "huge.png", 9, size=(900, 800))
    return root


def _write_list(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = sorted({k for r in rows for k in r})  # from_pylist alone takes the first row's keys
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


# The mixed list the run tests use: 2 scenes with 2 and 1 questions, and 4 bad rows.
MIXED = [
    {"image": "tiles/a.png", "question": "How many ships are in the harbour?"},
    {"image": "tiles/b.png", "question": "Is there a red car in the parking lot?"},
    {"image": "tiles/a.png", "question": "What is the colour of the roof?"},
    {"id": "missing", "image": "tiles/nope.png", "question": "Is there a bridge?"},
    {"id": "corrupt", "image": "tiles/corrupt.png", "question": "Is there a bridge?"},
    {"id": "huge", "image": "big/huge.png", "question": "Is there a bridge?"},
    {"id": "noq", "image": "tiles/a.png", "question": ""},
]


def _cfg(out: Path, model: Path, **kw) -> BatchConfig:
    base = dict(
        out=out,
        model=str(model),
        selection=dict(SELECTION),
        max_new_tokens=4,
        progress=False,
        read_opts={"max_pixels": 500_000},
    )
    base.update(kw)
    return BatchConfig(**base)


# ------------------------------------------------------------------------------------ inputs
def test_list_formats_give_the_same_rows_with_stable_ids_and_relative_paths(archive, tmp_path):
    rows = [
        {"image": "tiles/a.png", "question": "q1"},
        {"id": 7, "image": "tiles/b.png", "question": "q2"},
        {"image": str(archive / "tiles/sub/c.png"), "question": "q3"},
    ]
    lists = tmp_path / "lists"
    lists.mkdir()
    got = [
        read_input(_write_list(lists / f"l{ext}", rows), image_root=archive) for ext in (".jsonl", ".csv", ".parquet")
    ]
    assert got[0] == got[1] == got[2]
    r = got[0]
    assert [x.id for x in r] == [row_id("tiles/a.png", "q1"), "7", row_id(str(archive / "tiles/sub/c.png"), "q3")]
    assert r[0].path == str(archive / "tiles/a.png") and r[2].path == str(archive / "tiles/sub/c.png")
    # Without --image-root, relative paths resolve against the list's own folder.
    _png(tmp_path / "here" / "tiles" / "a.png", 5)
    inside = read_input(_write_list(tmp_path / "here" / "list.jsonl", rows[:1]))
    assert inside[0].path == str(tmp_path / "here" / "tiles" / "a.png")
    assert inside[0].id == r[0].id  # the id is the row's, not the folder's


def test_duplicate_ids_are_refused_up_front_naming_them(tmp_path):
    rows = [
        {"image": "a.png", "question": "q"},
        {"image": "a.png", "question": "q"},
        {"id": "x", "image": "b.png", "question": "q"},
        {"id": "x", "image": "c.png", "question": "q"},
    ]
    with pytest.raises(BatchInputError) as e:
        read_input(_write_list(tmp_path / "l.jsonl", rows))
    msg = str(e.value)
    assert "2 duplicate id(s)" in msg and repr(row_id("a.png", "q")) in msg and "'x' x2" in msg
    assert "\n" not in msg


def test_malformed_lists_are_refused_with_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "question": "q"}\nnot json\n')
    with pytest.raises(BatchInputError, match=r"bad.jsonl:2: not a JSON object"):
        read_input(tmp_path / "bad.jsonl")
    _write_list(tmp_path / "nocol.csv", [{"img": "a.png", "question": "q"}])
    with pytest.raises(BatchInputError, match="missing column.*image"):
        read_input(tmp_path / "nocol.csv")
    with pytest.raises(BatchInputError, match="unknown list format"):
        read_input(_write_list(tmp_path / "l.jsonl", [{"image": "a", "question": "q"}]).rename(tmp_path / "l.txt"))


def test_untrusted_lists_stay_inside_the_image_root(archive, tmp_path):
    rows = [
        {"id": "ok", "image": "tiles/a.png", "question": "q"},
        {"id": "up", "image": "../etc/passwd", "question": "q"},
        {"id": "abs", "image": str(archive / "tiles/a.png"), "question": "q"},
        {"id": "vrt", "image": "tiles/x.vrt", "question": "q"},
        {"id": "url", "image": "https://example.com/a.png", "question": "q"},
    ]
    lst = _write_list(tmp_path / "l.jsonl", rows)
    got = {r.id: r for r in read_input(lst, image_root=archive, trust="untrusted")}
    assert got["ok"].error is None and got["ok"].path == os.path.realpath(archive / "tiles/a.png")
    assert "outside the image root" in got["up"].error
    assert "absolute path" in got["abs"].error
    assert "VRT" in got["vrt"].error
    assert "URL" in got["url"].error
    # The same list, trusted: the absolute path is allowed.
    assert {r.id: r for r in read_input(lst, image_root=archive)}["abs"].error is None


def test_images_folder_and_glob(archive, monkeypatch):
    rows = images_rows(archive / "tiles", "Is there a bridge?")
    assert [r.image for r in rows] == ["a.png", "b.png", "corrupt.png", "sub/c.png"]
    assert rows[0].id == row_id("a.png", "Is there a bridge?")
    monkeypatch.chdir(archive)
    assert [r.image for r in images_rows("tiles/**/*.png", "q")] == [
        "tiles/a.png",
        "tiles/b.png",
        "tiles/corrupt.png",
        "tiles/sub/c.png",
    ]
    with pytest.raises(BatchInputError, match="no image files found"):
        images_rows("nothing/*.png", "q")


# ------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def local_run(archive, tiny_checkpoint, tmp_path_factory):
    """One local run over MIXED (with GeoJSON + Parquet); returns (out dir, rows by id, summary)."""
    out = tmp_path_factory.mktemp("local")
    rows = read_input(_write_list(out.parent / "mixed.jsonl", MIXED), image_root=archive)
    summary = run_batch(rows, _cfg(out, tiny_checkpoint, geojson_dir=out / "geo", parquet=True))
    got, torn = read_jsonl(out / "predictions.jsonl")
    assert torn == 0
    return out, rows, {r["id"]: r for r in got}, summary, len(got)


def test_local_run_writes_one_row_per_id_with_error_rows(local_run):
    _, rows, got, summary, n_lines = local_run
    assert n_lines == len(rows) == len(got)
    assert set(got) == {r.id for r in rows}
    errors = {k: v["error"] for k, v in got.items() if v["error"]}
    assert set(errors) == {"missing", "corrupt", "huge", "noq"}
    assert "not found" in errors["missing"] or "No such file" in errors["missing"]
    assert "pixel" in errors["huge"]
    assert "no question" in errors["noq"]
    for r in rows[:3]:
        g = got[r.id]
        assert isinstance(g["answer"], str) and g["error"] is None and g["num_visual_tokens"] > 0
        assert g["image"] == r.image and g["question"] == r.question and g["timings"]
    assert summary.rows == 7 and summary.written == 7 and summary.errors == 4
    assert summary.scenes_prepared == 2  # a.png once for its two questions, b.png once


def test_geojson_and_parquet_outputs(local_run):
    import pyarrow.parquet as pq

    out, rows, got, _, _ = local_run
    ok = [r.id for r in rows[:3]]
    files = sorted(p.name for p in (out / "geo").iterdir())
    assert files == sorted(f"{i}.pixels.json" for i in ok)  # PNG rows: the pixel-space file, never .geojson
    fc = json.loads((out / "geo" / f"{ok[0]}.pixels.json").read_text())
    assert fc["format"] == "uhrbat.pixel-boxes/1" and "type" not in fc and fc["answer"] == got[ok[0]]["answer"]
    assert len(fc["tokens"]) == got[ok[0]]["num_visual_tokens"] - fc["tokens_in_padding_dropped"]
    table = pq.read_table(out / "predictions.parquet").to_pylist()
    assert [t["id"] for t in table] == [r.id for r in rows]
    assert [t["answer"] for t in table] == [got[r.id]["answer"] for r in rows]
    assert table[0]["timing_encode"] == got[ok[0]]["timings"]["encode"]


def test_rerun_resumes_without_duplicates_and_refuses_other_settings(local_run, tiny_checkpoint):
    from uhrbat.errors import ConfigError

    out, rows, _, _, _ = local_run
    again = run_batch(rows, _cfg(out, tiny_checkpoint, geojson_dir=out / "geo", parquet=True))
    assert again.written == 0 and again.already_done == 7 and again.errors == 4
    assert len(read_jsonl(out / "predictions.jsonl")[0]) == 7
    with pytest.raises(ConfigError, match="different settings \\(max_new_tokens"):
        run_batch(rows, _cfg(out, tiny_checkpoint, max_new_tokens=5))


def test_batch_size_batches_one_question_scenes_with_the_same_answers(archive, tiny_checkpoint, local_run, tmp_path):
    """--batch-size 2: one-question scenes go through one left-padded ask_batch; answers unchanged."""
    _, rows, local, _, _ = local_run
    two = [rows[1], BatchRow(id="a0", image="tiles/a.png", question=rows[0].question, path=rows[0].path)]
    summary = run_batch(two, _cfg(tmp_path / "out", tiny_checkpoint, batch_size=2))
    got = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")[0]}
    assert summary.written == 2 and summary.scenes_prepared == 2
    assert got[rows[1].id]["answer"] == local[rows[1].id]["answer"]
    assert got["a0"]["answer"] == local[rows[0].id]["answer"]
    assert got["a0"]["seconds"] == got[rows[1].id]["seconds"]  # one call, shared equally (not one by one)


def test_georeferenced_rows_get_map_coordinates(tiny_checkpoint, tmp_path):
    pytest.importorskip("rasterio")
    rows = [BatchRow(id="geo", image=GEOTIFF.name, question="How many trees are there?", path=str(GEOTIFF))]
    run_batch(rows, _cfg(tmp_path / "out", tiny_checkpoint, geojson_dir=tmp_path / "geo", read_opts={}))
    fc = json.loads((tmp_path / "geo" / "geo.geojson").read_text())
    assert fc["coordinate_space"] == "wgs84"
    lon, lat = fc["features"][0]["geometry"]["coordinates"][0][0][:2]
    assert -180 <= lon <= 180 and -90 <= lat <= 90 and abs(lon) > 1  # lon/lat, not pixels


def test_untrusted_run_reads_images_with_the_untrusted_reader(archive, tiny_checkpoint, tmp_path):
    """--untrusted: a BMP (fine for the local reader) is refused by the untrusted one -> an error row."""
    Image.open(archive / "tiles" / "a.png").save(tmp_path / "a.bmp")
    (tmp_path / "tiles").mkdir()
    (tmp_path / "tiles" / "a.png").write_bytes((archive / "tiles" / "a.png").read_bytes())
    (tmp_path / "tiles" / "link.png").symlink_to(archive / "tiles" / "b.png")  # a symlink out of the root
    lst = _write_list(
        tmp_path / "l.jsonl",
        [
            {"id": "png", "image": "tiles/a.png", "question": "Is there a bridge?"},
            {"id": "bmp", "image": "a.bmp", "question": "Is there a bridge?"},
            {"id": "esc", "image": "../x.png", "question": "Is there a bridge?"},
            {"id": "link", "image": "tiles/link.png", "question": "Is there a bridge?"},
        ],
    )
    rows = read_input(lst, trust="untrusted")
    summary = run_batch(rows, _cfg(tmp_path / "out", tiny_checkpoint, trust="untrusted"))
    got = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")[0]}
    assert summary.written == 4 and summary.errors == 3
    assert got["png"]["error"] is None and got["png"]["answer"] is not None
    assert "untrusted" in got["bmp"]["error"]
    assert "outside the image root" in got["esc"]["error"] and "outside the image root" in got["link"]["error"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "uhrbat.cli.main", "batch", *args]


def test_sigkill_mid_run_then_rerun_gives_one_row_per_id(archive, tiny_checkpoint, local_run, tmp_path, capfd):
    """Kill the CLI with SIGKILL while it writes, rerun the same command: every id exactly once,
    answers equal to an uninterrupted run."""
    # 12 scenes x 1 question: copies of a.png / b.png under distinct names, same answers per content.
    imgs = tmp_path / "imgs"
    for i in range(12):
        _png(imgs / f"t{i:02d}.png", i % 2)
    out = tmp_path / "out"
    q = MIXED[0]["question"]
    cmd = _cli(
        "--images",
        str(imgs),
        "--question",
        q,
        "--out",
        str(out),
        "--model",
        str(tiny_checkpoint),
        "--budgets",
        "8,16",
        "--clusters",
        "8",
        "--iters",
        "3",
        "--max-new-tokens",
        "4",
        "--no-progress",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pred = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_jsonl(pred)[0])
    assert 2 <= n_before < 12
    from uhrbat.cli.main import main

    try:
        main(cmd[3:])  # the same command again, in this process (saves an interpreter start)
    except SystemExit as e:  # click's standalone mode exits 0 on success
        assert e.code in (0, None)
    assert f"{n_before} already done" in capfd.readouterr().err
    rows, torn = read_jsonl(pred)
    assert torn == 0 and len(rows) == 12 and len({r["id"] for r in rows}) == 12
    answers = {r["image"]: r["answer"] for r in rows}
    _, _, local, _, _ = local_run
    ref = {0: local[row_id("tiles/a.png", q)]["answer"]}
    assert all(answers[f"t{i:02d}.png"] == ref[0] for i in range(0, 12, 2))
    assert len({answers[f"t{i:02d}.png"] for i in range(1, 12, 2)}) == 1


def test_cli_refuses_ambiguous_inputs(tmp_path, capsys):
    from uhrbat.cli.main import main

    for args, msg in (
        [["--images", str(tmp_path)], "--images needs --question"],
        [
            ["--images", str(tmp_path), "--question", "q", "--input", str(tmp_path / "l.jsonl")],
            "exactly one of --input FILE or --images",
        ],
    ):
        with pytest.raises(SystemExit) as e:
            main(["batch", "--out", str(tmp_path / "o"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything is written


# ------------------------------------------------------------------------------------ Ray
def test_ray_gives_the_same_answers_as_local_and_resumes(archive, tiny_checkpoint, local_run, tmp_path):
    """A local Ray (2 CPUs, 2 actors) continues a run that the local engine started, writing only the
    rows still missing, with the same answers the local engine gave."""
    pytest.importorskip("ray")
    _, rows, local, _, _ = local_run
    out = tmp_path / "ray"
    first = run_batch(rows[:1], _cfg(out, tiny_checkpoint))  # one row done locally
    assert first.written == 1
    summary = run_batch(rows, _cfg(out, tiny_checkpoint, engine="ray", actors=2, ray_local_cpus=2))
    assert summary.already_done == 1 and summary.written == 6 and summary.errors == 4
    got, torn = read_jsonl(out / "predictions.jsonl")
    assert torn == 0 and len(got) == 7
    for g in got:
        assert g["answer"] == local[g["id"]]["answer"], g["id"]
        assert (g["error"] is None) == (local[g["id"]]["error"] is None)


# ------------------------------------------------------------------------------------ retry, outputs
def test_cli_retry_errors_and_the_last_line_names_every_file(tmp_path, capsys, monkeypatch):
    """Issue 23.2/23.7: `--retry-errors` answers error rows again (one row per id after it), and
    the last line names every file the run wrote, the Parquet file and the GeoJSON included."""
    pytest.importorskip("pyarrow")
    from uhrbat.cli.main import main

    monkeypatch.setenv("UHRBAT_PIPELINE_CLASS", "test_eval_support:FakePipeline")
    _png(tmp_path / "a.png", 0, size=(40, 30))
    lst = _write_list(
        tmp_path / "l.jsonl",
        [{"id": "a", "image": "a.png", "question": "q?"}, {"id": "b", "image": "b.png", "question": "q?"}],
    )
    out = tmp_path / "out"
    argv = ["batch", "--input", str(lst), "--out", str(out), "--model", "m", "--no-progress"]

    def run(*more: str) -> list[str]:
        capsys.readouterr()
        try:
            main([*argv, *more])
        except SystemExit as e:
            assert e.code in (0, None)
        return capsys.readouterr().err.strip().splitlines()

    err = run("--parquet", "--geojson-dir", str(out / "geo"))
    assert err[-2].startswith("2 rows (0 already done, 2 written now), 1 errors")
    assert err[-1] == (
        f"wrote {out / 'predictions.jsonl'}, {out / 'run.json'}, {out / 'predictions.parquet'}, "
        f"{out / 'summary.json'} and 1 kept-token files (.geojson or .pixels.json) in {out / 'geo'}"
    )
    assert any(line.startswith("b: ") and "b.png" in line for line in err)  # the error row, logged
    assert run("--parquet", "--geojson-dir", str(out / "geo"))[-2].startswith("2 rows (2 already done, 0 written")
    _png(tmp_path / "b.png", 1, size=(40, 30))  # fixed: retry the error row
    err = run("--parquet", "--geojson-dir", str(out / "geo"), "--retry-errors")
    assert err[-2].startswith("2 rows (1 already done, 1 written now, 1 error rows retried), 0 errors")
    rows, bad = read_jsonl(out / "predictions.jsonl")
    assert bad == 0 and [r["id"] for r in rows] == ["a", "b"] and rows[1]["error"] is None  # compacted
    import pyarrow.parquet as pq

    assert [r["error"] for r in pq.read_table(out / "predictions.parquet").to_pylist()] == [None, None]
    assert sorted(p.name for p in (out / "geo").iterdir()) == [
        "a.pixels.json",
        "b.pixels.json",
    ]  # PNGs: no georeference
