"""Loaders for every official format, image resolution, bad inputs, and the prompts."""

from __future__ import annotations

import json

import pytest

from test_eval_support import (
    b64,
    make_hrbench,
    make_lrs,
    make_mme,
    make_rshr,
    make_xlrs,
    png_bytes,
    write_jsonl,
    write_png,
)
from uhrbat.errors import BenchmarkDataError, ImageLoadError
from uhrbat.evaluation import prompts
from uhrbat.evaluation.benchmarks import get_spec, load_benchmark
from uhrbat.evaluation.loaders import parse_options


def test_xlrs_parquet(tmp_path):
    samples = load_benchmark("xlrs", make_xlrs(tmp_path))
    assert [s.id for s in samples] == ["100", "101", "102", "103"]
    s = samples[0]
    assert s.ok and s.answer == "B" and s.category == "Counting/Overall counting" and s.subcategory == "ship"
    assert s.options == {"A": "1", "B": "2", "C": "3", "D": "4"} and s.option_lines[0] == "(A) 1"
    assert s.images[0].data is not None and s.images[0].open().size == (24, 16)
    assert len(samples[3].images) == 2  # a change-detection style item with two images
    assert samples[2].answer == "AC"


def test_mme_official_json_filtered_to_remote_sensing(tmp_path):
    data, root = make_mme(tmp_path)
    samples = load_benchmark("mme-realworld-rs", data, root)
    assert len(samples) == 4  # the Autonomous_Driving row is dropped
    s = samples[0]
    assert s.id == "perception/remote_sensing/color/0000" and s.answer == "A" and s.category == "color"
    assert s.extra["task"] == "Perception" and s.images[0].path.endswith("remote_sensing/0.png")
    assert s.option_lines[4].startswith("(E)")


def test_mme_lmms_eval_variant(tmp_path):
    rows = [
        {
            "index": "rs-1",
            "question": "Colour?",
            "multi-choice options": ["(A) red", "(B) blue"],
            "answer": "B",
            "category": "Perception/Remote Sensing",
            "l2-category": "color",
            "bytes": b64(png_bytes()),
        },
        {
            "index": "od-1",
            "question": "Q",
            "multi-choice options": ["(A) x"],
            "answer": "A",
            "category": "Perception/Monitoring",
            "l2-category": "count",
            "bytes": b64(png_bytes()),
        },
    ]
    samples = load_benchmark("mme-realworld-rs", write_jsonl(tmp_path / "mme_lmms.jsonl", rows))
    assert [s.id for s in samples] == ["rs-1"]
    assert samples[0].category == "color" and samples[0].extra["task"] == "Perception"
    assert samples[0].images[0].data is not None


def test_mme_without_remote_sensing_rows_is_an_error(tmp_path):
    rows = [
        {
            "Question_id": "x",
            "Image": "a.png",
            "Text": "t",
            "Answer choices": ["(A) 1"],
            "Ground truth": "A",
            "Task": "Perception",
            "Subtask": "Monitoring",
            "Category": "c",
        }
    ]
    p = tmp_path / "mme.json"
    p.write_text(json.dumps(rows))
    with pytest.raises(BenchmarkDataError, match="no Remote Sensing rows"):
        load_benchmark("mme-realworld-rs", p)


def test_rshr_dataset_folder(tmp_path):
    samples = load_benchmark("rshr", make_rshr(tmp_path))  # a folder holding dataset.json
    assert [s.id for s in samples] == ["rshr-0", "rshr-1", "rshr-2", "rshr-3"]
    assert samples[0].options == {"A": "red", "B": "green", "C": "blue", "D": "white"}  # list -> A, B, ...
    assert samples[1].options == {"A": "1", "B": "2", "C": "3", "D": "4"}  # dict sorted by key
    assert samples[1].answer == "BD"  # list answer joined


def test_hrbench_tsv_base64(tmp_path):
    samples = load_benchmark("hrbench-4k", make_hrbench(tmp_path))
    assert len(samples) == 4 and all(s.ok for s in samples)
    assert samples[0].options == {"A": "red", "B": "green", "C": "blue", "D": "white"}
    assert samples[0].extra["cycle_category"] == "cycle_1" and samples[2].category == "cross"
    # every option cycle repeats the image: one shared buffer
    assert samples[0].images[0].data is samples[1].images[0].data


def test_hrbench_parquet_with_missing_option(tmp_path):
    from test_eval_support import write_parquet

    rows = [
        {
            "index": 7,
            "question": "q",
            "A": "x",
            "B": "y",
            "C": None,
            "D": None,
            "answer": "A",
            "category": "single",
            "cycle_category": "c1",
            "image": b64(png_bytes()),
        }
    ]
    samples = load_benchmark("hrbench-8k", write_parquet(tmp_path / "hr.parquet", rows))
    assert samples[0].options == {"A": "x", "B": "y"}  # NaN/None options dropped, as lmms-eval does


def test_hrbench_hub_folder_keeps_the_requested_split(tmp_path):
    from test_eval_support import write_parquet

    d = tmp_path / "hrbench_version_split"
    d.mkdir()
    for split, n in (("4k", 2), ("8k", 3)):
        rows = [
            {
                "index": i,
                "question": "q",
                "A": "x",
                "B": "y",
                "answer": "A",
                "category": "single",
                "cycle_category": "c1",
                "image": b64(png_bytes()),
            }
            for i in range(n)
        ]
        write_parquet(d / f"hrbench_{split}-00000-of-00001.parquet", rows)
    assert len(load_benchmark("hrbench-4k", tmp_path)) == 2
    assert len(load_benchmark("hrbench-8k", d)) == 3


def test_lrs_jsonl_tif_images(tmp_path):
    data, root = make_lrs(tmp_path)
    samples = load_benchmark("lrs-vqa", data, root)
    assert [s.id for s in samples] == ["FAIR_1", "FAIR_2", "GLH-Bridge_3", "STAR_4"]
    assert samples[0].question.endswith("Answer the question using a single word or phrase.")
    assert samples[0].images[0].open().size == (20, 20)


def test_llava_conversation_rows(tmp_path):
    write_png(tmp_path / "imgs" / "a.png")
    rows = [
        {
            "id": "c1",
            "image": "imgs/a.png",
            "category": "Counting/Overall counting",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many?\nA. 1\nB. 2\nAnswer with the option letter only."},
                {"from": "gpt", "value": "B"},
            ],
        }
    ]
    p = tmp_path / "xlrs_lite_relative.json"
    p.write_text(json.dumps(rows))
    (s,) = load_benchmark("xlrs", p)
    assert s.ok and s.source_format == "llava" and s.answer == "B"
    assert s.question.startswith("How many?") and s.options == {"A": "1", "B": "2"}
    assert prompts.build_prompt(get_spec("xlrs"), s, "official") == s.question


def test_bad_rows_become_error_rows(tmp_path):
    root = tmp_path / "root"
    write_png(root / "ok.png")
    outside = write_png(tmp_path / "outside.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    rows = [
        {"id": "ok", "images": ["ok.png"], "question": "q", "options": ["a", "b"], "answer": "A", "category": "COL"},
        {"id": "no-answer", "images": ["ok.png"], "question": "q", "options": ["a", "b"], "category": "COL"},
        {"id": "escape", "images": ["../outside.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "absolute", "images": [str(outside)], "question": "q", "options": ["a", "b"], "answer": "B"},
        {"id": "missing", "images": ["nope.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "broken", "images": ["broken.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "ok", "images": ["ok.png"], "question": "dup", "options": ["a"], "answer": "A"},
        {"images": ["ok.png"], "question": "no id", "options": ["a"], "answer": "A"},
    ]
    data = tmp_path / "dataset.json"
    data.write_text(json.dumps(rows))
    samples = load_benchmark("rshr", data, root)
    by_id = {s.id: s for s in samples}
    assert len(samples) == len(rows)  # nothing lost
    assert by_id["ok"].ok
    assert "missing answer" in by_id["no-answer"].error and by_id["no-answer"].error.startswith("row 1:")
    assert "escapes the image root" in by_id["escape"].error
    assert "outside the image root" in by_id["absolute"].error  # issue 8 item 6: refused unless allowed
    assert by_id["absolute"].error_kind == "image" and by_id["no-answer"].error_kind == "data"
    assert "image not found" in by_id["missing"].error
    assert by_id["broken"].ok  # only unreadable at decode time -> error row in the runner
    with pytest.raises(ImageLoadError):
        by_id["broken"].images[0].check()
    assert "duplicate id" in by_id["ok#dup1"].error
    assert by_id["row-7"].error.startswith("row 7: missing id")


def test_images_outside_the_root_are_refused_after_resolving_symlinks(tmp_path):
    root = tmp_path / "root"
    write_png(root / "ok.png")
    secret = write_png(tmp_path / "secret" / "s.png")
    (root / "link.png").symlink_to(secret)  # a symlink inside the root pointing out of it
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(tmp_path / "secret", target_is_directory=True)
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)  # the root itself may be a symlink
    rows = [
        {"id": "ok", "images": ["ok.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "abs-in", "images": [str(root / "ok.png")], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "abs-out", "images": [str(secret)], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "link", "images": ["link.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "dirlink", "images": ["sub/up/s.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
        {"id": "dotdot", "images": ["../secret/s.png"], "question": "q", "options": ["a", "b"], "answer": "A"},
    ]
    data = tmp_path / "dataset.json"
    data.write_text(json.dumps(rows))
    by_id = {s.id: s for s in load_benchmark("rshr", data, tmp_path / "alias")}
    assert by_id["ok"].ok and by_id["abs-in"].ok
    assert by_id["ok"].images[0].path == str((root / "ok.png").resolve())  # the real file is what gets read
    for sid in ("abs-out", "link", "dirlink", "dotdot"):
        err = by_id[sid].error
        assert err and ("outside the image root" in err or "escapes the image root" in err), (sid, err)
        assert "--allow-outside-images" in err and by_id[sid].error_kind == "image"
    allowed = {s.id: s for s in load_benchmark("rshr", data, tmp_path / "alias", allow_outside_images=True)}
    assert all(s.ok for s in allowed.values())
    assert allowed["link"].images[0].path == str(secret.resolve())


def test_invalid_jsonl_line_is_an_error_row(tmp_path):
    data, root = make_lrs(tmp_path)
    text = data.read_text().splitlines()
    data.write_text("\n".join([text[0], "{not json", *text[1:]]) + "\n")
    samples = load_benchmark("lrs-vqa", data, root)
    assert len(samples) == 5
    assert samples[1].error == "row 1: line 2 is not valid JSON (Expecting property name enclosed in double quotes)"


@pytest.mark.parametrize(
    "name,make,msg",
    [
        ("xlrs", lambda p: p / "missing.parquet", "benchmark data not found"),
        ("nope", lambda p: p / "x.json", "unknown benchmark 'nope'"),
        ("xlrs", lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "unsupported benchmark file type"),
        ("lrs-vqa", lambda p: (p / "e.jsonl").write_text("\n") and p / "e.jsonl", "no rows"),
        ("rshr", lambda p: (p / "d.json").write_text("{bad") and p / "d.json", "not valid JSON"),
        ("rshr", lambda p: (p / "d.json").write_text('{"a": 1}') and p / "d.json", "expected a JSON list"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, name, make, msg):
    with pytest.raises(BenchmarkDataError, match=msg):
        load_benchmark(name, make(tmp_path))


def test_images_root_must_exist(tmp_path):
    data, _ = make_lrs(tmp_path)
    with pytest.raises(BenchmarkDataError, match="image root is not a directory"):
        load_benchmark("lrs-vqa", data, tmp_path / "nowhere")


def test_parse_options_forms():
    assert parse_options(["(A) x", "(B) y"]) == ({"A": "x", "B": "y"}, ["(A) x", "(B) y"])
    assert parse_options(["A. x", "B: y"])[0] == {"A": "x", "B": "y"}
    assert parse_options(["x", "y"])[0] == {"A": "x", "B": "y"}
    assert parse_options({"b": "y", "a": "x"})[0] == {"A": "x", "B": "y"}
    assert parse_options("(A) x\n(B) y")[0] == {"A": "x", "B": "y"}


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------


def test_official_prompts_exact(tmp_path):
    x = load_benchmark("xlrs", make_xlrs(tmp_path))
    assert prompts.build_prompt(get_spec("xlrs"), x[0]) == (
        "How many ships? [[B]]The choices are listed below:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n\nSelect the best answer for "
        "the multiple-choice question based on the image. Only respond with the letter corresponding to the correct "
        "answer (A, B, C, D).\nThe answer is:"
    )
    assert "There may be more than one correct option" in prompts.build_prompt(
        get_spec("xlrs"), x[2]
    )  # Overall land use
    data, root = make_mme(tmp_path)
    m = load_benchmark("mme-realworld-rs", data, root)[0]
    assert prompts.build_prompt(get_spec("mme-realworld-rs"), m) == (
        "What is it? [[A]] The choices are listed below: \n(A) red\n(B) blue\n(C) 3\n(D) 4\n"
        "(E) The image does not feature the object\nSelect the best answer to the above multiple-choice question based "
        "on the image. Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:"
    )
    assert prompts.build_prompt(get_spec("mme-realworld-rs"), m, "reference") == (
        "What is it? [[A]]\nOptions:\nA. red\nB. blue\nC. 3\nD. 4\nE. The image does not feature the object\n"
        "Please reply with the letter of the correct option (e.g., A/B/C/D/E)."
    )
    h = load_benchmark("hrbench-4k", make_hrbench(tmp_path))[0]
    assert prompts.build_prompt(get_spec("hrbench-4k"), h) == (
        "What colour? [[B]]\nA. red\nB. green\nC. blue\nD. white\nAnswer the option letter directly."
    )
    data, root = make_lrs(tmp_path)
    lq = load_benchmark("lrs-vqa", data, root)[0]
    assert prompts.build_prompt(get_spec("lrs-vqa"), lq) == lq.question


def test_reference_prompt_leaks_answer_cardinality_only_when_asked(tmp_path):
    r = load_benchmark("rshr", make_rshr(tmp_path))[1]  # answer "BD"
    official = prompts.build_prompt(get_spec("rshr"), r, "official")
    reference = prompts.build_prompt(get_spec("rshr"), r, "reference")
    assert official.endswith("Select the best answer based on the image. Answer with the option letter only.")
    assert "You should choose multiple answers." not in official
    assert "Select the best answer based on the image. You should choose multiple answers. Answer with" in reference
    with pytest.raises(BenchmarkDataError):
        prompts.build_prompt(get_spec("rshr"), r, "fancy")
