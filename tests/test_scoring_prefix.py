"""Opt-in reuse of the scoring pass's query-independent prefix (`reuse_scoring_prefix=True`).

The two-step scoring (text before the image + image, then the question) is not bitwise the
one-pass scoring that the parity fixtures pin down (README "Many questions per scene"), so it is
an explicit mode: within it, cached == uncached bitwise by construction; against the fixture, the
relevance holds at the README tolerance and the selections and answers are unchanged."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARITY
from uhrbat.errors import ConfigError
from uhrbat.scene.store import SceneStore

IMAGE = PARITY / "images" / "image_b.png"
OTHER = PARITY / "images" / "image_a.png"
BASE = dict(budgets=[8, 16, 24, 32], kmeans_clusters=12, kmeans_iters=8, seed=0)
ASK = dict(max_new_tokens=3, return_relevance=True)


@cache
def _model():
    from uhrbat.modeling.loading import load

    return load(PARITY / "uhrbat_tiny", compat="reference", attn_implementation="eager")


def _pipe(**kw):
    from uhrbat.pipeline import UhrBatPipeline

    model, proc = _model()
    return UhrBatPipeline(model, proc, **{**BASE, **kw})


@pytest.fixture()
def prefix_calls(monkeypatch):
    """Counts `score_prefix` computations of the parity model."""
    model = _model()[0]
    calls = {"n": 0}
    orig = model.score_prefix

    def score_prefix(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(model, "score_prefix", score_prefix)
    return calls


def _same(a, b) -> None:
    assert a.generated_ids == b.generated_ids
    assert [t.to_dict() for t in a.tokens] == [t.to_dict() for t in b.tokens]
    assert a.relevance.keys() == b.relevance.keys()
    for s in a.relevance:
        assert torch.equal(a.relevance[s], b.relevance[s]), s


@pytest.mark.parametrize("case", ["case_a", "case_b"])
def test_two_step_scoring_matches_fixture_at_tolerance(case: str) -> None:
    """On the fixture's relevance-pass input: close to the reference (README tolerance), and the
    prefix state does not depend on the question (one state serves two suffixes)."""
    model = _model()[0]
    fx = load_file(str(PARITY / case / "fixture.safetensors"))
    emb, ids = fx["attn_pass.inputs_embeds"], fx["attn_pass.mm_input_ids"]
    img = (ids == -200).nonzero().squeeze(1)
    start, stop = int(img[0]), int(img[-1]) + 1
    state = model.score_prefix(emb[:start], emb[start:stop])
    assert state.length == stop and state.image_start == start
    assert len(state.keys) == len(model.lm_layers) - 1
    rel = model.score_relevance_from_prefix(state, emb[stop:]).float()
    torch.testing.assert_close(rel, fx["attn.base_scale_attention"], rtol=1e-5, atol=1e-9)
    # The state is read, never changed: scoring another suffix first gives the same numbers.
    fresh = model.score_prefix(emb[:start], emb[start:stop])
    model.score_relevance_from_prefix(fresh, emb[stop + 1 :])
    assert torch.equal(model.score_relevance_from_prefix(fresh, emb[stop:]).float(), rel)


def test_reused_prefix_is_bitwise_the_uncached_two_step_pass(tmp_path: Path, prefix_calls) -> None:
    """Cold, warm (same and other question), batched and from disk: bitwise the uncached two-step
    pipeline; a warm follow-up computes no prefix. Answers and selections equal the default
    one-pass pipeline on this fixture; relevance agrees at the README tolerance."""
    q1, q2 = "How many trees are there?", "Is there a road? Answer yes or no."
    cached = _pipe(reuse_scoring_prefix=True, cache_dir=tmp_path / "c")
    cold = cached.ask(IMAGE, q1, **ASK)
    assert (cold.cache, prefix_calls["n"]) == ("miss", 1)
    warm = cached.ask(IMAGE, q2, **ASK)
    again = cached.ask(IMAGE, q1, **ASK)
    assert (warm.cache, again.cache, prefix_calls["n"]) == ("hit", "hit", 1)
    many = cached.ask_many(IMAGE, [q2, q1], **ASK)
    assert prefix_calls["n"] == 1
    disk = _pipe(reuse_scoring_prefix=True, scene_cache=SceneStore(cache_dir=tmp_path / "c")).ask(IMAGE, q2, **ASK)
    assert (disk.cache, prefix_calls["n"]) == ("disk", 1)

    plain = _pipe(reuse_scoring_prefix=True, scene_cache=False)
    ref1, ref2 = plain.ask(IMAGE, q1, **ASK), plain.ask(IMAGE, q2, **ASK)
    assert prefix_calls["n"] == 3  # no cache: computed every time, the same way
    for got, ref in ((cold, ref1), (again, ref1), (many[1], ref1), (warm, ref2), (many[0], ref2), (disk, ref2)):
        _same(got, ref)

    one_pass = _pipe(scene_cache=False).ask(IMAGE, q1, **ASK)
    assert one_pass.generated_ids == cold.generated_ids
    strip = [{k: v for k, v in t.to_dict().items() if k != "score"} for t in cold.tokens]
    assert strip == [{k: v for k, v in t.to_dict().items() if k != "score"} for t in one_pass.tokens]
    for s in cold.relevance:
        torch.testing.assert_close(cold.relevance[s], one_pass.relevance[s], rtol=1e-5, atol=1e-9)


def test_batch_with_left_padding_equals_one_by_one() -> None:
    """Rows of different prompt lengths in one left-padded batch: each row's prefix ids exclude
    the padding, so every row equals its own `ask`."""
    pipe = _pipe(reuse_scoring_prefix=True)
    qs = ["Trees?", "Is there a road running from the top left corner to the bottom right corner?"]
    batch = pipe.ask_batch([IMAGE, OTHER], qs, **ASK)
    alone = _pipe(reuse_scoring_prefix=True, scene_cache=False)
    for got, im, q in zip(batch, (IMAGE, OTHER), qs):
        _same(got, alone.ask(im, q, **ASK))


def test_changed_system_prompt_or_bad_item_never_reuses_a_stale_prefix(prefix_calls) -> None:
    """Another system prompt is another prefix (new computation, equal to the uncached one); an
    item that does not hold a whole prefix state is recomputed, never used."""
    pipe = _pipe(reuse_scoring_prefix=True)
    plain = _pipe(reuse_scoring_prefix=True, scene_cache=False)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many trees?"}]}
    pipe.chat(IMAGE, [user], **ASK)
    assert prefix_calls["n"] == 1
    convo = [{"role": "system", "content": "You count trees in aerial images."}, user]
    got = pipe.chat(IMAGE, convo, **ASK)
    assert (got.cache, prefix_calls["n"]) == ("hit", 2)  # the scene is reused, the prefix is not
    _same(got, plain.chat(IMAGE, convo, **ASK))

    items = pipe.scene_cache._items
    keys = [k for k, v in items.items() if "last_k" in v]
    assert len(keys) == 2
    for k in keys:
        items[k] = {"last_k": items[k]["last_k"], "image_start": items[k]["image_start"]}  # layers missing
    n = prefix_calls["n"]
    _same(pipe.chat(IMAGE, convo, **ASK), got)
    assert prefix_calls["n"] == n + 1


def test_reuse_scoring_prefix_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="reuse_scoring_prefix must be True or False"):
        _pipe(reuse_scoring_prefix="yes")
