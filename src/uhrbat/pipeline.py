"""High-level API: ask questions about huge images.

```python
from uhrbat import UhrBatPipeline
pipe = UhrBatPipeline.from_pretrained("RL-MIND/UHR-BAT", device="cuda", dtype="bf16")
res = pipe.ask("scene.tif", "How many ships are in the harbour?")
print(res.answer, res.timings, res.reuse)
scene = pipe.open("scene.tif")                       # prepare once ...
more = pipe.ask_many(scene, ["Is the runway clear?", "Where is the fuel depot?"])  # ... ask many
port = pipe.ask(scene, "How many cranes?", region=[2000, 1500, 4000, 3500])   # one window, native resolution
far = pipe.ask("scene.tif", "Where is the damaged roof?", zoom=2)              # pass 1 proposes, pass 2 looks
```

The pipeline is a facade: `uhrbat.scene` prepares and keeps the question-independent work per
image (decoding, tiling, CLIP + projector, groupings) in a `SceneStore` (on by default), the
model scores, selects and generates, `uhrbat.answers` assembles the results. Results are bitwise
the same with or without the store. Options are `uhrbat.options` (the one vocabulary).

Regions and zoom (issue 21): `region=` (with `region_crs`, `region_file`, `region_geojson`) asks
about one window of the scene, a child scene read at native resolution from the image's origin
(`SceneManager.open_window`); `zoom=N` asks twice, the second time about up to N windows the
first answer's relevance proposes (`uhrbat.zoom`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from uhrbat.answers import build_result
from uhrbat.errors import ConfigError, PromptError
from uhrbat.generation import generate
from uhrbat.modeling.loading import DEFAULT_MODEL, load
from uhrbat.modeling.trace import ImageTrace
from uhrbat.options import GenerationOptions, ReadOptions, SelectionOptions
from uhrbat.processing.messages import chat_prompt
from uhrbat.progress import Progress
from uhrbat.results import AskResult
from uhrbat.scene.keys import model_identity, reset_model_identity
from uhrbat.scene.manager import OpenedScene, SceneManager
from uhrbat.scene.origin import reading_targets, refuse_window_masks
from uhrbat.scene.store import DEFAULT_MAX_BYTES, SceneStore
from uhrbat.selectors import get_selector
from uhrbat.selectors.base import require_mask
from uhrbat.zoom import zoom_answers

__all__ = ["UhrBatPipeline"]

_SELECTION_KEYS = tuple(SelectionOptions.model_fields)
_READ_KEYS = tuple(ReadOptions.model_fields)


def _make_store(scene_cache: Any, cache_dir: Any) -> SceneStore | None:
    if isinstance(scene_cache, SceneStore):
        if cache_dir is not None:
            raise ConfigError("give cache_dir to the SceneStore you pass, not to the pipeline")
        return scene_cache
    if scene_cache is None or scene_cache is False:
        if cache_dir is not None:
            raise ConfigError("cache_dir needs the scene cache; drop scene_cache=False or cache_dir")
        return None
    if cache_dir is not None:  # "~/.cache/uhrbat/scenes" means the home folder, not a "~" folder here
        cache_dir = Path(cache_dir).expanduser()
    if scene_cache is True:
        return SceneStore(DEFAULT_MAX_BYTES, cache_dir)
    if isinstance(scene_cache, int) and scene_cache >= 0:
        return SceneStore(scene_cache, cache_dir) if (scene_cache > 0 or cache_dir is not None) else None
    raise ConfigError(f"scene_cache must be True, False, a byte count >= 0 or a SceneStore, got {scene_cache!r}")


class UhrBatPipeline:
    """Model + processor + default options, with `open`, `ask`, `ask_many`, `ask_batch`, `chat`,
    `chat_batch`, `choice_logprobs` and `loglikelihood`.

    Args:
        model, processor: a loaded `UhrBatForConditionalGeneration` and `UhrBatProcessor`.
        scene_cache: True (default bound, `uhrbat.scene.store.DEFAULT_MAX_BYTES` per device),
            False, a byte bound (0 = no in-memory layer), or a `SceneStore` to share.
        cache_dir: folder of the on-disk layer (safetensors, bounded), or None.
        reuse_scoring_prefix: opt-in. Score in two steps (text before the image + image, then
            the question) and keep the first step's KV in the store, so a follow-up question
            runs only its own tokens in the scoring pass. Cached == uncached holds bitwise within
            this mode, but its relevance differs from the default one-pass scoring (and the
            parity fixtures) in the last bits (README "Many questions per scene").
        namespace: part of every store key (the server's tenant).
        **selection: default selection options (`uhrbat.options.SelectionOptions` names).

    Thread-safe: `ask` may be called from several threads; model runs are serialised by a
    lock, and two threads that need the same scene prepare it once.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        scene_cache: Any = True,
        cache_dir: str | os.PathLike | None = None,
        reuse_scoring_prefix: bool = False,
        namespace: str = "",
        **selection: Any,
    ) -> None:
        self.model = model
        self.processor = processor
        if not isinstance(reuse_scoring_prefix, bool):
            raise ConfigError(f"reuse_scoring_prefix must be True or False, got {reuse_scoring_prefix!r}")
        self.reuse_scoring_prefix = reuse_scoring_prefix
        self.options = SelectionOptions.of(**{k: v for k, v in selection.items() if v is not None})
        self.options.resolve(model.config)  # validate early (one budget per scale)
        self.scene_cache = _make_store(scene_cache, cache_dir)
        self.load_seconds = 0.0
        self._model_lock = threading.RLock()
        self.scenes = SceneManager(model, processor, self.scene_cache, self._model_lock, namespace)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        vision_tower: str | os.PathLike | None = None,
        attn_implementation: str | None = None,
        compat: str | None = None,
        scene_cache: Any = True,
        cache_dir: str | os.PathLike | None = None,
        reuse_scoring_prefix: bool = False,
        **selection: Any,
    ) -> UhrBatPipeline:
        t = time.perf_counter()
        overrides = {"compat": compat} if compat else {}
        net, proc = load(
            model,
            device=device,
            dtype=dtype,
            vision_tower=vision_tower,
            attn_implementation=attn_implementation,
            **overrides,
        )
        if compat:
            proc.compat = compat
        pipe = cls(
            net,
            proc,
            scene_cache=scene_cache,
            cache_dir=cache_dir,
            reuse_scoring_prefix=reuse_scoring_prefix,
            **selection,
        )
        pipe.load_seconds = time.perf_counter() - t
        return pipe

    # ---------------------------------------------------------------- identity and defaults
    @property
    def selection(self) -> dict[str, Any]:
        """The pipeline's default selection options that were given (keywords)."""
        return self.options.given()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def model_identity(self) -> str:
        """Fingerprint of the model (see `uhrbat.scene.keys.model_identity`); computed once.
        Call `reset_model_identity()` after changing the weights in place."""
        return model_identity(self.model)

    def reset_model_identity(self) -> None:
        reset_model_identity(self.model)

    def resolve(self, **overrides: Any) -> Any:
        """The selection options a call with `overrides` would run with (`ResolvedSelection`)."""
        return self.options.updated(**{k: v for k, v in overrides.items() if k in _SELECTION_KEYS}).resolve(
            self.model.config
        )

    # ---------------------------------------------------------------- API
    def open(
        self,
        image: Any,
        *,
        encode: str | None = None,
        progress: Progress | None = None,
        **read: Any,
    ) -> OpenedScene:
        """Prepare the scene of `image` (path, PIL image, `ImageSource`) once; pass the result to
        `ask` / `ask_many` / `chat` instead of the image. `read`: `uhrbat.options.ReadOptions`
        (bands, stretch, max_pixels; `region`, `region_crs`, `region_file`, `region_geojson`
        prepare one window of the scene, a child scene); `encode`: "full" (every tile now) or
        "gated" (the base scale now, finer tiles when a question needs them). A scene opened from
        a path or PIL image remembers it, so `ask(scene, ..., region=...)` reads other windows."""
        mode = self.resolve(encode=encode).encode
        ((_, target, request),) = reading_targets([image], read)
        if request is not None:
            return self.scenes.open_window(target, request, mode, progress)
        return self.scenes.open(target, mode, progress)

    def ask(
        self,
        image: Any,
        question: str,
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: dict | None = None,
        progress: Progress | None = None,
        **kwargs: Any,
    ) -> AskResult:
        """Answer one question about one image (path, PIL image, `ImageSource` or `open()`'s scene).

        `kwargs`: selection options (`uhrbat.options.SelectionOptions`: budgets, selector,
        kmeans_clusters, kmeans_iters, kmeans_mode, seed, encode, gate_margin, zoom), reading
        options (`uhrbat.options.ReadOptions`: region, region_crs, region_file, region_geojson;
        bands, stretch, max_pixels when the pipeline reads the file) and generation options
        passed to transformers' `generate` (do_sample, temperature, top_p, num_beams,
        repetition_penalty, stop_strings, streamer...). `progress(stage, info)` is called as each
        stage begins (`uhrbat.progress`); it may raise to cancel.

        `region=[x0, y0, x1, y1]` (full-image pixels, or map coordinates with `region_crs`) asks
        about that window, read at native resolution (`AskResult.region` / `window_source` place
        it); `zoom=N` answers from up to N windows pass 1 proposes (`uhrbat.zoom`, `AskResult.zoom`).
        """
        masks_ = None if masks is None else [masks]
        return self.ask_batch([image], [question], max_new_tokens, return_relevance, masks_, progress, **kwargs)[0]

    def ask_many(
        self,
        image: Any,
        questions: Sequence[str],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: dict | None = None,
        batch_size: int | None = None,
        progress: Progress | None = None,
        **kwargs: Any,
    ) -> list[AskResult]:
        """Answer several questions about one image; the scene is prepared once.

        Questions are answered in batches of `batch_size` (default: all at once)."""
        if isinstance(questions, str):
            raise PromptError("questions must be a list of strings; use ask() for one question")
        questions = list(questions)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigError(f"batch_size must be an integer >= 1 (or None for one batch), got {batch_size!r}")
        step = batch_size if batch_size is not None else max(1, len(questions))
        for q in questions:  # every question is checked before the first batch runs
            self.processor.build_prompt(q)
        GenerationOptions.of(max_new_tokens=max_new_tokens)
        out: list[AskResult] = []
        for i in range(0, len(questions), step):
            chunk = questions[i : i + step]
            out += self.ask_batch(
                [image] * len(chunk),
                chunk,
                max_new_tokens,
                return_relevance,
                None if masks is None else [masks] * len(chunk),
                progress,
                **kwargs,
            )
        return out

    def ask_batch(
        self,
        images: Sequence[Any],
        questions: Sequence[str],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: Sequence[dict | None] | None = None,
        progress: Progress | None = None,
        **kwargs: Any,
    ) -> list[AskResult]:
        """Answer several (image, question) pairs in one left-padded batch; greedy by default."""
        if isinstance(questions, str):
            raise PromptError("questions must be a list of strings; use ask() for one question")
        if len(images) != len(questions):
            raise PromptError(f"got {len(images)} images and {len(questions)} questions")
        prompts = [self.processor.build_prompt(q) for q in questions]
        return self._run(list(images), prompts, max_new_tokens, return_relevance, masks, progress, kwargs)

    def chat(
        self,
        image: Any,
        messages: Sequence[dict[str, Any]],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: dict | None = None,
        progress: Progress | None = None,
        **kwargs: Any,
    ) -> AskResult:
        """Answer the last user message of an OpenAI-style conversation about one image.

        Earlier turns go into the ChatML prompt; see `uhrbat.processing.messages.chat_prompt` for the
        message format. `streamer=` (e.g. a `TextIteratorStreamer`) streams the answer."""
        masks_ = None if masks is None else [masks]
        return self.chat_batch([image], [messages], max_new_tokens, return_relevance, masks_, progress, **kwargs)[0]

    def chat_batch(
        self,
        images: Sequence[Any],
        conversations: Sequence[Sequence[dict[str, Any]]],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: Sequence[dict | None] | None = None,
        progress: Progress | None = None,
        **kwargs: Any,
    ) -> list[AskResult]:
        """`chat` for several conversations in one left-padded batch (micro-batching)."""
        if len(images) != len(conversations):
            raise PromptError(f"got {len(images)} images and {len(conversations)} conversations")
        prompts = [chat_prompt(c) for c in conversations]
        return self._run(list(images), prompts, max_new_tokens, return_relevance, masks, progress, kwargs)

    @torch.no_grad()
    def choice_logprobs(self, image: Any, question: str, choices: Sequence[str], **kwargs: Any) -> dict[str, float]:
        """First-token log-probability of each option after the prompt (no answer parsing).

        Token selection uses the prompt only."""
        self._no_zoom(kwargs, "choice_logprobs")
        _, embeds, mask, *_ = self._prepare([image], [self.processor.build_prompt(question)], None, kwargs)
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
        with self._model_lock:
            out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tok = self.processor.tokenizer
        res = {}
        for c in choices:
            cids = tok(c, add_special_tokens=False)["input_ids"]
            if not cids:
                raise PromptError(f"choice {c!r} tokenizes to nothing")
            res[c] = float(logp[cids[0]])
        return res

    @torch.no_grad()
    def loglikelihood(self, image: Any, question: str, continuation: str, **kwargs: Any) -> tuple[float, bool]:
        """Sum log-probability of `continuation` after the prompt, and whether it is the greedy
        continuation. Visual tokens are selected from the prompt alone (the continuation never
        leaks into token selection, unlike the reference's lmms adapter)."""
        self._no_zoom(kwargs, "loglikelihood")
        ids, embeds, mask, *_ = self._prepare([image], [self.processor.build_prompt(question)], None, kwargs)
        cont = torch.tensor(
            self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"], device=self.device
        )
        if cont.numel() == 0:
            return 0.0, True
        cont_emb = self.model.get_input_embeddings()(cont)[None].to(embeds.dtype)
        full = torch.cat([embeds, cont_emb], dim=1)
        full_mask = torch.cat([mask, torch.ones(1, cont.numel(), dtype=mask.dtype, device=mask.device)], dim=1)
        pos = (full_mask.long().cumsum(-1) - 1).clamp_min(0)
        with self._model_lock:
            logits = self.model(inputs_embeds=full, attention_mask=full_mask, position_ids=pos).logits[0]
        pred = logits[ids.shape[1] - 1 : -1].float().log_softmax(-1)
        ll = pred.gather(-1, cont[:, None]).sum()
        return float(ll), bool(torch.equal(pred.argmax(-1), cont))

    # ---------------------------------------------------------------- the work
    def _no_zoom(self, kwargs: dict[str, Any], what: str) -> None:
        if self.resolve(**kwargs).zoom:
            raise ConfigError(f"{what} scores one scene and cannot zoom; give zoom=0 (or ask about a region)")

    def _prepare(
        self,
        images: list[Any],
        prompts: list[str],
        masks: Sequence[dict | None] | None,
        kwargs: dict[str, Any],
        progress: Progress | None = None,
        targets: list[tuple[Any, Any, Any]] | None = None,
    ):
        """Validate, tokenise, open the scenes (or the windows of `targets`) and splice the
        visual tokens (no generation).

        Returns `(ids, embeds, mask, traces, opened)`."""
        opts = self.resolve(**kwargs)  # resolved once for the whole request
        if masks is not None and len(masks) != len(images):
            raise PromptError(f"got {len(masks)} masks for {len(images)} images")
        if targets is None:
            targets = reading_targets(images, kwargs)
        selector = get_selector(opts.selector)
        if selector.needs_masks:
            refuse_window_masks(selector.name, targets)
            for m in masks or [None] * len(images):
                for s in self.model.config.scales:
                    require_mask(m, s, selector.name)
        text = self.processor(text=prompts, budgets=list(opts.budgets))  # validates before any compute
        opened = self.scenes.open_all(targets, opts.encode, progress)
        traces = [ImageTrace() for _ in images]
        ids, mask = text["input_ids"].to(self.device), text["attention_mask"].to(self.device)
        prefix = self.scenes.scoring_prefix_provider([o.key for o in opened]) if self.reuse_scoring_prefix else None
        if progress is not None:
            progress("score", {"rows": len(images)})
        with self._model_lock, torch.no_grad():
            embeds, mask = self.model.prepare_inputs_embeds(
                ids,
                mask,
                None,
                masks=masks,
                traces=traces,
                scenes=[o.view for o in opened],
                scoring_prefix=prefix,
                options=opts,
            )
        return ids, embeds, mask, traces, opened

    def _run(
        self,
        images: list[Any],
        prompts: list[str],
        max_new_tokens: int,
        return_relevance: bool,
        masks: Sequence[dict | None] | None,
        progress: Progress | None,
        kwargs: dict[str, Any],
    ) -> list[AskResult]:
        gen = {k: v for k, v in kwargs.items() if k not in _SELECTION_KEYS and k not in _READ_KEYS}
        gen = GenerationOptions.of(max_new_tokens=max_new_tokens, **gen).generate_kwargs()
        if not images:
            return []
        gen.setdefault("min_new_tokens", 1)
        if gen.get("stop_strings") is not None:
            gen.setdefault("tokenizer", self.processor.tokenizer)
        zoom = self.resolve(**kwargs).zoom
        targets = reading_targets(images, kwargs)
        if zoom:

            def answer(images: list, prompts: list, targets: list, relevance: bool, masks: Any) -> tuple[list, list]:
                return self._answer(images, prompts, targets, gen, relevance, masks, progress, {**kwargs, "zoom": 0})

            opts, cfg = self.resolve(**kwargs), self.model.config
            results = zoom_answers(answer, images, prompts, targets, opts, cfg, masks, return_relevance, progress)
        else:
            results, _ = self._answer(images, prompts, targets, gen, return_relevance, masks, progress, kwargs)
        if progress is not None:
            progress("done", {"rows": len(images)})
        return results

    def _answer(
        self,
        images: list[Any],
        prompts: list[str],
        targets: list[tuple[Any, Any, Any]],
        gen: dict[str, Any],
        return_relevance: bool,
        masks: Sequence[dict | None] | None,
        progress: Progress | None,
        kwargs: dict[str, Any],
    ) -> tuple[list[AskResult], list[OpenedScene]]:
        """One pass: open, score, select, generate; the results and the scenes they were about."""
        ids, embeds, mask, traces, opened = self._prepare(images, prompts, masks, kwargs, progress, targets)
        with self._model_lock:
            sequences, prefill, decode = generate(self.model, ids, embeds, mask, gen, progress)
        b = len(images)  # prefill and decoding run for the whole batch: each row gets an equal share
        results = [
            build_result(
                self.model,
                self.processor,
                [int(t) for t in sequences[i].tolist()],
                traces[i],
                opened[i],
                opened[i].view.stats,
                int(mask[i].sum()),
                prefill / b,
                decode / b,
                return_relevance,
            )
            for i in range(b)
        ]
        return results, opened
