"""High-level API: ask questions about huge images.

```python
from uhrbat import UhrBatPipeline
pipe = UhrBatPipeline.from_pretrained("RL-MIND/UHR-BAT", device="cuda", dtype="bf16")
res = pipe.ask("scene.tif", "How many ships are in the harbour?")
print(res.answer, res.timings)
```
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from uhrbat.compression.types import Selection
from uhrbat.errors import PromptError
from uhrbat.io.images import open_image
from uhrbat.modeling.loading import DEFAULT_MODEL, load
from uhrbat.modeling.modeling_uhrbat import ImageTrace, SelectionOptions
from uhrbat.results import AskResult, KeptToken

_SELECTION_KEYS = ("budgets", "selector", "kmeans_clusters", "kmeans_iters", "kmeans_mode", "seed")
_SPECIAL_RE = re.compile(r"<\|[^|]*\|>( ?assistant)?|<image>|</?s>|<pad>|<eos>|<unk>")


class _Clock(BaseStreamer):
    """Records when generation emits its first new token (end of prefill)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2 and self.first_token_at is None:  # call 1 is the prompt
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def clean_answer(text: str, compat: str = "none") -> str:
    """Strip specials and whitespace; in reference mode keep only the first non-empty line
    (the reference's post-processing, which truncates multi-line answers)."""
    if compat == "reference":
        text = _SPECIAL_RE.sub("", text)
        lines = [re.sub(r"\s+", " ", ln).strip() for ln in text.splitlines()]
        return next((ln for ln in lines if ln), "")
    return text.strip()


def kept_tokens(selections: dict[int, Selection], tokens_per_side: int = 24) -> list[KeptToken]:
    """Selection rows (scale order, emission order) -> `KeptToken` records."""
    out: list[KeptToken] = []
    per_tile = tokens_per_side**2
    for scale, sel in selections.items():
        offs = sel.offsets.tolist()
        pos = sel.positions.tolist()
        for i in range(len(sel)):
            members = pos[offs[i] : offs[i + 1]]
            p = members[0]
            out.append(KeptToken(
                scale=int(scale), tile=p // per_tile, row=(p % per_tile) // tokens_per_side, col=p % tokens_per_side,
                score=float(sel.scores[i]), merged=bool(sel.merged[i]), group=int(sel.group[i]), members=members,
            ))
    return out


class UhrBatPipeline:
    """Model + processor + defaults, with `ask`, `ask_batch`, `choice_logprobs` and `trace`."""

    def __init__(self, model: Any, processor: Any, **selection: Any) -> None:
        self.model = model
        self.processor = processor
        self.selection = {k: v for k, v in selection.items() if k in _SELECTION_KEYS and v is not None}
        SelectionOptions.resolve(model.config, **self.selection)  # validate early
        self.load_seconds = 0.0

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        vision_tower: str | os.PathLike | None = None,
        attn_implementation: str | None = None,
        compat: str | None = None,
        **selection: Any,
    ) -> "UhrBatPipeline":
        t = time.perf_counter()
        overrides = {"compat": compat} if compat else {}
        net, proc = load(model, device=device, dtype=dtype, vision_tower=vision_tower,
                         attn_implementation=attn_implementation, **overrides)
        if compat:
            proc.compat = compat
        pipe = cls(net, proc, **selection)
        pipe.load_seconds = time.perf_counter() - t
        return pipe

    # ---------------------------------------------------------------- helpers
    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        opts = dict(self.selection)
        opts.update({k: v for k, v in overrides.items() if k in _SELECTION_KEYS and v is not None})
        return opts

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _inputs(self, images: Sequence[Any], questions: Sequence[str], budgets: Any, timings: dict[str, float]):
        t0 = time.perf_counter()
        sources = [open_image(im) for im in images]
        t1 = time.perf_counter()
        prompts = [self.processor.build_prompt(q) for q in questions]
        inputs = self.processor(images=sources, text=prompts, budgets=budgets)
        t2 = time.perf_counter()
        timings["load"] = t1 - t0
        timings["tiles"] = t2 - t1
        return inputs, sources

    # ---------------------------------------------------------------- API
    def ask(self, image: Any, question: str, max_new_tokens: int = 512, return_relevance: bool = False,
            masks: dict | None = None, **kwargs: Any) -> AskResult:
        """Answer one question about one image (path, PIL image or image source)."""
        return self.ask_batch([image], [question], max_new_tokens=max_new_tokens, return_relevance=return_relevance,
                              masks=None if masks is None else [masks], **kwargs)[0]

    def ask_batch(self, images: Sequence[Any], questions: Sequence[str], max_new_tokens: int = 512,
                  return_relevance: bool = False, masks: Sequence[dict | None] | None = None, **kwargs: Any) -> list[AskResult]:
        """Answer several (image, question) pairs in one left-padded batch; greedy by default."""
        if len(images) != len(questions):
            raise PromptError(f"got {len(images)} images and {len(questions)} questions")
        opts = self._options(kwargs)
        gen_kwargs = {k: v for k, v in kwargs.items() if k not in _SELECTION_KEYS}
        gen_kwargs.setdefault("min_new_tokens", 1)
        timings: dict[str, float] = {}
        inputs, sources = self._inputs(images, questions, opts.get("budgets"), timings)
        traces = [ImageTrace() for _ in images]
        clock = _Clock()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device),
            pixel_values=inputs["pixel_values"], image_masks=masks, traces=traces, max_new_tokens=max_new_tokens,
            streamer=clock, **opts, **gen_kwargs,
        )
        t_end = time.perf_counter()
        compress = sum(tr.timings.get("encode", 0) + tr.timings.get("score", 0) + tr.timings.get("select", 0) for tr in traces)
        first = clock.first_token_at or t_end
        timings["encode"] = sum(tr.timings.get("encode", 0) for tr in traces)
        timings["score"] = sum(tr.timings.get("score", 0) for tr in traces)
        timings["select"] = sum(tr.timings.get("select", 0) for tr in traces)
        group = sum(tr.timings.get("group", 0) for tr in traces)
        timings["prefill"] = max(0.0, first - t0 - compress)
        timings["decode"] = max(0.0, t_end - first)
        results = []
        compat = self.model.config.compat
        for b, tr in enumerate(traces):
            ids = [int(i) for i in out[b].tolist()]
            ids = _until_eos(ids, self.model.generation_config.eos_token_id, self.model.generation_config.pad_token_id)
            text = self.processor.decode(ids, skip_special_tokens=True)
            results.append(AskResult(
                answer=clean_answer(text, compat),
                tokens=kept_tokens(tr.selections, self.model.config.tokens_per_side),
                timings=dict(timings),
                timings_detail={"group": group},
                num_visual_tokens=sum(len(s) for s in tr.selections.values()),
                image_size=tuple(sources[b].size),
                scales=list(self.model.config.scales),
                generated_ids=ids,
                relevance={s: r.cpu() for s, r in tr.relevance.items()} if return_relevance else None,
            ))
        return results

    @torch.no_grad()
    def choice_logprobs(self, image: Any, question: str, choices: Sequence[str], **kwargs: Any) -> dict[str, float]:
        """First-token log-probability of each option after the prompt (no answer parsing).

        Token selection uses the prompt only."""
        opts = self._options(kwargs)
        timings: dict[str, float] = {}
        inputs, _ = self._inputs([image], [question], opts.get("budgets"), timings)
        out = self.model(input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device),
                         pixel_values=inputs["pixel_values"], logits_to_keep=1, **opts)
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tok = self.processor.tokenizer
        res = {}
        for c in choices:
            ids = tok(c, add_special_tokens=False)["input_ids"]
            if not ids:
                raise PromptError(f"choice {c!r} tokenizes to nothing")
            res[c] = float(logp[ids[0]])
        return res

    @torch.no_grad()
    def loglikelihood(self, image: Any, question: str, continuation: str, **kwargs: Any) -> tuple[float, bool]:
        """Sum log-probability of `continuation` after the prompt, and whether it is the greedy
        continuation. Visual tokens are selected from the prompt alone (the continuation never
        leaks into token selection, unlike the reference's lmms adapter)."""
        opts = self._options(kwargs)
        timings: dict[str, float] = {}
        inputs, _ = self._inputs([image], [question], opts.get("budgets"), timings)
        ids = inputs["input_ids"].to(self.device)
        mask = inputs["attention_mask"].to(self.device)
        embeds, mask = self.model.prepare_inputs_embeds(ids, mask, inputs["pixel_values"], **opts)
        cont = torch.tensor(self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"], device=self.device)
        if cont.numel() == 0:
            return 0.0, True
        cont_emb = self.model.get_input_embeddings()(cont)[None].to(embeds.dtype)
        full = torch.cat([embeds, cont_emb], dim=1)
        full_mask = torch.cat([mask, torch.ones(1, cont.numel(), dtype=mask.dtype, device=mask.device)], dim=1)
        pos = (full_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits = self.model(inputs_embeds=full, attention_mask=full_mask, position_ids=pos).logits[0]
        pred = logits[ids.shape[1] - 1 : -1].float().log_softmax(-1)
        ll = pred.gather(-1, cont[:, None]).sum()
        return float(ll), bool(torch.equal(pred.argmax(-1), cont))


def _until_eos(ids: list[int], eos: Any, pad: Any) -> list[int]:
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    while ids and pad is not None and ids[-1] == pad:
        ids = ids[:-1]
    return ids
