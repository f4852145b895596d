"""Parity with the reference implementation on the fixtures in ../shared/parity (the contract).

The tiny reference-format checkpoint is loaded through the normal loading path, every case is
run with the fixture's call (seed 0, greedy, 8 new tokens, LLM attention eager, the
reference's prompt quirk) and each intermediate is compared at the README's tolerances.
"""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARITY

CASES = ["case_a", "case_b"]
SCALES = [672, 1344, 2688, 4032]


@lru_cache(maxsize=None)
def fixture(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(PARITY / case / "fixture.safetensors")), json.loads((PARITY / case / "meta.json").read_text())


@lru_cache(maxsize=None)
def pipeline():
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline.from_pretrained(PARITY / "uhrbat_tiny", compat="reference", attn_implementation="eager")


@lru_cache(maxsize=None)
def traced(case: str, mode: str) -> dict[str, torch.Tensor]:
    from uhrbat.tracing import trace_query

    _, meta = fixture(case)
    c = meta["case"]
    return trace_query(
        pipeline(), str(PARITY / "images" / c["image"]), c["question"], max_new_tokens=c["max_new_tokens"],
        budgets=c["multiscale_topk"], kmeans_clusters=c["kmeans_num_clusters"], kmeans_iters=c["kmeans_max_iters"],
        seed=c["seed"], kmeans_mode=mode, selector="kmeans",
    )


def tied_rows(meta: dict, scale: int) -> set[int]:
    return {r for t in meta["ties"][str(scale)]["tied_individual_runs"] for r in t["select_rows"]}


def assert_rows_equal(mine: torch.Tensor, ref: torch.Tensor, ties: set[int], **tol) -> None:
    """Row-wise comparison; exactly tied rows (unstable argsort order) are compared as a set."""
    assert mine.shape == ref.shape
    keep = torch.tensor([i not in ties for i in range(ref.shape[0])])
    torch.testing.assert_close(mine[keep], ref[keep], **tol)
    if ties:
        idx = sorted(ties)
        a = sorted(mine[idx].tolist())
        b = sorted(ref[idx].tolist())
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), **tol)


def csr_rows(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    o = offsets.tolist()
    f = flat.tolist()
    return [f[o[i] : o[i + 1]] for i in range(len(o) - 1)]


@pytest.mark.parametrize("case", CASES)
def test_inputs_tiles_features_and_relevance(case: str) -> None:
    fx, meta = fixture(case)
    t = traced(case, "exact")
    assert torch.equal(t["input_ids"], fx["input_ids"])
    for s in SCALES:
        assert torch.equal(t[f"tiles.{s}.tile_sha256_prefix"], fx[f"tiles.{s}.tile_sha256_prefix"]), s
        assert torch.equal(t[f"scale_residual.{s}"], fx[f"scale_residual.{s}"]), s
        torch.testing.assert_close(t[f"clip_feats.{s}.token_norm"], fx[f"clip_feats.{s}.token_norm"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t[f"vision_feats.{s}.token_norm"], fx[f"vision_feats.{s}.token_norm"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t[f"attn.by_scale.{s}"], fx[f"attn.by_scale.{s}"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(t["clip_feats.672"], fx["clip_feats.672"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["vision_feats.672"], fx["vision_feats.672"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["attn.base_scale_attention"], fx["attn.base_scale_attention"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("case", CASES)
def test_exact_kmeans_mode_matches_everything(case: str) -> None:
    fx, meta = fixture(case)
    t = traced(case, "exact")
    for s in SCALES:
        assert torch.equal(t[f"kmeans.{s}.init_idx"], fx[f"kmeans.{s}.init_idx"]), s
        assert torch.equal(t[f"kmeans.{s}.labels_iter1"], fx[f"kmeans.{s}.labels_iter1"]), s
        torch.testing.assert_close(t[f"kmeans.{s}.centers_iter1"], fx[f"kmeans.{s}.centers_iter1"], atol=1e-6, rtol=0)
        assert torch.equal(t[f"kmeans.{s}.labels"], fx[f"kmeans.{s}.labels"]), s
        ties = tied_rows(meta, s)
        assert torch.equal(t[f"select.{s}.aggregated"], fx[f"select.{s}.aggregated"]), s
        assert torch.equal(t[f"select.{s}.cluster"], fx[f"select.{s}.cluster"]), s
        mine = csr_rows(t[f"select.{s}.pos_flat"], t[f"select.{s}.pos_offsets"])
        ref = csr_rows(fx[f"select.{s}.pos_flat"], fx[f"select.{s}.pos_offsets"])
        assert [sorted(r) for i, r in enumerate(mine) if i not in ties] == [sorted(r) for i, r in enumerate(ref) if i not in ties]
        assert sorted(map(sorted, (mine[i] for i in ties))) == sorted(map(sorted, (ref[i] for i in ties)))
        torch.testing.assert_close(t[f"select.{s}.score"], fx[f"select.{s}.score"], rtol=1e-5, atol=0)
    ties_all: set[int] = set()
    off = 0
    for s in SCALES:
        ties_all |= {off + r for r in tied_rows(meta, s)}
        off += len(fx[f"select.{s}.aggregated"])
    assert_rows_equal(t["merged.pre_mlp"], fx["merged.pre_mlp"], ties_all, atol=1e-5, rtol=1e-5)
    assert_rows_equal(t["merged.post_mlp"], fx["merged.post_mlp"], ties_all, atol=1e-5, rtol=1e-5)
    prefix = int((fx["final.mm_input_ids"] == -200).nonzero()[0])
    assert_rows_equal(t["final.inputs_embeds"], fx["final.inputs_embeds"], {prefix + r for r in ties_all}, atol=1e-5, rtol=1e-5)
    assert torch.equal(t["final.mm_input_ids"], fx["final.mm_input_ids"])
    # Logits over the 1003 real vocabulary rows.
    torch.testing.assert_close(t["logits.last_prompt"], fx["logits.last_prompt"], atol=1e-4, rtol=0)
    torch.testing.assert_close(t["gen.step_logits_raw"], fx["gen.step_logits_raw"], atol=1e-4, rtol=0)
    assert torch.equal(t["gen.new_token_ids"], fx["gen.new_token_ids"])


@pytest.mark.parametrize("case", CASES)
def test_fast_kmeans_mode_matches_where_labels_agree(case: str) -> None:
    fx, meta = fixture(case)
    t = traced(case, "fast")
    agreed = []
    for s in SCALES:
        assert torch.equal(t[f"kmeans.{s}.init_idx"], fx[f"kmeans.{s}.init_idx"]), s
        assert torch.equal(t[f"kmeans.{s}.labels_iter1"], fx[f"kmeans.{s}.labels_iter1"]), s
        if torch.equal(t[f"kmeans.{s}.labels"], fx[f"kmeans.{s}.labels"]):
            agreed.append(s)
            ties = tied_rows(meta, s)
            assert torch.equal(t[f"select.{s}.aggregated"], fx[f"select.{s}.aggregated"]), s
            mine = csr_rows(t[f"select.{s}.pos_flat"], t[f"select.{s}.pos_offsets"])
            ref = csr_rows(fx[f"select.{s}.pos_flat"], fx[f"select.{s}.pos_offsets"])
            assert [sorted(r) for i, r in enumerate(mine) if i not in ties] == [sorted(r) for i, r in enumerate(ref) if i not in ties]
    # The README: a vectorised centre update keeps the labels at every scale but the largest.
    assert agreed[:3] == [672, 1344, 2688], agreed
    assert torch.equal(t["gen.new_token_ids"], fx["gen.new_token_ids"])
