"""`UhrBatProcessor`: tokenizer + image processor, with budget-aware `<image>` expansion.

A transformers `ProcessorMixin`, so `AutoProcessor.from_pretrained`, `save_pretrained` and hub
publishing work as for any VLM. `processor(images=..., text=...)` returns `input_ids` in which
the single `<image>` marker of each prompt is expanded to exactly as many placeholder ids as the
model will splice visual tokens (sum over scales of min(budget, tokens at that scale)). The
placeholder is a real, non-negative added token, so logits processors such as
`repetition_penalty` work. The budgets the placeholders were expanded for travel with the output
as `image_budgets`, which `generate` / `forward` use when they are not given `budgets`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from uhrbat.errors import ConfigError, ContextOverflowError, PromptError
from uhrbat.options import COMPAT_MODES, parse_budgets
from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
from uhrbat.processing.prompt import IMAGE_MARKER, chatml, count_markers, question_prompt

__all__ = ["UhrBatProcessor", "parse_budgets"]


class UhrBatProcessor(ProcessorMixin):
    """Pairs a Qwen2 tokenizer with [`UhrBatImageProcessor`].

    Args:
        image_processor: the pyramid/tile builder.
        tokenizer: a Qwen2 tokenizer; an `<image>` special token is added if missing.
        budgets: default visual tokens per scale.
        max_context: longest allowed prompt (visual tokens included).
        compat: `"reference"` reproduces the reference's prompt bug (every id >= the base
            vocabulary size, i.e. every ChatML special, overwritten with EOS).
        chat_template: optional Jinja chat template (saved as `chat_template.jinja`); prompts
            are built by `build_prompt` / `apply_chat_template` below either way.
    """

    def __init__(
        self,
        image_processor: UhrBatImageProcessor | None = None,
        tokenizer: Any = None,
        budgets: Sequence[int] = (80, 320, 600, 2000),
        max_context: int = 5000,
        compat: str = "none",
        chat_template: str | None = None,
    ) -> None:
        if image_processor is None or tokenizer is None:
            raise ConfigError("UhrBatProcessor needs an image_processor and a tokenizer")
        if IMAGE_MARKER not in tokenizer.get_vocab():
            tokenizer.add_tokens([IMAGE_MARKER], special_tokens=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token = IMAGE_MARKER
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_MARKER))
        self.budgets = parse_budgets(budgets, len(image_processor.scales))
        self.max_context = int(max_context)
        if compat not in COMPAT_MODES:
            raise ConfigError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
        self.compat = compat

    # ---------------------------------------------------------------- counts
    def tokens_per_scale(self, budgets: Sequence[int] | None = None) -> list[int]:
        """Visual tokens spliced per scale: min(budget, tokens available at that scale)."""
        b = self.budgets if budgets is None else parse_budgets(budgets, len(self.image_processor.scales))
        ip = self.image_processor
        return [min(k, (s // ip.tile_size) ** 2 * ip.tokens_per_tile) for k, s in zip(b, ip.scales)]

    def num_visual_tokens(self, budgets: Sequence[int] | None = None) -> int:
        return sum(self.tokens_per_scale(budgets))

    # ---------------------------------------------------------------- text
    def build_prompt(self, question: str) -> str:
        """ChatML prompt for one question (`<image>` prefixed as in the reference)."""
        return question_prompt(question)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **_: Any
    ) -> str:
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
        **unknown: Any,
    ) -> BatchFeature:
        """Tokenise prompts (each with one `<image>`) and build the tiles of their images.

        Returns `input_ids`, `attention_mask`, and with `images` `pixel_values` and `image_sizes`;
        with `budgets`, `image_budgets` `[B, S]` (what the placeholder runs were expanded for;
        `generate`/`forward` read it). Unknown keywords are refused (`budget=` would otherwise
        silently do nothing)."""
        if unknown:
            name = next(iter(unknown))
            known = ["images", "text", "budgets", "padding_side", "return_tensors"]
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(known)}"
            raise ConfigError(f"UhrBatProcessor got an unknown keyword {name!r}{hint}")
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
            b = parse_budgets(budgets, len(self.image_processor.scales))
            data["image_budgets"] = torch.tensor([b] * len(rows))
        return BatchFeature(data=data)

    # ---------------------------------------------------------------- decoding
    def batch_decode(self, ids: Any, skip_special_tokens: bool = True, **kw: Any) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def decode(self, ids: Any, skip_special_tokens: bool = True, **kw: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> UhrBatProcessor:
        """`ProcessorMixin.from_pretrained` (folder or hub id), plus overrides of the saved
        settings: `budgets`, `max_context`, `compat`, and the image processor's `scales`,
        `tile_size`, `patch_size` (e.g. from the model's config)."""
        own = {k: kwargs.pop(k) for k in ("budgets", "max_context", "compat") if k in kwargs}
        geo = {k: kwargs.pop(k) for k in ("scales", "tile_size", "patch_size") if k in kwargs}
        own = {k: v for k, v in own.items() if v is not None}
        geo = {k: v for k, v in geo.items() if v is not None}
        proc = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if not own and not geo:
            return proc
        ip = proc.image_processor
        if geo:
            ip = UhrBatImageProcessor(**{**ip.settings(), **geo})
        settings = {"budgets": proc.budgets, "max_context": proc.max_context, "compat": proc.compat, **own}
        return cls(ip, proc.tokenizer, chat_template=proc.chat_template, **settings)
