"""What the MCP tools do, as plain synchronous methods (no MCP types): open a scene under the
allowed folders with the untrusted reader, ask about it, draw it, describe it, close it.

`uhrbat.mcp.server` wraps each method as an MCP tool (run in a worker thread; `UhrBatError`s
become tool errors). The pipeline is reached only through `uhrbat.mcp.adapter`.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from uhrbat.errors import ConfigError, UhrBatError
from uhrbat.mcp import adapter
from uhrbat.mcp.scenes import Question, SceneTable, allowed_roots, resolve_allowed
from uhrbat.mcp.schemas import (
    MCP_SELECTORS,
    AskOutput,
    Closed,
    QuestionRecord,
    SceneDescription,
    SceneInfo,
)
from uhrbat.mcp.views import LOOK_MAX_SIDE, overlay_view, plain_view, png_bytes

#: Features `ask` returns as evidence unless the call says otherwise (the most relevant first).
DEFAULT_MAX_REGIONS = 100

_CACHE_WORDS = {
    "miss": "prepared now (tiles, CLIP features, groups); follow-up questions reuse it",
    "hit": "reused from an earlier question (no tiling, CLIP or K-Means)",
    "disk": "read from the on-disk scene cache",
    "off": "prepared now (the scene cache is off: follow-ups prepare it again)",
}


class ModelLoadError(UhrBatError):
    """The server's model could not be loaded."""


class PipelineLoader:
    """Loads the pipeline once, in a background thread, so the server answers `initialize`,
    `tools/list` and `open_scene` while the weights load; calling it waits for the pipeline."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._future: Future = Future()
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._run, name="uhrbat-mcp-model-load", daemon=True).start()

    def _run(self) -> None:
        try:
            self._future.set_result(self._load())
        except BaseException as e:  # reported by every call that needs the model
            self._future.set_exception(e)
            print(f"error: the model could not be loaded: {_one_line(e)}", file=sys.stderr, flush=True)

    def __call__(self) -> Any:
        self.start()
        try:
            return self._future.result()
        except UhrBatError as e:
            raise ModelLoadError(f"the model could not be loaded ({_one_line(e)}); restart the server") from e
        except Exception as e:
            raise ModelLoadError(
                f"the model could not be loaded (internal error: {type(e).__name__}: {_one_line(e)}); "
                f"restart the server (with --debug for the traceback)"
            ) from e


@dataclass(frozen=True)
class ServiceOptions:
    """Server-wide settings (from the `uhrbat mcp` command line)."""

    allowed_paths: Sequence[str]
    read: dict[str, Any] = field(default_factory=dict)  # `open_image` keywords (stretch, max_pixels)
    max_new_tokens: int = 512
    max_scenes: int = 8
    scene_ttl_s: float = 3600.0


class SceneService:
    """The five tools over one pipeline and one scene table."""

    def __init__(self, pipeline: Callable[[], Any], options: ServiceOptions, table: SceneTable | None = None):
        self.pipeline = pipeline  # () -> UhrBatPipeline (may wait for the model to load)
        self.options = options
        self.roots = allowed_roots(options.allowed_paths)
        self.table = table or SceneTable(options.max_scenes, options.scene_ttl_s)

    # ---------------------------------------------------------------- open / close
    def open_scene(self, path: str, bands: Sequence[int] | None = None) -> SceneInfo:
        from uhrbat.io import decode_section
        from uhrbat.scene.origin import open_source

        real = resolve_allowed(path, self.roots)
        self.table.check_room()  # before decoding, not after
        read = dict(self.options.read)
        if bands is not None:
            read["bands"] = tuple(bands)
        with decode_section():  # the source remembers its file: regions are windows of it (adapter.window)
            source = open_source(real, trust="untrusted", **read)
        scene = self.table.add(real, source)
        return SceneInfo(id=scene.id, **scene_facts(source))

    def close_scene(self, scene_id: str) -> Closed:
        scene = self.table.close(scene_id)
        return Closed(id=scene.id, questions_asked=len(scene.questions))

    # ---------------------------------------------------------------- ask
    def ask(
        self,
        scene_id: str,
        question: str,
        region: Sequence[float] | None = None,
        region_crs: str | None = None,
        budgets: Any = None,
        selector: Any = None,
        max_regions: int = DEFAULT_MAX_REGIONS,
    ) -> tuple[AskOutput, str]:
        """The answer with its evidence, and a short text summary of both."""
        from uhrbat.cli.ask import check_questions

        scene = self.table.get(scene_id)
        check_questions([question])
        selection = selection_overrides(budgets, selector)
        request = adapter.region_options(region, region_crs)
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 0:
            raise ConfigError(f"max_regions must be an integer >= 0 (0 = all), got {max_regions!r}")
        window = None if request is None else adapter.window(scene, request)  # before the model: a bad region
        pipe = self.pipeline()
        with scene.lock:
            if scene.handle is None:
                scene.handle = adapter.scene_handle(pipe, scene.source)
            res = adapter.ask(
                pipe,
                scene.handle if window is None else window,
                question,
                max_new_tokens=self.options.max_new_tokens,
                **selection,
            )
            seconds = float(sum(res.timings.values()))
            SceneTable.record(scene, Question(question, res.answer, res.cache, seconds))
            scene.last = (question, res)
            number = len(scene.questions)
        about = {"question": question, "answer": res.answer}
        evidence = evidence_document(res.tokens, scene.source if window is None else window, max_regions, about)
        out = AskOutput(
            scene_id=scene.id,
            question=question,
            answer=res.answer,
            region=res.region,
            coordinate_space=evidence["coordinate_space"],
            evidence=evidence,
            regions_total=len(res.tokens),
            regions_returned=len(evidence_items(evidence)),
            question_number=number,
            cache=res.cache,
            timings={k: float(v) for k, v in res.timings.items()},
            seconds=seconds,
            settings=adapter.settings(pipe, selection),
        )
        return out, ask_summary(out)

    # ---------------------------------------------------------------- look / describe
    def look(self, scene_id: str, region: Sequence[float] | None = None, region_crs: str | None = None):
        """(PNG bytes, text): the last question's relevance overlay, or the plain scene; with a
        region, that window (the last question's overlay when it was about the same window).
        Without one, the last question's frame (its window, when it asked about a region)."""
        from uhrbat.io import decode_section

        scene = self.table.get(scene_id)
        request = adapter.region_options(region, region_crs)
        window = None if request is None else adapter.window(scene, request)
        last = scene.last
        if last is not None:  # the frame the last answer's tokens belong to (its window, for a region)
            asked = last[1].window_source
            if window is not None and _pixels(asked) != _pixels(window):
                last = None  # the last question was about another part of the scene
            elif window is None:
                window = asked
        source = scene.source if window is None else window
        w, h = source.size
        what = "the scene" if window is None else f"the window {_pixels(window)} of the scene ({_scene_size(window)})"
        with decode_section():  # the view reads the scene's pixels again
            if last is None:
                image = plain_view(source, LOOK_MAX_SIDE)
                text = (
                    f"No question has been asked about {what} yet: this is the plain image ({w}x{h} px, shown "
                    f"at {image.width}x{image.height}). Ask a question to see where the model looks."
                )
            else:
                question, res = last
                image, box = overlay_view(source, res, question, LOOK_MAX_SIDE)
                text = (
                    f"Where the model looked for the last question ({_quote(question)} -> "
                    f"{_quote(res.answer)}): warm heatmap = relevance, boxes = kept visual tokens per scale, "
                    f"dashed outlines = merged groups. {what[0].upper() + what[1:]} ({w}x{h} px) fills the box "
                    f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}] of this {image.width}x{image.height} picture "
                    f"(1 picture px = {w / max(1, box[2] - box[0]):.2f} scene px); legend and caption below it."
                )
        return png_bytes(image), text

    def describe_scene(self, scene_id: str) -> SceneDescription:
        scene = self.table.get(scene_id)
        history = list(scene.questions)
        return SceneDescription(
            id=scene.id,
            **scene_facts(scene.source),
            path=scene.path,
            questions_asked=len(history),
            questions=[QuestionRecord(**vars(q)) for q in history],
            prepared=scene.last is not None,
            last_cache=history[-1].cache if history else None,
            idle_seconds=round(self.table.idle_seconds(scene), 3),
            expires_in_seconds=_round(self.table.expires_in(scene)),
        )


# ----------------------------------------------------------------------------- helpers
def selection_overrides(budgets: Any, selector: Any) -> dict[str, Any]:
    """A call's budgets / selector, checked by the same parser as `--budgets` (one-line errors)."""
    from uhrbat.processing.processing_uhrbat import parse_budgets

    out: dict[str, Any] = {}
    if budgets is not None:
        out["budgets"] = parse_budgets(budgets)
    if selector is not None:
        if selector not in MCP_SELECTORS:
            raise ConfigError(f"selector must be one of {', '.join(MCP_SELECTORS)}, got {selector!r}")
        out["selector"] = selector
    return out


def scene_facts(source: Any) -> dict[str, Any]:
    """width, height, crs, bounds, bands (and a georeference note) of an opened source."""
    import numpy as np

    w, h = (int(v) for v in source.size)
    georef = getattr(source, "georef", None)
    crs = bounds = None
    if georef is not None:
        crs = georef.crs_name
        xs, ys = georef.pixel_to_crs([0, w, w, 0], [0, 0, h, h])
        bounds = [float(np.min(xs)), float(np.min(ys)), float(np.max(xs)), float(np.max(ys))]
    bands = getattr(source, "bands", None)
    return {
        "width": w,
        "height": h,
        "crs": crs,
        "bounds": bounds,
        "bands": None if bands is None else [int(b) for b in bands],
        "georeference_note": getattr(source, "georef_note", None),
    }


def evidence_document(
    tokens: Sequence[Any], source: Any, max_regions: int, properties: dict[str, Any]
) -> dict[str, Any]:
    """The `max_regions` most relevant kept tokens (0 = all), as `uhrbat.io.geo.kept_tokens_document`
    writes them: GeoJSON in WGS84 when the scene is georeferenced, else the pixel-space document
    (`uhrbat.pixel-boxes/1`, never GeoJSON: a GIS would place pixels on the globe). Each item's
    `index` (and a feature's `id`) stays the token's position in the full list."""
    from uhrbat.io.geo import kept_tokens_document

    order = sorted(range(len(tokens)), key=lambda i: -float(tokens[i].score))
    if max_regions:
        order = order[:max_regions]
    doc, _ = kept_tokens_document([tokens[i] for i in order], source, properties=properties, untransformable="pixels")
    for item in doc.get("features", doc.get("tokens", [])):
        props = item.get("properties", item)
        props["index"] = order[props["index"]]
        if "id" in item:
            item["id"] = props["index"]
    doc["tokens_total"] = len(tokens)
    doc["items_limit"] = max_regions
    doc["items_limited"] = bool(max_regions) and len(tokens) > max_regions
    doc["items_order"] = "score, highest first"
    return doc


def evidence_items(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-token properties (box_px, score, scale, ...) of an evidence document, in order."""
    if "features" in doc:
        return [f["properties"] for f in doc["features"]]
    return list(doc["tokens"])


def ask_summary(out: AskOutput) -> str:
    """A few lines an agent reads: the answer, where the evidence is, what the question cost."""
    where = (
        "GeoJSON, longitude/latitude (WGS84)"
        if out.coordinate_space == "wgs84"
        else f"scene pixels, x right, y down, not GeoJSON: {out.evidence['coordinate_note'].split(': ', 1)[-1]}"
    )
    top = []
    for p in evidence_items(out.evidence)[:3]:
        box = ", ".join(f"{v:g}" for v in p["box_px"])
        top.append(f"[{box}] px (score {p['score']:.3g}, {p['scale']}-px scale)")
    ev = out.evidence
    held = f"the {out.regions_returned} most relevant" if ev["items_limited"] else f"{out.regions_returned}"
    padding = ev.get("tokens_in_padding_dropped", 0)
    lines = [
        out.answer,
        "",
        f"Evidence: {out.regions_total} visual tokens kept; {held} are in the structured result's `evidence` "
        f"({where})" + (f"; {padding} more lie in the square padding, outside the image." if padding else "."),
    ]
    if out.region is not None:
        x0, y0, x1, y1 = out.region["pixels"]
        note = f" ({out.region['note']})" if out.region.get("note") else ""
        lines.append(
            f"Asked about the window [{x0}, {y0}, {x1}, {y1}] of the scene ({x1 - x0}x{y1 - y0} px, read at native "
            f"resolution){note}; boxes are in the scene's coordinates."
        )
    if top:
        lines.append("Most relevant: " + "; ".join(top) + ".")
    stages = ", ".join(f"{k} {v:.2f}" for k, v in out.timings.items())
    lines.append(
        f"Question {out.question_number} on this scene: {out.seconds:.2f} s ({stages}); the scene was "
        f"{_CACHE_WORDS.get(out.cache, out.cache)}. Settings: {out.settings}."
    )
    return "\n".join(lines)


def _pixels(source: Any) -> list[int] | None:
    """The window a source shows, as [x0, y0, x1, y1] scene pixels (None: the whole scene)."""
    region = getattr(source, "region", None)
    return None if region is None else [int(v) for v in region.pixels]


def _scene_size(source: Any) -> str:
    sw, sh = source.region.scene_size
    return f"{sw}x{sh} px"


def _quote(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
