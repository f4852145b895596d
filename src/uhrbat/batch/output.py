"""The batch run directory: `predictions.jsonl` (exactly one row per id), `run.json`, GeoJSON, Parquet.

`PredictionStore` holds the run lock (`uhrbat.runfiles.RunLock`), refuses a rerun with different
settings (`run.json`), reads the rows already written (a torn last line from a kill is dropped)
and appends each new row as one fsynced line (`uhrbat.runfiles.JsonlAppender`). A row's GeoJSON
file is written (atomically) *before* its row, so every row in the file has its GeoJSON. Rerunning
the same command skips the ids already written: a SIGKILL at any moment loses at most the rows
being computed, never duplicates one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import ConfigError
from uhrbat.runfiles import JsonlAppender, RunLock, read_jsonl

__all__ = [
    "PARQUET",
    "PREDICTIONS",
    "ROW_KEYS",
    "RUN_JSON",
    "Answered",
    "PredictionStore",
    "Summary",
    "geojson_name",
    "output_row",
    "write_parquet",
]

PREDICTIONS = "predictions.jsonl"
PARQUET = "predictions.parquet"
RUN_JSON = "run.json"

#: Per-sample timing keys in every row (seconds); the pipeline's stages plus the row's share of wall time.
ROW_KEYS = (
    "id",
    "image",
    "question",
    "answer",
    "error",
    "num_visual_tokens",
    "image_size",
    "cache",
    "timings",
    "seconds",
)


@dataclass
class Answered:
    """One finished row: the `predictions.jsonl` row, its GeoJSON FeatureCollection (or None) and
    whether answering it prepared (encoded + scored) its scene rather than reusing a cached one."""

    row: dict[str, Any]
    geojson: dict[str, Any] | None = None
    prepared: bool = False

    def to_json(self) -> str:
        return json.dumps({"row": self.row, "geojson": self.geojson, "prepared": self.prepared}, default=str)

    @classmethod
    def from_json(cls, text: str) -> Answered:
        d = json.loads(text)
        return cls(row=d["row"], geojson=d.get("geojson"), prepared=bool(d.get("prepared")))


def output_row(
    row: Any, *, answer: str | None = None, error: str | None = None, result: Any = None, seconds: float | None = None
) -> dict[str, Any]:
    """The output row of a `BatchRow` with an `AskResult` (or an error)."""
    out: dict[str, Any] = {
        "id": row.id,
        "image": row.image,
        "question": row.question,
        "answer": answer,
        "error": error,
        "num_visual_tokens": None,
        "image_size": None,
        "cache": None,
        "timings": {},
        "seconds": seconds,
    }
    if result is not None:
        out["answer"] = result.answer
        out["num_visual_tokens"] = int(result.num_visual_tokens)
        out["image_size"] = [int(v) for v in result.image_size]
        out["cache"] = getattr(result, "cache", None)
        out["timings"] = {k: float(v) for k, v in (result.timings or {}).items()}
    return out


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def geojson_name(row_id: str, suffix: str = ".geojson") -> str:
    """File name of a row's kept-token file: the id itself when it is a safe file name, else its
    hash; `suffix` ".geojson", or ".pixels.json" for the pixel-space file of an image without
    georeference (`uhrbat.io.geo.kept_tokens_document`)."""
    if _SAFE.match(row_id):
        return f"{row_id}{suffix}"
    return f"id-{hashlib.sha256(row_id.encode('utf-8')).hexdigest()[:24]}{suffix}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PredictionStore:
    """Exclusive, resumable writer of one batch run directory (a context manager).

    fingerprint: the settings that decide answers (model, selection, generation, reader); a rerun
    with different ones is refused, naming the first difference. geojson_dir: where each row's
    kept tokens go (`<id>.geojson`), or None.
    """

    def __init__(
        self, out_dir: str | os.PathLike, fingerprint: dict[str, Any], geojson_dir: str | os.PathLike | None = None
    ) -> None:
        self.out = Path(out_dir).expanduser()
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.geojson_dir = Path(geojson_dir).expanduser() if geojson_dir is not None else None
        self.path = self.out / PREDICTIONS
        self.done: set[str] = set()  # ids with a row (only ids are kept: the archive may be huge)
        self.error_ids: set[str] = set()
        self.n_torn = 0
        self._lock = RunLock(self.out, "batch")
        self._appender: JsonlAppender | None = None

    def __enter__(self) -> PredictionStore:
        self._lock.__enter__()
        try:
            self._check_run_json()
            rows, self.n_torn = read_jsonl(self.path)
            for r in rows:
                if "id" in r:
                    self._remember(r)
            del rows
            self._appender = JsonlAppender(self.path)
            if self.geojson_dir is not None:
                self.geojson_dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._appender is not None:
                self._appender.close()
                self._appender = None
        finally:
            self._lock.release()

    def _check_run_json(self) -> None:
        path = self.out / RUN_JSON
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict):
                for k, v in self.fingerprint.items():
                    if old.get(k) != v:
                        raise ConfigError(
                            f"{self.out} holds a batch run with different settings ({k}: {old.get(k)!r} "
                            f"!= {v!r}); rerun with the same options or use another --out"
                        )
                return
        _atomic_write(path, json.dumps(self.fingerprint, indent=2) + "\n")

    def _remember(self, row: dict[str, Any]) -> None:
        rid = str(row["id"])
        self.done.add(rid)
        if row.get("error"):
            self.error_ids.add(rid)

    def write(self, answered: Answered) -> bool:
        """GeoJSON first (atomic), then the row (one fsynced line): a row never lacks its GeoJSON.
        Returns False (and writes nothing) for an id that already has its row."""
        assert self._appender is not None, "PredictionStore used outside `with`"
        row = answered.row
        rid = str(row["id"])
        if rid in self.done:  # a second answer for an id (e.g. resent by a restarted actor) is dropped
            return False
        if self.geojson_dir is not None and answered.geojson is not None:
            _atomic_write(
                self.geojson_dir / geojson_name(rid, ".geojson" if "type" in answered.geojson else ".pixels.json"),
                json.dumps(answered.geojson, separators=(",", ":")) + "\n",
            )
        self._appender.write(row)
        self._remember(row)
        return True

    def read_rows(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The file's rows for `ids`, in that order (read back from disk)."""
        wanted = set(ids)
        by_id: dict[str, dict[str, Any]] = {}
        for r in read_jsonl(self.path)[0]:
            rid = str(r.get("id"))
            if rid in wanted:
                by_id.setdefault(rid, r)
        return [by_id[i] for i in ids if i in by_id]


def write_parquet(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """`predictions.parquet`: the JSONL columns, `timings` flattened to `timing_<stage>` float columns."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the ray/eval extras
        raise ConfigError("--parquet needs pyarrow: pip install -e '.[ray]' (or '.[eval]')") from None
    stages = sorted({k for r in rows for k in (r.get("timings") or {})})
    cols: dict[str, list[Any]] = {k: [] for k in ROW_KEYS if k != "timings"}
    cols.update({f"timing_{s}": [] for s in stages})
    for r in rows:
        for k in ROW_KEYS:
            if k == "timings":
                continue
            v = r.get(k)
            cols[k].append(
                None if v is None else (str(v) if k in ("id", "image", "question", "answer", "error", "cache") else v)
            )
        t = r.get("timings") or {}
        for s in stages:
            cols[f"timing_{s}"].append(float(t[s]) if s in t else None)
    schema = pa.schema(
        [(k, pa.string()) for k in ("id", "image", "question", "answer", "error")]
        + [
            ("num_visual_tokens", pa.int64()),
            ("image_size", pa.list_(pa.int64())),
            ("cache", pa.string()),
            ("seconds", pa.float64()),
        ]
        + [(f"timing_{s}", pa.float64()) for s in stages]
    )
    table = pa.table({name: cols[name] for name in schema.names}, schema=schema)
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p)
    return p


@dataclass
class Summary:
    """What a batch run did (printed at the end and saved as `summary.json`)."""

    rows: int = 0  # rows in the input list
    already_done: int = 0  # rows found in predictions.jsonl at start
    written: int = 0  # rows written by this run
    errors: int = 0  # error rows among all rows of the list
    scenes_prepared: int = 0  # scenes encoded + scored by this run (cache hits excluded)
    wall_s: float = 0.0
    engine: str = "local"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "already_done": self.already_done,
            "written": self.written,
            "errors": self.errors,
            "scenes_prepared": self.scenes_prepared,
            "wall_s": round(self.wall_s, 3),
            "rows_per_s": round(self.rows_per_s, 4),
            "engine": self.engine,
            **self.extra,
        }

    def line(self) -> str:
        return (
            f"{self.rows} rows ({self.already_done} already done, {self.written} written now), {self.errors} errors, "
            f"{self.scenes_prepared} scenes prepared, {self.wall_s:.1f} s wall ({self.rows_per_s:.2f} rows/s), "
            f"engine {self.engine}"
        )
