"""The scene cache and the pipeline API around it: cached results are bitwise the uncached ones
(cold, warm, evicted, from disk), options never hit stale entries, the disk layer survives bad
files, threads share one pipeline, and bad requests fail before any compute."""

from __future__ import annotations

import threading
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ASSETS, PARITY
from uhrbat.errors import BudgetError, ConfigError, MaskError, PromptError
from uhrbat.scene.store import SceneStore

IMAGE = ASSETS / "aerial" / "neon_yell_1249x1035.png"
SMALL = dict(budgets=[8, 16], kmeans_clusters=8, kmeans_iters=5)


def _image(seed: int, size=(300, 200)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


@cache
def _parity_model():
    from uhrbat.modeling.loading import load

    return load(PARITY / "uhrbat_tiny", compat="reference", attn_implementation="eager")


def _parity_pipe(**kw):
    from uhrbat.pipeline import UhrBatPipeline

    model, proc = _parity_model()
    return UhrBatPipeline(model, proc, **kw)


def _same(a, b) -> None:
    """Bitwise equality of everything a result reports about the model's work."""
    assert a.generated_ids == b.generated_ids
    assert [t.to_dict() for t in a.tokens] == [t.to_dict() for t in b.tokens]
    assert a.prompt_tokens == b.prompt_tokens and a.completion_tokens == b.completion_tokens
    if a.relevance is not None or b.relevance is not None:
        assert a.relevance.keys() == b.relevance.keys()
        for s in a.relevance:
            assert torch.equal(a.relevance[s], b.relevance[s])


@pytest.fixture()
def counted(monkeypatch, tiny_pipeline):
    """Counts CLIP encodes and K-Means groupings of the tiny model."""
    model = tiny_pipeline.model
    calls = {"encode": 0, "group": 0}
    enc, grp = model.encode_scene, model.group_scene

    def encode_scene(*a, **k):
        calls["encode"] += 1
        return enc(*a, **k)

    def group_scene(*a, **k):
        calls["group"] += 1
        return grp(*a, **k)

    monkeypatch.setattr(model, "encode_scene", encode_scene)
    monkeypatch.setattr(model, "group_scene", group_scene)
    return calls


def _tiny(tiny_pipeline, **kw):
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline(tiny_pipeline.model, tiny_pipeline.processor, **{**SMALL, **kw})


# ------------------------------------------------------------------------------ bitwise parity
def test_cached_equals_uncached_cold_warm_disk_in_both_kmeans_modes(tmp_path: Path) -> None:
    """On the parity fixture's tiny model (4 scales, 228 tiles, reference compat, eager): answer
    ids, kept tokens and relevance are bitwise the uncached ones, in exact and fast K-Means mode."""
    base = dict(budgets=[8, 16, 24, 32], kmeans_clusters=12, kmeans_iters=8, seed=0)
    image = PARITY / "images" / "image_a.png"
    q = "How many red cars are in the parking lot?"
    ask = dict(max_new_tokens=4, return_relevance=True)
    cached = _parity_pipe(cache_dir=tmp_path / "c", **base)
    for i, mode in enumerate(("exact", "fast")):
        ref = _parity_pipe(scene_cache=False, **base).ask(image, q, kmeans_mode=mode, **ask)
        cold = cached.ask(image, q, kmeans_mode=mode, **ask)
        warm = cached.ask(image, q, kmeans_mode=mode, **ask)
        # The scene is shared by both modes; the K-Means labels are keyed by the mode.
        assert (ref.cache, cold.cache, warm.cache) == ("off", "miss" if i == 0 else "hit", "hit")
        assert cold.timings_detail["group"] > 0 and warm.timings_detail["group"] == 0.0
        assert warm.timings["encode"] == 0.0 and warm.timings["tiles"] == 0.0
        disk = _parity_pipe(scene_cache=SceneStore(cache_dir=tmp_path / "c"), **base).ask(
            image, q, kmeans_mode=mode, **ask
        )
        assert disk.cache == "disk"
        for res in (cold, warm, disk):
            _same(res, ref)


def test_evicted_scene_is_recomputed_identically(tiny_pipeline) -> None:
    q = "How many trees?"
    ref = _tiny(tiny_pipeline, scene_cache=False).ask(IMAGE, q, max_new_tokens=3, return_relevance=True)
    probe = _tiny(tiny_pipeline)
    probe.ask(IMAGE, q, max_new_tokens=1)
    small = _tiny(tiny_pipeline, scene_cache=probe.scene_cache.nbytes() * 3 // 2)  # one scene fits, two do not
    first = small.ask(IMAGE, q, max_new_tokens=3, return_relevance=True)
    small.ask(_image(5), "What is this?", max_new_tokens=1)
    evicted = small.ask(IMAGE, q, max_new_tokens=3, return_relevance=True)
    assert small.scene_cache.stats["evictions"] >= 1
    assert small.scene_cache.nbytes() <= small.scene_cache.max_bytes
    assert (first.cache, evicted.cache) == ("miss", "miss")
    _same(first, ref)
    _same(evicted, ref)


def test_fresh_caches_sharing_a_folder_never_mix_images(tiny_pipeline, tmp_path) -> None:
    plain = _tiny(tiny_pipeline, scene_cache=False)
    for image in (IMAGE, _image(41, (400, 300)), PARITY / "images" / "image_b.png"):
        got = _tiny(tiny_pipeline, scene_cache=SceneStore(cache_dir=tmp_path)).ask(
            image, "What?", max_new_tokens=2, return_relevance=True
        )
        assert got.cache == "miss"
        _same(got, plain.ask(image, "What?", max_new_tokens=2, return_relevance=True))


def test_choice_logprobs_and_loglikelihood_use_the_cache(tiny_pipeline) -> None:
    model, proc = tiny_pipeline.model, tiny_pipeline.processor
    q, choices = "Is there a road?", ["yes", "no"]
    cached = _tiny(tiny_pipeline)
    cached.ask(IMAGE, q, max_new_tokens=1)  # prepares the scene
    inp = proc(images=[str(IMAGE)], text=[proc.build_prompt(q)], budgets=SMALL["budgets"])
    sel = {k: v for k, v in SMALL.items() if k != "budgets"}
    with torch.no_grad():  # the model's own forward with tiles
        logp = torch.log_softmax(model(**inp, logits_to_keep=1, **sel).logits[0, -1].float(), -1)
    ids = [proc.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
    assert cached.choice_logprobs(IMAGE, q, choices) == {c: float(logp[i]) for c, i in zip(choices, ids)}
    plain = _tiny(tiny_pipeline, scene_cache=False)
    assert cached.loglikelihood(IMAGE, q, "yes it is") == plain.loglikelihood(IMAGE, q, "yes it is")


def test_pipeline_path_equals_model_generate(tiny_pipeline) -> None:
    """The pipeline (prepared scene) and `model.generate` with tiles (one call) agree."""
    model, proc = tiny_pipeline.model, tiny_pipeline.processor
    q = "Is there a river?"
    res = _tiny(tiny_pipeline).ask(IMAGE, q, max_new_tokens=5, min_new_tokens=5)
    inp = proc(images=[str(IMAGE)], text=[proc.build_prompt(q)], budgets=SMALL["budgets"])
    sel = {k: v for k, v in SMALL.items() if k != "budgets"}
    assert model.generate(**inp, max_new_tokens=5, min_new_tokens=5, **sel)[0].tolist() == res.generated_ids


def test_changed_options_never_hit_stale_entries(tiny_pipeline) -> None:
    cached = _tiny(tiny_pipeline)
    plain = _tiny(tiny_pipeline, scene_cache=False)
    q = "Where is the river?"
    cached.ask(IMAGE, q, max_new_tokens=3)
    for change in (
        dict(seed=1),
        dict(kmeans_clusters=5),
        dict(kmeans_iters=2),
        dict(kmeans_mode="exact"),
        dict(budgets=[4, 20]),
        dict(kmeans_clusters=0),
        dict(kmeans_clusters=0, budgets=[6, 16]),
        dict(selector="topk"),
    ):
        got = cached.ask(IMAGE, q, max_new_tokens=3, return_relevance=True, **change)
        assert got.cache == "hit"  # the scene is shared; the grouping is keyed by the options
        _same(got, plain.ask(IMAGE, q, max_new_tokens=3, return_relevance=True, **change))


def test_group_key_holds_every_scale() -> None:
    """The seeded generator runs through the scales in order: K of an earlier scale is part of
    the key of every later scale's labels."""
    from uhrbat.options import SelectionOptions
    from uhrbat.selectors import get_selector

    model, proc = _parity_model()
    key = get_selector("kmeans").grouping_key
    a = SelectionOptions.of(budgets=[8, 16, 24, 32], kmeans_clusters=0).resolve(model.config)
    b = SelectionOptions.of(budgets=[9, 16, 24, 32], kmeans_clusters=0).resolve(model.config)
    c = SelectionOptions.of(budgets=[9, 16, 24, 32], kmeans_clusters=7).resolve(model.config)
    d = SelectionOptions.of(budgets=[8, 16, 24, 32], kmeans_clusters=7).resolve(model.config)
    assert len({key(o, model.config) for o in (a, b, c)}) == 3
    assert key(c, model.config) == key(d, model.config)  # budgets do not change K when K is given


# ------------------------------------------------------------------------------ reuse
def test_follow_up_reuses_scene_and_groups(tiny_pipeline, counted) -> None:
    pipe = _tiny(tiny_pipeline)
    pil = _image(11, (500, 420))
    for image in (IMAGE, pil):
        first = pipe.ask(image, "How many trees?", max_new_tokens=2)
        again = pipe.ask(image, "Is there a road?", max_new_tokens=2)
        assert (first.cache, again.cache) == ("miss", "hit")
        assert again.timings["tiles"] == 0.0 and again.timings["encode"] == 0.0 and again.timings_detail["group"] == 0.0
    assert counted == {"encode": 2, "group": 2}
    many = pipe.ask_many(_image(12), ["a?", "b?", "c?"], max_new_tokens=2)
    assert [r.cache for r in many] == ["miss", "hit", "hit"]
    assert counted == {"encode": 3, "group": 3}


def test_ask_many_equals_one_by_one(tiny_pipeline) -> None:
    pipe = _tiny(tiny_pipeline, scene_cache=False)
    qs = ["How many trees are there?", "Is there a road?", "Describe the image in detail."]
    many = pipe.ask_many(IMAGE, qs, max_new_tokens=4)
    assert [r.cache for r in many] == ["off"] * 3
    for r, q in zip(many, qs):
        _same(r, pipe.ask(IMAGE, q, max_new_tokens=4))


def test_per_sample_timings_in_a_batch(tiny_pipeline) -> None:
    pipe = _tiny(tiny_pipeline)
    a, b = pipe.ask_batch([_image(21), _image(22)], ["x?", "y?"], max_new_tokens=3, min_new_tokens=3)
    for r in (a, b):
        assert set(r.timings) == {"load", "tiles", "encode", "score", "select", "prefill", "decode"}
        assert all(isinstance(v, float) and v >= 0 for v in r.timings.values())
        assert r.timings["encode"] > 0 and r.cache == "miss"
    assert a.timings["prefill"] == b.timings["prefill"]  # the batch's share, not the batch's sum
    assert a.completion_tokens == 3 and a.prompt_tokens > 24


def test_concurrent_ask_from_threads(tiny_pipeline, counted) -> None:
    pipe = _tiny(tiny_pipeline)
    plain = _tiny(tiny_pipeline, scene_cache=False)
    image = _image(31, (640, 480))
    qs = [f"Question number {i}?" for i in range(6)]
    expected = {q: plain.ask(image, q, max_new_tokens=3) for q in qs}
    counted.update(encode=0, group=0)
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def work(q: str) -> None:
        try:
            results[q] = pipe.ask(image, q, max_new_tokens=3)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(q,)) for q in qs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert counted == {"encode": 1, "group": 1}  # one thread prepared the scene, the others waited
    for q in qs:
        _same(results[q], expected[q])


# ------------------------------------------------------------------------------ memory bound
def test_lru_eviction_under_a_byte_bound() -> None:
    def item(v: float) -> dict:  # 1 KiB
        return {"x": torch.full((256,), float(v))}

    cache = SceneStore(max_bytes=3 * 1024)
    for k in "abc":
        cache.put(k, item(ord(k)))
    assert len(cache) == 3 and cache.nbytes("cpu") == 3 * 1024
    assert cache.get("a")[1] == "hit"  # a is now the most recent
    cache.put("d", item(1))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "acd" if k in cache}
    assert cache.nbytes() <= cache.max_bytes and cache.stats["evictions"] == 1
    cache.put("huge", {"x": torch.zeros(4096)})  # larger than the bound: not kept, nothing evicted
    assert "huge" not in cache and len(cache) == 3
    assert cache.get("b") is None and cache.stats["misses"] == 1
    off = SceneStore(max_bytes=0)
    off.put("a", item(0))
    assert len(off) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        SceneStore(max_bytes=-1)


def test_pipeline_cache_settings(tiny_pipeline, tmp_path) -> None:
    assert _tiny(tiny_pipeline).scene_cache is not None
    assert _tiny(tiny_pipeline, scene_cache=False).scene_cache is None
    assert _tiny(tiny_pipeline, scene_cache=0).scene_cache is None
    assert _tiny(tiny_pipeline, scene_cache=1000).scene_cache.max_bytes == 1000
    shared = SceneStore(max_bytes=10)
    assert _tiny(tiny_pipeline, scene_cache=shared).scene_cache is shared
    with pytest.raises(ConfigError, match="scene_cache must be"):
        _tiny(tiny_pipeline, scene_cache="yes")
    with pytest.raises(ConfigError, match="cache_dir needs the scene cache"):
        _tiny(tiny_pipeline, scene_cache=False, cache_dir=tmp_path)


# ------------------------------------------------------------------------------ disk layer
def test_corrupt_partial_and_foreign_disk_files_are_recomputed(tiny_pipeline, tmp_path) -> None:
    d = tmp_path / "cache"
    q = "How many trees?"
    plain = _tiny(tiny_pipeline, scene_cache=False).ask(IMAGE, q, max_new_tokens=3, return_relevance=True)
    _tiny(tiny_pipeline, cache_dir=d).ask(IMAGE, q, max_new_tokens=3)
    files = sorted(d.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    assert len(files) == 2  # the scene's features and its K-Means labels
    groups_file, scene_file = files
    assert not list(d.rglob(".tmp-*"))  # atomic writes leave no temporaries
    good = scene_file.read_bytes()

    def damaged(data: bytes):
        scene_file.write_bytes(data)
        pipe = _tiny(tiny_pipeline, scene_cache=SceneStore(cache_dir=d))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = pipe.ask(IMAGE, q, max_new_tokens=3, return_relevance=True)
        return res, [str(w.message) for w in caught if "scene cache" in str(w.message)]

    flipped = bytearray(good)
    flipped[-100] ^= 0xFF  # a bit flip inside the tensor data
    foreign = groups_file.read_bytes()  # a valid file holding another key
    for data in (good[: len(good) // 2], b"", bytes(flipped), foreign, b"\x00" * 64):
        res, msgs = damaged(data)
        assert res.cache == "miss" and msgs, data[:16]
        _same(res, plain)
    # The recompute rewrote a good file: the next pipeline reads it from disk.
    res = _tiny(tiny_pipeline, scene_cache=SceneStore(cache_dir=d)).ask(
        IMAGE, q, max_new_tokens=3, return_relevance=True
    )
    assert res.cache == "disk"
    _same(res, plain)
    for alias in d.rglob("*.alias.json"):
        alias.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="scene cache: ignoring"):
        res = _tiny(tiny_pipeline, scene_cache=SceneStore(cache_dir=d)).ask(IMAGE, q, max_new_tokens=3)
    assert res.cache == "disk"  # the alias is recomputed (tiling), the features still come from disk


# ------------------------------------------------------------------------------ generation options
def test_beam_search_and_streamer_through_the_pipeline(tiny_pipeline) -> None:
    from transformers import TextIteratorStreamer

    pipe = _tiny(tiny_pipeline)
    res = pipe.ask(IMAGE, "How many trees?", max_new_tokens=4, min_new_tokens=4, num_beams=3)
    assert len(res.generated_ids) == 4 and res.timings["prefill"] > 0 and res.timings["decode"] > 0
    model, proc = tiny_pipeline.model, tiny_pipeline.processor
    inp = proc(images=[str(IMAGE)], text=[proc.build_prompt("How many trees?")], budgets=SMALL["budgets"])
    sel = {k: v for k, v in SMALL.items() if k != "budgets"}
    beams = model.generate(**inp, max_new_tokens=4, min_new_tokens=4, num_beams=3, **sel)
    assert beams[0].tolist() == res.generated_ids
    streamer = TextIteratorStreamer(proc.tokenizer, skip_prompt=True)
    res = pipe.chat(
        IMAGE,
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Trees?"}]}],
        max_new_tokens=4,
        min_new_tokens=4,
        streamer=streamer,
    )
    assert "".join(streamer).strip() == res.answer


# ------------------------------------------------------------------------------ chat
def test_chat_matches_ask_and_keeps_earlier_turns(tiny_pipeline) -> None:
    from uhrbat.processing.messages import chat_prompt

    pipe = _tiny(tiny_pipeline)
    q = "How many trees?"
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    _same(pipe.chat(IMAGE, one, max_new_tokens=3), pipe.ask(IMAGE, q, max_new_tokens=3))
    turns = one + [{"role": "assistant", "content": "Seven."}, {"role": "user", "content": "And roads?"}]
    prompt = chat_prompt(turns)
    assert (
        prompt.count("<image>") == 1
        and "Seven.<|im_end|>" in prompt
        and prompt.endswith("And roads?<|im_end|>\n<|im_start|>assistant\n")
    )
    a, b = pipe.chat_batch([IMAGE, IMAGE], [turns, one], max_new_tokens=3)
    assert a.prompt_tokens > b.prompt_tokens and b.cache == "hit"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "no image"}], "exactly one image part, found 0"),
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}],
            "found 2",
        ),
        (
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]},
                {"role": "assistant", "content": "a"},
            ],
            "last message must be the user's question",
        ),
        ([{"role": "robot", "content": [{"type": "image"}]}], "role must be"),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  "}]}], "empty"),
        (
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "see <image>"}]}],
            "contains '<image>'",
        ),
        ([{"role": "user", "content": [{"type": "image"}, {"type": "audio"}]}], "unsupported content part"),
    ],
)
def test_chat_validation(tiny_pipeline, counted, messages, match) -> None:
    with pytest.raises(PromptError, match=match):
        _tiny(tiny_pipeline).chat(IMAGE, messages)
    assert counted["encode"] == 0


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(question=""), PromptError, "question is empty"),
        (dict(question=" \n\t "), PromptError, "question is empty"),
        (dict(question="<image>\n  "), PromptError, "question is empty"),
        (dict(question="Is <image> a ship?"), PromptError, "extra '<image>'"),
        (dict(max_new_tokens=0), BudgetError, "max_new_tokens must be an integer >= 1, got 0"),
        (dict(budgets=[0, 0]), BudgetError, "all 0"),
        (dict(kmeans_iters=0), ConfigError, "kmeans_iters must be >= 1"),
        (dict(kmeans_clusters=-1), ConfigError, "kmeans_clusters must be >= 0"),
        (dict(selector="segments"), MaskError, "needs a segment mask for every scale"),
        (
            dict(selector="segments", masks={672: torch.zeros(672, 672, dtype=torch.int32)}),
            MaskError,
            "scale 1344 has none",
        ),
    ],
)
def test_bad_requests_fail_before_compute(tiny_pipeline, counted, kwargs, error, match) -> None:
    kwargs = {"question": "How many trees?", **kwargs}
    with pytest.raises(error, match=match) as info:
        _tiny(tiny_pipeline).ask(IMAGE, kwargs.pop("question"), **kwargs)
    assert "\n" not in str(info.value)
    assert counted["encode"] == 0
