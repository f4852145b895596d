"""Before/after comparison of uhrbat's public outputs (issue 19: "behaviour unchanged").

Runs a fixed set of cases through the *public* interfaces only - the CLI as subprocesses
(`python -m uhrbat.cli.main ...`, with `sys.executable` and this process's environment, so
`PYTHONPATH=/some/worktree/src` picks the code under test) and the OpenAI-compatible HTTP server
(`uhrbat serve` on 127.0.0.1, a free port, queried with the `openai` client) - and writes one
normalised JSON file per case. Comparing the files of two code versions shows whether `ask --json`,
`chat`, `trace`, `batch`, `eval` and the HTTP API still give identical outputs for the same inputs.

    python benchmarks/compare_outputs.py capture OUT_DIR            # all cases
    python benchmarks/compare_outputs.py capture OUT_DIR --only ask_topk,http     # names or prefixes
    python benchmarks/compare_outputs.py capture OUT_DIR --only eval --force      # recapture one case
    python benchmarks/compare_outputs.py compare BEFORE_DIR AFTER_DIR   # exit 1 if a case differs
    python benchmarks/compare_outputs.py list                        # the cases

    # another worktree's code against the baseline captured on main (427f50e):
    PYTHONPATH=/work/wt-X/src python benchmarks/compare_outputs.py capture /tmp/after
    python benchmarks/compare_outputs.py compare /work/baseline-outputs /tmp/after

Cost: 24 processes, about 5 CPU-minutes in all (about 3 s of each is importing torch); on the
project's shared 2-core machine a capture took 10 min at load average ~8 and 35 min at ~20.

Inputs (resolved from this file: `<repo>/../shared`, or `--shared DIR`): the tiny reference-format
checkpoint `parity/uhrbat_tiny`, `parity/images/image_a.png` (3000x2000) and `image_b.png`
(1200x1200), `assets/aerial/neon_yell_1249x1035.png` (plain aerial PNG), and the GeoTIFFs
`assets/aerial/neon_osbs_400.tif` (UTM) and `assets/aerial/rmnp_rgb_geotiff.tif` (EPSG:4326).
Generated inputs (a batch JSONL list, an RSHR-format `dataset.json`) are written into a fresh
temporary work folder. Every subprocess runs with `OMP_NUM_THREADS` = `MKL_NUM_THREADS` =
`--threads` (default 2; MKL's results depend on the thread count), `COLUMNS=120`, no colour, and
without `UHRBAT_*`, `RANK`/`WORLD_SIZE`/`LOCAL_RANK` or `RAY_ADDRESS` from the caller.

A case file holds `output` (compared strictly: exit code, stdout JSON/text, written files, HTTP
status and bodies, error messages) and `log` (stderr of successful commands, eval's table on
stdout: reported when it differs, but not a failure unless `compare --strict-logs`), plus `meta`
(the command line; never compared). Floats are compared exactly (JSON keeps every bit).

Normalisation (`normalise`), applied to every value before it is written:

* dropped, at any depth, by key name: `timings`, `timings_detail`, `seconds`, `queue_seconds`,
  `latency_s`, `group_s`, `wall_s`, `rows_per_s`, `created`, `pid`, `date`, `timestamp`,
  `started_at`, `finished_at`; every key ending in `_s` (seconds: eval's `runtime/mean_<stage>_s`,
  `runtime/scene_time_saved_s`) or `_seconds`, and every key starting with `timing_` (the Parquet
  timing columns). Counts such as `runtime/scenes_prepared` stay.
* in every string: the temporary work folder -> `<work>`, the shared folder -> `<shared>`,
  the imported package's `src` folder -> `<src>`; a completion id `chatcmpl-<32 hex>` ->
  `chatcmpl-<id>` (a random uuid per response).
* in eval's `meta.scene_cache` text (report.json and report.md) and in `log` lines: decimal
  numbers (the measured seconds) -> `<num>`. `report.md` table rows whose metric is a dropped key
  are removed.

Nothing else is touched: answers, kept tokens, scores, boxes, GeoJSON coordinates, generated ids,
error messages, ids and counts are kept as written. JSON key order is not compared.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = (REPO / ".." / "shared").resolve()
MANIFEST = "_manifest.json"

# ----------------------------------------------------------------------------- normalisation
DROP_KEYS = frozenset(
    {
        "timings",
        "timings_detail",
        "seconds",
        "queue_seconds",
        "latency_s",
        "group_s",
        "wall_s",
        "rows_per_s",
        "created",
        "pid",
        "date",
        "timestamp",
        "started_at",
        "finished_at",
    }
)
DROP_SUFFIXES = ("_s", "_seconds")
DROP_PREFIXES = ("timing_",)
#: Keys whose text states measured seconds (eval report's scene-cache sentence).
TIMED_TEXT_KEYS = frozenset({"scene_cache"})
_COMPLETION_ID = re.compile(r"chatcmpl-[0-9a-f]{32}")
_DECIMAL = re.compile(r"\d+\.\d+")


def dropped(key: str) -> bool:
    """True for keys that hold run-dependent figures (timings, dates, pids)."""
    return key in DROP_KEYS or key.endswith(DROP_SUFFIXES) or key.startswith(DROP_PREFIXES)


@dataclass(frozen=True)
class Roots:
    """Run-dependent folders replaced by placeholders in every string (longest first)."""

    pairs: tuple[tuple[str, str], ...] = ()

    def sub(self, text: str) -> str:
        for path, name in self.pairs:
            text = text.replace(path, name)
        return _COMPLETION_ID.sub("chatcmpl-<id>", text)


def normalise(value: Any, roots: Roots = Roots(), key: str | None = None) -> Any:
    """`value` with run-dependent keys dropped and run-dependent text replaced (module docstring)."""
    if isinstance(value, dict):
        return {k: normalise(v, roots, k) for k, v in value.items() if not dropped(str(k))}
    if isinstance(value, (list, tuple)):
        return [normalise(v, roots) for v in value]
    if isinstance(value, str):
        text = roots.sub(value)
        return _DECIMAL.sub("<num>", text) if key in TIMED_TEXT_KEYS else text
    return value


def normalise_log(text: str, roots: Roots = Roots()) -> list[str]:
    """Log text (stderr) as lines with paths replaced and decimal numbers (seconds) masked."""
    return [_DECIMAL.sub("<num>", roots.sub(line)) for line in text.splitlines()]


def normalise_markdown(text: str, roots: Roots = Roots()) -> list[str]:
    """eval's report.md as lines: table rows of dropped metrics removed, timed sentences masked."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and dropped(cells[0]):
            continue
        if any(line.startswith(f"- **{k}**") for k in TIMED_TEXT_KEYS):
            line = _DECIMAL.sub("<num>", line)
        out.append(roots.sub(line))
    return out


# ----------------------------------------------------------------------------- diff
def diff(before: Any, after: Any, path: str = "$") -> Iterator[tuple[str, Any, Any]]:
    """Yield (json path, before, after) for every differing leaf; a missing side is `<absent>`.
    Lists of different lengths are compared item by item, then the extra items are reported."""
    if isinstance(before, dict) and isinstance(after, dict):
        for k in list(before) + [k for k in after if k not in before]:
            sub = f"{path}.{k}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k)) else f"{path}[{json.dumps(k)}]"
            yield from diff(before.get(k, _ABSENT), after.get(k, _ABSENT), sub)
    elif isinstance(before, list) and isinstance(after, list):
        for i in range(max(len(before), len(after))):
            b = before[i] if i < len(before) else _ABSENT
            a = after[i] if i < len(after) else _ABSENT
            yield from diff(b, a, f"{path}[{i}]")
    elif type(before) is not type(after) or before != after:
        yield path, before, after


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def short(value: Any, width: int = 100) -> str:
    text = repr(value) if isinstance(value, _Absent) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_diff(before: Any, after: Any, limit: int = 5) -> list[str]:
    """At most `limit` readable lines for the first differing paths, then a count of the rest."""
    found = list(diff(before, after))
    lines = [f"  {p}: before={short(b)} after={short(a)}" for p, b, a in found[:limit]]
    if len(found) > limit:
        lines.append(f"  ... and {len(found) - limit} more differing value(s)")
    return lines


# ----------------------------------------------------------------------------- running cases
@dataclass
class Context:
    """What every case needs: inputs, the work folder, the subprocess environment."""

    shared: Path
    work: Path
    env: dict[str, str]
    roots: Roots
    timeout: float
    server: Any = None  # a running `Server` for the http cases

    @property
    def model(self) -> str:
        return str(self.shared / "parity" / "uhrbat_tiny")

    def image(self, rel: str) -> str:
        return str(self.shared / rel)

    def cli(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        """`python -m uhrbat.cli.main ARGS` in the work folder; output decoded as UTF-8."""
        return subprocess.run(
            [sys.executable, "-m", "uhrbat.cli.main", *args],
            cwd=self.work,
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="backslashreplace",
            timeout=self.timeout,
        )


@dataclass
class Record:
    output: dict[str, Any]
    log: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


IMAGE_B = "parity/images/image_b.png"
IMAGE_A = "parity/images/image_a.png"
AERIAL = "assets/aerial/neon_yell_1249x1035.png"
GEOTIFF_UTM = "assets/aerial/neon_osbs_400.tif"
GEOTIFF_4326 = "assets/aerial/rmnp_rgb_geotiff.tif"
SMALL = ["--budgets", "8,16,24,32", "--clusters", "0"]
GEN = ["--max-new-tokens", "8"]


def json_lines(text: str) -> list[Any]:
    """Each non-empty line parsed as JSON; a line that is not JSON is kept as text."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"<not json>": line})
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else "<missing>"


def cli_record(ctx: Context, args: list[str], *, files: dict[str, Path] | None = None, as_json: bool = True) -> Record:
    """A CLI run: exit code and stdout (JSON lines or text) compared; stderr is the log, except
    when the command failed, where stderr (the error message) is output."""
    p = ctx.cli(args)
    output: dict[str, Any] = {"exit_code": p.returncode}
    if p.returncode == 0:
        output["stdout"] = json_lines(p.stdout) if as_json else p.stdout.splitlines()
        log = {"stderr": normalise_log(p.stderr, ctx.roots)}
    else:
        output["stdout"] = p.stdout.splitlines()
        output["stderr"] = p.stderr.splitlines()
        log = {}
    if files:
        output["files"] = {name: read_json(path) for name, path in files.items()}
    return Record(output=output, log=log, argv=["uhrbat", *args])


# --- ask / chat / trace
def ask(ctx: Context, image: str, questions: list[str], options: list[str], geojson: str | None = None) -> Record:
    """`uhrbat ask IMAGE QUESTIONS --model tiny OPTIONS`; with `geojson` (a work sub-folder) also
    `--geojson <work>/FOLDER/kept.geojson`, whose file(s) (`kept.N.geojson` for several questions)
    are captured."""
    args = ["ask", ctx.image(image), *questions, "--model", ctx.model, *options]
    files: dict[str, Path] = {}
    if geojson is not None:
        geo = ctx.work / geojson / "kept.geojson"
        geo.parent.mkdir(parents=True, exist_ok=True)
        args += ["--geojson", str(geo)]
        names = ["kept.geojson"] if len(questions) == 1 else [f"kept.{i + 1}.geojson" for i in range(len(questions))]
        files = {name: geo.with_name(name) for name in names}
    return cli_record(ctx, args, files=files, as_json="--json" in options)


def case_ask_kmeans_fast(ctx: Context) -> Record:
    """Default budgets (80/320/600/2000), K = budget, fast K-Means."""
    return ask(ctx, IMAGE_B, ["How many trees are there?"], ["--clusters", "0", *GEN, "--json"])


def case_ask_kmeans_exact(ctx: Context) -> Record:
    """Exact (reference loop order) K-Means on small budgets."""
    return ask(ctx, IMAGE_B, ["How many trees are there?"], [*SMALL, "--kmeans", "exact", *GEN, "--json"])


def case_ask_topk(ctx: Context) -> Record:
    """Top-k selector on the 3000x2000 image, default budgets."""
    return ask(ctx, IMAGE_A, ["Is there a river?"], ["--selector", "topk", *GEN, "--json"])


def case_ask_seed_budgets(ctx: Context) -> Record:
    """A non-default seed, budgets, K and iteration count."""
    options = ["--budgets", "4,12,40,100", "--clusters", "6", "--iters", "3", "--seed", "7", *GEN, "--json"]
    return ask(ctx, IMAGE_B, ["Where is the largest building?"], options)


def case_ask_compat_reference(ctx: Context) -> Record:
    """`--compat reference` (the reference's inference bugs), a longer answer."""
    options = [*SMALL, "--compat", "reference", "--max-new-tokens", "24", "--json"]
    return ask(ctx, IMAGE_B, ["Describe the scene."], options)


def case_ask_two_questions(ctx: Context) -> Record:
    """Two questions in one call (scene reuse: miss then hit) with numbered pixel-space GeoJSON files."""
    options = ["--budgets", "16,32,48,64", "--clusters", "0", *GEN, "--json"]
    return ask(ctx, AERIAL, ["How many trees are there?", "Is there a road?"], options, geojson="two")


def case_ask_two_questions_text(ctx: Context) -> Record:
    """Two questions without --json: the `Q: ... / A: ...` text output."""
    return ask(ctx, IMAGE_B, ["How many trees are there?", "Is there a road?"], [*SMALL, *GEN])


def case_ask_geotiff_geojson(ctx: Context) -> Record:
    """A UTM GeoTIFF: --json (pixel and CRS boxes) and --geojson (WGS84 lon/lat)."""
    options = ["--clusters", "0", "--budgets", "20,40,60,80", *GEN, "--json"]
    return ask(ctx, GEOTIFF_UTM, ["How many trees are there?"], options, geojson="geotiff")


def case_ask_geotiff_4326_topk(ctx: Context) -> Record:
    """An EPSG:4326 GeoTIFF with the top-k selector and --geojson."""
    options = ["--selector", "topk", "--budgets", "20,40,60,80", *GEN, "--json"]
    return ask(ctx, GEOTIFF_4326, ["Where is the lake?"], options, geojson="geotiff4326")


def case_ask_errors(ctx: Context) -> Record:
    """Bad inputs: exit codes and the one-line messages (usage error, missing file, wrong budget count,
    `<image>` in the question)."""
    runs = {
        "all_zero_budgets": ["ask", ctx.image(IMAGE_B), "Q?", "--model", ctx.model, "--budgets", "0,0,0,0"],
        "missing_image": ["ask", ctx.image("parity/images/missing.png"), "Q?", "--model", ctx.model],
        "image_in_question": ["ask", ctx.image(IMAGE_B), "What is <image> here?", "--model", ctx.model],
        "budget_count": ["ask", ctx.image(IMAGE_B), "Q?", "--model", ctx.model, "--budgets", "8,16"],
        "unknown_selector": ["ask", ctx.image(IMAGE_B), "Q?", "--model", ctx.model, "--selector", "nearest"],
    }
    output: dict[str, Any] = {}
    for name, args in runs.items():
        p = ctx.cli(args)
        output[name] = {"exit_code": p.returncode, "stdout": p.stdout.splitlines(), "stderr": p.stderr.splitlines()}
    return Record(output=output, argv=[" ".join(a) for a in runs.values()])


def case_chat(ctx: Context) -> Record:
    """`uhrbat chat` with piped lines: a question, option commands, a follow-up, an error line."""
    lines = [
        "How many trees are there?",
        "/seed 3",
        "/budgets 8,16,24,32",
        "Is there a road next to them?",
        "/iters 0",
        "What is <image>?",
        "/reset",
        "Describe the scene.",
        "/quit",
    ]
    args = ["chat", ctx.image(IMAGE_B), "--model", ctx.model, "--clusters", "0", *GEN]
    p = ctx.cli(args, "\n".join(lines) + "\n")
    output = {"exit_code": p.returncode, "stdin": lines, "stdout": p.stdout.splitlines()}
    # answers go to stdout; a bad line's one-line error goes to stderr, and is output too
    output["errors"] = [line for line in p.stderr.splitlines() if line.startswith("error")]
    rec = Record(output=output, log={"stderr": normalise_log(p.stderr, ctx.roots)}, argv=["uhrbat", *args])
    return rec


def case_trace(ctx: Context) -> Record:
    """`uhrbat trace`: every intermediate tensor's name, dtype, shape and SHA-256 of its bytes."""
    out = ctx.work / "trace.safetensors"
    args = ["trace", "--image", ctx.image(IMAGE_B), "--question", "How many trees are there?", "--out", str(out)]
    args += ["--model", ctx.model, *SMALL, "--max-new-tokens", "6"]
    p = ctx.cli(args)
    output: dict[str, Any] = {"exit_code": p.returncode}
    if p.returncode == 0 and out.exists():
        from safetensors.numpy import load_file

        tensors = load_file(str(out))
        output["tensors"] = {
            k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
            for k, v in sorted(tensors.items())
        }
        output["gen.new_token_ids"] = tensors["gen.new_token_ids"].tolist() if "gen.new_token_ids" in tensors else None
        return Record(output=output, log={"stderr": normalise_log(p.stderr, ctx.roots)}, argv=["uhrbat", *args])
    output["stderr"] = p.stderr.splitlines()
    return Record(output=output, argv=["uhrbat", *args])


# --- batch
def _batch_list(ctx: Context) -> Path:
    d = ctx.work / "batch"
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": "b-one", "image": IMAGE_B, "question": "How many trees are there?"},
        {"image": IMAGE_B, "question": "Is there a road?"},
        {"image": GEOTIFF_UTM, "question": "Where are the trees?"},
        {"id": "b-aerial", "image": AERIAL, "question": "Is there a building?"},
        {"image": "parity/images/missing.png", "question": "Anything?"},
        {"id": "b-list-cell", "image": IMAGE_B, "question": ["not", "text"]},
    ]
    path = d / "list.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _batch_args(ctx: Context, out: Path, budgets: str = "8,16,24,32") -> list[str]:
    args = ["batch", "--input", str(ctx.work / "batch" / "list.jsonl"), "--image-root", str(ctx.shared)]
    args += ["--out", str(out), "--model", ctx.model, "--budgets", budgets, "--clusters", "0", *GEN]
    return args + ["--geojson-dir", str(out / "geojson"), "--parquet", "--no-progress"]


def _batch_files(out: Path) -> dict[str, Any]:
    files: dict[str, Any] = {"predictions.jsonl": json_lines(_text(out / "predictions.jsonl"))}
    files["summary.json"] = read_json(out / "summary.json")
    files["run.json"] = read_json(out / "run.json")
    gdir = out / "geojson"
    files["geojson"] = {p.name: read_json(p) for p in sorted(gdir.glob("*.geojson"))} if gdir.is_dir() else None
    pq = out / "predictions.parquet"
    if pq.exists():
        import pyarrow.parquet as papq

        table = papq.read_table(pq)
        files["predictions.parquet"] = {
            "schema": [f"{f.name}: {f.type}" for f in table.schema],
            "rows": table.to_pylist(),
        }
    return files


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else ""


def case_batch(ctx: Context) -> Record:
    """`uhrbat batch` over a JSONL list (explicit and hashed ids, a shared scene, a GeoTIFF, a missing
    image, a non-text question cell): rows, summary, run.json, per-row GeoJSON, Parquet."""
    _batch_list(ctx)
    out = ctx.work / "batch" / "run"
    args = _batch_args(ctx, out)
    p = ctx.cli(args)
    output = {"exit_code": p.returncode, "files": _batch_files(out)}
    if p.returncode:
        output["stderr"] = p.stderr.splitlines()
    return Record(output=output, log={"stderr": normalise_log(p.stderr, ctx.roots)}, argv=["uhrbat", *args])


def case_batch_resume(ctx: Context) -> Record:
    """Rerunning the finished batch (nothing new is written), then a rerun with other options (refused)."""
    out = ctx.work / "batch" / "run"
    if not (out / "predictions.jsonl").exists():
        case_batch(ctx)
    before = _text(out / "predictions.jsonl")
    same = ctx.cli(_batch_args(ctx, out))
    other = ctx.cli(_batch_args(ctx, out, budgets="4,8,12,16"))
    output = {
        "rerun": {
            "exit_code": same.returncode,
            "predictions_unchanged": _text(out / "predictions.jsonl") == before,
            "summary.json": read_json(out / "summary.json"),
        },
        "other_options": {"exit_code": other.returncode, "stderr": other.stderr.splitlines()},
        "predictions_unchanged_after_refusal": _text(out / "predictions.jsonl") == before,
    }
    return Record(output=output, log={"rerun_stderr": normalise_log(same.stderr, ctx.roots)})


def case_batch_images_glob(ctx: Context) -> Record:
    """`uhrbat batch --images GLOB --question Q --batch-size 2` (one-question scenes batched together)."""
    out = ctx.work / "batch_glob"
    args = ["batch", "--images", str(ctx.shared / "parity" / "images" / "*.png"), "--question", "Is there a lake?"]
    args += ["--out", str(out), "--model", ctx.model, "--selector", "topk", "--budgets", "10,20,30,40"]
    args += [*GEN, "--batch-size", "2", "--no-progress"]
    p = ctx.cli(args)
    output: dict[str, Any] = {"exit_code": p.returncode}
    output["predictions.jsonl"] = json_lines(_text(out / "predictions.jsonl"))
    output["summary.json"] = read_json(out / "summary.json")
    if p.returncode:
        output["stderr"] = p.stderr.splitlines()
    return Record(output=output, log={"stderr": normalise_log(p.stderr, ctx.roots)}, argv=["uhrbat", *args])


# --- eval
def _rshr_dataset(ctx: Context) -> Path:
    """A tiny RSHR (XHRBench) `dataset.json`: list and dict options, a multi-letter answer, two
    images (one shared by two questions), a missing image."""
    d = ctx.work / "XHRBench"
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": "r0",
            "images": ["image_b.png"],
            "question": "What colour is the roof?",
            "options": ["red", "green", "blue", "white"],
            "answer": "A",
            "category": "COL",
        },
        {
            "id": "r1",
            "images": ["image_b.png"],
            "question": "How many cars are parked?",
            "options": {"A": "1", "B": "2", "C": "3", "D": "4"},
            "answer": ["B", "D"],
            "category": "OCN",
        },
        {
            "id": "r2",
            "images": ["image_a.png"],
            "question": "Is anything unusual?",
            "options": ["yes", "no", "maybe", "unknown"],
            "answer": "C",
            "category": "AD",
        },
        {
            "id": "r3",
            "images": ["missing.png"],
            "question": "Where is the bridge?",
            "options": ["north", "south", "east", "west"],
            "answer": "B",
            "category": "FP",
        },
        {
            "id": "r4",
            "images": ["image_a.png"],
            "question": "Which shape is the field?",
            "options": ["round", "square", "triangular", "irregular"],
            "answer": "D",
            "category": "Perception/SHP",
        },
    ]
    (d / "dataset.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return d


def case_eval(ctx: Context) -> Record:
    """`uhrbat eval --benchmark rshr` (batch size 2, --choice-by-logits): predictions, report.json,
    report.md and run.json; then `uhrbat score --json` on the predictions."""
    data = _rshr_dataset(ctx)
    out = ctx.work / "eval"
    args = ["eval", "--benchmark", "rshr", "--data", str(data), "--images", str(ctx.shared / "parity" / "images")]
    args += ["--model", ctx.model, "--out", str(out), *SMALL, "--max-new-tokens", "6", "--batch-size", "2"]
    args += ["--choice-by-logits", "--no-progress", "--device", "cpu"]
    p = ctx.cli(args)
    output: dict[str, Any] = {"exit_code": p.returncode}
    output["predictions.jsonl"] = json_lines(_text(out / "predictions.jsonl"))
    output["report.json"] = read_json(out / "report.json")
    output["report.md"] = normalise_markdown(_text(out / "report.md"), ctx.roots)
    output["run.json"] = read_json(out / "run.json")
    if p.returncode:
        output["stderr"] = p.stderr.splitlines()
    score = ctx.cli(
        ["score", "--benchmark", "rshr", "--data", str(data), "--predictions", str(out / "predictions.jsonl")]
        + ["--json"]
    )
    output["score"] = {"exit_code": score.returncode, "stdout": json_lines(score.stdout)}
    log = {"stdout": normalise_log(p.stdout, ctx.roots), "stderr": normalise_log(p.stderr, ctx.roots)}
    return Record(output=output, log=log, argv=["uhrbat", *args])


# --- HTTP
class Server:
    """`uhrbat serve` on a free loopback port, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, ctx: Context) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path = ctx.work / "serve.log"
        self.args = ["serve", "--model", ctx.model, "--port", str(self.port), "--max-new-tokens", "16"]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uhrbat.cli.main", *self.args],
            cwd=ctx.work,
            env=ctx.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.model = ctx.model

    def wait_ready(self, timeout: float) -> None:
        import openai

        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uhrbat serve exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                client.models.list()
                return
            except openai.APIConnectionError:
                time.sleep(0.3)
        raise RuntimeError(f"uhrbat serve did not answer within {timeout:.0f} s (log: {self.log_path})")

    def client(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=300)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and nothing else
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def user_message(url: str, text: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
    }


def http_post(ctx: Context, messages: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """A non-streamed chat completion through the openai client: status and the raw JSON body
    (an error response's body too)."""
    import openai

    client = ctx.server.client()
    try:
        raw = client.chat.completions.with_raw_response.create(model=ctx.server.model, messages=messages, **kwargs)
    except openai.APIStatusError as e:
        return {"status": e.status_code, "body": _json_or_text(e.response.text)}
    resp = raw.http_response
    parsed = raw.parse()  # the client must still understand the body
    return {
        "status": resp.status_code,
        "body": _json_or_text(resp.text),
        "client_content": parsed.choices[0].message.content,
    }


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"<not json>": text}


def case_http_models(ctx: Context) -> Record:
    """GET /v1/models."""
    raw = ctx.server.client().models.with_raw_response.list()
    return Record(output={"status": raw.http_response.status_code, "body": _json_or_text(raw.http_response.text)})


def case_http_chat(ctx: Context) -> Record:
    """Non-streamed completions with extra_body options and return_tokens: a PNG (pixel boxes) and the
    same PNG again (scene cache hit), a UTM GeoTIFF (CRS boxes + WGS84 GeoJSON), a seeded sampled one."""
    png = data_url(ctx.shared / IMAGE_B, "image/png")
    tif = data_url(ctx.shared / GEOTIFF_UTM, "image/tiff")
    opts = {"budgets": [8, 16, 24, 32], "kmeans_clusters": 0, "seed": 3, "return_tokens": True}
    output = {
        "png": http_post(ctx, [user_message(png, "How many trees are there?")], max_tokens=8, extra_body=opts),
        "png_again": http_post(ctx, [user_message(png, "Is there a road?")], max_tokens=8, extra_body=opts),
        "geotiff": http_post(
            ctx,
            [
                {"role": "system", "content": "You are a remote-sensing analyst."},
                user_message(tif, "Where are the trees?"),
            ],
            max_tokens=8,
            extra_body={"budgets": "20,40,60,80", "selector": "kmeans", "kmeans_iters": 4, "return_tokens": True},
        ),
        "sampled": http_post(
            ctx,
            [user_message(png, "Describe the scene.")],
            max_tokens=8,
            temperature=0.8,
            top_p=0.9,
            seed=11,
            extra_body={"budgets": [8, 16, 24, 32], "selector": "topk", "repetition_penalty": 1.2},
        ),
    }
    return Record(output=output)


def case_http_stream(ctx: Context) -> Record:
    """A streamed follow-up (system + user + assistant + user turns) with include_usage and a stop
    string: concatenated deltas, finish reason, the final `uhrbat` field, the usage chunk."""
    png = data_url(ctx.shared / IMAGE_B, "image/png")
    messages = [
        {"role": "system", "content": "You are a remote-sensing analyst."},
        user_message(png, "How many trees are there?"),
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Which one is the largest?"},
    ]
    client = ctx.server.client()
    extra = {"budgets": [8, 16, 24, 32], "kmeans_clusters": 0, "return_tokens": True}
    with client.chat.completions.with_streaming_response.create(
        model=ctx.server.model,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        stop=["\n\n"],
        extra_body=extra,
    ) as resp:
        status = resp.http_response.status_code
        events = [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]
    content, roles, finish, ext, usage, objects, errors = "", [], [], None, None, [], []
    for ev in events:
        if ev == "[DONE]":
            continue
        chunk = json.loads(ev)
        if "error" in chunk:
            errors.append(chunk)
            continue
        objects.append(chunk.get("object"))
        for choice in chunk.get("choices", []):
            delta = choice.get("delta", {})
            content += delta.get("content") or ""
            if delta.get("role"):
                roles.append(delta["role"])
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
        ext = chunk.get("uhrbat", ext)
        usage = chunk.get("usage") or usage
    output = {
        "status": status,
        "content": content,
        "roles": roles,
        "finish_reasons": finish,
        "uhrbat": ext,
        "usage": usage,
        "objects": sorted(set(objects)),
        "in_band_errors": errors,
        "ends_with_done": bool(events) and events[-1] == "[DONE]",
    }
    return Record(output=output)


def case_http_errors(ctx: Context) -> Record:
    """400/404 bodies: wrong budget count, misspelt extra_body key, unknown selector, K over the
    server's limit, a non-image data URL, n > 1, an unknown model."""
    png = data_url(ctx.shared / IMAGE_B, "image/png")
    msg = [user_message(png, "How many trees are there?")]
    bad_image = [user_message("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "Q?")]
    output = {
        "budget_count": http_post(ctx, msg, max_tokens=4, extra_body={"budgets": [8, 16]}),
        "misspelt_key": http_post(ctx, msg, max_tokens=4, extra_body={"budget": [8, 16, 24, 32]}),
        "unknown_selector": http_post(ctx, msg, max_tokens=4, extra_body={"selector": "nearest"}),
        "clusters_over_limit": http_post(ctx, msg, max_tokens=4, extra_body={"kmeans_clusters": 5000}),
        "max_tokens_over_limit": http_post(ctx, msg, max_tokens=64),
        "not_an_image": http_post(ctx, bad_image, max_tokens=4),
        "n_2": http_post(ctx, msg, max_tokens=4, n=2),
    }
    import openai

    try:
        ctx.server.client().chat.completions.create(model="no-such-model", messages=msg, max_tokens=4)
        output["unknown_model"] = {"status": 200}
    except openai.APIStatusError as e:
        output["unknown_model"] = {"status": e.status_code, "body": _json_or_text(e.response.text)}
    return Record(output=output)


CLI_CASES: dict[str, Callable[[Context], Record]] = {
    "ask_kmeans_fast": case_ask_kmeans_fast,
    "ask_kmeans_exact": case_ask_kmeans_exact,
    "ask_topk": case_ask_topk,
    "ask_seed_budgets": case_ask_seed_budgets,
    "ask_compat_reference": case_ask_compat_reference,
    "ask_two_questions": case_ask_two_questions,
    "ask_two_questions_text": case_ask_two_questions_text,
    "ask_geotiff_geojson": case_ask_geotiff_geojson,
    "ask_geotiff_4326_topk": case_ask_geotiff_4326_topk,
    "ask_errors": case_ask_errors,
    "chat": case_chat,
    "trace": case_trace,
    "batch": case_batch,
    "batch_resume": case_batch_resume,
    "batch_images_glob": case_batch_images_glob,
    "eval": case_eval,
}
HTTP_CASES: dict[str, Callable[[Context], Record]] = {
    "http_models": case_http_models,
    "http_chat": case_http_chat,
    "http_stream": case_http_stream,
    "http_errors": case_http_errors,
}
CASES = {**CLI_CASES, **HTTP_CASES}


def select_cases(only: str | None) -> list[str]:
    """All cases, or those named (a name, or a prefix such as `http` / `ask`)."""
    if not only:
        return list(CASES)
    wanted = [w.strip() for w in only.split(",") if w.strip()]

    def match(name: str, w: str) -> bool:
        return name == w or name.startswith(w + "_")

    names = [n for n in CASES if any(match(n, w) for w in wanted)]
    unknown = [w for w in wanted if not any(match(n, w) for n in CASES)]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}; `list` shows them")
    return names


# ----------------------------------------------------------------------------- commands
def subprocess_env(threads: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("UHRBAT_") and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS"}
    }
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        COLUMNS="120",
        NO_COLOR="1",
        TERM="dumb",
        PYTHONIOENCODING="utf-8",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    return env


def package_info(env: dict[str, str]) -> dict[str, str]:
    """Which uhrbat the subprocesses import (and its src folder, masked in outputs)."""
    code = (
        "import json, uhrbat, torch, transformers; print(json.dumps({'file': uhrbat.__file__, "
        "'torch': torch.__version__, 'transformers': transformers.__version__}))"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def git_state(path: Path) -> dict[str, str | None]:
    """Where the code under test comes from: the commit checked out at `path` (the package's src
    folder), the git tree of that folder (equal for equal code, whatever else the commit changed)
    and whether the folder has uncommitted changes. None outside git."""

    def git(*args: str) -> str | None:
        p = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    return {"git": git("rev-parse", "HEAD"), "src_tree": git("rev-parse", "HEAD:./"), "src_dirty": bool(dirty)}


def describe_code(info: dict[str, Any]) -> str:
    """One line naming the code a capture ran (a manifest or `git_state` + file + threads)."""
    dirty = ", src has uncommitted changes" if info.get("src_dirty") else ""
    return (
        f"uhrbat from {info.get('uhrbat')} (git {info.get('git')}, src tree {info.get('src_tree')}{dirty}, "
        f"threads {info.get('threads')})"
    )


def capture(args: argparse.Namespace) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} is not empty; give an empty folder, or --force to recapture the cases run")
    shared = Path(args.shared).resolve()
    if not (shared / "parity" / "uhrbat_tiny").is_dir():
        raise SystemExit(f"error: {shared}/parity/uhrbat_tiny not found; give the shared folder with --shared DIR")
    names = select_cases(args.only)
    env = subprocess_env(args.threads)
    info = package_info(env)
    src = Path(info["file"]).resolve().parents[1]
    code = {"uhrbat": info["file"], **git_state(src), "threads": args.threads}
    previous = json.loads((out / MANIFEST).read_text(encoding="utf-8")) if (out / MANIFEST).exists() else {}
    if previous and (code["src_dirty"] or any(previous.get(k) != code[k] for k in ("uhrbat", "src_tree", "threads"))):
        raise SystemExit(
            f"error: {out} holds a capture of other code or settings ({previous.get('uhrbat')}, src tree "
            f"{previous.get('src_tree')}, threads {previous.get('threads')}); capture into another folder"
        )
    for name in names:  # --force replaces the cases run now; the others stay
        (out / f"{name}.json").unlink(missing_ok=True)
    work = Path(tempfile.mkdtemp(prefix="uhrbat-compare-")).resolve()
    pairs = sorted({(str(work), "<work>"), (str(shared), "<shared>"), (str(src), "<src>")}, key=lambda p: -len(p[0]))
    ctx = Context(shared=shared, work=work, env=env, roots=Roots(tuple(pairs)), timeout=args.timeout)
    print(f"{describe_code(code)}; work folder {work}", file=sys.stderr)
    t_all = time.perf_counter()
    durations: dict[str, float] = {}
    failed: list[str] = []
    try:
        for name in names:
            if name in HTTP_CASES and ctx.server is None:
                ctx.server = Server(ctx)
                t = time.perf_counter()
                try:
                    ctx.server.wait_ready(args.timeout)
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    failed += [n for n in names if n in HTTP_CASES]
                    break
                durations["http_server_start"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            try:
                rec = CASES[name](ctx)
            except Exception as e:  # noqa: BLE001  (recorded, so `compare` reports the case)
                failed.append(name)
                rec = Record(output={"capture_error": f"{type(e).__name__}: {e}"})
            durations[name] = round(time.perf_counter() - t, 2)
            doc = {
                "case": name,
                "description": (CASES[name].__doc__ or "").strip(),
                "meta": {"argv": normalise(rec.argv, ctx.roots)},
                "output": normalise(rec.output, ctx.roots),
                "log": normalise(rec.log, ctx.roots),
            }
            (out / f"{name}.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"{name:28s} {durations[name]:7.1f} s", file=sys.stderr)
    finally:
        if ctx.server is not None:
            ctx.server.stop()
        if args.keep_work:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_all
    seconds = {**previous.get("seconds", {}), **durations}
    failed = sorted(set(failed) | (set(previous.get("failed", [])) - set(names)))
    manifest = {
        "cases": [n for n in CASES if n in set(names) | set(previous.get("cases", []))],
        **code,
        "python": sys.version.split()[0],
        "torch": info["torch"],
        "transformers": info["transformers"],
        "shared": str(shared),
        "seconds": seconds,
        "total_seconds": round(total, 1) if not previous else None,  # None: several runs
        "failed": failed,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"captured {len(names)} case(s) into {out} in {total:.0f} s", file=sys.stderr)
    if failed:
        print(f"cases that could not be captured: {failed}", file=sys.stderr)
    return 1 if failed else 0


def load_cases(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder of captured cases")
    return {
        p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json")) if p.name != MANIFEST
    }


def compare(args: argparse.Namespace) -> int:
    before_dir, after_dir = Path(args.before), Path(args.after)
    before, after = load_cases(before_dir), load_cases(after_dir)
    setups = []
    for side, folder in (("before", before_dir), ("after", after_dir)):
        m = folder / MANIFEST
        if m.exists():
            info = json.loads(m.read_text(encoding="utf-8"))
            print(f"{side}: {describe_code(info)}, torch {info.get('torch')}")
            setups.append((info.get("threads"), info.get("torch")))
    if len(setups) == 2 and setups[0] != setups[1]:
        print(
            "warning: captured with other threads or torch builds; floats may differ in the last bits for that reason"
        )
    found = set(before) | set(after)
    order = [n for n in CASES if n in found] + sorted(found - set(CASES))  # the capture order
    n_diff = 0
    for name in order:
        if name not in before or name not in after:
            n_diff += 1
            print(f"{name}: only in {'after' if name not in before else 'before'}")
            continue
        lines = describe_diff(before[name]["output"], after[name]["output"], args.limit)
        log_lines = describe_diff(before[name].get("log"), after[name].get("log"), args.limit)
        if lines or (log_lines and args.strict_logs):
            n_diff += 1
            print(f"{name}: DIFFERS")
            print("\n".join(lines or ["  (output identical)"]))
            if log_lines:
                print("  log (stderr) differs:")
                print("\n".join("  " + line for line in log_lines))
        elif log_lines:
            print(f"{name}: identical (log differs, not compared strictly):")
            print("\n".join("  " + line for line in log_lines))
        else:
            print(f"{name}: identical")
    print(f"{len(order) - n_diff} of {len(order)} case(s) identical")
    return 1 if n_diff else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="run the cases and write OUT_DIR/<case>.json")
    cap.add_argument("out_dir", metavar="OUT_DIR")
    cap.add_argument("--only", help="comma-separated case names or prefixes (ask, batch, http, ...)")
    cap.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared folder (default: %(default)s)")
    cap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of every subprocess (default: 2)")
    cap.add_argument("--timeout", type=float, default=1800, help="seconds per command (default: 1800)")
    cap.add_argument(
        "--force",
        action="store_true",
        help="write into a capture of the same code: the cases run are replaced, the others kept",
    )
    cap.add_argument("--keep-work", action="store_true", help="keep the temporary work folder (inputs, raw outputs)")
    cmp = sub.add_parser("compare", help="compare two capture folders; exit 1 if any case differs")
    cmp.add_argument("before", metavar="BEFORE_DIR")
    cmp.add_argument("after", metavar="AFTER_DIR")
    cmp.add_argument("--limit", type=int, default=5, help="differing paths shown per case (default: 5)")
    cmp.add_argument("--strict-logs", action="store_true", help="a differing log (stderr) also fails the comparison")
    sub.add_parser("list", help="list the cases")
    args = ap.parse_args(argv)
    if args.command == "capture":
        return capture(args)
    if args.command == "compare":
        return compare(args)
    for name, fn in CASES.items():
        print(f"{name:28s} {' '.join((fn.__doc__ or '').split())}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
