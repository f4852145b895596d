"""The batch run directory: `predictions.jsonl` (one row per id), `run.json`, GeoJSON, Parquet.

`PredictionStore` holds the run lock (`uhrbat.runfiles.RunLock`), refuses a rerun with different
settings (`run.json`; the model compared by identity, `uhrbat.factory.model_identity`), reads the
rows already written under the run files' one corruption policy (`uhrbat.runfiles.RowFile`: a torn
last line from a kill is cut with a note; any other damage is refused, naming the file, line and
fix) and appends each new row as one fsynced line (`uhrbat.runfiles.JsonlAppender`). A row's
GeoJSON file is written (atomically) *before* its row, so every row in the file has its GeoJSON.
Rerunning the same command skips the ids already written: a SIGKILL at any moment loses at most
the rows being computed, never duplicates one. `--retry-errors` appends a new row for each retried
error row (the later row of an id wins) and the run ends by compacting the file back to one row
per id (an atomic rewrite).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import BatchEngineError
from uhrbat.factory import model_identity
from uhrbat.runfiles import RUN_JSON, JsonlAppender, RowFile, RunLock, atomic_write, check_run_settings

__all__ = [
    "PARQUET",
    "PREDICTIONS",
    "ROW_KEYS",
    "RUN_JSON",
    "SUMMARY",
    "Answered",
    "PredictionStore",
    "Summary",
    "geojson_name",
    "output_row",
    "write_parquet",
]

PREDICTIONS = "predictions.jsonl"
PARQUET = "predictions.parquet"
SUMMARY = "summary.json"

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
    """One finished row: the `predictions.jsonl` row, its GeoJSON FeatureCollection (or None),
    whether answering it prepared (encoded + scored) its scene rather than reusing a cached one,
    and the unexpected model exception behind an error row (the abort rule's input; see
    `uhrbat.rowrunner`)."""

    row: dict[str, Any]
    geojson: dict[str, Any] | None = None
    prepared: bool = False
    unexpected: BaseException | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "row": self.row,
                "geojson": self.geojson,
                "prepared": self.prepared,
                "unexpected": None if self.unexpected is None else str(self.row.get("error")),
            },
            default=str,
        )

    @classmethod
    def from_json(cls, text: str) -> Answered:
        d = json.loads(text)
        unexpected = d.get("unexpected")
        return cls(
            row=d["row"],
            geojson=d.get("geojson"),
            prepared=bool(d.get("prepared")),
            # an actor's exception cannot cross the process boundary: its one line, as an engine error
            unexpected=None if not unexpected else BatchEngineError(f"the model failed in a Ray actor: {unexpected}"),
        )


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
        if getattr(result, "region", None) is not None:  # a region / zoom window: where, in the full image
            out["region"] = result.region
        if getattr(result, "zoom", None) is not None:
            z = result.zoom
            out["windows"] = [
                {"pixels": list(w.pixels), "bounds": w.bounds, "score": w.score, "answer": w.result.answer}
                for w in z.windows
            ]
            out["zoom_note"] = z.note
    return out


_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def geojson_name(row_id: str, suffix: str = ".geojson") -> str:
    """File name of a row's kept-token file: the id itself when it is a safe file name, else its
    hash; `suffix` ".geojson", or ".pixels.json" for the pixel-space file of an image without
    georeference (`uhrbat.io.geo.kept_tokens_document`)."""
    if _SAFE.match(row_id):
        return f"{row_id}{suffix}"
    return f"id-{hashlib.sha256(row_id.encode('utf-8')).hexdigest()[:24]}{suffix}"


class PredictionStore:
    """Exclusive, resumable writer of one batch run directory (a context manager).

    fingerprint: the settings that decide answers (model, selection, generation, reader); a rerun
    with different ones is refused, naming the first difference. geojson_dir: where each row's
    kept tokens go (`<id>.geojson`), or None. log: where notes go (a torn last line cut).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        fingerprint: dict[str, Any],
        geojson_dir: str | os.PathLike | None = None,
        *,
        log: Any = None,
    ) -> None:
        self.out = Path(out_dir).expanduser()
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.geojson_dir = Path(geojson_dir).expanduser() if geojson_dir is not None else None
        self.path = self.out / PREDICTIONS
        self.log = log
        self.done: set[str] = set()  # ids with a row (only ids are kept: the archive may be huge)
        self.error_ids: set[str] = set()
        self.retrying: set[str] = set()  # error rows this run answers again (--retry-errors)
        self.written_now: set[str] = set()
        self.superseded = 0  # rows in the file replaced by a later row of the same id
        self.geojson_written = 0
        self.created: list[Path] = []  # files this run created besides the rows (run.json)
        self._lock = RunLock(self.out, "batch")
        self._appender: JsonlAppender | None = None

    def __enter__(self) -> PredictionStore:
        self._lock.__enter__()
        try:
            had_settings = (self.out / RUN_JSON).exists()
            check_run_settings(self.out, self.fingerprint, what="batch", normalise={"model": model_identity})
            if not had_settings:
                self.created.append(self.out / RUN_JSON)
            rows = RowFile(self.path)
            for _, r in rows.rows():
                self._remember(r)
            self.superseded = rows.superseded
            note = rows.torn_note()
            if note and self.log is not None:
                self.log(note)
            self._appender = JsonlAppender(self.path)  # cuts the torn tail, if any
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

    def _remember(self, row: dict[str, Any]) -> None:
        rid = str(row["id"])
        self.done.add(rid)
        if row.get("error"):
            self.error_ids.add(rid)
        else:
            self.error_ids.discard(rid)

    def pending(self, rows: Iterable[Any], retry_errors: bool = False) -> list[Any]:
        """The rows still to answer: those without a row, and with `retry_errors` those whose row
        is an error (they get a new row; the old one is superseded)."""
        todo = []
        for r in rows:
            if r.id not in self.done:
                todo.append(r)
            elif retry_errors and r.id in self.error_ids:
                self.retrying.add(r.id)
                todo.append(r)
        return todo

    def write(self, answered: Answered) -> bool:
        """GeoJSON first (atomic), then the row (one fsynced line): a row never lacks its GeoJSON.
        Returns False (and writes nothing) for an id that already has its row."""
        assert self._appender is not None, "PredictionStore used outside `with`"
        row = answered.row
        rid = str(row["id"])
        # a second answer for an id (e.g. resent by a restarted Ray actor) is dropped
        if rid in self.written_now or (rid in self.done and rid not in self.retrying):
            return False
        if self.geojson_dir is not None and answered.geojson is not None:
            atomic_write(
                self.geojson_dir / geojson_name(rid, ".geojson" if "type" in answered.geojson else ".pixels.json"),
                json.dumps(answered.geojson, separators=(",", ":")) + "\n",
            )
            self.geojson_written += 1
        if rid in self.done:
            self.superseded += 1
        self._appender.write(row)
        self._remember(row)
        self.written_now.add(rid)
        return True

    def compact(self) -> bool:
        """Rewrite `predictions.jsonl` with only the last row of each id (atomically), when some
        row was superseded (`--retry-errors`). Returns whether it rewrote the file."""
        if not self.superseded:
            return False
        if self._appender is not None:
            self._appender.close()
            self._appender = None
        last = {str(r["id"]): n for n, r in RowFile(self.path).rows()}
        keep = set(last.values())

        def copy(tmp: str) -> None:
            with self.path.open("rb") as src, open(tmp, "wb") as dst:
                for n, line in enumerate(src, 1):
                    if n in keep:
                        dst.write(line)

        atomic_write(self.path, copy)
        self.superseded = 0
        self._appender = JsonlAppender(self.path)
        return True

    def read_rows(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """The file's rows for `ids`, in that order (read back from disk; the last row of an id wins)."""
        wanted = set(ids)
        by_id: dict[str, dict[str, Any]] = {}
        for _, r in RowFile(self.path).rows():
            rid = str(r["id"])
            if rid in wanted:
                by_id[rid] = r
        return [by_id[i] for i in ids if i in by_id]


def write_parquet(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """`predictions.parquet`: the JSONL columns, `timings` flattened to `timing_<stage>` float columns."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the ray/eval extras
        from uhrbat.errors import ConfigError

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
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


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
    outputs: list[str] = field(default_factory=list)  # what this run wrote (the CLI's last line)

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
        retried = self.extra.get("retried")
        return (
            f"{self.rows} rows ({self.already_done} already done, {self.written} written now"
            + (f", {retried} error rows retried" if retried else "")
            + f"), {self.errors} errors, {self.scenes_prepared} scenes prepared, {self.wall_s:.1f} s wall "
            f"({self.rows_per_s:.2f} rows/s), engine {self.engine}"
        )

    def wrote_line(self) -> str:
        """'wrote A, B and C': every file this run wrote."""
        if not self.outputs:
            return "wrote nothing"
        if len(self.outputs) == 1:
            return f"wrote {self.outputs[0]}"
        return f"wrote {', '.join(self.outputs[:-1])} and {self.outputs[-1]}"
