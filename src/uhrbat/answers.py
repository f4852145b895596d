"""Answer assembly: generated ids + what the model kept + timings -> `AskResult`."""

from __future__ import annotations

import re
from typing import Any

from uhrbat.compression.types import Selection
from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry
from uhrbat.generation import as_set, until_eos
from uhrbat.results import AskResult, KeptToken

__all__ = ["build_result", "clean_answer", "kept_tokens"]

_SPECIAL_RE = re.compile(r"<\|[^|]*\|>( ?assistant)?|<image>|</?s>|<pad>|<eos>|<unk>")


def clean_answer(text: str, compat: str = "none") -> str:
    """Strip specials and whitespace; in reference mode keep only the first non-empty line
    (the reference's post-processing, which truncates multi-line answers)."""
    if compat == "reference":
        text = _SPECIAL_RE.sub("", text)
        lines = [re.sub(r"\s+", " ", ln).strip() for ln in text.splitlines()]
        return next((ln for ln in lines if ln), "")
    return text.strip()


def kept_tokens(selections: dict[int, Selection], geometry: TokenGeometry = CLIP_336_14) -> list[KeptToken]:
    """Selection rows (scale order, emission order) -> `KeptToken` records carrying `geometry`
    (the model config's tile and patch sides)."""
    out: list[KeptToken] = []
    for scale, sel in selections.items():
        offs = sel.offsets.tolist()
        pos = sel.positions.tolist()
        for i in range(len(sel)):
            members = pos[offs[i] : offs[i + 1]]
            tile, row, col = geometry.unflat(members[0])
            out.append(
                KeptToken(
                    scale=int(scale),
                    tile=tile,
                    row=row,
                    col=col,
                    score=float(sel.scores[i]),
                    merged=bool(sel.merged[i]),
                    group=int(sel.group[i]),
                    members=members,
                    tile_size=geometry.tile_size,
                    patch_size=geometry.patch_size,
                )
            )
    return out


def build_result(
    model: Any,
    processor: Any,
    raw_ids: list[int],
    trace: Any,
    opened: Any,
    view_stats: Any,
    prompt_tokens: int,
    prefill: float,
    decode: float,
    return_relevance: bool,
) -> AskResult:
    """One row's `AskResult`: the cleaned answer, kept tokens, per-stage timings and reuse."""
    gc = model.generation_config
    cfg = model.config
    answer_ids = until_eos(raw_ids, gc.eos_token_id, gc.pad_token_id)
    ended = len(answer_ids) < len(raw_ids) and raw_ids[len(answer_ids)] in as_set(gc.eos_token_id)
    text = processor.decode(answer_ids, skip_special_tokens=True)
    timings = {
        "load": opened.timings["load"],
        "tiles": opened.timings["tiles"],
        "encode": opened.timings["encode"] + view_stats.encode,
        "score": trace.timings.get("score", 0.0),
        "select": trace.timings.get("select", 0.0),
        "prefill": prefill,
        "decode": decode,
    }
    reuse = {"features": opened.features}
    if view_stats.groups != "none":
        reuse["groups"] = view_stats.groups
    scene, geometry = opened.scene, opened.scene.geometry
    tiles = {
        s: {
            "encoded": opened.encoded.get(s, 0) + view_stats.tiles_encoded.get(s, 0),  # for this question
            "held": int(scene.encoded(s).numel()),  # by the scene now
            "total": geometry.num_tiles(s),
        }
        for s in cfg.scales
    }
    return AskResult(
        answer=clean_answer(text, cfg.compat),
        tokens=kept_tokens(trace.selections, cfg.geometry),
        timings=timings,
        timings_detail={"group": view_stats.group},
        num_visual_tokens=sum(len(s) for s in trace.selections.values()),
        image_size=tuple(opened.size),
        scales=list(cfg.scales),
        generated_ids=answer_ids,
        relevance={s: r.cpu() for s, r in trace.relevance.items()} if return_relevance else None,
        cache=opened.features,
        reuse=reuse,
        tiles=tiles,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(answer_ids) + int(ended),
        region=None if opened.region is None else opened.region.to_dict(),
        window_source=None if opened.region is None else opened.source,
    )
