"""The selector registry, progress reporting and per-stage reuse on the tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import ASSETS
from uhrbat.compression.selection import select_topk
from uhrbat.errors import ConfigError
from uhrbat.selectors import _REGISTERED, get_selector, register_selector, selector_names

IMAGE = ASSETS / "aerial" / "neon_yell_1249x1035.png"
SMALL = dict(budgets=[8, 16], kmeans_clusters=8, kmeans_iters=5)


def _pipe(tiny_pipeline, **kw):
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline(tiny_pipeline.model, tiny_pipeline.processor, **{**SMALL, **kw})


def test_registry_lists_and_resolves_the_builtin_selectors() -> None:
    assert selector_names()[:5] == ("kmeans", "segments", "topk", "divprune", "dpp")
    km, seg, top = (get_selector(n) for n in ("kmeans", "segments", "topk"))
    assert (km.name, km.grouping, km.needs_masks) == ("kmeans", True, False)
    assert (seg.grouping, seg.needs_masks, top.grouping) == (False, True, False)
    with pytest.raises(ConfigError, match="selector must be one of kmeans, segments, topk, divprune, dpp"):
        get_selector("nope")


@pytest.fixture()
def lowest_first():
    """A selector registered by a test: the `budget` *least* relevant tokens."""

    @register_selector("test_lowest")
    class Lowest:
        grouping = False
        needs_masks = False

        def grouping_key(self, options, config):
            return ()

        def group(self, tokens, budget, options, config, generator, details=None):
            return None

        def select(self, tokens, relevance, budget, options, groups=None, mask=None):
            return select_topk(tokens.embeds, -relevance, budget)

    yield "test_lowest"
    _REGISTERED.pop("test_lowest")


def test_a_registered_selector_is_usable_everywhere(tiny_pipeline, lowest_first) -> None:
    """One registration makes a selector valid in the options, the pipeline and the model."""
    from uhrbat.options import SelectionOptions

    assert lowest_first in selector_names() and SelectionOptions.of(selector=lowest_first).selector == lowest_first
    pipe = _pipe(tiny_pipeline)
    res = pipe.ask(IMAGE, "How many trees?", max_new_tokens=2, selector=lowest_first, return_relevance=True)
    assert "groups" not in res.reuse  # no grouping step
    for scale, budget in zip(res.scales, [8, 16]):
        rel = res.relevance[scale].reshape(-1)
        want = torch.sort(-rel, descending=True, stable=True).indices[:budget].tolist()
        assert [t.members[0] for t in res.tokens if t.scale == scale] == want


@pytest.mark.parametrize("name", ["divprune", "dpp"])
def test_diversity_selectors_keep_exact_budgets_everywhere(tiny_pipeline, name) -> None:
    """DivPrune and DPP: registered like the others, exactly the budget per scale, deterministic,
    gated or not (they have no grouping step, so gated runs them on the most relevant tiles)."""
    pipe = _pipe(tiny_pipeline)
    runs = [pipe.ask(IMAGE, "How many trees?", max_new_tokens=2, selector=name) for _ in range(2)]
    runs.append(pipe.ask(IMAGE, "How many trees?", max_new_tokens=2, selector=name, encode="gated"))
    for res in runs:
        assert [sum(t.scale == s for t in res.tokens) for s in res.scales] == [8, 16]
        assert not any(t.merged for t in res.tokens) and "groups" not in res.reuse
    assert [t.to_dict() for t in runs[0].tokens] == [t.to_dict() for t in runs[1].tokens]


def test_progress_reports_every_stage_in_order_and_can_cancel(tiny_pipeline) -> None:
    pipe = _pipe(tiny_pipeline)
    seen: list[tuple[str, dict]] = []
    res = pipe.ask(IMAGE, "How many trees?", max_new_tokens=2, progress=lambda s, i: seen.append((s, i)))
    stages = [s for s, _ in seen]
    assert stages == ["load", "tiles", "encode", "score", "group", "select", "prefill", "decode", "done"]
    assert dict(seen)["encode"]["tiles"] == {672: 4, 1344: 16} and res.reuse == {"features": "miss", "groups": "miss"}
    seen.clear()
    pipe.ask(IMAGE, "Is there a road?", max_new_tokens=2, progress=lambda s, i: seen.append((s, i)))
    assert [s for s, _ in seen] == ["score", "select", "prefill", "decode", "done"]  # reused: no load/encode/group

    class Cancelled(Exception):
        pass

    def deadline(stage: str, info: dict) -> None:
        if stage == "select":
            raise Cancelled

    with pytest.raises(Cancelled):
        pipe.ask(IMAGE, "Where?", max_new_tokens=2, progress=deadline)


def test_reuse_is_reported_per_stage(tiny_pipeline) -> None:
    """Changing K reuses the features but not the grouping: the result says so (never a bare
    "hit" while K-Means runs again)."""
    pipe = _pipe(tiny_pipeline)
    first = pipe.ask(IMAGE, "How many trees?", max_new_tokens=2)
    again = pipe.ask(IMAGE, "How many trees?", max_new_tokens=2)
    other_k = pipe.ask(IMAGE, "How many trees?", max_new_tokens=2, kmeans_clusters=5)
    top = pipe.ask(IMAGE, "How many trees?", max_new_tokens=2, selector="topk")
    assert first.reuse == {"features": "miss", "groups": "miss"}
    assert again.reuse == {"features": "hit", "groups": "hit"} and again.timings_detail["group"] == 0.0
    assert other_k.reuse == {"features": "hit", "groups": "miss"} and other_k.timings_detail["group"] > 0
    assert top.reuse == {"features": "hit"}
    assert again.to_dict()["reuse"] == again.reuse
    assert again.tiles == {672: {"encoded": 0, "held": 4, "total": 4}, 1344: {"encoded": 0, "held": 16, "total": 16}}
    assert first.tiles[1344]["encoded"] == 16
    from uhrbat.cli.ask import format_timings

    assert format_timings(other_k).endswith("(scene cache: hit for features, miss for groups)")
    off = _pipe(tiny_pipeline, scene_cache=False).ask(IMAGE, "How many trees?", max_new_tokens=2)
    assert off.reuse == {"features": "off", "groups": "off"} and format_timings(off).endswith("(scene cache: off)")


def test_open_returns_a_scene_to_ask_about(tiny_pipeline) -> None:
    pipe = _pipe(tiny_pipeline)
    plain = _pipe(tiny_pipeline, scene_cache=False).ask(IMAGE, "How many trees?", max_new_tokens=3)
    for store in (True, False):
        p = _pipe(tiny_pipeline, scene_cache=store)
        scene = p.open(IMAGE)
        assert scene.size == (1249, 1035) and scene.tiles == {672: 4, 1344: 16}
        res = p.ask(scene, "How many trees?", max_new_tokens=3)
        assert res.cache == ("hit" if store else "off") and res.timings["encode"] == 0.0
        assert res.generated_ids == plain.generated_ids
        assert [t.to_dict() for t in res.tokens] == [t.to_dict() for t in plain.tokens]
    with pytest.raises(ConfigError, match="give 1 band"):
        pipe.open(IMAGE, bands="1,2")
