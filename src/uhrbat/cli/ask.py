"""`uhrbat ask` (one or several questions about one image) and `uhrbat trace`.

Everything that can be checked without the model is checked first (questions, option values,
output paths, the device, the image file, the mask file), so a bad input never costs a model
load or a minute of compute. On a terminal, `ask` shows each stage as it runs (stderr).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from uhrbat.cli import options as opt
from uhrbat.errors import PromptError


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def check_questions(questions: Sequence[str]) -> list[str]:
    """Validate every question before anything runs (`PromptError` naming the question)."""
    from uhrbat.processing.prompt import validate_question

    out = []
    for i, q in enumerate(questions):
        try:
            validate_question(q)
        except PromptError as e:
            raise PromptError(f"question {i + 1}: {e}" if len(questions) > 1 else str(e)) from None
        out.append(q)
    return out


def open_source(image: Path, read: dict[str, Any]):
    """Open the image with the shared reader options (`opt.read_kwargs`)."""
    from uhrbat.io.sources import open_image

    return open_image(image, **read)


def load_masks(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    from uhrbat.compression.segments import load_mask_file

    return load_mask_file(path)


def load_pipeline(model: str, load: dict[str, Any], selection: dict[str, Any]):
    """`UhrBatPipeline.from_pretrained` with a progress line; returns (pipe, seconds)."""
    from uhrbat.pipeline import UhrBatPipeline

    t = time.perf_counter()
    _err(f"loading {model} on {load['device']} ...")
    pipe = UhrBatPipeline.from_pretrained(model, **load, **selection)
    # The number of budgets is checked against the model's scales here (SelectionOptions.resolve).
    return pipe, time.perf_counter() - t


def describe_selection(pipe: Any, selection: dict[str, Any]) -> str:
    """The settings that will run, checkpoint defaults filled in (the help can only say
    "the checkpoint's")."""
    from uhrbat.options import SelectionOptions

    o = SelectionOptions.of(**selection).resolve(pipe.model.config)
    text = f"budgets {','.join(map(str, o.budgets))}, selector {o.selector}"
    if o.selector == "kmeans":
        k = "the scale's budget" if not o.kmeans_clusters else f"{o.kmeans_clusters}"
        text += f" (clusters {k}, <= {o.kmeans_iters} iterations, seed {o.seed}, {o.kmeans_mode})"
    if o.encode == "gated":
        text += f", gated encoding (margin {o.gate_margin:g})"
    return text


def numbered(path: Optional[Path], i: int, n: int) -> Optional[Path]:
    """With several questions each gets its own output file: `overlay.png` -> `overlay.2.png`."""
    if path is None or n == 1:
        return path
    return path.with_name(f"{path.stem}.{i + 1}{path.suffix}")


def format_timings(res: Any) -> str:
    """Stage timings, then what the scene cache reused per stage (features vs groupings: never
    "hit" while K-Means re-runs) and, when a scale is partly encoded, its tiles."""
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in res.timings.items())
    reuse = getattr(res, "reuse", None) or {"features": res.cache}
    cache = reuse["features"] if reuse["features"] == "off" else f"{reuse['features']} for features"
    if "groups" in reuse and reuse["features"] != "off":
        cache += f", {reuse['groups']} for groups"
    tiles = getattr(res, "tiles", None) or {}
    partial = {s: t for s, t in tiles.items() if t["held"] < t["total"]}
    held = "  tiles " + " ".join(f"{s}:{t['held']}/{t['total']}" for s, t in tiles.items()) if partial else ""
    return f"{stages}  (scene cache: {cache}){held}"


_STAGE_TEXT = {
    "load": "reading the image",
    "tiles": "building the pyramid",
    "encode": "encoding {tiles} tiles (CLIP + projector)",
    "score": "scoring relevance",
    "group": "grouping tokens ({selector})",
    "select": "selecting tokens ({selector})",
    "prefill": "reading the prompt ({prompt_tokens} tokens)",
    "decode": "writing the answer",
}


def stage_text(stage: str, info: dict[str, Any]) -> str:
    """One status line for a progress event (`uhrbat.progress`)."""
    info = dict(info)
    if isinstance(info.get("tiles"), dict):
        info["tiles"] = sum(info["tiles"].values())
    try:
        return _STAGE_TEXT.get(stage, stage).format(**info)
    except (KeyError, IndexError):
        return _STAGE_TEXT.get(stage, stage).split(" (")[0]


@contextmanager
def live_status(enabled: bool) -> Iterator[Any]:
    """A progress callback that shows the running stage on stderr (rich), or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("starting ...") as status:
        t0 = time.perf_counter()

        def progress(stage: str, info: dict[str, Any]) -> None:
            status.update(f"{stage_text(stage, info)} ... [dim]{time.perf_counter() - t0:.0f}s[/dim]")

        yield progress


def show_progress(as_json: bool) -> bool:
    """Stage display only for a person watching: stderr is a terminal, and `--json` is not being
    piped somewhere (a script reading the output gets nothing extra)."""
    return sys.stderr.isatty() and not (as_json and not sys.stdout.isatty())


@opt.shared("selection", "masks", "model", "cache", "generation", "reading")
def ask(
    image: Annotated[
        Path, typer.Argument(metavar="IMAGE", help="Image file (PNG/JPEG/TIFF/GeoTIFF/COG/JPEG2000 ...).")
    ],
    questions: Annotated[
        list[str],
        typer.Argument(
            metavar="QUESTION", help="One or more questions; the scene is prepared once and reused for each."
        ),
    ],
    as_json: opt.Json = False,
    geojson: opt.GeoJson = None,
    explain: opt.Explain = None,
    *,
    opts: opt.Shared,
) -> None:
    """Ask questions about a (huge) image; answers go to stdout, stage timings to stderr.

    One question: the answer alone (or one JSON object with --json). Several questions: a
    "Q: ... / A: ..." pair each (or one JSON object per line with --json); --geojson/--explain
    then write one file per question (kept.geojson -> kept.1.geojson, kept.2.geojson, ...).
    """
    questions = check_questions(questions)
    n = len(questions)
    load = opts.load
    for path in (geojson, explain):  # numbered files land next to the checked path
        for i in range(n if path is not None and n > 1 else 0):
            opt.check_writable(numbered(path, i, n))
    source = open_source(image, opts.read)
    if geojson is not None:  # GeoJSON is lon/lat: refuse a non-georeferenced image before the model runs
        from uhrbat.io.geo import map_ready

        map_ready(source)
    mask = load_masks(opts.masks)
    pipe, t_load = load_pipeline(opts.model, load, opts.selection)
    _err(f"model loaded in {t_load:.1f}s; {describe_selection(pipe, opts.selection)}")
    with live_status(show_progress(as_json)) as progress:
        results = pipe.ask_many(
            source,
            questions,
            max_new_tokens=opts.max_new_tokens,
            masks=mask,
            return_relevance=explain is not None,
            progress=progress,
        )
    for i, (q, res) in enumerate(zip(questions, results)):
        _err((f"[{i + 1}/{n}] " if n > 1 else "") + format_timings(res))
        write_outputs(res, source, q, numbered(geojson, i, n), numbered(explain, i, n))
        if as_json:
            typer.echo(json.dumps(result_json(res, source, q), ensure_ascii=False))
        elif n == 1:
            typer.echo(res.answer)
        else:
            typer.echo(f"Q: {q}\nA: {res.answer}")


def result_json(res: Any, source: Any, question: str) -> dict[str, Any]:
    """`AskResult.to_dict()` with the question and each token's pixel box (and CRS box)."""
    from uhrbat.io import geo

    payload = {"question": question, **res.to_dict(with_tokens=False)}
    payload["tokens"] = geo.tokens_with_boxes(res.tokens, source)
    return payload


def write_outputs(res: Any, source: Any, question: str, geojson: Optional[Path], explain: Optional[Path]) -> None:
    if geojson is not None:
        from uhrbat.io import geo

        geo.write_geojson(geojson, res.tokens, source, properties={"question": question, "answer": res.answer})
        _err(f"wrote {geojson}")
    if explain is not None:
        from uhrbat.io import overlay

        overlay.render_overlay(source, res.tokens, res.relevance, question, res.answer, explain)
        _err(f"wrote {explain}")


def _out_safetensors(value: Path) -> Path:
    return opt.check_writable(value)


@opt.shared("selection", "model", "generation", attn="eager", max_new_tokens=8)
def trace(
    image: Annotated[Path, typer.Option("--image", metavar="FILE", help="Image file.")],
    question: Annotated[str, typer.Option("--question", help="The question.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            metavar="FILE.safetensors",
            callback=_out_safetensors,
            help="Output .safetensors file (checked writable before the model runs).",
        ),
    ],
    *,
    opts: opt.Shared,
) -> None:
    """Write the intermediates of one query (parity-fixture tensor names) to a safetensors file.

    --attn defaults to eager here: it matches the parity fixtures bitwise."""
    from safetensors.torch import save

    from uhrbat.tracing import trace_query

    check_questions([question])
    load = opts.load
    open_source(image, opt.read_kwargs())  # a missing / corrupt image fails before the model loads
    pipe, _ = load_pipeline(opts.model, load, opts.selection)
    tensors = trace_query(pipe, str(image), question, max_new_tokens=opts.max_new_tokens)
    # safetensors' save_file creates the file 0600; an ordinary open() follows the user's umask.
    out.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}))
    ids = tensors["gen.new_token_ids"].tolist()
    _err(f"wrote {len(tensors)} tensors to {out}; new token ids {ids}")


def register(app: typer.Typer) -> None:
    app.command("ask")(ask)
    app.command("trace")(trace)
