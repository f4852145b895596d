"""High-level API: ask questions about huge images.

```python
from uhrbat import UhrBatPipeline
pipe = UhrBatPipeline.from_pretrained("RL-MIND/UHR-BAT", device="cuda", dtype="bf16")
res = pipe.ask("scene.tif", "How many ships are in the harbour?")
print(res.answer, res.timings, res.cache)
more = pipe.ask_many("scene.tif", ["Is the runway clear?", "Where is the fuel depot?"])
```

Every question about one image repeats work that does not depend on the question: decoding and
tiling, CLIP + projector, K-Means. The pipeline keeps that work in a `SceneCache` (on by default),
so a follow-up question only runs the query-dependent part: the relevance pass, preserve-and-merge,
the token MLP, prefill and decoding. Results are bitwise the same with or without the cache.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from uhrbat.compression.types import Selection
from uhrbat.configuration.geometry import CLIP_336_14, TokenGeometry
from uhrbat.errors import BudgetError, ConfigError, PromptError
from uhrbat.io.sources import open_image
from uhrbat.modeling.loading import DEFAULT_MODEL, load
from uhrbat.modeling.modeling_uhrbat import ImageTrace, SceneFeatures, ScoringPrefix, SelectionOptions
from uhrbat.processing.prompt import IMAGE_MARKER, chatml, validate_question
from uhrbat.results import AskResult, KeptToken
from uhrbat.scene_cache import DEFAULT_MAX_BYTES, SceneCache, digest

_SELECTION_KEYS = ("budgets", "selector", "kmeans_clusters", "kmeans_iters", "kmeans_mode", "seed")
_SPECIAL_RE = re.compile(r"<\|[^|]*\|>( ?assistant)?|<image>|</?s>|<pad>|<eos>|<unk>")
_ROLES = ("system", "user", "assistant")
_IMAGE_PARTS = ("image", "image_url", "input_image")  # the image itself is passed separately


class _FirstToken(LogitsProcessor):
    """Records when generation first asks for next-token scores (the end of prefill).

    A logits processor, not a streamer: transformers refuses streamers with beam search."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.at is None:
            self.at = time.perf_counter()
        return scores


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


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """OpenAI-style messages about one image -> the ChatML prompt (earlier turns included).

    Content is a string or a list of parts `{"type": "text", "text": ...}` and exactly one image
    part (`{"type": "image"}`; `image_url` / `input_image` parts count as the image too, the image
    itself is passed separately). The last message must be the user's question.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    rendered: list[dict[str, Any]] = []
    n_images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise PromptError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if role == "system" and i != 0:
            raise PromptError(f"message {i}: a system message may only come first")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise PromptError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        out: list[dict[str, Any]] = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE_PARTS:
                if role != "user":
                    raise PromptError(f"message {i}: only a user message may hold the image")
                n_images += 1
                out.append({"type": "image"})
            elif kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError(f"message {i}: a text part needs a 'text' string")
                if IMAGE_MARKER in text:
                    raise PromptError(
                        f"message {i}: the text contains {IMAGE_MARKER!r}; pass the image as an image part "
                        f"and remove {IMAGE_MARKER!r} from the text"
                    )
                out.append({"type": "text", "text": text})
            else:
                raise PromptError(f"message {i}: unsupported content part {kind!r}; use 'text' and one 'image' part")
        rendered.append({"role": role, "content": out})
    if n_images != 1:
        raise PromptError(
            f"a conversation needs exactly one image part, found {n_images}; "
            "add {'type': 'image'} to the first user message"
        )
    last = rendered[-1]
    if last["role"] != "user":
        raise PromptError(f"the last message must be the user's question, got a {last['role']!r} message")
    validate_question("".join(p.get("text", "") for p in last["content"]))  # empty / whitespace-only
    return chatml(rendered)


@dataclass
class _Scene:
    """One prepared image for this call: its features, where they came from, what they cost."""

    features: SceneFeatures
    key: str | None  # scene-cache key (None with the cache off)
    size: tuple[int, int]
    cache: str  # "off" | "miss" | "hit" | "disk"
    timings: dict[str, float] = field(default_factory=dict)  # load, tiles, encode (this row's own cost)
    groups: dict[tuple, tuple[dict[int, torch.Tensor], float]] = field(
        default_factory=dict
    )  # options -> (labels, seconds)


def _make_cache(scene_cache: Any, cache_dir: Any) -> SceneCache | None:
    if isinstance(scene_cache, SceneCache):
        if cache_dir is not None:
            raise ConfigError("give cache_dir to the SceneCache you pass, not to the pipeline")
        return scene_cache
    if scene_cache is None or scene_cache is False:
        if cache_dir is not None:
            raise ConfigError("cache_dir needs the scene cache; drop scene_cache=False or cache_dir")
        return None
    if cache_dir is not None:  # "~/.cache/uhrbat/scenes" means the home folder, not a "~" folder here
        cache_dir = Path(cache_dir).expanduser()
    if scene_cache is True:
        return SceneCache(DEFAULT_MAX_BYTES, cache_dir)
    if isinstance(scene_cache, int) and scene_cache >= 0:
        return SceneCache(scene_cache, cache_dir) if (scene_cache > 0 or cache_dir is not None) else None
    raise ConfigError(f"scene_cache must be True, False, a byte count >= 0 or a SceneCache, got {scene_cache!r}")


def _check_max_new_tokens(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BudgetError(f"max_new_tokens must be an integer >= 1, got {n!r}")
    return n


class UhrBatPipeline:
    """Model + processor + defaults, with `ask`, `ask_many`, `ask_batch`, `chat`, `chat_batch`,
    `choice_logprobs` and `loglikelihood`.

    Args:
        model, processor: a loaded `UhrBatForConditionalGeneration` and `UhrBatProcessor`.
        scene_cache: True (default bound, `uhrbat.scene_cache.DEFAULT_MAX_BYTES` per device),
            False, a byte bound (0 = no in-memory layer), or a `SceneCache` to share.
        cache_dir: folder of the on-disk cache layer (safetensors), or None.
        reuse_scoring_prefix: opt-in. Score in two steps (text before the image + image, then
            the question) and keep the first step's KV in the scene cache, so a follow-up
            question runs only its own tokens in the scoring pass. Cached == uncached holds
            bitwise within this mode, but its relevance differs from the default one-pass
            scoring (and the parity fixtures) in the last bits (README "Many questions per scene").
        **selection: default selection options (budgets, selector, kmeans_clusters,
            kmeans_iters, kmeans_mode, seed).

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
        **selection: Any,
    ) -> None:
        self.model = model
        self.processor = processor
        if not isinstance(reuse_scoring_prefix, bool):
            raise ConfigError(f"reuse_scoring_prefix must be True or False, got {reuse_scoring_prefix!r}")
        self.reuse_scoring_prefix = reuse_scoring_prefix
        self.selection = {k: v for k, v in selection.items() if k in _SELECTION_KEYS and v is not None}
        SelectionOptions.resolve(model.config, **self.selection)  # validate early
        self.scene_cache = _make_cache(scene_cache, cache_dir)
        self.load_seconds = 0.0
        self._model_lock = threading.RLock()
        self._identity: str | None = None
        self._source_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opened source -> alias
        self._file_hashes: dict[tuple, str] = {}

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

    # ---------------------------------------------------------------- helpers
    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        opts = dict(self.selection)
        opts.update({k: v for k, v in overrides.items() if k in _SELECTION_KEYS and v is not None})
        return opts

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def _inputs(self, images: Sequence[Any], questions: Sequence[str], budgets: Any, timings: dict[str, float]):
        """Processor output for (image, question) pairs, tiles included (the uncached path; tracing)."""
        t0 = time.perf_counter()
        sources = [open_image(im) for im in images]
        t1 = time.perf_counter()
        prompts = [self.processor.build_prompt(q) for q in questions]
        inputs = self.processor(images=sources, text=prompts, budgets=budgets)
        t2 = time.perf_counter()
        timings["load"] = t1 - t0
        timings["tiles"] = t2 - t1
        return inputs, sources

    # ---------------------------------------------------------------- cache keys
    def model_identity(self) -> str:
        """Fingerprint of the model (config, every weight's name/shape/dtype and a strided sample
        of its values), its dtype/device and the torch build and processor it runs on; computed
        once. Call `reset_model_identity()` after changing the weights in place."""
        if self._identity is None:
            h = hashlib.sha256(self.model.config.to_json_string().encode())
            with torch.no_grad():
                for name, p in self.model.state_dict().items():
                    flat = p.detach().reshape(-1)
                    sample = flat[:: max(1, flat.numel() // 1024)][:1024].to("cpu", torch.float64)
                    h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.device}|".encode())
                    h.update(sample.numpy().tobytes())
            dev = self.device
            hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
            self._identity = digest(h.hexdigest(), torch.__version__, str(dev), hw, _cpu_model())
        return self._identity

    def reset_model_identity(self) -> None:
        self._identity = None

    @property
    def _feature_dtype(self) -> torch.dtype:
        return self.model.projector.fc1.weight.dtype

    def _tiling(self) -> dict[str, Any]:
        ip = self.processor.image_processor
        return {k: getattr(ip, k, None) for k in ("scales", "tile_size", "image_mean", "image_std")}

    def _source_fingerprint(self, image: Any) -> str | None:
        """A cheap key for the *source* (before decoding): file bytes, PIL pixels, or the
        `cache_fingerprint` string an ImageSource may carry; None when unknown."""
        from PIL import Image

        from uhrbat.io import images as io_images

        read = {"stretch": io_images.DEFAULT_STRETCH, "max_pixels": io_images.DEFAULT_MAX_PIXELS}
        if isinstance(image, (str, os.PathLike)):
            try:
                return digest("file", self._file_hash(Path(image)), read, self._tiling())
            except OSError:
                return None  # open_image reports the problem
        if isinstance(image, Image.Image):
            h = hashlib.sha256(image.tobytes())
            return digest("pil", image.mode, image.size, h.hexdigest(), read, self._tiling())
        fp = getattr(image, "cache_fingerprint", None)
        return digest("source", fp, self._tiling()) if isinstance(fp, str) else None

    def _file_hash(self, path: Path) -> str:
        st = path.stat()
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if memo not in self._file_hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self._file_hashes[memo] = h.hexdigest()
        return self._file_hashes[memo]

    def _scene_key(self, content: str) -> str:
        if not isinstance(content, str) or not content:
            raise TypeError(f"a scene key needs the content digest, got {content!r}")
        cfg = self.model.config
        vision_attn = getattr(cfg.vision_config, "_attn_implementation", None)
        return digest(
            "scene",
            content,
            self.model_identity(),
            str(self._feature_dtype),
            cfg.encode_chunk_size,
            cfg.vision_feature_layer,
            cfg.enable_scale_pos_residual,
            list(cfg.scales),
            vision_attn,
        )

    def _group_options(self, opts: SelectionOptions) -> tuple:
        """Everything K-Means labels depend on besides the scene (every scale: one generator)."""
        cfg = self.model.config
        ks = [opts.kmeans_clusters if opts.kmeans_clusters else b for b in opts.budgets]
        return (
            "kmeans",
            tuple(ks),
            opts.kmeans_iters,
            opts.seed,
            opts.kmeans_mode,
            cfg.kmeans_feat_scale,
            cfg.kmeans_coord_scale,
            cfg.tokens_per_side,
        )

    # ---------------------------------------------------------------- scene preparation
    def _prepare(self, image: Any) -> _Scene:
        """Features of one image, from the cache when possible (query-independent)."""
        cache = self.scene_cache
        timings = {"load": 0.0, "tiles": 0.0, "encode": 0.0}
        t0 = time.perf_counter()
        alias = None
        fingerprint = None
        if cache is not None:
            alias = self._source_keys.get(image) if _weakrefable(image) else None
            if alias is None:
                fingerprint = self._source_fingerprint(image)
                alias = cache.get_alias(fingerprint) if fingerprint else None
        if alias is not None:
            key = self._scene_key(alias["content"])
            with cache.key_lock(key):
                got = self._lookup(key)
            if got is not None:
                timings["load"] = time.perf_counter() - t0
                return _Scene(got[0], key, tuple(alias["size"]), got[1], timings)
        source = open_image(image)
        t1 = time.perf_counter()
        tiles, size = self.processor.image_processor.pyramid(source)
        content = (
            digest("tiles", hashlib.sha256(tiles.numpy().data).hexdigest(), tuple(tiles.shape))
            if cache is not None
            else None
        )
        t2 = time.perf_counter()
        timings["load"], timings["tiles"] = t1 - t0, t2 - t1
        if cache is None:
            with self._model_lock:
                features = self.model.encode_scene(tiles)
            timings["encode"] = time.perf_counter() - t2
            return _Scene(features, None, tuple(size), "off", timings)
        alias = {"content": content, "size": list(size)}
        if fingerprint is not None:
            cache.put_alias(fingerprint, content, size)
        if _weakrefable(image):
            self._source_keys[image] = alias
        key = self._scene_key(content)
        with cache.key_lock(key):
            got = self._lookup(key)
            if got is not None:
                return _Scene(got[0], key, tuple(size), got[1], timings)
            t3 = time.perf_counter()
            with self._model_lock:
                features = self.model.encode_scene(tiles)
            cache.put(key, {"embeds": features.embeds, "score_base": features.score_base})
            timings["encode"] = time.perf_counter() - t3
        return _Scene(features, key, tuple(size), "miss", timings)

    def _lookup(self, key: str) -> tuple[SceneFeatures, str] | None:
        got = self.scene_cache.get(key, self.device)
        if got is None:
            return None
        item, where = got
        embeds, base = item.get("embeds"), item.get("score_base")
        cfg = self.model.config
        ok = (
            embeds is not None
            and base is not None
            and embeds.dtype == self._feature_dtype == base.dtype
            and embeds.dim() == 3
            and embeds.shape[0] == sum(cfg.num_tiles(s) for s in cfg.scales)
            and embeds.shape[1] == cfg.tokens_per_tile
            and base.dim() == 2
            and base.shape[1] == embeds.shape[2]
        )
        return (SceneFeatures(embeds=embeds, score_base=base), where) if ok else None

    def _groups(self, scene: _Scene, opts: SelectionOptions) -> tuple[dict[int, torch.Tensor], float]:
        """K-Means labels of `scene` for `opts` (cached) and the seconds spent computing them here."""
        if opts.selector != "kmeans":
            return {}, 0.0
        gopts = self._group_options(opts)
        if gopts in scene.groups:
            return scene.groups[gopts][0], 0.0
        cache = self.scene_cache
        gkey = digest("groups", scene.key, gopts) if scene.key is not None and cache is not None else None

        def compute() -> tuple[dict[int, torch.Tensor], float]:
            t0 = time.perf_counter()
            with self._model_lock:
                labels = self.model.group_scene(scene.features, opts)
            return labels, time.perf_counter() - t0

        if gkey is None:
            labels, seconds = compute()
        else:
            with cache.key_lock(gkey):
                got = cache.get(gkey, self.device)
                labels, seconds = ({int(k): v for k, v in got[0].items()}, 0.0) if got is not None else ({}, 0.0)
                cfg = self.model.config
                if sorted(labels) != sorted(cfg.scales) or any(  # a miss, or an item of another shape
                    labels[s].shape != (cfg.num_tokens(s),) or labels[s].dtype != torch.int64 for s in cfg.scales
                ):
                    labels, seconds = compute()
                    cache.put(gkey, {str(s): v for s, v in labels.items()})
        scene.groups[gopts] = (labels, seconds)
        return labels, seconds

    # ---------------------------------------------------------------- API
    def ask(
        self,
        image: Any,
        question: str,
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: dict | None = None,
        **kwargs: Any,
    ) -> AskResult:
        """Answer one question about one image (path, PIL image or opened ImageSource).

        `kwargs`: selection options (budgets, selector, kmeans_clusters, kmeans_iters,
        kmeans_mode, seed) and generation options passed to transformers' `generate`
        (do_sample, temperature, top_p, num_beams, repetition_penalty, stop_strings, streamer...).
        """
        return self.ask_batch(
            [image],
            [question],
            max_new_tokens=max_new_tokens,
            return_relevance=return_relevance,
            masks=None if masks is None else [masks],
            **kwargs,
        )[0]

    def ask_many(
        self,
        image: Any,
        questions: Sequence[str],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: dict | None = None,
        batch_size: int | None = None,
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
        _check_max_new_tokens(max_new_tokens)
        out: list[AskResult] = []
        for i in range(0, len(questions), step):
            chunk = questions[i : i + step]
            out += self.ask_batch(
                [image] * len(chunk),
                chunk,
                max_new_tokens=max_new_tokens,
                return_relevance=return_relevance,
                masks=None if masks is None else [masks] * len(chunk),
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
        **kwargs: Any,
    ) -> list[AskResult]:
        """Answer several (image, question) pairs in one left-padded batch; greedy by default."""
        if isinstance(questions, str):
            raise PromptError("questions must be a list of strings; use ask() for one question")
        if len(images) != len(questions):
            raise PromptError(f"got {len(images)} images and {len(questions)} questions")
        prompts = [self.processor.build_prompt(q) for q in questions]
        return self._run(list(images), prompts, max_new_tokens, return_relevance, masks, kwargs)

    def chat(
        self,
        image: Any,
        messages: Sequence[dict[str, Any]],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: dict | None = None,
        **kwargs: Any,
    ) -> AskResult:
        """Answer the last user message of an OpenAI-style conversation about one image.

        Earlier turns go into the ChatML prompt; see `chat_prompt` for the message format.
        `streamer=` (e.g. a `TextIteratorStreamer`) streams the answer."""
        return self.chat_batch(
            [image],
            [messages],
            max_new_tokens=max_new_tokens,
            return_relevance=return_relevance,
            masks=None if masks is None else [masks],
            **kwargs,
        )[0]

    def chat_batch(
        self,
        images: Sequence[Any],
        conversations: Sequence[Sequence[dict[str, Any]]],
        max_new_tokens: int = 512,
        return_relevance: bool = False,
        masks: Sequence[dict | None] | None = None,
        **kwargs: Any,
    ) -> list[AskResult]:
        """`chat` for several conversations in one left-padded batch (micro-batching)."""
        if len(images) != len(conversations):
            raise PromptError(f"got {len(images)} images and {len(conversations)} conversations")
        prompts = [chat_prompt(c) for c in conversations]
        return self._run(list(images), prompts, max_new_tokens, return_relevance, masks, kwargs)

    # ---------------------------------------------------------------- core
    def _encode_prompts(
        self, images: list[Any], prompts: list[str], masks: Sequence[dict | None] | None, kwargs: dict[str, Any]
    ):
        """Validate, tokenise, prepare scenes and splice the visual tokens (no generation).

        Returns `(ids, embeds, mask, traces, scenes, opts, group_seconds)`."""
        raw_opts = self._options(kwargs)
        opts = SelectionOptions.resolve(self.model.config, **raw_opts)
        if masks is not None and len(masks) != len(images):
            raise PromptError(f"got {len(masks)} masks for {len(images)} images")
        if opts.selector == "segments":
            for m in masks or [None] * len(images):
                for s in self.model.config.scales:
                    self.model.require_mask(m, s)
        text = self.processor(text=prompts, budgets=opts.budgets)  # validates before any compute
        scenes: list[_Scene] = []
        seen: dict[int, _Scene] = {}
        for im in images:
            if id(im) in seen:  # the same object again in this call (ask_many): prepared once
                first = seen[id(im)]
                scenes.append(
                    _Scene(
                        first.features,
                        first.key,
                        first.size,
                        "hit" if first.key else first.cache,
                        {"load": 0.0, "tiles": 0.0, "encode": 0.0},
                        first.groups,
                    )
                )
            else:
                seen[id(im)] = sc = self._prepare(im)
                scenes.append(sc)
        groups, group_seconds = [], []
        for sc in scenes:
            labels, seconds = self._groups(sc, opts)
            groups.append(labels)
            group_seconds.append(seconds)
        traces = [ImageTrace() for _ in images]
        dev = self.device
        ids, mask = text["input_ids"].to(dev), text["attention_mask"].to(dev)
        with self._model_lock, torch.no_grad():
            embeds, mask = self.model.prepare_inputs_embeds(
                ids,
                mask,
                None,
                masks=masks,
                traces=traces,
                scenes=[sc.features for sc in scenes],
                groups=groups,
                scoring_prefix=self._scoring_prefix_provider(scenes) if self.reuse_scoring_prefix else None,
                **raw_opts,
            )
        return ids, embeds, mask, traces, scenes, opts, group_seconds

    def _scoring_prefix_provider(
        self, scenes: Sequence[_Scene]
    ) -> Callable[[int, torch.Tensor, Callable[[], ScoringPrefix]], ScoringPrefix]:
        """`scoring_prefix` for `prepare_inputs_embeds`: each row's `ScoringPrefix` from the scene
        cache, keyed by its scene, the exact token ids before the image (system prompt and user
        header: another system prompt or compat template is another key), the LLM's attention
        implementation and dtype; computed and kept on a miss."""
        cache = self.scene_cache
        lm = self.model.language_model
        num_layers = len(self.model.lm_layers)

        def provide(row: int, prefix_ids: torch.Tensor, compute: Callable[[], ScoringPrefix]) -> ScoringPrefix:
            key = scenes[row].key
            if cache is None or key is None:
                return compute()
            pkey = digest(
                "scoring-prefix",
                key,
                [int(t) for t in prefix_ids.tolist()],
                self.model.config.compat,
                getattr(lm.config, "_attn_implementation", None),
                str(lm.get_input_embeddings().weight.dtype),
            )
            with cache.key_lock(pkey):
                got = cache.get(pkey, self.device)
                state = ScoringPrefix.from_tensors(got[0], num_layers) if got is not None else None
                if state is None:
                    state = compute()
                    cache.put(pkey, state.tensors())
            return state

        return provide

    def _run(
        self,
        images: list[Any],
        prompts: list[str],
        max_new_tokens: int,
        return_relevance: bool,
        masks: Sequence[dict | None] | None,
        kwargs: dict[str, Any],
    ) -> list[AskResult]:
        max_new_tokens = _check_max_new_tokens(max_new_tokens)
        if not images:
            return []
        gen_kwargs = {k: v for k, v in kwargs.items() if k not in _SELECTION_KEYS}
        gen_kwargs.setdefault("min_new_tokens", 1)
        if gen_kwargs.get("stop_strings") is not None:
            gen_kwargs.setdefault("tokenizer", self.processor.tokenizer)
        ids, embeds, mask, traces, scenes, _, group_seconds = self._encode_prompts(images, prompts, masks, kwargs)
        clock = _FirstToken()
        processors = LogitsProcessorList(gen_kwargs.pop("logits_processor", None) or [])
        processors.append(clock)
        with self._model_lock:
            t0 = time.perf_counter()
            out = self.model.generate_from_embeds(
                ids, embeds, mask, max_new_tokens=max_new_tokens, logits_processor=processors, **gen_kwargs
            )
            t_end = time.perf_counter()
        sequences = out if torch.is_tensor(out) else out.sequences
        first = clock.at or t_end
        b = len(images)
        # Prefill and decoding run for the whole batch: each row gets an equal share.
        prefill, decode = max(0.0, first - t0) / b, max(0.0, t_end - first) / b
        gc = self.model.generation_config
        compat = self.model.config.compat
        results = []
        for i, (tr, sc) in enumerate(zip(traces, scenes)):
            raw = [int(t) for t in sequences[i].tolist()]
            answer_ids = _until_eos(raw, gc.eos_token_id, gc.pad_token_id)
            ended = len(answer_ids) < len(raw) and raw[len(answer_ids)] in _as_set(gc.eos_token_id)
            text = self.processor.decode(answer_ids, skip_special_tokens=True)
            timings = {
                "load": sc.timings["load"],
                "tiles": sc.timings["tiles"],
                "encode": sc.timings["encode"],
                "score": tr.timings.get("score", 0.0),
                "select": tr.timings.get("select", 0.0) + group_seconds[i],
                "prefill": prefill,
                "decode": decode,
            }
            results.append(
                AskResult(
                    answer=clean_answer(text, compat),
                    tokens=kept_tokens(tr.selections, self.model.config.geometry),
                    timings=timings,
                    timings_detail={"group": group_seconds[i]},
                    num_visual_tokens=sum(len(s) for s in tr.selections.values()),
                    image_size=tuple(sc.size),
                    scales=list(self.model.config.scales),
                    generated_ids=answer_ids,
                    relevance={s: r.cpu() for s, r in tr.relevance.items()} if return_relevance else None,
                    cache=sc.cache,
                    prompt_tokens=int(mask[i].sum()),
                    completion_tokens=len(answer_ids) + int(ended),
                )
            )
        return results

    @torch.no_grad()
    def choice_logprobs(self, image: Any, question: str, choices: Sequence[str], **kwargs: Any) -> dict[str, float]:
        """First-token log-probability of each option after the prompt (no answer parsing).

        Token selection uses the prompt only."""
        _, embeds, mask, *_ = self._encode_prompts([image], [self.processor.build_prompt(question)], None, kwargs)
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
        ids, embeds, mask, *_ = self._encode_prompts([image], [self.processor.build_prompt(question)], None, kwargs)
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


def _weakrefable(obj: Any) -> bool:
    """Opened image sources are immutable readers: remember their content key by identity.
    Paths are hashed (files change); PIL images are hashed (they are mutable)."""
    from PIL import Image

    if isinstance(obj, (str, os.PathLike, Image.Image)):
        return False
    try:
        weakref.ref(obj)
        hash(obj)
    except TypeError:
        return False
    return True


_CPU_MODEL: str | None = None


def _cpu_model() -> str:
    """The CPU's model name (kernels, hence last bits, differ between CPUs; part of cache keys)."""
    global _CPU_MODEL
    if _CPU_MODEL is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
            _CPU_MODEL = next(
                (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), ""
            )
        except OSError:
            _CPU_MODEL = ""
        _CPU_MODEL = _CPU_MODEL or platform.processor()
    return _CPU_MODEL


def _as_set(ids: Any) -> set[int]:
    return set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}


def _until_eos(ids: list[int], eos: Any, pad: Any) -> list[int]:
    stops = _as_set(eos)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    while ids and pad is not None and ids[-1] == pad:
        ids = ids[:-1]
    return ids
