"""SFT data: convert the released parquet / LLaVA-style JSON into one validated JSONL manifest.

The manifest is the only format training reads. One JSON object per line:

```json
{"id": "…", "image": "/abs/or/relative/path.png",
 "messages": [{"role": "user", "content": "<image>\\nQuestion?"}, {"role": "assistant", "content": "Answer."}],
 "masks": "/path/to/masks.safetensors" | null, "source": "…" | null}
```

Relative `image` / `masks` paths are resolved against the manifest's folder.

Inputs understood by `prepare_sft` (method §5.4):

* the released `RL-MIND/UHR-BAT-SFT-10K` layout, `train/metadata.parquet` beside `train/images/`:
  the image column is `image_paths` (a path or a one-element list), falling back to `file_name`; a
  leading `images/` is stripped (the folder beside the parquet); the dialogue is `conversations`
  (a list or its JSON text) or is built from `prompt` / `question` + `answer`;
* LLaVA / LongVA conversation JSON (`[{"id", "image", "conversations": [{"from", "value"}]}]`), or
  JSONL with one such object per line.

Bad rows are never fatal: each is reported with its reason (missing or unreadable image, no
`<image>` marker or several, empty answer, unreadable mask, ...), skipped, and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.configuration.geometry import CLIP_336_14
from uhrbat.errors import ConfigError, MaskError
from uhrbat.processing.prompt import IMAGE_MARKER

MANIFEST_VERSION = 1
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}
MASK_SUFFIXES = (".safetensors", ".pt")


# ----------------------------------------------------------------------------- records
@dataclass
class Sample:
    """One validated training example (a manifest line)."""

    id: str
    image: str
    messages: list[dict[str, str]]
    masks: str | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image": self.image,
            "messages": self.messages,
            "masks": self.masks,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path | None = None) -> Sample:
        def res(p: str | None) -> str | None:
            if p is None or root is None or os.path.isabs(p):
                return p
            return os.path.normpath(str(root / p))

        return cls(
            id=str(d["id"]),
            image=res(d["image"]),
            messages=list(d["messages"]),
            masks=res(d.get("masks")),
            source=d.get("source"),
        )


@dataclass
class BadRow:
    where: str  # "file:row" or "file:id"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class PrepareReport:
    written: int = 0
    bad: list[BadRow] = field(default_factory=list)
    with_masks: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def summary(self) -> str:
        return f"{self.written} samples written ({self.with_masks} with masks), {self.skipped} bad rows skipped"


class RowError(ValueError):
    """A row is unusable; the message says why."""


# ----------------------------------------------------------------------------- helpers
def sanitize(rel_path: str) -> str:
    """The reference's mask-file stem for an image path: separators become `__` (§4.3)."""
    return os.path.normpath(rel_path).replace("\\", "__").replace("/", "__")


def mask_path_for(mask_dir: Path, rel_path: str) -> Path | None:
    """Existing mask file for an image (`<sanitized>.safetensors`, or the reference's `.pt`)."""
    stem = sanitize(rel_path)
    for suffix in MASK_SUFFIXES:
        p = mask_dir / f"{stem}{suffix}"
        if p.exists():
            return p
    return None


def read_mask_file(path: str | os.PathLike) -> dict[int, Any]:
    """Read a per-image mask file into `{scale: mask}` (tile `[g², 24, 24]` or full-grid format).

    The one reader the model uses (`uhrbat.compression.segments.load_mask_file`): this package's
    safetensors (`scale.{S}` keys, written by `uhrbat masks`) and the reference's `.pt` files.
    """
    from uhrbat.compression.segments import load_mask_file

    return {int(k): v for k, v in load_mask_file(path).items()}


def validate_masks(
    masks: dict[int, Any],
    scales: Sequence[int] | None,
    tile: int = CLIP_336_14.tile_size,
    patch: int = CLIP_336_14.patch_size,
) -> None:
    """Raise `MaskError` unless every mask of a listed scale has a usable shape and integer ids."""
    from uhrbat.compression.segments import segment_ids_for_scale

    for s, m in masks.items():
        if scales is not None and s not in scales:
            continue
        segment_ids_for_scale(m, s, tile, patch)


#: What each `verify` level checks (the README and `--verify` help say the same).
VERIFY_LEVELS = {
    "none": "the image file exists and is not empty",
    "header": (
        "the file's header parses as an image (Pillow, else GDAL) and, for PNG / JPEG, the file is "
        "complete (the PNG chunk list reaches IEND; a JPEG end marker is in its last 1 MB); corrupt "
        "pixel data inside a complete file is only found by 'full'"
    ),
    "full": "every pixel decodes: the image is opened with the shared reader and a 16-px square is built",
}


def _image_ok(path: Path, verify: str) -> None:
    """Raise RowError if the image fails the `verify` level's checks (see `VERIFY_LEVELS`)."""
    if not path.is_file():
        raise RowError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise RowError(f"image is empty: {path}")
    if verify == "none":
        return
    from uhrbat.io.sources import open_image

    if verify == "full":
        try:
            src = open_image(path)
            src.square(16)
        except Exception as e:
            raise RowError(f"unreadable image {path}: {' '.join(str(e).split())}") from None
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # Rasters PIL cannot parse (JPEG2000 without plugins, some GeoTIFFs): try the project's reader.
        try:
            open_image(path)
        except Exception:
            raise RowError(f"unreadable image {path}: {type(e).__name__}: {e}") from None
        return
    reason = _truncation(path, fmt)
    if reason:
        raise RowError(f"corrupt image {path}: {reason} (use --verify full to decode every image)")


def _truncation(path: Path, fmt: str | None) -> str | None:
    """A cheap completeness check for PNG / JPEG (no decode), or None when the file looks whole."""
    from uhrbat.io.formats import png_ends_with_iend

    with path.open("rb") as f:
        if fmt == "PNG":
            try:
                return None if png_ends_with_iend(f) else "truncated PNG (no IEND chunk)"
            except ValueError as e:
                return f"malformed PNG ({e})"
        if fmt in ("JPEG", "MPO"):
            size = path.stat().st_size
            f.seek(max(0, size - (1 << 20)))
            return None if b"\xff\xd9" in f.read() else "truncated JPEG (no end-of-image marker)"
    return None


def normalise_messages(raw: Any) -> list[dict[str, str]]:
    """LLaVA `[{"from","value"}]`, HF `[{"role","content"}]`, or their JSON text -> role/content list."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RowError(f"conversations is not valid JSON: {e}") from None
    if hasattr(raw, "tolist"):  # numpy array from parquet
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)) or not raw:
        raise RowError("conversations is empty or not a list")
    out = []
    for turn in raw:
        if not isinstance(turn, dict):
            raise RowError(f"conversation turn is not an object: {turn!r:.60}")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLE_ALIASES:
            raise RowError(f"unknown conversation role {role!r}")
        if isinstance(content, list):  # HF content parts
            from uhrbat.processing.prompt import render_content

            content = render_content(content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RowError(f"turn content is {type(content).__name__}, expected text")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def check_messages(messages: list[dict[str, str]]) -> None:
    """Exactly one `<image>` (in a user turn), alternating user/assistant, non-empty answers."""
    body = [m for m in messages if m["role"] != "system"]
    if any(m["role"] == "system" for m in messages[1:]):
        raise RowError("a system message may only come first")
    n_img = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if n_img == 0:
        raise RowError(f"no {IMAGE_MARKER} marker in the conversation")
    if n_img > 1:
        raise RowError(f"{n_img} {IMAGE_MARKER} markers; exactly one image per sample is supported")
    if not body or body[0]["role"] != "user":
        raise RowError("the conversation must start with a user turn")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RowError(f"turn {i} is {m['role']!r}, expected {want!r} (turns must alternate)")
    if len(body) < 2:
        raise RowError("no assistant answer")
    if IMAGE_MARKER not in body[0]["content"]:
        raise RowError(f"the {IMAGE_MARKER} marker must be in the first user turn")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip():
            raise RowError("empty answer")
        if m["role"] == "user" and not m["content"].replace(IMAGE_MARKER, "").strip() and m is not body[0]:
            raise RowError("empty question")


def _scalar(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    return v


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        import math

        return isinstance(v, float) and math.isnan(v)
    except TypeError:
        return False


# ----------------------------------------------------------------------------- readers
@dataclass
class RawRow:
    where: str
    id: str
    image: Any  # str | list
    messages: Any  # raw conversations, or None when built from question/answer
    question: Any = None
    answer: Any = None
    masks: Any = None
    source: Any = None


def read_parquet_rows(path: Path) -> Iterator[RawRow]:
    """Rows of the released SFT parquet (§5.4 column resolution)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("reading parquet needs pyarrow (pip install pyarrow)") from e
    table = pq.read_table(str(path))
    cols = set(table.column_names)
    img_col = (
        "image_paths"
        if "image_paths" in cols
        else ("file_name" if "file_name" in cols else ("image" if "image" in cols else None))
    )
    if img_col is None:
        raise ConfigError(f"{path}: no image column (expected image_paths or file_name); columns: {sorted(cols)}")
    q_col = next((c for c in ("prompt", "question") if c in cols), None)
    if "conversations" not in cols and (q_col is None or "answer" not in cols):
        raise ConfigError(f"{path}: need a conversations column or prompt/question + answer; columns: {sorted(cols)}")
    for i, row in enumerate(table.to_pylist()):
        conv = row.get("conversations")
        yield RawRow(
            where=f"{path.name} row {i + 1}",  # 1-based (a table has no lines)
            id=str(row.get("id") if row.get("id") is not None else i),
            image=row.get(img_col),
            messages=None if _is_missing(conv) else conv,
            question=row.get(q_col) if q_col else None,
            answer=row.get("answer"),
            masks=row.get("masks") or row.get("mask"),
            source=row.get("source_dataset") or row.get("source"),
        )


def _non_utf8(obj: Any) -> bool:
    """Does a parsed JSON value hold undecodable bytes (lone surrogates from `surrogateescape`)?"""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def read_json_rows(path: Path) -> Iterator[RawRow]:
    """LLaVA/LongVA conversation JSON (a list) or JSONL (one object per line).

    Bytes that are not UTF-8 make only the row that holds them bad (never the whole file)."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad byte spoils one row.
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    items: list[Any]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        numbered: Iterable[tuple[int, Any]] = enumerate(items)
        bad_lines: list[tuple[int, str]] = []
        where = "{name} item {n}"  # a JSON list: the item's 1-based position
    else:
        items, bad_lines = [], []
        where = "{name}:{n}"  # JSONL: file:line, the line 1-based as editors count
        for ln, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                items.append((ln, json.loads(line)))
            except json.JSONDecodeError as e:
                bad_lines.append((ln, str(e)))
        numbered = items  # type: ignore[assignment]
    for ln, err in bad_lines:
        yield RawRow(
            where=where.format(name=path.name, n=ln + 1),
            id=str(ln),
            image=None,
            messages=None,
            question=RowError(f"invalid JSON line: {err}"),
        )
    for i, obj in numbered:
        if not isinstance(obj, dict):
            yield RawRow(
                where=where.format(name=path.name, n=i + 1),
                id=str(i),
                image=None,
                messages=None,
                question=RowError("row is not an object"),
            )
            continue
        if _non_utf8(obj):
            yield RawRow(
                where=where.format(name=path.name, n=i + 1),
                id=str(i),
                image=None,
                messages=None,
                question=RowError("row holds bytes that are not valid UTF-8; fix the file's encoding"),
            )
            continue
        img = obj.get("image", obj.get("image_paths", obj.get("file_name")))
        yield RawRow(
            where=where.format(name=path.name, n=i + 1),
            id=str(obj.get("id", i)),
            image=img,
            messages=obj.get("conversations", obj.get("messages")),
            question=obj.get("question", obj.get("prompt")),
            answer=obj.get("answer"),
            masks=obj.get("masks", obj.get("mask")),
            source=obj.get("source_dataset", obj.get("source")),
        )


# ----------------------------------------------------------------------------- conversion
def _resolve_image(raw: Any, image_roots: Sequence[Path], strip_prefix: str | None) -> tuple[Path, str]:
    """Image path of a row -> (absolute path, path relative to its root, for mask lookup)."""
    raw = _scalar(raw)
    if isinstance(raw, (list, tuple)):
        if len(raw) != 1:
            raise RowError(f"{len(raw)} images in the row; exactly one image per sample is supported")
        raw = raw[0]
    if not isinstance(raw, str) or not raw.strip():
        raise RowError("no image path")
    rel = raw.strip()
    if strip_prefix and rel.startswith(strip_prefix):
        rel = rel[len(strip_prefix) :]
    if os.path.isabs(rel):
        return Path(rel), Path(rel).name
    candidates = [(root / rel, rel) for root in image_roots]
    if rel != raw.strip():
        candidates += [(root / raw.strip(), raw.strip()) for root in image_roots]
    for p, r in candidates:
        if p.is_file():
            return p, r
    return candidates[0]


def convert_row(
    row: RawRow,
    image_roots: Sequence[Path],
    *,
    strip_prefix: str | None = "images/",
    mask_dir: Path | None = None,
    scales: Sequence[int] | None = None,
    verify: str = "header",
    mask_root: Path | None = None,
) -> Sample:
    """One raw row -> a validated `Sample` (raises `RowError`)."""
    if isinstance(row.question, RowError):
        raise row.question
    if row.messages is not None:
        messages = normalise_messages(row.messages)
    else:
        q, a = _scalar(row.question), _scalar(row.answer)
        if _is_missing(q) or not isinstance(q, str) or not q.replace(IMAGE_MARKER, "").strip():
            raise RowError("no conversations and no question")
        if _is_missing(a) or not isinstance(a, str):
            raise RowError("empty answer")
        if IMAGE_MARKER not in q:
            q = f"{IMAGE_MARKER}\n{q}"  # as the reference's converter does (§5.4)
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    check_messages(messages)
    image, rel = _resolve_image(row.image, image_roots, strip_prefix)
    _image_ok(image, verify)
    masks: Path | None = None
    if row.masks is not None and not _is_missing(row.masks) and str(row.masks).strip():
        m = Path(str(row.masks))
        masks = m if m.is_absolute() else (mask_root or image_roots[0]) / m
        if not masks.exists():
            raise RowError(f"mask file not found: {masks}")
    elif mask_dir is not None:
        masks = mask_path_for(mask_dir, rel)
    if masks is not None:
        try:
            validate_masks(read_mask_file(masks), scales)
        except (MaskError, OSError, ValueError, RuntimeError) as e:
            raise RowError(f"unreadable mask {masks}: {e}") from None
    return Sample(
        id=row.id,
        image=str(image.resolve()),
        messages=messages,
        masks=str(masks.resolve()) if masks else None,
        source=None if _is_missing(row.source) else str(row.source),
    )


def find_sft_parquet(path: Path) -> tuple[Path, Path]:
    """(parquet file, its images folder) for a dataset root, a `train/` folder or the parquet itself."""
    if path.is_file():
        return path, path.parent / "images"
    for cand in (path / "metadata.parquet", path / "train" / "metadata.parquet"):
        if cand.exists():
            return cand, cand.parent / "images"
    found = sorted(path.glob("**/*.parquet"))
    if not found:
        raise ConfigError(f"no parquet file under {path}")
    return found[0], found[0].parent / "images"


def prepare_sft(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    strip_prefix: str | None = "images/",
    scales: Sequence[int] | None = (672, 1344, 2688, 4032),
    verify: str = "header",
    relative: bool = False,
    bad_rows: str | os.PathLike | None = None,
) -> PrepareReport:
    """Convert SFT inputs (parquet datasets, LLaVA JSON / JSONL) into one JSONL manifest.

    Args:
        inputs: parquet files or dataset folders (`…/train/metadata.parquet` + `…/train/images/`),
            and/or `.json` / `.jsonl` conversation files, in any mix.
        out: the manifest to write (`.jsonl`); written atomically.
        image_root: where relative image paths live (default: `images/` beside a parquet, the
            folder of a JSON file).
        mask_dir: optional folder of per-image segment masks named `<sanitized rel path>.safetensors`
            (output of `uhrbat masks`) or the reference's `.pt`; an image without one is mask-less.
        strip_prefix: leading prefix removed from parquet image paths (`images/`).
        scales: pyramid sides the masks must cover (None: do not check shapes).
        verify: `header` (default), `full` or `none`; exactly what each checks is `VERIFY_LEVELS`.
        relative: write paths relative to the manifest's folder.
        bad_rows: optional JSONL file listing every skipped row and why.
    """
    if verify not in ("none", "header", "full"):
        raise ConfigError(f"verify must be none, header or full, got {verify!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = Path(mask_dir) if mask_dir is not None else None
    if md is not None and not md.is_dir():
        raise ConfigError(f"mask folder not found: {md}")
    report = PrepareReport()
    seen_ids: dict[str, int] = {}
    tmp = out.with_name(out.name + ".tmp")
    try:
        _write_manifest(tmp, inputs, out, image_root, md, strip_prefix, scales, verify, relative, report, seen_ids)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a partial manifest behind
        raise
    tmp.replace(out)
    if bad_rows is not None:
        with Path(bad_rows).open("w", encoding="utf-8") as f:
            for b in report.bad:
                f.write(json.dumps({"row": b.where, "reason": b.reason}) + "\n")
    return report


def _write_manifest(
    tmp: Path,
    inputs: Sequence[str | os.PathLike],
    out: Path,
    image_root: Any,
    md: Path | None,
    strip_prefix: str | None,
    scales: Sequence[int] | None,
    verify: str,
    relative: bool,
    report: PrepareReport,
    seen_ids: dict[str, int],
) -> None:
    with tmp.open("w", encoding="utf-8") as f:
        for inp in inputs:
            p = Path(inp)
            if not p.exists():
                raise ConfigError(f"input not found: {p}")
            if p.is_dir() or p.suffix == ".parquet":
                pq_path, img_dir = find_sft_parquet(p)
                roots = [Path(image_root)] if image_root else [img_dir, pq_path.parent]
                rows: Iterable[RawRow] = read_parquet_rows(pq_path)
                prefix = strip_prefix
            elif p.suffix in (".json", ".jsonl"):
                roots = [Path(image_root)] if image_root else [p.parent]
                rows = read_json_rows(p)
                prefix = None
            else:
                raise ConfigError(f"unsupported input {p} (expected a parquet, .json, .jsonl or a dataset folder)")
            for row in rows:
                try:
                    sample = convert_row(row, roots, strip_prefix=prefix, mask_dir=md, scales=scales, verify=verify)
                except RowError as e:
                    report.bad.append(BadRow(row.where, str(e)))
                    continue
                n = seen_ids.get(sample.id, 0)
                seen_ids[sample.id] = n + 1
                if n:
                    sample.id = f"{sample.id}#{n}"
                if relative:
                    sample.image = os.path.relpath(sample.image, out.parent.resolve())
                    if sample.masks:
                        sample.masks = os.path.relpath(sample.masks, out.parent.resolve())
                f.write(json.dumps(sample.to_json(), ensure_ascii=False) + "\n")
                report.written += 1
                report.with_masks += sample.masks is not None
                src = sample.source or p.name
                report.sources[src] = report.sources.get(src, 0) + 1


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """Load a manifest written by `prepare_sft` (relative paths resolved against its folder)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"training manifest not found: {p}")
    root = p.parent.resolve()
    out = []
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            out.append(Sample.from_json(json.loads(line), root))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(
                f"{p}:{ln + 1}: not a manifest line ({e}); build manifests with `uhrbat data prepare-sft`"
            ) from e
    return out
