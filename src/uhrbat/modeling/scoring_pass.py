"""The scoring pass (method §3): the LLM reads the prompt with the base scale spliced in, and the
last prompt token's last-layer attention over the image tokens is every token's relevance.

`score_relevance` is the one-pass scoring the reference runs (and the parity fixtures pin down);
`score_prefix` + `score_relevance_from_prefix` split it at the question for the opt-in reuse of
the query-independent prefix. Both read the last layer through `_last_layer_kq`; the attention
maths is `uhrbat.compression.relevance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from uhrbat.compression import relevance
from uhrbat.compression.precision import autocast_off
from uhrbat.modeling.layers import run_until

__all__ = ["RelevanceMixin", "ScoringPrefix"]


@dataclass
class ScoringPrefix:
    """Query-independent state of the scoring pass: the text before the image and the image.

    Used only when the scoring prefix is reused (`UhrBatPipeline(reuse_scoring_prefix=True)`);
    see `score_prefix` for why that is not bitwise the one-pass scoring.

    Attributes:
        keys, values: per layer `0 .. L-2`, `[1, H_kv, n, d]` attention keys (rotated) and values.
        last_keys: `[1, H_kv, n, d]` the last layer's rotated keys of the same `n` rows.
        image_start: index of the first image row (= number of text rows before the image).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_keys: torch.Tensor
    image_start: int

    @property
    def length(self) -> int:
        return int(self.last_keys.shape[2])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict (scene cache item); `image_start` travels as a 0-d int64 tensor."""
        out = {f"k.{i}": k for i, k in enumerate(self.keys)} | {f"v.{i}": v for i, v in enumerate(self.values)}
        out["last_k"] = self.last_keys
        out["image_start"] = torch.tensor(self.image_start, dtype=torch.int64, device=self.last_keys.device)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], num_layers: int) -> ScoringPrefix | None:
        """Inverse of `tensors`, or None when the item does not hold `num_layers - 1` layers of
        one consistent shape (a foreign or stale item is recomputed, never used)."""
        try:
            keys = [tensors[f"k.{i}"] for i in range(num_layers - 1)]
            values = [tensors[f"v.{i}"] for i in range(num_layers - 1)]
            last, start = tensors["last_k"], int(tensors["image_start"])
        except (KeyError, TypeError, ValueError, RuntimeError):
            return None
        if len(tensors) != 2 * num_layers or last.dim() != 4 or not 0 <= start < last.shape[2]:
            return None
        if any(t.dim() != 4 or t.shape[:3] != last.shape[:3] or t.dtype != last.dtype for t in keys + values):
            return None
        return cls(keys=keys, values=values, last_keys=last, image_start=start)


class RelevanceMixin:
    """Scoring methods of `UhrBatForConditionalGeneration` (uses `language_model`, `lm_layers`)."""

    @torch.no_grad()
    @autocast_off  # selection ignores autocast (bf16 training): same tokens as inference
    def score_relevance(
        self, prefix_embeds: torch.Tensor, image_embeds: torch.Tensor, suffix_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Relevance of each base-scale token for one prompt.

        Args:
            prefix_embeds: `[P, H]` embedded text before the image.
            image_embeds: `[N, H]` base-scale tokens (projector output + 1x residual).
            suffix_embeds: `[S, H]` embedded text after the image (ends with the query token).
        Returns:
            `[N]` float32 relevance.
        """
        seq = torch.cat([prefix_embeds, image_embeds, suffix_embeds]).unsqueeze(0)
        hidden, kw = self._last_layer_input(seq)
        k, q = self._last_layer_kq(hidden, *kw["position_embeddings"], want_q=True)
        d = self.lm_layers[-1].self_attn.head_dim
        probs = relevance.last_query_attention(q[0, :, 0], k[0], d)
        pos = torch.arange(prefix_embeds.shape[0], prefix_embeds.shape[0] + image_embeds.shape[0], device=seq.device)
        return relevance.image_relevance(probs, pos)

    def _last_layer_input(self, seq: torch.Tensor, start: int = 0, cache: Any = None) -> tuple[torch.Tensor, dict]:
        """Run the LLM on `seq` `[1, n, H]` (positions from `start`, through `cache` if given) up to
        its last layer; returns that layer's input `[1, n, H]` and keyword arguments."""
        positions = torch.arange(start, start + seq.shape[1], device=seq.device).unsqueeze(0)
        extra = {} if cache is None else {"cache": cache}
        return run_until(
            self.language_model.model,
            self.lm_layers[-1],
            inputs_embeds=seq,
            position_ids=positions,
            use_cache=cache is not None,
            **extra,
        )

    def _last_layer_kq(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, want_q: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotated last-layer keys `[1, H_kv, n, d]` of `hidden` `[1, n, H]` and, if `want_q`, the
        rotated query `[1, H, 1, d]` of its last row.

        Every row is projected, then the last kept: the same GEMM as the reference, so the query
        rounds identically (a 1-row projection differs in the last bits)."""
        last = self.lm_layers[-1]
        attn = last.self_attn
        d, n = attn.head_dim, hidden.shape[1]
        h = last.input_layernorm(hidden)
        k = attn.k_proj(h).view(1, n, -1, d).transpose(1, 2)
        k, _ = apply_rotary_pos_emb(k, k, cos, sin)
        if not want_q:
            return k, None
        q = attn.q_proj(h)[:, -1:].view(1, 1, -1, d).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
        return k, q

    @torch.no_grad()
    @autocast_off
    def score_prefix(self, prefix_embeds: torch.Tensor, image_embeds: torch.Tensor) -> ScoringPrefix:
        """The query-independent half of a two-step scoring pass: text before the image + image.

        Not bitwise the one-pass `score_relevance`: there, the rows before the question are
        computed in attention products whose key axis spans the whole prompt, and that length
        (question included) changes their last bits (on the parity fixtures: relevance within
        ~1e-9 absolute, 5e-7 relative; same selections and answers). Pair it only with
        `score_relevance_from_prefix`, never mix it with the one-pass numbers.

        Args:
            prefix_embeds: `[P, H]` embedded text before the image; image_embeds: `[N, H]`.
        """
        from transformers import DynamicCache

        seq = torch.cat([prefix_embeds, image_embeds]).unsqueeze(0)
        cache = DynamicCache(config=self.language_model.config)
        hidden, kw = self._last_layer_input(seq, cache=cache)
        last_k, _ = self._last_layer_kq(hidden, *kw["position_embeddings"], want_q=False)
        layers = cache.layers[: len(self.lm_layers) - 1]
        return ScoringPrefix(
            keys=[lay.keys for lay in layers],
            values=[lay.values for lay in layers],
            last_keys=last_k,
            image_start=prefix_embeds.shape[0],
        )

    @torch.no_grad()
    @autocast_off
    def score_relevance_from_prefix(self, prefix: ScoringPrefix, suffix_embeds: torch.Tensor) -> torch.Tensor:
        """`[N]` float32 relevance of the prefix's image rows for the question `suffix_embeds`
        `[S, H]` (ends with the query token): only the suffix's rows run through the LLM."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.language_model.config)
        for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
            cache.update(k, v, i)  # concatenation with the suffix makes new tensors: `prefix` is not changed
        seq = suffix_embeds.unsqueeze(0)
        n0 = prefix.length
        hidden, kw = self._last_layer_input(seq, start=n0, cache=cache)
        k, q = self._last_layer_kq(hidden, *kw["position_embeddings"], want_q=True)
        d = self.lm_layers[-1].self_attn.head_dim
        probs = relevance.last_query_attention(q[0, :, 0], torch.cat([prefix.last_keys, k], dim=2)[0], d)
        pos = torch.arange(prefix.image_start, n0, device=seq.device)
        return relevance.image_relevance(probs, pos)
