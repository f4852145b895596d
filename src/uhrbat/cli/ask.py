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
    """Open the image with the shared reader options (`opt.read_kwargs`; with a region, only
    that window, at native resolution). The source remembers the file, so the pipeline can read
    other windows of the scene (zoom); a region that sticks out of the image is clipped, with a
    note on stderr."""
    from uhrbat.io.sources import open_image
    from uhrbat.options import ReadOptions
    from uhrbat.scene.origin import Origin

    opts = ReadOptions.of(**read)
    source = open_image(image, **opts.open_kwargs())  # directly: errors and --debug tracebacks stay short
    source.origin = Origin(image, "local", opts)
    note = getattr(getattr(source, "region", None), "note", None)
    if note:
        _err(f"note: {note}")
    return source


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
    if o.zoom:
        text += f", zoom {o.zoom}"
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
    "zoom": "zooming in: {windows} window(s)",
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
    relevance_tif: opt.RelevanceTif = None,
    *,
    opts: opt.Shared,
) -> None:
    """Ask questions about a (huge) image; answers go to stdout, stage timings to stderr.

    One question: the answer alone (or one JSON object with --json). Several questions: a
    "Q: ... / A: ..." pair each (or one JSON object per line with --json); --geojson/--explain/
    --relevance-tif then write one file per question (kept.geojson -> kept.1.geojson, ...).
    --region reads one window at native resolution; --zoom N answers from up to N windows the
    first pass's relevance proposes. Boxes, GeoJSON and map files are in the full image's pixels
    and CRS.
    """
    questions = check_questions(questions)
    n = len(questions)
    load = opts.load
    for path in (geojson, explain, relevance_tif):  # numbered files land next to the checked path
        for i in range(n if path is not None and n > 1 else 0):
            opt.check_writable(numbered(path, i, n))
    source = open_source(image, opts.read)
    check_outputs(source, geojson, relevance_tif, opts.selection)
    mask = load_masks(opts.masks)
    pipe, t_load = load_pipeline(opts.model, load, opts.selection)
    _err(f"model loaded in {t_load:.1f}s; {describe_selection(pipe, opts.selection)}")
    with live_status(show_progress(as_json)) as progress:
        results = pipe.ask_many(
            source,
            questions,
            max_new_tokens=opts.max_new_tokens,
            masks=mask,
            return_relevance=explain is not None or relevance_tif is not None,
            progress=progress,
        )
    for i, (q, res) in enumerate(zip(questions, results)):
        _err((f"[{i + 1}/{n}] " if n > 1 else "") + format_timings(res))
        if res.zoom is not None:
            _err(zoom_line(res))
        where = answer_source(res, source)
        write_outputs(res, where, q, numbered(geojson, i, n), numbered(explain, i, n), numbered(relevance_tif, i, n))
        if as_json:
            typer.echo(json.dumps(result_json(res, source, q), ensure_ascii=False))
        elif n == 1:
            typer.echo(res.answer)
        else:
            typer.echo(f"Q: {q}\nA: {res.answer}")


def check_outputs(source: Any, geojson: Optional[Path], relevance_tif: Optional[Path], selection: dict) -> None:
    """Before the model runs: map outputs need a georeferenced image, zoom a readable scene."""
    if geojson is not None:  # GeoJSON is lon/lat: refuse a non-georeferenced image before the model runs
        from uhrbat.io.geo import map_ready

        map_ready(source)
    if relevance_tif is not None:
        from uhrbat.io.mapfiles import map_file_ready

        map_file_ready(source)
    if selection.get("zoom"):
        from uhrbat.zoom import check_zoomable

        check_zoomable(source)
    if selection.get("selector") == "segments" and (selection.get("zoom") or getattr(source, "region", None)):
        from uhrbat.errors import RegionError

        raise RegionError(
            "--selector segments reads the segment masks of the whole image (--masks), not of a window; "
            "drop --region / --zoom or use another selector"
        )


def answer_source(res: Any, source: Any) -> Any:
    """The source the answer's tokens belong to: the window zoom answered from, else `source`
    (itself a window for --region)."""
    return res.window_source if res.window_source is not None else source


def zoom_line(res: Any) -> str:
    """One stderr line: the windows zoom looked at, and which answered."""
    z = res.zoom
    if not z.windows:
        return f"zoom: {z.note}"
    shown = "; ".join(
        f"{'*' if i == z.chosen else ''}[{','.join(map(str, w.pixels))}] score {w.score:.3f}"
        for i, w in enumerate(z.windows)
    )
    return f"zoom: {len(z.windows)} window(s) in scene pixels, * answered: {shown}" + (f" ({z.note})" if z.note else "")


def result_json(res: Any, source: Any, question: str) -> dict[str, Any]:
    """`AskResult.to_dict()` with the question and each token's pixel box (and CRS box), in the
    full image's coordinates; with zoom, the same for pass 1 and every window."""
    from uhrbat.io import geo

    payload = {"question": question, **res.to_dict(with_tokens=False)}
    payload["tokens"] = geo.tokens_with_boxes(res.tokens, answer_source(res, source))
    if res.zoom is not None:
        for w, d in zip(res.zoom.windows, payload["windows"]):
            d["tokens"] = geo.tokens_with_boxes(w.result.tokens, w.result.window_source)
        scene = res.zoom.scene
        payload["zoom"]["scene"]["tokens"] = geo.tokens_with_boxes(scene.tokens, answer_source(scene, source))
    return payload


def write_outputs(
    res: Any,
    source: Any,
    question: str,
    geojson: Optional[Path],
    explain: Optional[Path],
    relevance_tif: Optional[Path] = None,
) -> None:
    if geojson is not None:
        from uhrbat.io import geo

        geo.write_geojson(geojson, res.tokens, source, properties={"question": question, "answer": res.answer})
        _err(f"wrote {geojson}")
    if explain is not None:
        from uhrbat.io import overlay

        drawn = overlay.render_overlay(source, res.tokens, res.relevance, question, res.answer, explain)
        written = [explain]
        if getattr(getattr(source, "georef", None), "crs", None) is not None:  # a GIS places it on the scene
            from uhrbat.io.mapfiles import write_overlay_georef

            written += write_overlay_georef(explain, drawn, source)
        _err(f"wrote {', '.join(map(str, written))}")
    if relevance_tif is not None:
        from uhrbat.io.mapfiles import write_relevance_geotiff

        write_relevance_geotiff(relevance_tif, res.relevance, source, tags={"question": question})
        _err(f"wrote {relevance_tif}")


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
