"""Write a tiny sample of every benchmark format `uhrbat eval` reads (a few rows, small images).

    python examples/make_eval_samples.py [OUT_DIR]      # default: examples/eval (what is committed)

Each folder holds rows in the benchmark's official distribution format, with generated aerial-like
scenes (grass, a road, red-roofed buildings, a pond) whose questions have true answers:

    xlrs/xlrs_lite.parquet                  XLRS-Bench-lite hub parquet (images embedded)
    mme-realworld-rs/MME_RealWorld.json     MME-RealWorld official JSON + remote_sensing/*.png
    rshr/dataset.json                       RSHR-Bench / XHRBench dataset.json + images/*.png
    hrbench/hr_bench_4k.tsv                 HR-Bench TSV (base64 images, two option cycles)
    lrs-vqa/LRS_VQA_merged.jsonl            LRS-VQA JSONL + LRS_VQA/image/*.tif

The output is deterministic (same rows, same pixels); `tests/test_eval_samples.py` checks that the
committed files are what this script writes, and that `uhrbat eval` runs on each of them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# (buildings, pond colour, has road) per scene
SCENES = {
    "harbour": (3, (40, 90, 200), True),
    "farm": (1, (40, 90, 200), False),
    "village": (4, (40, 90, 200), True),
    "village-later": (2, (40, 90, 200), True),  # the village after two buildings were removed
}


def scene(name: str, size: tuple[int, int] = (128, 96)) -> Image.Image:
    """A small aerial-like scene: grass, an optional grey road, `n` red-roofed buildings, a pond."""
    n, pond, road = SCENES[name]
    w, h = size
    im = Image.new("RGB", size, (70, 140, 60))
    d = ImageDraw.Draw(im)
    if road:
        d.rectangle([0, h // 2 - 5, w - 1, h // 2 + 5], fill=(128, 128, 128))
    for i in range(n):
        x = 8 + i * 28
        d.rectangle([x, 10, x + 16, 26], fill=(190, 40, 35))
    d.ellipse([w - 40, h - 32, w - 8, h - 8], fill=pond)
    return im


def png(name: str) -> bytes:
    buf = io.BytesIO()
    scene(name).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _count_options() -> list[str]:
    return ["(A) 1", "(B) 2", "(C) 3", "(D) 4"]


def _letter(n: int) -> str:
    return "ABCD"[n - 1]


def write_xlrs(out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def img(name: str) -> dict[str, Any]:
        return {"bytes": png(name), "path": f"{name}.png"}

    rows = [
        {
            "index": 1,
            "question": "How many buildings with red roofs are in the image?",
            "multi-choice options": _count_options(),
            "answer": _letter(SCENES["harbour"][0]),
            "category": "Counting/Overall counting",
            "l2-category": "building",
            "image": [img("harbour")],
        },
        {
            "index": 2,
            "question": "What is the colour of the pond?",
            "multi-choice options": ["(A) red", "(B) blue", "(C) yellow", "(D) white"],
            "answer": "B",
            "category": "Object properties/Object color",
            "l2-category": "water",
            "image": [img("harbour")],
        },
        {
            "index": 3,
            "question": "Which land uses appear in the image?",
            "multi-choice options": ["(A) farmland", "(B) industrial", "(C) water", "(D) airport"],
            "answer": "AC",
            "category": "Land use classification/Overall Land use classification",
            "l2-category": "land use",
            "image": [img("farm")],
        },
        {
            "index": 4,
            "question": "How many buildings were removed between the two images?",
            "multi-choice options": _count_options(),
            "answer": _letter(SCENES["village"][0] - SCENES["village-later"][0]),
            "category": "Counting/Counting with changing detection",
            "l2-category": "building",
            "image": [img("village"), img("village-later")],  # two images: pasted side by side
        },
    ]
    (out / "xlrs").mkdir(parents=True, exist_ok=True)
    path = out / "xlrs" / "xlrs_lite.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, compression="zstd")
    return path


def write_mme(out: Path) -> Path:
    d = out / "mme-realworld-rs"
    choices = ["(A) red", "(B) blue", "(C) green", "(D) white", "(E) The image does not feature the object"]
    rows = []
    specs = [
        ("color", "harbour", "What colour are the building roofs?", choices, "A"),
        ("count", "village", "How many buildings are there?", ["(A) 2", "(B) 3", "(C) 4", "(D) 5", choices[4]], "C"),
        (
            "position",
            "farm",
            "Where is the pond in the image?",
            ["(A) top left", "(B) top right", "(C) bottom left", "(D) bottom right", choices[4]],
            "D",
        ),
    ]
    for i, (cat, name, text, opts, gt) in enumerate(specs):
        (d / "remote_sensing").mkdir(parents=True, exist_ok=True)
        (d / "remote_sensing" / f"{name}.png").write_bytes(png(name))
        rows.append(
            {
                "Question_id": f"perception/remote_sensing/{cat}/{i:04d}",
                "Image": f"remote_sensing/{name}.png",
                "Text": text,
                "Answer choices": opts,
                "Ground truth": gt,
                "Task": "Perception",
                "Subtask": "Remote Sensing",
                "Category": cat,
            }
        )
    rows.append(  # another subtask: `--benchmark mme-realworld-rs` leaves it out
        {
            "Question_id": "perception/autonomous_driving/objects/0000",
            "Image": "remote_sensing/harbour.png",
            "Text": "How many cars are on the road?",
            "Answer choices": ["(A) 0", "(B) 1", "(C) 2", "(D) 3", choices[4]],
            "Ground truth": "A",
            "Task": "Perception",
            "Subtask": "Autonomous_Driving",
            "Category": "objects",
        }
    )
    path = d / "MME_RealWorld.json"
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


def write_rshr(out: Path) -> Path:
    d = out / "rshr"
    (d / "images").mkdir(parents=True, exist_ok=True)
    for name in ("harbour", "farm"):
        (d / "images" / f"{name}.png").write_bytes(png(name))
    rows = [
        {
            "id": "rshr-0",
            "images": ["images/harbour.png"],
            "question": "What colour is the water body?",
            "options": ["red", "blue", "green", "white"],
            "answer": "B",
            "category": "COL",
        },
        {
            "id": "rshr-1",
            "images": ["images/harbour.png"],
            "question": "How many buildings are there?",
            "options": {"A": "1", "B": "2", "C": "3", "D": "4"},
            "answer": "C",
            "category": "OCN",
        },
        {
            "id": "rshr-2",
            "images": ["images/farm.png"],
            "question": "Which of these are in the image? Choose all that apply.",
            "options": ["a pond", "a road", "a building", "a ship"],
            "answer": ["A", "C"],
            "category": "OC",
        },
    ]
    path = d / "dataset.json"
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


def write_hrbench(out: Path) -> Path:
    d = out / "hrbench"
    d.mkdir(parents=True, exist_ok=True)
    img = {name: base64.b64encode(png(name)).decode() for name in ("harbour", "village")}
    rows = [  # index, question, A, B, C, D, answer, category, cycle_category, image
        (0, "What colour are the roofs?", "red", "blue", "green", "white", "A", "single", "cycle_1", "harbour"),
        (1, "What colour are the roofs?", "blue", "green", "white", "red", "D", "single", "cycle_2", "harbour"),
        (
            2,
            "What lies between the buildings and the pond?",
            "a road",
            "a river",
            "a bridge",
            "nothing",
            "A",
            "cross",
            "cycle_1",
            "village",
        ),
        (
            3,
            "What lies between the buildings and the pond?",
            "a river",
            "a bridge",
            "nothing",
            "a road",
            "D",
            "cross",
            "cycle_2",
            "village",
        ),
    ]
    path = d / "hr_bench_4k.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"])
        for *fields, name in rows:
            w.writerow([*fields, img[name]])
    return path


def write_lrs(out: Path) -> Path:
    d = out / "lrs-vqa"
    (d / "LRS_VQA" / "image").mkdir(parents=True, exist_ok=True)
    for name in ("harbour", "farm"):
        scene(name).save(d / "LRS_VQA" / "image" / f"{name}.tif", format="TIFF", compression="tiff_adobe_deflate")
    suffix = "\nAnswer the question using a single word or phrase."
    rows = [
        ("FAIR_1", "harbour", "count", "How many buildings are there?", "3"),
        ("GLH-Bridge_2", "harbour", "rural or urban", "Is this area rural or urban?", "rural"),
        ("STAR_3", "farm", "color", "What colour is the pond?", "blue"),
    ]
    path = d / "LRS_VQA_merged.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for qid, name, cat, text, gt in rows:
            row = {
                "question_id": qid,
                "image": f"LRS_VQA/image/{name}.tif",
                "category": cat,
                "text": text + suffix,
                "ground_truth": gt,
            }
            f.write(json.dumps(row) + "\n")
    return path


#: benchmark name -> (sample folder, writer); hrbench-8k reads the same TSV format as hrbench-4k.
SAMPLES = {
    "xlrs": ("xlrs", write_xlrs),
    "mme-realworld-rs": ("mme-realworld-rs", write_mme),
    "rshr": ("rshr", write_rshr),
    "hrbench-4k": ("hrbench", write_hrbench),
    "lrs-vqa": ("lrs-vqa", write_lrs),
}


def main(out: Path) -> None:
    for bench, (_, write) in SAMPLES.items():
        path = write(out)
        print(f"{bench}: {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "eval")
