"""Generation from spliced prompts, with the prefill / decode split measured."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from uhrbat.progress import Progress

__all__ = ["generate", "until_eos"]


class _FirstToken(LogitsProcessor):
    """Records when generation first asks for next-token scores (the end of prefill).

    A logits processor, not a streamer: transformers refuses streamers with beam search."""

    def __init__(self, progress: Progress | None = None) -> None:
        self.at: float | None = None
        self.progress = progress

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = time.perf_counter()
            if self.progress is not None:
                self.progress("decode", {})
        return scores


def generate(
    model: Any,
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_kwargs: dict[str, Any],
    progress: Progress | None = None,
) -> tuple[torch.Tensor, float, float]:
    """`model.generate_from_embeds` -> `(sequences [B, N], prefill seconds, decode seconds)`."""
    gen_kwargs = dict(gen_kwargs)
    clock = _FirstToken(progress)
    processors = LogitsProcessorList(gen_kwargs.pop("logits_processor", None) or [])
    processors.append(clock)
    if progress is not None:
        progress("prefill", {"prompt_tokens": int(attention_mask.sum())})
    t0 = time.perf_counter()
    out = model.generate_from_embeds(
        input_ids, inputs_embeds, attention_mask, logits_processor=processors, **gen_kwargs
    )
    t_end = time.perf_counter()
    sequences = out if torch.is_tensor(out) else out.sequences
    first = clock.at or t_end
    return sequences, max(0.0, first - t0), max(0.0, t_end - first)


def as_set(ids: Any) -> set[int]:
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


def until_eos(ids: list[int], eos: Any, pad: Any) -> list[int]:
    """The answer ids: up to the first end-of-sequence id, trailing padding dropped."""
    stops = as_set(eos)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    while ids and pad is not None and ids[-1] == pad:
        ids = ids[:-1]
    return ids
