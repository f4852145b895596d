"""Batch input lists -> validated `BatchRow`s.

Sources: a JSONL / JSON / CSV / TSV / Parquet file with `image` and `question` columns (optional
`id`, and `region` / `region_crs`: ask about one window of the row's image - `"x0,y0,x1,y1"` or
`[x0, y0, x1, y1]` in pixels of the full image, or map coordinates in `region_crs`), or every
image under a folder / glob with one question (`images_rows`).

* ids: the row's `id` when given, else a stable id derived from the row itself
  (`row_id(image, question[, region])`: the image *as written in the list*, so moving the archive
  keeps the ids); duplicate ids are refused up front, all of them named.
* regions: checked when the list is read (syntax, CRS: a bad one makes that row an error row);
  placed on the image when it is opened (outside the image: that row's image error).
* paths: relative image paths resolve against `image_root`, else the input file's folder.
* trust: with `trust="untrusted"` (lists we do not control) a path must stay inside the image
  root (no absolute paths, no `..` or symlink escapes) and the image is later decoded with the
  untrusted reader; a row that breaks this (or names a path no file can have, e.g. with a NUL
  byte) becomes an error row, never a crash.

A row whose image or question is missing is kept as an error row (`BatchRow.error`), so it
appears in the output; only a malformed *file* (unparseable line, missing column) is refused.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from uhrbat.errors import BatchInputError

__all__ = ["IMAGE_SUFFIXES", "BatchRow", "Trust", "check_unique_ids", "images_rows", "read_input", "row_id"]

Trust = Literal["local", "untrusted"]

#: File suffixes `--images DIR` picks up (anything the shared reader can open).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".jp2", ".webp", ".bmp", ".gif", ".img", ".vrt")
_UNTRUSTED_SUFFIX_BLOCK = (".vrt",)  # a VRT names other files: never from a list we do not control


@dataclass(frozen=True)
class BatchRow:
    """One question about one image.

    id: unique within the run; image: the image as written in the list (what the output shows);
    question: the question text; path: the resolved absolute file path (None when unusable);
    error: why the row cannot run (None when it can); region / region_crs: the row's window of
    the image (`"x0,y0,x1,y1"`, pixels or map coordinates in `region_crs`), or None.
    """

    id: str
    image: str
    question: str
    path: str | None = None
    error: str | None = None
    region: str | None = None
    region_crs: str | None = None

    @property
    def scene(self) -> Any:
        """Rows with equal scenes show the same pixels (opened once): the file, and the window."""
        return self.path if self.region is None else (self.path, self.region, self.region_crs)

    def region_kwargs(self) -> dict[str, Any]:
        """The row's region as reading options (empty without one)."""
        if self.region is None:
            return {}
        return {"region": self.region, **({"region_crs": self.region_crs} if self.region_crs else {})}

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "image": self.image, "question": self.question, "path": self.path, "error": self.error}
        return {**d, **self.region_kwargs()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchRow:
        return cls(
            id=str(d["id"]),
            image=str(d["image"]),
            question=str(d["question"]),
            path=d.get("path"),
            error=d.get("error"),
            region=d.get("region"),
            region_crs=d.get("region_crs"),
        )


def row_id(image: str, question: str, region: str | None = None, region_crs: str | None = None) -> str:
    """Stable 16-hex-digit id of an (image, question) pair (and its region, when it has one)."""
    key = f"{image}\x00{question}" + (f"\x00{region}\x00{region_crs or ''}" if region is not None else "")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _region_cells(rec: dict[str, Any], where: str, n: int) -> tuple[str | None, str | None, str | None]:
    """(region "x0,y0,x1,y1", region_crs, error) of a list row, checked with the vocabulary's rules."""
    raw, crs = rec.get("region"), rec.get("region_crs")
    if isinstance(raw, float) and math.isnan(raw):
        raw = None
    if isinstance(crs, float) and math.isnan(crs):
        crs = None
    if isinstance(raw, str) and not raw.strip():
        raw = None
    if isinstance(crs, str) and not crs.strip():
        crs = None
    if raw is None and crs is None:
        return None, None, None
    from uhrbat.errors import UhrBatError
    from uhrbat.options import ReadOptions

    try:
        opts = ReadOptions.of(region=raw, region_crs=None if crs is None else str(crs))
    except UhrBatError as e:
        return None, None, f"{where} row {n}: {e}"
    return opts.region_text(), opts.region_crs, None


def _text(value: Any) -> str | None:
    """A cell as text; None for missing / NaN / empty cells."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):  # NaN from parquet / pandas
        return None
    if isinstance(value, (bytes, bytearray, dict, list, tuple, bool)):
        raise TypeError(type(value).__name__)  # not a path or a question; never str()-ed into one
    text = str(value)
    return text if text.strip() else None


def _resolve(image: str, root: Path, trust: Trust) -> tuple[str | None, str | None]:
    """(absolute path, error) for an image string relative to `root`."""
    if "://" in image:
        return None, f"image {image!r} is a URL; only local files are read (download the archive first)"
    if "\x00" in image:  # no file system accepts it (os.path raises ValueError); one error row, not a dead run
        return None, f"image {image!r} contains a NUL byte, which no file name can hold; fix the path in the list"
    if trust == "untrusted":
        if os.path.isabs(image):
            return (
                None,
                f"image {image!r} is an absolute path; untrusted lists may only name files inside the image root",
            )
        if Path(image).suffix.lower() in _UNTRUSTED_SUFFIX_BLOCK:
            return None, f"image {image!r}: VRT files are refused in untrusted lists (they can point at any file)"
        real_root = os.path.realpath(root)
        full = os.path.realpath(os.path.join(real_root, image))
        if os.path.commonpath([real_root, full]) != real_root:
            return None, f"image {image!r} resolves outside the image root {real_root}; refused for an untrusted list"
        return full, None
    p = Path(image).expanduser()
    return str(p if p.is_absolute() else (root / p).absolute()), None


def _make_rows(records: Iterable[tuple[int, dict[str, Any]]], root: Path, trust: Trust, where: str) -> list[BatchRow]:
    rows: list[BatchRow] = []
    for n, rec in records:
        error = None
        try:
            image = _text(rec.get("image"))
        except TypeError as e:
            embedded = isinstance(rec.get("image"), (bytes, bytearray, dict))
            image, error = (
                f"<embedded image, row {n}>" if embedded else f"<{e}, row {n}>",
                (
                    f"{where} row {n}: embedded image bytes are not supported; "
                    "write the images to files and list their paths"
                    if embedded
                    else f"{where} row {n}: image must be a file path (text), got {e}"
                ),
            )
        try:
            question = _text(rec.get("question"))
        except TypeError as e:
            question, error = f"<{e}, row {n}>", error or f"{where} row {n}: question must be text, got {e}"
        given = rec.get("id")
        rid = (
            None
            if given is None or (isinstance(given, float) and math.isnan(given)) or str(given) == ""
            else str(given)
        )
        if error is None and image is None:
            error = f"{where} row {n}: no image"
        if error is None and question is None:
            error = f"{where} row {n}: no question"
        region, region_crs, region_error = _region_cells(rec, where, n)
        error = error or region_error
        image = image if image is not None else ""
        question = question if question is not None else ""
        if rid is None:
            rid = row_id(image, question, region, region_crs)
        path = None
        if error is None:
            path, error = _resolve(image, root, trust)
        rows.append(BatchRow(rid, image, question, path, error, region, region_crs))
    return rows


def _read_text(path: Path) -> str:
    """The list as UTF-8 text; a byte that is not UTF-8 refuses the list, naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BatchInputError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x}); save the list as UTF-8") from None


def _jsonl_records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    text = _read_text(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise BatchInputError(f"{path}: not valid JSON ({e}); give a JSON list of objects or JSONL") from None
        for n, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise BatchInputError(f"{path}: item {n} is not an object with image/question keys")
            yield n, rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise BatchInputError(f"{path}:{n}: not a JSON object ({e}); fix or remove the line") from None
        if not isinstance(rec, dict):
            raise BatchInputError(f"{path}:{n}: not a JSON object with image/question keys")
        yield n, rec


def _csv_records(path: Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    _require_columns(path, reader.fieldnames or [])
    return [(n, rec) for n, rec in enumerate(reader, 2)]  # line 1 is the header


def _parquet_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the eval/ray extras
        raise BatchInputError(f"{path}: reading Parquet needs pyarrow (pip install -e '.[ray]' or '.[eval]')") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a bad file
        raise BatchInputError(f"{path}: not a readable Parquet file ({e})") from None
    _require_columns(path, table.column_names)
    cols = [c for c in ("id", "image", "question", "region", "region_crs") if c in table.column_names]
    return list(enumerate(table.select(cols).to_pylist(), 1))


def _require_columns(path: Path, names: Sequence[str]) -> None:
    missing = [c for c in ("image", "question") if c not in names]
    if missing:
        raise BatchInputError(
            f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(map(str, names)) or 'none'}); "
            "the list needs `image` and `question` (and optionally `id`)"
        )


def read_input(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, trust: Trust = "local"
) -> list[BatchRow]:
    """Rows of a JSONL / JSON / CSV / TSV / Parquet list, in file order, ids checked unique."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise BatchInputError(f"input list not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        records = list(_jsonl_records(p))
        keys = set().union(*(r.keys() for _, r in records)) if records else {"image", "question"}
        _require_columns(p, sorted(keys))
    elif suffix in (".csv", ".tsv"):
        records = _csv_records(p, "\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", ".pq"):
        records = _parquet_records(p)
    else:
        raise BatchInputError(
            f"{p}: unknown list format {suffix or '(no suffix)'}; use .jsonl, .json, .csv, .tsv or .parquet"
        )
    root = Path(image_root).expanduser() if image_root is not None else p.absolute().parent
    if image_root is not None and not root.is_dir():
        raise BatchInputError(f"--image-root {root} is not a folder")
    rows = _make_rows(records, root.absolute(), trust, p.name)
    check_unique_ids(rows, str(p))
    return rows


def images_rows(pattern: str | os.PathLike, question: str, *, trust: Trust = "local") -> list[BatchRow]:
    """One row per image under a folder (recursive, image suffixes only) or matching a glob.

    For a folder, `image` is the path relative to it (ids survive moving the folder)."""
    if not question or not question.strip():
        raise BatchInputError("--question is empty; give the question to ask about every image")
    text = str(pattern)
    p = Path(text).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        root = p.absolute()
        images = [f.relative_to(p).as_posix() for f in files]
    else:
        matches = sorted(m for m in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(m))
        root = Path.cwd()
        images = matches
        if trust == "untrusted":  # a glob the user typed is trusted; its matches are made relative to cwd
            images = [os.path.relpath(m, root) for m in matches]
    if not images:
        raise BatchInputError(
            f"--images {text}: no image files found (folder scanned recursively for "
            f"{', '.join(IMAGE_SUFFIXES)}, or a glob such as 'tiles/**/*.tif')"
        )
    rows = _make_rows(
        ((n, {"image": im, "question": question}) for n, im in enumerate(images, 1)), root, trust, f"--images {text}"
    )
    check_unique_ids(rows, f"--images {text}")
    return rows


def check_unique_ids(rows: Sequence[BatchRow], where: str) -> None:
    """Refuse duplicate ids, naming every duplicated id (up to 10) and how often it occurs."""
    seen: dict[str, int] = {}
    for r in rows:
        seen[r.id] = seen.get(r.id, 0) + 1
    dups = [(k, n) for k, n in seen.items() if n > 1]
    if dups:
        shown = ", ".join(f"{k!r} x{n}" for k, n in dups[:10]) + (
            f" and {len(dups) - 10} more" if len(dups) > 10 else ""
        )
        raise BatchInputError(
            f"{where}: {len(dups)} duplicate id(s): {shown}; give each row a unique `id` "
            "(rows without one get a hash of image+question, so a repeated pair repeats its id)"
        )
