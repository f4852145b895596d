"""`UhrBatProcessor`: tokenizer + image processor, with budget-aware `<image>` expansion.

`processor(images=..., text=...)` returns `input_ids` in which the single `<image>` marker of
each prompt is expanded to exactly as many placeholder ids as the model will splice visual
tokens (sum over scales of min(budget, tokens at that scale)). The placeholder is a real,
non-negative added token, so logits processors such as `repetition_penalty` work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer, BatchFeature

from uhrbat.errors import BudgetError, ContextOverflowError, PromptError
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.processing.prompt import IMAGE_MARKER, chatml, count_markers, question_prompt

PROCESSOR_CONFIG = "processor_config.json"
COMPAT_MODES = ("none", "reference")


def parse_budgets(budgets: Any, num_scales: int) -> list[int]:
    """Validate per-scale budgets given as a list or a "80,320,600,2000" string."""
    if isinstance(budgets, str):
        items = [b.strip() for b in budgets.split(",") if b.strip()]
    else:
        items = list(budgets)
    out: list[int] = []
    for b in items:
        if isinstance(b, bool):
            raise BudgetError(f"budget {b!r} is not an integer")
        try:
            f = float(b)
        except (TypeError, ValueError):
            raise BudgetError(f"budget {b!r} is not an integer") from None
        if not f.is_integer():
            raise BudgetError(f"budget {b!r} is not an integer")
        if f < 0:
            raise BudgetError(f"budget {int(f)} is negative; budgets must be >= 0")
        out.append(int(f))
    if len(out) != num_scales:
        raise BudgetError(f"got {len(out)} budgets {out} but the model has {num_scales} scales")
    return out


class UhrBatProcessor:
    """Pairs a Qwen2 tokenizer with [`UhrBatImageProcessor`].

    Args:
        image_processor: the pyramid/tile builder.
        tokenizer: a Qwen2 tokenizer; an `<image>` special token is added if missing.
        budgets: default visual tokens per scale.
        max_context: longest allowed prompt (visual tokens included).
        compat: `"reference"` reproduces the reference's prompt bug (every id >= the base
            vocabulary size, i.e. every ChatML special, overwritten with EOS).
    """

    def __init__(
        self,
        image_processor: UhrBatImageProcessor,
        tokenizer: Any,
        budgets: Sequence[int] = (80, 320, 600, 2000),
        max_context: int = 5000,
        compat: str = "none",
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        if IMAGE_MARKER not in tokenizer.get_vocab():
            tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_MARKER))
        self.budgets = parse_budgets(budgets, len(image_processor.scales))
        self.max_context = int(max_context)
        if compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # ---------------------------------------------------------------- counts
    def tokens_per_scale(self, budgets: Sequence[int] | None = None) -> list[int]:
        """Visual tokens spliced per scale: min(budget, tokens available at that scale)."""
        b = self.budgets if budgets is None else parse_budgets(budgets, len(self.image_processor.scales))
        ip = self.image_processor
        per_tile = (ip.tile_size // 14) ** 2
        return [min(k, (s // ip.tile_size) ** 2 * per_tile) for k, s in zip(b, ip.scales)]

    def num_visual_tokens(self, budgets: Sequence[int] | None = None) -> int:
        return sum(self.tokens_per_scale(budgets))

    # ---------------------------------------------------------------- text
    def build_prompt(self, question: str) -> str:
        """ChatML prompt for one question (`<image>` prefixed as in the reference)."""
        return question_prompt(question)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **_: Any) -> str:
        """HF-style messages (content str or [{"type": "image"}, {"type": "text", ...}]) -> prompt."""
        return chatml(messages, add_generation_prompt=add_generation_prompt)

    def _ids(self, prompt: str, n_visual: int) -> list[int]:
        n = count_markers(prompt)
        if n != 1:
            raise PromptError(f"prompt must contain exactly one {IMAGE_MARKER!r} marker, found {n}")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pos = ids.index(self.image_token_id)
        if self.compat == "reference":
            # Reference quirk (§7.5): ids >= tokenizer.vocab_size (every ChatML special) -> EOS.
            limit, eos = self.tokenizer.vocab_size, self.tokenizer.eos_token_id
            ids = [i if (i < limit or k == pos) else eos for k, i in enumerate(ids)]
        return ids[:pos] + [self.image_token_id] * n_visual + ids[pos + 1 :]

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        budgets: Sequence[int] | str | None = None,
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        **_: Any,
    ) -> BatchFeature:
        """Tokenise prompts (each with one `<image>`) and build the tiles of their images."""
        if text is None:
            raise PromptError("text is required (a prompt containing one '<image>' marker)")
        texts = [text] if isinstance(text, str) else list(text)
        n_visual = self.num_visual_tokens(budgets)
        rows = [self._ids(t, n_visual) for t in texts]
        longest = max(len(r) for r in rows)
        if longest > self.max_context:
            raise ContextOverflowError(
                f"prompt would be {longest} tokens ({n_visual} visual + {longest - n_visual} text) "
                f"but the model's context is {self.max_context}; lower the budgets or shorten the question"
            )
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(longest - len(r), longest) if padding_side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if images is not None:
            imgs = images if isinstance(images, (list, tuple)) else [images]
            if len(imgs) != len(rows):
                raise PromptError(f"got {len(imgs)} images for {len(rows)} prompts; give one image per prompt")
            data.update(self.image_processor(imgs))
        if budgets is not None:
            data["budgets"] = torch.tensor(parse_budgets(budgets, len(self.image_processor.scales)))
        return BatchFeature(data=data)

    # ---------------------------------------------------------------- decoding
    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kw: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kw: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    # ---------------------------------------------------------------- (de)serialisation
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        cfg = {"processor_class": type(self).__name__, "budgets": self.budgets, "max_context": self.max_context, "compat": self.compat}
        (d / PROCESSOR_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, **overrides: Any) -> "UhrBatProcessor":
        """Load from a folder saved by `save_pretrained`, or from a reference checkpoint folder
        (tokenizer files + CLIP mean/std defaults). `overrides`: budgets, max_context, compat, scales."""
        d = Path(directory)
        cfg: dict[str, Any] = {}
        if (d / PROCESSOR_CONFIG).exists():
            cfg = json.loads((d / PROCESSOR_CONFIG).read_text())
        cfg.pop("processor_class", None)
        image_processor = UhrBatImageProcessor.from_pretrained(d, scales=overrides.pop("scales", None), tile_size=overrides.pop("tile_size", None))
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or d))
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        return cls(image_processor, tokenizer, **cfg)
