"""Reading benchmark files into validated `Sample`s — the part every benchmark shares.

* files: JSON, JSONL, Parquet (streamed), TSV/CSV; a folder picks `dataset.json` or its
  parquet shards (a benchmark's `pick_files` may choose among them);
* field helpers for the per-benchmark normalisers (`missing`, `first`, `text`,
  `answer_text`, `parse_options`, `row_images`);
* the generic LLaVA / LongVA conversation format (`id`, `image`|`images`, `conversations`),
  accepted by every benchmark (the reference evaluator's `*_relative.json` files use it).

Each benchmark's own row format lives in its module in `uhrbat.evaluation.benchmarks`; this
module knows benchmarks only through the `BenchmarkSpec` it is given (the registry,
`uhrbat.evaluation.benchmarks.load_benchmark`, looks a name up and calls `load_samples`).

Images: relative paths resolve in the image root; every path, after symlinks are resolved,
must stay inside that root (an absolute path elsewhere, a `..` escape or a symlink pointing
out is an error row) unless `allow_outside_images`; embedded bytes / base64 are decoded. A
malformed row never stops loading: it becomes a `Sample` with `error` set (its row index and
the reason) and `error_kind` "data" or "image"; a row whose only problem is its image keeps its
other fields (category, options, answer), so the per-category report counts it where it
belongs. Problems with the file as a whole (missing, unreadable, empty, unknown format) raise
`BenchmarkDataError`.
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import json
import math
import os
import re
import string
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from uhrbat.errors import BenchmarkDataError
from uhrbat.evaluation.records import (
    ImageRef,
    ImageRowError,
    LoadContext,
    RowError,
    Sample,
    decode_base64_image,
    is_within,
)
from uhrbat.evaluation.spec import BenchmarkSpec

__all__ = [
    "load_samples",
    "iter_rows",
    "parse_options",
    "LoadContext",
    "RowError",
    "ImageRowError",
    "missing",
    "first_of",
    "text_field",
    "answer_text",
    "row_images",
    "strip_image_markers",
    "OPTION_RE",
]

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".tsv", ".csv")

OPTION_RE = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.):：])\s*(.*)$", re.DOTALL)
_LEADING_IMAGE_RE = re.compile(r"^(?:\s*<image>\s*)+", re.IGNORECASE)
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s]+$")


# --------------------------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------------------------


def _resolve_data_path(path: Path, spec: BenchmarkSpec) -> list[Path]:
    if not path.exists():
        raise BenchmarkDataError(f"benchmark data not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise BenchmarkDataError(
                f"unsupported benchmark file type {path.suffix or '(none)'!r} for {path}; "
                f"expected one of {', '.join(DATA_SUFFIXES)}"
            )
        return [path]
    # A directory: XHRBench ships `dataset.json`; hub downloads are parquet shards.
    for name in ("dataset.json", "data.json", "annotations.json"):
        if (path / name).is_file():
            return [path / name]
    shards = sorted(path.glob("*.parquet")) or sorted(path.glob("*/*.parquet"))
    if shards and spec.pick_files is not None:
        shards = spec.pick_files(shards, path)
    if shards:
        return shards
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if len(files) == 1:
        return files
    if not files:
        raise BenchmarkDataError(f"no benchmark data file ({', '.join(DATA_SUFFIXES)}) in directory {path}")
    raise BenchmarkDataError(
        f"several data files in {path} ({', '.join(p.name for p in files[:5])}); pass one with --data"
    )


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


def missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return False


def first_of(row: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in row and not missing(row[k]):
            return row[k]
    return None


def text_field(v: Any, what: str) -> str:
    if missing(v):
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
    if missing(value):
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
            if not missing(value[k]):
                out[letter] = str(value[k]).strip()
        return out, [f"{k}. {v}" for k, v in out.items()]
    if isinstance(value, (list, tuple)):
        lines = [str(v) for v in value if not missing(v)]
        out = {}
        for pos, line in enumerate(lines):
            m = OPTION_RE.match(line)
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


def answer_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        parts = [str(x).strip() for x in v if not missing(x)]
        if not parts:
            raise RowError("missing answer")
        return "".join(parts)  # as the reference evaluator joins list answers
    return text_field(v, "answer")


def strip_image_markers(text: str) -> str:
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
    if missing(value):
        raise RowError("missing image")
    if isinstance(value, (list, tuple)):
        refs: list[ImageRef] = []
        for v in value:
            refs.extend(resolve_images(v, ctx))
        if not refs:
            raise RowError("missing image")
        return refs
    if isinstance(value, dict):  # Hugging Face `Image` feature: {"bytes": ..., "path": ...}
        if not missing(value.get("bytes")):
            return resolve_images(value["bytes"], ctx)
        if not missing(value.get("path")):
            return resolve_images(value["path"], ctx)
        raise RowError("image entry has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if not data:
            raise ImageRowError("empty embedded image")
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
                raise ImageRowError(str(e)) from e
        return [_resolve_path(s, ctx)]
    raise RowError(f"unsupported image value of type {type(value).__name__}")


def row_images(value: Any, ctx: LoadContext) -> list[ImageRef]:
    """Image references of a row; when only scoring (`check_images=False`) problems are ignored."""
    if ctx.check_images:
        return resolve_images(value, ctx)
    try:
        return resolve_images(value, ctx)
    except RowError:
        return []


def _resolve_path(s: str, ctx: LoadContext) -> ImageRef:
    """A row's image path -> ImageRef of the real file, refused outside the image root.

    The check runs on the *real* path (symlinks resolved), so an absolute path elsewhere or a
    symlink inside the root that points out of it is refused like a `..` escape, unless the
    user allowed it (`--allow-outside-images`). The root itself may be a symlink.
    """
    relative = not os.path.isabs(s)
    p = os.path.normpath(os.path.join(os.path.abspath(ctx.root), s) if relative else s)
    real = os.path.realpath(p)
    if not ctx.allow_outside:
        fix = "pass --allow-outside-images to allow it"
        if relative and not is_within(ctx.root, p):
            raise ImageRowError(f"image path {s!r} escapes the image root {ctx.root}; {fix}")
        if not is_within(os.path.realpath(ctx.root), real):
            raise ImageRowError(f"image path {s!r} resolves to {real}, outside the image root {ctx.root}; {fix}")
    if not os.path.isfile(real):
        raise ImageRowError(f"image not found: {p}")
    return ImageRef(path=real)


def _id_of(row: dict[str, Any], keys: tuple[str, ...], idx: int) -> str | None:
    v = first_of(row, *keys)
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
    if missing(q):
        raise RowError("conversations have no human turn")
    question = strip_image_markers(str(q))
    options: dict[str, str] = {}
    lines: list[str] = []
    for line in question.splitlines():
        m = OPTION_RE.match(line)
        if m and (m.group(1) or m.group(2)) not in options:
            options[m.group(1) or m.group(2)] = m.group(3).strip()
            lines.append(line)
    return dict(
        images=row_images(first_of(row, "image", "images"), ctx),
        question=question,
        options=options,
        option_lines=lines,
        answer=answer_text(a) if not missing(a) else None,
        category=None if missing(row.get("category")) else str(row["category"]),
        subcategory=None if missing(row.get("l2-category")) else str(row["l2-category"]),
        source_format="llava",
        extra={k: row[k] for k in ("cycle_category", "task", "type") if k in row and not missing(row[k])},
    )


def load_samples(
    spec: BenchmarkSpec,
    data: str | os.PathLike,
    images: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_outside_images: bool = False,
) -> list[Sample]:
    """Load and validate a benchmark's rows; malformed rows come back as error samples.

    Image paths must resolve (symlinks followed) inside `images` (default: the data file's
    folder) unless `allow_outside_images`. `check_images=False` (scoring saved outputs)
    ignores missing or unresolvable images.
    """
    bench = spec.name
    data_path = Path(data).expanduser()
    files = _resolve_data_path(data_path, spec)
    root = Path(images).expanduser() if images is not None else files[0].parent
    if images is not None and not root.is_dir():
        raise BenchmarkDataError(f"image root is not a directory: {root}")
    ctx = LoadContext(
        benchmark=bench,
        source=data_path,
        root=root.absolute(),
        check_images=check_images,
        allow_outside=allow_outside_images,
    )

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
                if spec.keep_row is not None and not spec.keep_row(row):
                    continue
                fields = _normalise(spec, row, gidx, ctx)
                if fields is None:
                    continue
                sid = _id_of(row, spec.id_keys, gidx)
                if sid is None:
                    raise RowError(f"missing id (one of {', '.join(spec.id_keys)})")
                if fields.get("answer") is None:
                    raise RowError("missing answer / ground truth")
                sample = Sample(id=sid, row=gidx, **fields, **_row_region(row))
            except (RowError, ValidationError, ValueError) as e:
                reason = _reason(e)
                if sid is None and isinstance(row, dict):
                    sid = _id_of(row, spec.id_keys, gidx)
                is_image = isinstance(e, ImageRowError)
                sample = Sample(
                    id=sid or f"row-{gidx}",
                    row=gidx,
                    error=f"row {gidx}: {reason}",
                    error_kind="image" if is_image else "data",
                    source_format=bench,
                    question=_safe_question(row),
                    **(_kept_fields(spec, row, gidx, ctx) if is_image else {}),
                )
            if sample.id in seen:
                seen[sample.id] += 1
                sample = sample.model_copy(
                    update={
                        "id": f"{sample.id}#dup{seen[sample.id]}",
                        "error": f"row {gidx}: duplicate id {sample.id!r} "
                        f"(first at row {samples[_first_index(samples, sample.id)].row})",
                        "error_kind": "data",
                    }
                )
            else:
                seen[sample.id] = 0
            samples.append(sample)
        offset += last + 1
    if n_rows == 0:
        raise BenchmarkDataError(f"no rows in benchmark data {data_path}")
    if not samples:
        if spec.no_rows_hint:
            raise BenchmarkDataError(f"{spec.no_rows_hint} in {data_path}")
        raise BenchmarkDataError(f"no usable rows in benchmark data {data_path}")
    return samples


def _row_region(row: dict[str, Any]) -> dict[str, Any]:
    """A row's own `region` / `region_crs` (any benchmark format), checked with the options
    vocabulary's rules (`RowError` naming the problem); {} without one."""
    raw, crs = row.get("region"), row.get("region_crs")
    raw, crs = (None if missing(v) else v for v in (raw, crs))
    if raw is None and crs is None:
        return {}
    from uhrbat.errors import UhrBatError
    from uhrbat.options import ReadOptions

    try:
        opts = ReadOptions.of(region=raw, region_crs=None if crs is None else str(crs))
    except UhrBatError as e:
        raise RowError(str(e)) from None
    return {"region": opts.region_text(), **({"region_crs": opts.region_crs} if opts.region_crs else {})}


def _normalise(spec: BenchmarkSpec, row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any] | None:
    return _llava(row, idx, ctx) if "conversations" in row else spec.normalise(row, idx, ctx)


_KEPT = ("category", "subcategory", "options", "option_lines", "answer", "extra")


def _kept_fields(spec: BenchmarkSpec, row: Any, idx: int, ctx: LoadContext) -> dict[str, Any]:
    """A row whose image is unusable keeps its category, options and answer (so the report counts
    it in its category): the row normalised again with image problems ignored."""
    try:
        fields = _normalise(spec, row, idx, dataclasses.replace(ctx, check_images=False))
    except (RowError, ValueError):
        return {}
    return {k: fields[k] for k in _KEPT if fields and fields.get(k) is not None}


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
