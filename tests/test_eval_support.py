"""Shared helpers for the evaluation tests: a deterministic fake pipeline and builders for a
tiny synthetic benchmark in each official format (images generated with Pillow).

The fake answers with whatever the question carries between `[[` and `]]` ("A" otherwise),
so a test decides each answer in the data it writes. It is selected in subprocesses through
the `UHRBAT_PIPELINE_CLASS=test_eval_support:FakePipeline` hook (with `tests/` on PYTHONPATH).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from uhrbat.results import AskResult

_ANS = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)


HOOK = "test_eval_support:FakePipeline"


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Every pipeline the factory loads (in this process and in subprocesses) is a `FakePipeline`;
    no rank environment leaks in. Import it into a test module and mark it autouse there."""
    monkeypatch.setenv("UHRBAT_PIPELINE_CLASS", HOOK)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    FakePipeline.instances.clear()


class FakePipeline:
    instances: list[FakePipeline] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.model = model
        self.kwargs = kwargs
        self.calls: list[tuple[str, int]] = []
        self.asked: list[Any] = []  # the image argument of every question, in order
        self._seen: set[Any] = set()  # a scene cache stand-in: an image seen before is a "hit"
        self.delay = float(os.environ.get("UHRBAT_FAKE_DELAY", "0"))
        FakePipeline.instances.append(self)

    @classmethod
    def from_pretrained(
        cls, model: str, device: str = "cpu", dtype: str | None = None, **selection: Any
    ) -> FakePipeline:
        return cls(model, device=device, dtype=dtype, **selection)

    @staticmethod
    def _size(image: Any) -> tuple[int, int]:
        if isinstance(image, Image.Image) or hasattr(image, "square"):  # PIL image or image source
            return tuple(image.size)
        with Image.open(image) as im:  # a path: must be a readable image
            im.load()
            return im.size

    def _answer(self, image: Any, question: str) -> AskResult:
        size = self._size(image)
        self.asked.append(image)
        if "[[RAISE]]" in question:
            raise RuntimeError("fake model failure")
        m = _ANS.search(question)
        answer = m.group(1) if m else "A"
        if self.delay:
            time.sleep(self.delay)
        key = image if isinstance(image, str) else id(image)
        cache = "hit" if key in self._seen else "miss"
        self._seen.add(key)
        return AskResult(
            answer=answer,
            tokens=[],
            timings={"encode": 0.001 if cache == "miss" else 0.0, "decode": 0.002},
            num_visual_tokens=42,
            image_size=size,
            scales=[672],
            cache=cache,
        )

    def ask(self, image: Any, question: str, max_new_tokens: int = 512, **kw: Any) -> AskResult:
        self.calls.append(("ask", 1))
        return self._answer(image, question)

    def ask_batch(
        self, images: list[Any], questions: list[str], max_new_tokens: int = 512, **kw: Any
    ) -> list[AskResult]:
        self.calls.append(("ask_batch", len(questions)))
        return [self._answer(im, q) for im, q in zip(images, questions)]

    def loglikelihood(self, image: Any, question: str, continuation: str) -> tuple[float, bool]:
        self._size(image)
        m = _ANS.search(question)
        return -float(len(continuation)), (m.group(1) if m else "A") == continuation

    def choice_logprobs(self, image: Any, question: str, choices: list[str]) -> dict[str, float]:
        m = re.search(r"\{\{([A-Z])\}\}", question)
        best = m.group(1) if m else choices[-1]
        return {c: (-0.1 if c == best else -3.0) for c in choices}


# ---------------------------------------------------------------------------------------------
# tiny images and data files
# ---------------------------------------------------------------------------------------------


def png_bytes(color: tuple[int, int, int] = (10, 120, 30), size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color: tuple[int, int, int] = (10, 120, 30), size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size))
    return path


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_xlrs(tmp: Path, answers: list[str] | None = None) -> Path:
    """XLRS-Bench-lite hub parquet: list of HF Image structs, "(A) ..." options, L2/L3 category."""
    answers = answers or ["B", "C", "AC", "D"]
    cats = [
        "Counting/Overall counting",
        "Object properties/Object color",
        "Land use classification/Overall Land use classification",
        "Counting/Overall counting",
    ]
    rows = []
    for i, (ans, cat) in enumerate(zip(answers, cats * 4)):
        n_img = 2 if i == 3 else 1
        rows.append(
            {
                "index": 100 + i,
                "question": f"How many ships? [[{ans}]]",
                "multi-choice options": ["(A) 1", "(B) 2", "(C) 3", "(D) 4"],
                "answer": ans,
                "category": cat,
                "l2-category": "ship",
                "image": [{"bytes": png_bytes((i * 40, 20, 20)), "path": f"img{i}_{k}.png"} for k in range(n_img)],
            }
        )
    return write_parquet(tmp / "xlrs_lite.parquet", rows)


def make_mme(tmp: Path) -> tuple[Path, Path]:
    """MME-RealWorld official JSON with an image folder; one non-RS row that must be filtered out."""
    root = tmp / "mme_images"
    rows = []
    for i, (ans, cat) in enumerate([("A", "color"), ("C", "count"), ("E", "position"), ("B", "count")]):
        write_png(root / "remote_sensing" / f"{i}.png")
        rows.append(
            {
                "Question_id": f"perception/remote_sensing/{cat}/{i:04d}",
                "Question Type": "Multiple Choice",
                "Image": f"remote_sensing/{i}.png",
                "Text": f"What is it? [[{ans}]]",
                "Answer choices": [
                    "(A) red",
                    "(B) blue",
                    "(C) 3",
                    "(D) 4",
                    "(E) The image does not feature the object",
                ],
                "Ground truth": ans,
                "Task": "Perception",
                "Subtask": "Remote Sensing",
                "Category": cat,
            }
        )
    write_png(root / "ad" / "x.png")
    rows.append(
        {
            "Question_id": "perception/autonomous_driving/x/0000",
            "Image": "ad/x.png",
            "Text": "cars?",
            "Answer choices": ["(A) 1", "(B) 2"],
            "Ground truth": "A",
            "Task": "Perception",
            "Subtask": "Autonomous_Driving",
            "Category": "objects",
        }
    )
    data = tmp / "MME_RealWorld.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    return data, root


def make_rshr(tmp: Path) -> Path:
    """XHRBench dataset.json next to images/ (list and dict options, list answer)."""
    d = tmp / "XHRBench"
    rows = []
    specs = [("A", "COL"), ("BD", "OCN"), ("C", "AD"), ("B", "FP")]
    for i, (ans, cat) in enumerate(specs):
        write_png(d / "images" / f"{i}.png")
        opts: Any = ["red", "green", "blue", "white"] if i % 2 == 0 else {"A": "1", "B": "2", "C": "3", "D": "4"}
        rows.append(
            {
                "id": f"rshr-{i}",
                "images": [f"images/{i}.png"],
                "question": f"Q{i}? [[{ans}]]",
                "options": opts,
                "answer": list(ans) if len(ans) > 1 else ans,
                "category": cat,
            }
        )
    (d / "dataset.json").write_text(json.dumps(rows), encoding="utf-8")
    return d


def make_hrbench(tmp: Path) -> Path:
    """HR-Bench TSV with base64 images, two option cycles, FSP ("single") and FCP ("cross")."""
    import csv

    img = b64(png_bytes((200, 10, 10)))
    path = tmp / "hr_bench_4k.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"])
        rows = [
            (0, "What colour? [[B]]", "red", "green", "blue", "white", "B", "single", "cycle_1"),
            (1, "What colour? [[The answer is C. blue]]", "green", "blue", "white", "red", "A", "single", "cycle_2"),
            (2, "Which is left? [[D]]", "car", "bus", "tree", "house", "D", "cross", "cycle_1"),
            (3, "Which is left? [[house]]", "bus", "tree", "house", "car", "C", "cross", "cycle_2"),
        ]
        for r in rows:
            w.writerow([*r, img])
    return path


def make_lrs(tmp: Path) -> tuple[Path, Path]:
    """LRS-VQA JSONL with .tif images under LRS_VQA/image/."""
    root = tmp / "lrs_root"
    rows = []
    specs = [
        ("FAIR_1", "count", "2", "[[two]]"),
        ("FAIR_2", "color", "white", "[[White ]]"),
        ("GLH-Bridge_3", "rural or urban", "rural", "[[urban]]"),
        ("STAR_4", "category", "car", "[[cars]]"),
    ]
    for i, (qid, cat, gt, ans) in enumerate(specs):
        p = root / "LRS_VQA" / "image" / f"{i}.tif"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(p, format="TIFF")
        rows.append(
            {
                "question_id": qid,
                "image": f"LRS_VQA/image/{i}.tif",
                "category": cat,
                "text": f"Question {i}? {ans}\nAnswer the question using a single word or phrase.",
                "ground_truth": gt,
            }
        )
    return write_jsonl(tmp / "LRS_VQA_merged.jsonl", rows), root


def make_mini_wordnet(d: Path, synsets: list[tuple[str, list[str]]] | None = None) -> Path:
    """A tiny WordNet-3.0-format database (nouns only) for the LRS-VQA synonym rule.

    `synsets` is [(gloss, [lemma, ...]), ...]; each becomes one noun synset. The byte offsets in
    `data.noun` are real, as NLTK seeks to them. The other parts of speech are empty files.
    """
    synsets = synsets or [
        ("the number two", ["two", "2", "II"]),
        ("a motor vehicle", ["car", "automobile", "auto"]),
        ("the colour white", ["white", "whiteness"]),
        ("countryside", ["rural_area", "country"]),
    ]
    d.mkdir(parents=True, exist_ok=True)
    header = "  1 This is a generated miniature WordNet-format database for tests.  \n"
    data = header
    index: dict[str, list[int]] = {}
    for gloss, lemmas in synsets:
        offset = len(data.encode("utf-8"))
        words = " ".join(f"{w} 0" for w in lemmas)
        data += f"{offset:08d} 03 n {len(lemmas):02x} {words} 000 | {gloss}  \n"
        for w in lemmas:
            index.setdefault(w.lower(), []).append(offset)
    (d / "data.noun").write_text(data, encoding="utf-8")
    idx = header + "".join(
        f"{w} n {len(offs)} 0 {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
        for w, offs in sorted(index.items())
    )
    (d / "index.noun").write_text(idx, encoding="utf-8")
    for pos in ("verb", "adj", "adv"):
        (d / f"index.{pos}").write_text(header, encoding="utf-8")
        (d / f"data.{pos}").write_text(header, encoding="utf-8")
    (d / "noun.exc").write_text("", encoding="utf-8")
    for pos in ("verb", "adj", "adv"):
        (d / f"{pos}.exc").write_text("", encoding="utf-8")
    return d
