"""CUDA paths (opt-in: `python -m pytest -m gpu tests/test_gpu.py` on a machine with a GPU).

Deselected by the default marker filter (`-m 'not slow and not lmms_eval and not gpu'`); they
skip with a reason when selected on a machine without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from conftest import ASSETS, PARITY

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _features(n: int, f: int, k: int, seed: int = 0) -> torch.Tensor:
    """Clustered unit-norm rows like `clustering_features` (feature part normalised)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    centres = torch.randn(k, f, device="cuda", generator=g)
    comp = torch.randint(0, k, (n,), device="cuda", generator=g)
    x = centres[comp] + 0.7 * torch.randn(n, f, device="cuda", generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_fast_kmeans_loop_has_no_host_syncs() -> None:
    from uhrbat.compression.kmeans import device

    x = _features(20_000, 258, 300)
    init = torch.randperm(x.shape[0])[:300].cuda()
    state = device.DeviceState(
        centers=x[init].clone(),
        labels=torch.zeros(x.shape[0], dtype=torch.int64, device="cuda"),
        active=torch.ones((), dtype=torch.bool, device="cuda"),
        converged=torch.zeros((), dtype=torch.bool, device="cuda"),
        iterations=torch.zeros((), dtype=torch.int64, device="cuda"),
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        device.lloyd_steps(x, state, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(state.iterations) >= 1


def test_fast_kmeans_memory_is_bounded_at_released_sizes() -> None:
    """N = 82,944 tokens (4032 px), K = 3000, 3586-wide features, 3 iterations."""
    x = _features(82_944, 3586, 3000)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    from uhrbat.compression import kmeans

    res = kmeans(x, 3000, 3, generator=torch.Generator().manual_seed(0))
    extra = torch.cuda.max_memory_allocated() - base
    assert res.labels.device.type == "cuda" and res.iterations >= 1
    assert extra < 2 * 2**30, f"{extra / 2**30:.2f} GiB of temporaries"


def test_fast_kmeans_agrees_with_exact_on_the_same_gpu() -> None:
    """Same first assignment; afterwards float64 centres vs CUDA's `mean(0)` order can flip
    labels at float near-ties only."""
    from uhrbat.compression import kmeans

    x = _features(36_864, 66, 600, seed=1)
    fast = kmeans(x, 600, 50, generator=torch.Generator().manual_seed(0))
    exact = kmeans(x, 600, 50, generator=torch.Generator().manual_seed(0), mode="exact")
    assert torch.equal(fast.labels_iter1, exact.labels_iter1)
    torch.testing.assert_close(fast.centers_iter1, exact.centers_iter1, atol=1e-6, rtol=1e-6)
    assert float((fast.labels == exact.labels).float().mean()) >= 0.99


@pytest.fixture(scope="module")
def pipes():
    from uhrbat.pipeline import UhrBatPipeline

    kw = dict(
        device="cuda",
        attn_implementation="sdpa",
        scene_cache=False,
        budgets=[80, 320, 600, 2000],
        kmeans_clusters=600,
        kmeans_iters=20,
    )
    return (
        UhrBatPipeline.from_pretrained(PARITY / "uhrbat_tiny", dtype="fp32", **kw),
        UhrBatPipeline.from_pretrained(PARITY / "uhrbat_tiny", dtype="bf16", **kw),
    )


def test_bf16_selection_matches_fp32_within_tolerance(pipes) -> None:
    from uhrbat.tracing import trace_query

    image, q = str(PARITY / "images" / "image_b.png"), "Is there a ship in the harbor?"
    a, b = (trace_query(p, image, q, max_new_tokens=2) for p in pipes)
    torch.testing.assert_close(b["attn.base_scale_attention"], a["attn.base_scale_attention"], rtol=5e-2, atol=1e-5)
    for s in (672, 1344, 2688, 4032):
        assert len(b[f"select.{s}.aggregated"]) == len(a[f"select.{s}.aggregated"])
        kept = [set(t[f"select.{s}.pos_flat"].tolist()) for t in (a, b)]
        assert len(kept[0] & kept[1]) / len(kept[0]) >= 0.8, s


def test_batch_equals_one_by_one_on_cuda(pipes) -> None:
    pipe = pipes[0]
    images = [str(PARITY / "images" / "image_b.png"), str(ASSETS / "aerial" / "neon_yell_2299x2472.png")]
    questions = ["Is there a ship in the harbor?", "How many trees are there?"]
    one = [pipe.ask(i, q, max_new_tokens=6) for i, q in zip(images, questions)]
    batch = pipe.ask_batch(images, questions, max_new_tokens=6)
    assert [r.answer for r in batch] == [r.answer for r in one]
