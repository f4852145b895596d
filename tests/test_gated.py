"""Gated fine-scale encoding (`encode="gated"`): only the tiles a question needs are encoded,
`topk` keeps exactly what `full` keeps, the scene grows and never encodes a tile twice.

Bitwise equality of gated and full results needs the vision tower to give every tile the same
numbers whatever else is in its batch (gated batches hold other tiles). `encoder_regime` checks
that on this CPU and says which regime ran; where it does not hold, the kept positions must still
be equal and the rest is compared at a tolerance.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from conftest import ASSETS, PARITY, PARITY_REPORT
from uhrbat.errors import ConfigError

AERIAL = ASSETS / "aerial" / "neon_yell_1249x1035.png"
ASK = dict(max_new_tokens=4, min_new_tokens=4, return_relevance=True)


@cache
def _parity_model():
    from uhrbat.modeling.loading import load

    return load(PARITY / "uhrbat_tiny", compat="reference", attn_implementation="eager")


def _pipe(model_proc, **kw):
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline(*model_proc, **kw)


@cache
def encoder_regime() -> bool:
    """Does the parity model's vision tower encode a tile bitwise the same alone and in a batch?"""
    model, proc = _parity_model()
    tiles, _ = proc.image_processor.pyramid(PARITY / "images" / "image_b.png")
    with torch.no_grad():
        together, _ = model.encode_tiles(tiles[:40])
        apart = torch.cat([model.encode_tiles(tiles[i : i + 1])[0] for i in (0, 7, 39)])
    same = torch.equal(apart, together[[0, 7, 39]])
    PARITY_REPORT["gated encoding"] = (
        "batch-invariant encoder: gated == full checked bitwise"
        if same
        else "encoder differs by batch on this CPU: gated == full checked on kept positions, embeddings at tolerance"
    )
    return same


def _same_result(a, b, bitwise: bool) -> None:
    ta, tb = [t.to_dict() for t in a.tokens], [t.to_dict() for t in b.tokens]
    if bitwise:
        assert a.generated_ids == b.generated_ids and ta == tb
    else:
        assert [(t["scale"], t["members"]) for t in ta] == [(t["scale"], t["members"]) for t in tb]
    for s in a.relevance:
        assert torch.equal(a.relevance[s], b.relevance[s])  # the base scale is encoded alike in both


@pytest.mark.parametrize("image", [AERIAL, PARITY / "images" / "image_a.png"], ids=["aerial", "parity_a"])
def test_gated_topk_keeps_what_full_topk_keeps(image) -> None:
    """4 scales (672-4032, 228 tiles): gated top-k encodes the base scale and only the tiles that
    hold the kept tokens, and keeps the same tokens and answers the same."""
    budgets = [8, 16, 24, 32]
    full = _pipe(_parity_model(), scene_cache=False).ask(
        image, "Where is the road?", selector="topk", budgets=budgets, **ASK
    )
    gated = _pipe(_parity_model(), scene_cache=False, encode="gated").ask(
        image, "Where is the road?", selector="topk", budgets=budgets, **ASK
    )
    _same_result(full, gated, encoder_regime())
    tiles = {s: len({t.tile for t in gated.tokens if t.scale == s}) for s in gated.scales}
    assert gated.tiles[672] == {"encoded": 4, "held": 4, "total": 4}
    for s in gated.scales[1:]:
        assert gated.tiles[s]["encoded"] == gated.tiles[s]["held"] == tiles[s] < gated.tiles[s]["total"]
    assert full.tiles[4032] == {"encoded": 144, "held": 144, "total": 144}


def test_the_scene_grows_and_never_encodes_a_tile_twice() -> None:
    model, proc = _parity_model()
    pipe = _pipe((model, proc), encode="gated", budgets=[8, 16, 24, 32], selector="topk")
    encoded: list[int] = []
    original = model.encode_tiles

    def counting(tiles, *a, **k):
        encoded.append(int(tiles.shape[0]))
        return original(tiles, *a, **k)

    model.encode_tiles = counting
    try:
        image = PARITY / "images" / "image_b.png"
        first = pipe.ask(image, "How many trees?", **ASK)
        again = pipe.ask(image, "How many trees?", **ASK)  # same question: nothing new to encode
        other = pipe.ask(image, "Is there a river in the lower left corner?", **ASK)
        held = {s: t["held"] for s, t in other.tiles.items()}
        assert sum(encoded) == sum(held.values())  # every tile encoded at most once
        assert sum(t["encoded"] for t in again.tiles.values()) == 0 and again.reuse["features"] == "hit"
        assert all(other.tiles[s]["encoded"] == held[s] - first.tiles[s]["held"] for s in held)
        n = len(encoded)
        full = pipe.ask(image, "How many trees?", encode="full", **ASK)  # completes the scene
        assert len(encoded) == n + 1 and sum(encoded) == 228  # one call for the missing tiles only
        assert all(t["held"] == t["total"] for t in full.tiles.values())
    finally:
        model.encode_tiles = original
    fresh = _pipe((model, proc), scene_cache=False, budgets=[8, 16, 24, 32], selector="topk")
    _same_result(fresh.ask(image, "How many trees?", **ASK), full, encoder_regime())


def test_gated_kmeans_groups_the_most_relevant_tiles_only(tiny_pipeline) -> None:
    """kmeans/segments/other selectors: the most relevant tiles until they hold >= margin x the
    budget in tokens; K-Means runs on those tokens, its labels keyed by the tiles."""
    model, proc = tiny_pipeline.model, tiny_pipeline.processor  # 672 (4 tiles) + 1344 (16 tiles)
    kw = dict(budgets=[8, 700], kmeans_clusters=0, kmeans_iters=5, encode="gated", gate_margin=1.5)
    cached, plain = _pipe((model, proc), **kw), _pipe((model, proc), scene_cache=False, **kw)
    a = cached.ask(AERIAL, "How many trees?", **ASK)
    assert a.tiles[1344]["held"] == 2  # ceil(1.5 * 700 / 576) tiles, the two most relevant
    rel = a.relevance[1344].reshape(16, -1).sum(1)
    assert {t.tile for t in a.tokens if t.scale == 1344} <= set(torch.sort(rel, descending=True).indices[:2].tolist())
    assert sum(t.scale == 1344 for t in a.tokens) == 700 and sum(t.scale == 672 for t in a.tokens) == 8
    _same_result(a, plain.ask(AERIAL, "How many trees?", **ASK), True)  # the store changes nothing
    again = cached.ask(AERIAL, "How many trees?", **ASK)
    assert again.reuse == {"features": "hit", "groups": "hit"}
    wider = cached.ask(AERIAL, "How many trees?", **{**ASK, "gate_margin": 3.0})  # other tiles: other groups
    assert wider.reuse == {"features": "hit", "groups": "miss"} and wider.tiles[1344]["held"] == 4
    none = plain.ask(AERIAL, "How many trees?", **{**ASK, "budgets": [8, 0]})  # nothing needed at 1344
    assert none.tiles[1344] == {"encoded": 0, "held": 0, "total": 16} and {t.scale for t in none.tokens} == {672}


def test_gated_through_generate_and_bad_values(tiny_pipeline) -> None:
    model, proc = tiny_pipeline.model, tiny_pipeline.processor
    inputs = proc(images=[str(AERIAL)], text=[proc.build_prompt("Where is the road?")], budgets=[8, 16])
    full = model.generate(**inputs, selector="topk", max_new_tokens=4, min_new_tokens=4)
    gated = model.generate(**inputs, selector="topk", encode="gated", max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(full, gated) or not encoder_regime()
    for bad, message in ((dict(encode="fast"), "encode must be one of full, gated"), (dict(gate_margin=0), "> 0")):
        with pytest.raises(ConfigError, match=message):
            tiny_pipeline.ask(AERIAL, "q?", **bad)


def test_cli_json_reports_the_tiles_of_each_scale(tiny_checkpoint) -> None:
    """`uhrbat ask --encode gated --json`: per scale the tiles encoded, held and in total."""
    import json

    from typer.testing import CliRunner

    from uhrbat.cli.main import app

    args = ["ask", str(AERIAL), "Where is the road?", "--model", str(tiny_checkpoint), "--json"]
    args += ["--selector", "topk", "--budgets", "8,16", "--max-new-tokens", "2"]
    got = {}
    for encode in ("gated", "full"):
        r = CliRunner().invoke(app, [*args, "--encode", encode])
        assert r.exit_code == 0, r.output
        got[encode] = json.loads(r.stdout)
    gated, full = got["gated"]["tiles"], got["full"]["tiles"]
    assert gated["672"] == full["672"] == {"encoded": 4, "held": 4, "total": 4}
    assert 0 < gated["1344"]["encoded"] == gated["1344"]["held"] < gated["1344"]["total"] == 16
    assert full["1344"] == {"encoded": 16, "held": 16, "total": 16}
    assert got["gated"]["tokens"] == got["full"]["tokens"]  # top-k: the same tokens either way
