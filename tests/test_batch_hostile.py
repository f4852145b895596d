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
