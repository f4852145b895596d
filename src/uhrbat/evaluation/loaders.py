"""Loaders for the formats the UHR benchmarks are distributed in.

One normaliser per format turns a raw row into a validated `Sample`:

* XLRS-Bench-lite (hub parquet / jsonl): `index`, `question`, `multi-choice options`, `answer`
  (one or several letters), `category` ("L2/L3"), `l2-category`, `image` (list of images).
* MME-RealWorld official JSON (`Question_id`, `Image`, `Text`, `Answer choices`,
  `Ground truth`, `Task`, `Subtask`, `Category`; also the Lite file) and the lmms-eval variant
  (`index`, `question`, `multi-choice options`, `answer`, `category`, `l2-category`, base64
  `bytes`), filtered to the remote-sensing subtask.
* RSHR-Bench / XHRBench `dataset.json` (`id`, `images`, `question`, `options` list or dict,
  `answer`, `category`) and the hub parquet with embedded images.
* HR-Bench 4K/8K parquet / TSV (`index`, `question`, `A`..`D`, `answer`, `category`,
  `cycle_category`, base64 `image`).
* LRS-VQA JSONL (`question_id`, `image`, `category`, `text`, `ground_truth`).
* Generic LLaVA / LongVA conversation JSON (`id`, `image`|`images`, `conversations`), accepted
  by every benchmark (the reference evaluator's `*_relative.json` files use it).

Images are resolved relative to the image root only (a path escaping it is an error row),
or taken as absolute paths, or decoded from embedded bytes / base64. A malformed row never
stops loading: it becomes a `Sample` with `error` set (its row index and the reason).
Problems with the file as a whole (missing, unreadable, empty, unknown format) raise
`BenchmarkDataError`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import math
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pydantic import ValidationError

from uhrbat.errors import BenchmarkDataError
from uhrbat.evaluation.records import ImageRef, Sample, decode_base64_image, is_within

__all__ = ["BENCHMARK_NAMES", "load_benchmark", "iter_rows", "parse_options", "LoadContext"]

BENCHMARK_NAMES = ("xlrs", "mme-realworld-rs", "rshr", "hrbench-4k", "hrbench-8k", "lrs-vqa")

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".tsv", ".csv")

_OPTION_RE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):：])\s*(.*)$", re.DOTALL)
_LEADING_IMAGE_RE = re.compile(r"^(?:\s*<image>\s*)+", re.IGNORECASE)
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")


class RowError(ValueError):
    """A row is malformed; becomes an error Sample."""


@dataclass
class LoadContext:
    benchmark: str
    source: Path
    root: Path
    notes: list[str] = field(default_factory=list)
    check_images: bool = True
    _blobs: dict[bytes, bytes] = field(default_factory=dict)

    def blob(self, data: bytes) -> bytes:
        """Share identical embedded images (HR-Bench repeats each image in every option cycle)."""
        key = hashlib.blake2b(data, digest_size=16).digest()
        return self._blobs.setdefault(key, data)


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------


def _resolve_data_path(path: Path, benchmark: str) -> list[Path]:
    if not path.exists():
        raise BenchmarkDataError(f"benchmark data not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise BenchmarkDataError(
                f"unsupported benchmark file type {path.suffix or '(none)'!r} for {path}; expected one of {', '.join(DATA_SUFFIXES)}"
            )
        return [path]
    # A directory: XHRBench ships `dataset.json`; hub downloads are parquet shards.
    for name in ("dataset.json", "data.json", "annotations.json"):
        if (path / name).is_file():
            return [path / name]
    shards = sorted(path.glob("*.parquet")) or sorted(path.glob("*/*.parquet"))
    if shards and benchmark in ("hrbench-4k", "hrbench-8k"):
        # the hub folder holds both splits (hrbench_4k-*.parquet, hrbench_8k-*.parquet): keep ours
        want = benchmark.split("-")[1]
        tagged = [p for p in shards if re.search(r"(4k|8k)", p.name, re.IGNORECASE)]
        if tagged:
            shards = [p for p in tagged if want in p.name.lower()]
            if not shards:
                raise BenchmarkDataError(f"no {want.upper()} parquet shard in {path}")
    if shards:
        return shards
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if len(files) == 1:
        return files
    if not files:
        raise BenchmarkDataError(f"no benchmark data file ({', '.join(DATA_SUFFIXES)}) in directory {path}")
    raise BenchmarkDataError(f"several data files in {path} ({', '.join(p.name for p in files[:5])}); pass one with --data")


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """Yield (row index, row dict or RowError) for one data file, streaming where possible."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        elif suffix == ".parquet":
            yield from _iter_parquet(path)
        elif suffix in (".tsv", ".csv"):
            yield from _iter_csv(path, "\t" if suffix == ".tsv" else ",")
        else:  # pragma: no cover - filtered earlier
            raise BenchmarkDataError(f"unsupported benchmark file type {suffix!r}: {path}")
    except BenchmarkDataError:
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkDataError(f"cannot read benchmark file {path}: {e}") from e


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    with path.open("r", encoding="utf-8") as f:
        idx = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield idx, RowError(f"line {lineno} is not valid JSON ({e.msg})")
            else:
                yield idx, obj if isinstance(obj, dict) else RowError(f"line {lineno} is not a JSON object")
            idx += 1


def _iter_json(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        # A JSON-lines file saved as .json is common; try that before giving up.
        try:
            rows = list(_iter_jsonl(path))
        except Exception:
            rows = []
        if rows and not all(isinstance(r, RowError) for _, r in rows):
            yield from rows
            return
        raise BenchmarkDataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
    if isinstance(data, dict):
        for key in ("data", "questions", "annotations", "samples", "test"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            raise BenchmarkDataError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
    if not isinstance(data, list):
        raise BenchmarkDataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, obj in enumerate(data):
        yield i, obj if isinstance(obj, dict) else RowError(f"row {i} is not a JSON object")


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BenchmarkDataError(f"reading {path.name} needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise BenchmarkDataError(f"cannot read parquet file {path}: {e}") from e
    idx = 0
    for batch in pf.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            yield idx, row
            idx += 1


def _iter_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images live in cells
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            return
        for i, row in enumerate(reader):
            if None in row:
                yield i, RowError(f"row {i} has more cells than the header")
                continue
            yield i, dict(row)


# --------------------------------------------------------------------------------------------
# field helpers
# --------------------------------------------------------------------------------------------


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return False


def _first(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in row and not _missing(row[k]):
            return row[k]
    return None


def _text(v: Any, what: str) -> str:
    if _missing(v):
        raise RowError(f"missing {what}")
    if isinstance(v, (dict, list)):
        raise RowError(f"{what} is not text")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def parse_options(value: Any) -> tuple[dict[str, str], list[str]]:
    """Options as distributed -> ({letter: text}, option lines as distributed).

    Lists may be prefixed ("(A) x", "A. x") or bare (then lettered by position); dicts map
    letters to text (sorted by key, as the reference evaluator does); a string is split
    into lines.
    """
    if _missing(value):
        return {}, []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return parse_options(parsed)
        value = [ln for ln in s.splitlines() if ln.strip()]
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k in sorted(value, key=lambda x: str(x)):
            letter = str(k).strip().upper()
            if len(letter) != 1 or not letter.isalpha() or not letter.isascii():
                raise RowError(f"option key {k!r} is not a letter")
            if not _missing(value[k]):
                out[letter] = str(value[k]).strip()
        return out, [f"{k}. {v}" for k, v in out.items()]
    if isinstance(value, (list, tuple)):
        lines = [str(v) for v in value if not _missing(v)]
        out = {}
        for pos, line in enumerate(lines):
            m = _OPTION_RE.match(line)
            if m:
                letter = m.group(1) or m.group(2)
                text = m.group(3).strip()
            else:
                if pos >= 26:
                    raise RowError("more than 26 options")
                letter, text = string.ascii_uppercase[pos], line.strip()
            if letter in out:
                raise RowError(f"option letter {letter} appears twice")
            out[letter] = text
        return out, lines
    raise RowError(f"options have an unsupported type {type(value).__name__}")


def _answer_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        parts = [str(x).strip() for x in v if not _missing(x)]
        if not parts:
            raise RowError("missing answer")
        return "".join(parts)  # as the reference evaluator joins list answers
    return _text(v, "answer")


def _strip_image_markers(text: str) -> str:
    return _LEADING_IMAGE_RE.sub("", text, count=1).lstrip("\n")


_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _looks_base64(s: str) -> bool:
    """Embedded image text (not a path): a data URL, or base64 whose bytes start like an image."""
    if s.startswith("data:image"):
        return True
    if len(s) < 16 or not _BASE64_RE.match(s[:4096]):
        return False
    if len(s) > 256 and "." not in s[-8:]:
        return True
    try:
        head = base64.b64decode(s[:64] + "=" * (-len(s[:64]) % 4))
    except (binascii.Error, ValueError):
        return False
    return head.startswith(_IMAGE_MAGIC)


def resolve_images(value: Any, ctx: LoadContext) -> list[ImageRef]:
    """Any distributed image value -> list of ImageRef (paths checked for containment + existence)."""
    if _missing(value):
        raise RowError("missing image")
    if isinstance(value, (list, tuple)):
        refs: list[ImageRef] = []
        for v in value:
            refs.extend(resolve_images(v, ctx))
        if not refs:
            raise RowError("missing image")
        return refs
    if isinstance(value, dict):  # Hugging Face `Image` feature: {"bytes": ..., "path": ...}
        if not _missing(value.get("bytes")):
            return resolve_images(value["bytes"], ctx)
        if not _missing(value.get("path")):
            return resolve_images(value["path"], ctx)
        raise RowError("image entry has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise RowError("empty embedded image")
        return [ImageRef(data=ctx.blob(data))]
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return resolve_images(parsed, ctx)
        if _looks_base64(s):
            try:
                return [ImageRef(data=ctx.blob(decode_base64_image(s)))]
            except ValueError as e:
                raise RowError(str(e)) from e
        return [_resolve_path(s, ctx)]
    raise RowError(f"unsupported image value of type {type(value).__name__}")


def _images(value: Any, ctx: LoadContext) -> list[ImageRef]:
    """Image references of a row; when only scoring (`check_images=False`) problems are ignored."""
    if ctx.check_images:
        return resolve_images(value, ctx)
    try:
        return resolve_images(value, ctx)
    except RowError:
        return []


def _resolve_path(s: str, ctx: LoadContext) -> ImageRef:
    if os.path.isabs(s):
        p = os.path.normpath(s)
    else:
        p = os.path.normpath(os.path.join(os.path.abspath(ctx.root), s))
        if not is_within(ctx.root, p):
            raise RowError(f"image path {s!r} escapes the image root {ctx.root}")
    if not os.path.isfile(p):
        raise RowError(f"image not found: {p}")
    return ImageRef(path=p)


def _id_of(row: dict[str, Any], keys: tuple[str, ...], idx: int) -> str | None:
    v = _first(row, *keys)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip() or None


# --------------------------------------------------------------------------------------------
# per-format normalisers: (row, idx, ctx) -> dict of Sample fields, or None to skip the row
# --------------------------------------------------------------------------------------------


def _llava(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    q = a = None
    for msg in row.get("conversations") or []:
        if not isinstance(msg, dict):
            continue
        role = str(msg.get("from") or msg.get("role") or "").lower()
        if role in ("human", "user") and q is None:
            q = msg.get("value", msg.get("content"))
        elif role in ("gpt", "assistant") and a is None:
            a = msg.get("value", msg.get("content"))
    if _missing(q):
        raise RowError("conversations have no human turn")
    question = _strip_image_markers(str(q))
    options: dict[str, str] = {}
    lines: list[str] = []
    for line in question.splitlines():
        m = _OPTION_RE.match(line)
        if m and (m.group(1) or m.group(2)) not in options:
            options[m.group(1) or m.group(2)] = m.group(3).strip()
            lines.append(line)
    return dict(
        images=_images(_first(row, "image", "images"), ctx),
        question=question,
        options=options,
        option_lines=lines,
        answer=_answer_text(a) if not _missing(a) else None,
        category=None if _missing(row.get("category")) else str(row["category"]),
        subcategory=None if _missing(row.get("l2-category")) else str(row["l2-category"]),
        source_format="llava",
        extra={k: row[k] for k in ("cycle_category", "task", "type") if k in row and not _missing(row[k])},
    )


def _xlrs(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    options, lines = parse_options(_first(row, "multi-choice options", "options"))
    if not options:
        raise RowError("missing multi-choice options")
    return dict(
        images=_images(_first(row, "image", "images", "image_path"), ctx),
        question=_text(row.get("question"), "question"),
        options=options,
        option_lines=lines,
        answer=_answer_text(row.get("answer")) if not _missing(row.get("answer")) else None,
        category=None if _missing(row.get("category")) else str(row["category"]).strip(),
        subcategory=None if _missing(row.get("l2-category")) else str(row["l2-category"]).strip(),
        source_format="xlrs",
    )


def _is_remote_sensing(row: dict[str, Any]) -> bool | None:
    sub = _first(row, "Subtask", "subtask")
    if sub is not None:
        return str(sub).strip().lower().replace("_", " ") == "remote sensing"
    cat = _first(row, "category")
    if cat is not None:
        parts = [p.strip().lower().replace("_", " ") for p in str(cat).split("/")]
        return "remote sensing" in parts
    return None  # no subtask information: keep (the reference evaluator does the same)


def _mme(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any] | None:
    if _is_remote_sensing(row) is False:
        return None
    if "Text" in row or "Question_id" in row or "Answer choices" in row:  # official JSON / Lite
        options, lines = parse_options(row.get("Answer choices"))
        task = _first(row, "Task")
        return dict(
            images=_images(_first(row, "Image", "image"), ctx),
            question=_text(row.get("Text"), "Text"),
            options=options,
            option_lines=lines,
            answer=None if _missing(row.get("Ground truth")) else _text(row.get("Ground truth"), "Ground truth"),
            category=None if _missing(row.get("Category")) else str(row["Category"]),
            subcategory=None if _missing(row.get("Subtask")) else str(row["Subtask"]),
            source_format="mme-realworld",
            extra={"task": str(task) if task is not None else None},
        )
    # lmms-eval variant (lmms_eval/tasks/mme_realworld/utils.py): Task from `category`,
    # Subtask = last part of `category`, Category = `l2-category`.
    options, lines = parse_options(_first(row, "multi-choice options", "options"))
    cat = str(_first(row, "category") or "")
    return dict(
        images=_images(_first(row, "bytes", "image", "images"), ctx),
        question=_text(row.get("question"), "question"),
        options=options,
        option_lines=lines,
        answer=None if _missing(row.get("answer")) else _text(row.get("answer"), "answer"),
        category=None if _missing(row.get("l2-category")) else str(row["l2-category"]),
        subcategory=cat.split("/")[-1] if cat else None,
        source_format="mme-realworld-lmms-eval",
        extra={"task": "Perception" if "perception" in cat.lower() else "Reasoning"},
    )


_RSHR_GROUP_KEYS = ("group", "task_type", "dimension", "l1-category", "l1_category", "task", "type", "capability")


def _rshr(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    options, lines = parse_options(_first(row, "options", "multi-choice options", "choices"))
    extra = {k: str(row[k]) for k in _RSHR_GROUP_KEYS if k in row and not _missing(row[k])}
    ans = row.get("answer")
    return dict(
        images=_images(_first(row, "images", "image", "image_path"), ctx),
        question=_text(row.get("question"), "question"),
        options=options,
        option_lines=lines,
        answer=None if _missing(ans) or (isinstance(ans, (list, tuple)) and not ans) else _answer_text(ans),
        category=None if _missing(row.get("category")) else str(row["category"]).strip(),
        subcategory=None if _missing(row.get("l2-category")) else str(row["l2-category"]),
        source_format="rshr",
        extra=extra,
    )


def _hrbench(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    # lmms_eval/tasks/hrbench/utils.py: options are every single upper-case letter column that
    # is present and not NaN (an empty TSV cell is NaN under pandas).
    options = {c: str(row[c]).strip() for c in string.ascii_uppercase if c in row and not _missing(row[c])}
    if not options:
        raise RowError("no option columns (A, B, ...)")
    extra = {}
    if not _missing(row.get("cycle_category")):
        extra["cycle_category"] = str(row["cycle_category"])
    return dict(
        images=_images(_first(row, "image", "images", "image_path"), ctx),
        question=_text(row.get("question"), "question"),
        options=options,
        option_lines=[f"{k}. {v}" for k, v in options.items()],
        answer=None if _missing(row.get("answer")) else _text(row.get("answer"), "answer").strip(),
        category=None if _missing(row.get("category")) else str(row["category"]).strip(),
        source_format="hrbench",
        extra=extra,
    )


def _lrs(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    gt = row.get("ground_truth")
    if _missing(row.get("category")):
        raise RowError("missing category (the official LRS-VQA scorer drops such rows)")
    return dict(
        images=_images(_first(row, "image", "images"), ctx),
        question=_text(row.get("text"), "text"),
        # Not stripped: Script/evaluation_LRSVQA.py only lower-cases the ground truth.
        answer=None if _missing(gt) else (gt if isinstance(gt, str) else _text(gt, "ground_truth")),
        category=str(row["category"]),
        source_format="lrs-vqa",
        extra={k: row[k] for k in ("image_size", "size_bin") if k in row and not _missing(row[k])},
    )


@dataclass(frozen=True)
class _Format:
    normalise: Callable[[dict[str, Any], int, LoadContext], dict[str, Any] | None]
    id_keys: tuple[str, ...]


_FORMATS: dict[str, _Format] = {
    "xlrs": _Format(_xlrs, ("index", "id", "question_id")),
    "mme-realworld-rs": _Format(_mme, ("Question_id", "index", "id", "question_id")),
    "rshr": _Format(_rshr, ("id", "index", "question_id")),
    "hrbench-4k": _Format(_hrbench, ("index", "id")),
    "hrbench-8k": _Format(_hrbench, ("index", "id")),
    "lrs-vqa": _Format(_lrs, ("question_id", "id")),
}


def check_benchmark(name: str) -> str:
    key = name.strip().lower()
    aliases = {"xlrs-lite": "xlrs", "xlrs-bench": "xlrs", "mme-rs": "mme-realworld-rs", "mme-realworld": "mme-realworld-rs",
               "xhrbench": "rshr", "rshr-bench": "rshr", "lrsvqa": "lrs-vqa", "hrbench4k": "hrbench-4k", "hrbench8k": "hrbench-8k"}
    key = aliases.get(key, key)
    if key not in _FORMATS:
        raise BenchmarkDataError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARK_NAMES)}")
    return key


def load_benchmark(name: str, data: str | os.PathLike, images: str | os.PathLike | None = None,
                   check_images: bool = True) -> list[Sample]:
    """Load and validate a benchmark; malformed rows come back as error samples.

    `check_images=False` (scoring saved outputs) ignores missing or unresolvable images.
    """
    bench = check_benchmark(name)
    fmt = _FORMATS[bench]
    data_path = Path(data).expanduser()
    files = _resolve_data_path(data_path, bench)
    root = Path(images).expanduser() if images is not None else files[0].parent
    if images is not None and not root.is_dir():
        raise BenchmarkDataError(f"image root is not a directory: {root}")
    ctx = LoadContext(benchmark=bench, source=data_path, root=root.absolute(), check_images=check_images)

    samples: list[Sample] = []
    seen: dict[str, int] = {}
    n_rows = 0
    offset = 0
    for f in files:
        last = -1
        for idx, row in iter_rows(f):
            last = idx
            gidx = offset + idx
            n_rows += 1
            sid: str | None = None
            try:
                if isinstance(row, RowError):
                    raise row
                if "conversations" in row:
                    fields = _llava(row, gidx, ctx)
                    if bench == "mme-realworld-rs" and _is_remote_sensing(row) is False:
                        continue
                else:
                    fields = fmt.normalise(row, gidx, ctx)
                    if fields is None:
                        continue
                sid = _id_of(row, fmt.id_keys, gidx)
                if sid is None:
                    raise RowError(f"missing id (one of {', '.join(fmt.id_keys)})")
                if fields.get("answer") is None:
                    raise RowError("missing answer / ground truth")
                sample = Sample(id=sid, row=gidx, **fields)
            except (RowError, ValidationError, ValueError) as e:
                reason = _reason(e)
                if sid is None and isinstance(row, dict):
                    sid = _id_of(row, fmt.id_keys, gidx)
                sample = Sample(id=sid or f"row-{gidx}", row=gidx, error=f"row {gidx}: {reason}",
                                source_format=bench, question=_safe_question(row))
            if sample.id in seen:
                seen[sample.id] += 1
                sample = sample.model_copy(update={
                    "id": f"{sample.id}#dup{seen[sample.id]}",
                    "error": f"row {gidx}: duplicate id {sample.id!r} (first at row {samples[_first_index(samples, sample.id)].row})",
                })
            else:
                seen[sample.id] = 0
            samples.append(sample)
        offset += last + 1
    if n_rows == 0:
        raise BenchmarkDataError(f"no rows in benchmark data {data_path}")
    if not samples:
        if bench == "mme-realworld-rs":
            raise BenchmarkDataError(f"no Remote Sensing rows in {data_path} (MME-RealWorld is filtered to Subtask == 'Remote Sensing')")
        raise BenchmarkDataError(f"no usable rows in benchmark data {data_path}")
    return samples


def _first_index(samples: list[Sample], sid: str) -> int:
    for i, s in enumerate(samples):
        if s.id == sid:
            return i
    return 0


def _safe_question(row: Any) -> str:
    if isinstance(row, dict):
        for k in ("question", "Text", "text"):
            if isinstance(row.get(k), str):
                return row[k]
    return ""


def _reason(e: Exception) -> str:
    if isinstance(e, ValidationError):
        errs = e.errors()
        if errs:
            loc = ".".join(str(x) for x in errs[0].get("loc", ()))
            return f"{loc}: {errs[0].get('msg', '')}".strip(": ")
    return str(e)
