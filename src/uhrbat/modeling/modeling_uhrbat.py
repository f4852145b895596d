"""UHR-BAT model: CLIP tower + projector + scale residuals + token MLP + Qwen2 LM.

Pipeline for one image (method §11):

    tiles --CLIP (penultimate, chunked)--> projector --> F[s]            [T_s, 576, H]
    scoring:   prompt with F[base] + R[base] spliced --LLM up to the last layer's input-->
               last prompt token's Q . K over image tokens, head mean --> relevance (base)
               --bilinear--> relevance at every scale                    [T_s, 24, 24]
    selection: E[s] = F[s] (+ R[s] + R[s] when enable_scale_pos_residual), grouped
               (K-Means / segments / singletons), greedy preserve-and-merge per budget
    token MLP on the selected rows, spliced at the `<image>` placeholders, LLM generates.

Each tile is encoded exactly once; scoring and selection inputs derive from the same tensor.
The model class is assembled from one module per job: `vision` (tiles -> scene, grouping),
`relevance` (the scoring pass), `visual_tokens` (selection and splicing), `training` (re-projection
with gradient), `trace` (intermediates), `model_card` (the released model card's call signature).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from transformers import CLIPVisionModel, GenerationMixin, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from uhrbat.configuration import UhrBatConfig, is_reference_checkpoint
from uhrbat.errors import BudgetError, CheckpointError, ConfigError, PromptError
from uhrbat.modeling.layers import MLP2x, ScaleResidual
from uhrbat.modeling.model_card import from_reference_call
from uhrbat.modeling.scoring_pass import RelevanceMixin
from uhrbat.modeling.trace import ImageTrace
from uhrbat.modeling.vision import VisionMixin
from uhrbat.modeling.visual_tokens import VisualTokensMixin
from uhrbat.options import SelectionOptions

__all__ = ["UhrBatForConditionalGeneration", "UhrBatPreTrainedModel", "selection_kwargs"]


# ----------------------------------------------------------------------------- model
class UhrBatPreTrainedModel(PreTrainedModel):
    config: UhrBatConfig
    config_class = UhrBatConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ScaleResidual):
            # The reference initialises residuals as randn / sqrt(hidden).
            for p in module.grids.values():
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        else:
            super()._init_weights(module)


class UhrBatForConditionalGeneration(
    UhrBatPreTrainedModel, VisionMixin, RelevanceMixin, VisualTokensMixin, GenerationMixin
):
    """UHR-BAT with a language-modelling head.

    Use with [`UhrBatProcessor`]:

    ```python
    inputs = processor(images=image, text=processor.build_prompt("How many ships?"))
    answer_ids = model.generate(**inputs, max_new_tokens=32)  # answer tokens only
    processor.batch_decode(answer_ids)
    ```
    """

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: UhrBatConfig) -> None:
        super().__init__(config)
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.projector = MLP2x(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.scale_residuals = ScaleResidual(config)
        self.token_mlp = MLP2x(config.text_config.hidden_size, config.text_config.hidden_size)
        self.language_model = Qwen2ForCausalLM(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any
    ) -> UhrBatForConditionalGeneration:
        """Load this package's format strictly: missing weights raise `CheckpointError`.

        Reference-format checkpoints (`LlavaQwenForCausalLM`, e.g. the released `RL-MIND/UHR-BAT`)
        go through the one loading entry, `uhrbat.modeling.loading.load`, which also builds the
        processor; this method names it instead of guessing."""
        path = str(pretrained_model_name_or_path)
        if is_reference_checkpoint(path):
            raise CheckpointError(
                f"{path} is a reference-format (LlavaQwenForCausalLM) checkpoint; load it with "
                f"uhrbat.modeling.loading.load({path!r}) or convert it once with `uhrbat convert {path} DST`"
            )
        kwargs["output_loading_info"] = True
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as e:  # no weights file, unreadable shard, ...
            raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from e
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise CheckpointError(
                f"{path}: {len(missing)} weights missing from the checkpoint, e.g. {', '.join(missing[:4])}"
            )
        return model

    # ------------------------------------------------------------------ plumbing
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def lm_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    @property
    def image_token_id(self) -> int:
        if self.config.image_token_id is None:
            raise ConfigError(
                "config.image_token_id is not set; load the model with its processor (UhrBatPipeline) or set it"
            )
        return int(self.config.image_token_id)

    # ------------------------------------------------------------------ forward / generate
    def _mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        n = self.config.vocab_in_use
        if n is not None and n < logits.shape[-1]:
            # Rows past the tokenizer are padding; the reference cut them off at load.
            logits[..., n:] = torch.finfo(logits.dtype).min
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_masks: Sequence[dict | None] | None = None,
        budgets: Sequence[int] | torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        *,
        selector: str | None = None,
        kmeans_clusters: int | None = None,
        kmeans_iters: int | None = None,
        kmeans_mode: str | None = None,
        seed: int | None = None,
        encode: str | None = None,
        gate_margin: float | None = None,
        zoom: int | None = None,
        image_budgets: Sequence[int] | torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Training / scoring forward. With `pixel_values`, the placeholders in `input_ids`
        are replaced by the selected visual tokens (selection without gradient; gradient flows
        through the kept tokens and the members of merged groups).

        With `labels` and no `query_index`, relevance is scored from the prompt only: the query is
        the token before the first supervised label, so the answer never influences which visual
        tokens are kept. `config.compat == "reference"` reproduces the reference's training
        behaviour instead (the query is the last token of the whole sequence, i.e. the answer).

        Args:
            input_ids: `[B, L]` token ids; each row holds one run of `image_token_id` placeholders
                when `pixel_values` is given (as `UhrBatProcessor` builds them).
            attention_mask: `[B, L]`, 1 for real tokens (left or right padding).
            position_ids: `[B, L]`; default from the attention mask after splicing.
            cache / past_key_values: the language model's KV cache (either name).
            inputs_embeds: `[B, L, H]` already spliced embeddings (then `pixel_values` is unused).
            pixel_values: `[B, T, 3, tile, tile]` tiles of each row's image (`T` = tiles of the
                whole pyramid, 228 for 672/1344/2688/4032 with 336-px tiles).
            labels: `[B, L]` target ids, -100 = not supervised.
            use_cache: return the KV cache.
            logits_to_keep: keep logits of the last N positions only (0 = all).
            image_masks: per row, `None` or `{scale: segment ids}` for `selector="segments"`.
            budgets: visual tokens kept per scale, `[S]` or `[B, S]` of identical rows; default
                `image_budgets`, else `config.budgets`. They must give as many visual tokens as
                the prompts hold placeholders: set them on the processor.
            query_index: `[B]` position of each row's relevance query token (see above).
            selector: a registered selector (`uhrbat.selectors`); default `config.selector`.
            kmeans_clusters: clusters per scale, 0 = the scale's budget; default the config's.
            kmeans_iters: maximum Lloyd iterations (>= 1); default the config's.
            kmeans_mode: `"fast"` | `"exact"`; default the config's.
            seed: K-Means initialisation seed; default the config's.
            encode: `"full"` (default) | `"gated"` (finer scales: only the tiles that can matter).
            gate_margin: with `encode="gated"`, tiles until >= this x the budget in tokens.
            zoom: 0 / None only: zoom reads windows of the image file, which the model does not
                have (it gets tiles); ask through `UhrBatPipeline` for `zoom=N`.
            image_budgets: `[B, S]` the budgets the processor expanded the placeholders for.
            image_sizes: `[B, 2]` original (width, height) from the processor; not needed here.
            kwargs: passed to the language model (e.g. `output_hidden_states`).
        Returns:
            `CausalLMOutputWithPast`: `logits` `[B, L, V]` (rows past the tokenizer masked to the
            dtype minimum), `loss` when `labels` are given, `past_key_values` with `use_cache`.
        """
        if cache is None:
            cache = past_key_values
        if pixel_values is not None and inputs_embeds is None:
            given = (selector, kmeans_clusters, kmeans_iters, kmeans_mode, seed, encode, gate_margin, zoom)
            options = selection_options(budgets, image_budgets, *given)
            if query_index is None and labels is not None and self.config.compat != "reference":
                query_index = _last_prompt_index(labels)
            inputs_embeds, attention_mask = self.prepare_inputs_embeds(
                input_ids, attention_mask, pixel_values, masks=image_masks, query_index=query_index, options=options
            )
            if position_ids is None and attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            input_ids = None
        elif input_ids is not None and inputs_embeds is None and (input_ids == self.config.image_token_id).any():
            raise PromptError("input_ids contain <image> placeholders but no pixel_values were given")
        out = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if out.logits is not None:
            out.logits = self._mask_vocab(out.logits)
        return out

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache: Any = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # Visual tokens are spliced into `inputs_embeds` before generation starts (see
        # `generate`), so the decoding steps only ever see text ids.
        kwargs.pop("pixel_values", None)
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_masks: Sequence[dict | None] | None = None,
        budgets: Sequence[int] | torch.Tensor | None = None,
        traces: list[ImageTrace] | None = None,
        *,
        selector: str | None = None,
        kmeans_clusters: int | None = None,
        kmeans_iters: int | None = None,
        kmeans_mode: str | None = None,
        seed: int | None = None,
        encode: str | None = None,
        gate_margin: float | None = None,
        zoom: int | None = None,
        image_budgets: Sequence[int] | torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Generate an answer; returns only the new (answer) tokens.

        Accepts the processor output (`input_ids`, `attention_mask`, `pixel_values`,
        `image_sizes`, `image_budgets`) and the released model card's call signature
        (`inputs=`, `multiscale_pixels=`, `multiscale_topk=`, `multiscale_target_sizes=`,
        `multiscale_masks=`, `images=`, `modalities=`; see `uhrbat.modeling.model_card`).

        Args:
            input_ids: `[B, L]` prompts, each with one run of `image_token_id` placeholders
                (left padding for batches).
            attention_mask: `[B, L]`; default all ones.
            pixel_values: `[B, T, 3, tile, tile]` tiles of each row's image; without it the
                model is a plain text LM (and placeholders are an error).
            image_masks: per row, `None` or `{scale: segment ids}` for `selector="segments"`.
            budgets: visual tokens kept per scale, `[S]` or `[B, S]`; default `image_budgets`
                (what the processor expanded the placeholders for), else `config.budgets`.
            traces: optional per-row `ImageTrace` filled with relevance, selections and timings.
            selector / kmeans_clusters / kmeans_iters / kmeans_mode / seed / encode / gate_margin / zoom:
                per-call selection options (see `forward`); default the config's.
            image_budgets: `[B, S]` the processor's budgets.
            image_sizes: `[B, 2]` original (width, height) from the processor; not needed here.
            kwargs: generation options for `GenerationMixin.generate` (`max_new_tokens`,
                `do_sample`, `temperature`, `num_beams`, `repetition_penalty`, `streamer`, ...).
        Returns:
            `[B, N]` new token ids (or a `GenerateOutput` whose `sequences` hold only the new
            tokens, with `return_dict_in_generate=True`).
        """
        if "multiscale_pixels" in kwargs or "inputs" in kwargs and pixel_values is None:
            input_ids, attention_mask, pixel_values, image_masks, budgets, kwargs = from_reference_call(
                self, input_ids, attention_mask, kwargs
            )
            # With reference masks the call implies the segments selector (unless one was given).
            implied = kwargs.pop("selector", None)
            selector = selector or implied
        for k in ("modalities", "images"):  # model-card arguments with no meaning here
            kwargs.pop(k, None)
        given = (selector, kmeans_clusters, kmeans_iters, kmeans_mode, seed, encode, gate_margin, zoom)
        options = selection_options(budgets, image_budgets, *given)
        if input_ids is None:
            raise PromptError("generate needs input_ids (use UhrBatProcessor)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is None:
            if (input_ids == self.config.image_token_id).any():
                raise PromptError("input_ids contain <image> placeholders but no pixel_values were given")
            out = super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return _strip_prompt(out, input_ids.shape[1])
        device = self.get_input_embeddings().weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        inputs_embeds, attention_mask = self.prepare_inputs_embeds(
            input_ids, attention_mask, pixel_values, masks=image_masks, traces=traces, options=options
        )
        return self.generate_from_embeds(input_ids, inputs_embeds, attention_mask, **kwargs)

    @torch.no_grad()
    def generate_from_embeds(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any
    ) -> Any:
        """Generate from prompts whose visual tokens are already spliced (`prepare_inputs_embeds`).

        `input_ids` `[B, L]` (placeholders included) only feed logits processors such as
        `repetition_penalty`; returns only the new tokens."""
        max_pos = self.config.text_config.max_position_embeddings
        new = kwargs.get("max_new_tokens") or 0
        if input_ids.shape[1] + new > max_pos:
            raise BudgetError(
                f"prompt ({input_ids.shape[1]}) + max_new_tokens ({new}) exceeds max_position_embeddings {max_pos}"
            )
        out = super().generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )
        return _strip_prompt(out, input_ids.shape[1])


def selection_kwargs(
    budgets: Sequence[int] | torch.Tensor | None = None,
    selector: str | None = None,
    kmeans_clusters: int | None = None,
    kmeans_iters: int | None = None,
    kmeans_mode: str | None = None,
    seed: int | None = None,
    encode: str | None = None,
    gate_margin: float | None = None,
    zoom: int | None = None,
) -> dict[str, Any]:
    """The given selection options (None = the config's) as `SelectionOptions` keywords.

    `budgets` may be a list, a `[S]` tensor or the processor's `[B, S]` tensor (rows identical)."""
    if torch.is_tensor(budgets):
        budgets = (budgets[0] if budgets.dim() == 2 else budgets).tolist()
    given = {
        "budgets": budgets,
        "selector": selector,
        "kmeans_clusters": kmeans_clusters,
        "kmeans_iters": kmeans_iters,
        "kmeans_mode": kmeans_mode,
        "seed": seed,
        "encode": encode,
        "gate_margin": gate_margin,
        "zoom": zoom,
    }
    return {k: v for k, v in given.items() if v is not None}


def selection_options(
    budgets: Sequence[int] | torch.Tensor | None,
    image_budgets: Sequence[int] | torch.Tensor | None,
    *given: Any,
) -> SelectionOptions:
    """`forward`/`generate`'s selection keywords (in `selection_kwargs` order after `budgets`) as
    `SelectionOptions`; without `budgets`, the ones the processor expanded the prompts for.
    `zoom` > 0 is refused: the model gets tiles, not the file zoom reads windows from."""
    options = SelectionOptions.of(**selection_kwargs(budgets if budgets is not None else image_budgets, *given))
    if options.zoom:
        raise ConfigError(
            f"zoom={options.zoom} reads windows of the image file, which forward / generate do not have (they get "
            f"tiles); ask through UhrBatPipeline.ask(image, question, zoom=...)"
        )
    return options


def _last_prompt_index(labels: torch.Tensor) -> torch.Tensor:
    """`[B]` index of the token before each row's first supervised label (-100 = ignored)."""
    supervised = labels != -100
    if not supervised.any(dim=1).all():
        raise PromptError("a training row has no supervised (answer) tokens")
    return supervised.int().argmax(dim=1) - 1


def _strip_prompt(out: Any, prompt_len: int) -> Any:
    """Keep only the generated tokens (HF returns prompt + answer when input_ids are given)."""
    if torch.is_tensor(out):
        return out[:, prompt_len:] if out.shape[1] > prompt_len else out
    if getattr(out, "sequences", None) is not None and out.sequences.shape[1] > prompt_len:
        out.sequences = out.sequences[:, prompt_len:]
    return out
