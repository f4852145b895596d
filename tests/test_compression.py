"""Pure-tensor compression core: K-Means, preserve-and-merge, segment masks.

Golden data: ../shared/parity/case_{a,b} (see its README, step 8 and "Recommended tolerances").
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from uhrbat.compression import (
    KMeansResult,
    Selection,
    clustering_features,
    kmeans,
    load_mask_file,
    max_selectable,
    preserve_and_merge,
    segment_ids_for_scale,
    select_segments,
    select_topk,
)
from uhrbat.compression.kmeans import cached, means
from uhrbat.compression.kmeans.cached import CachedDistances
from uhrbat.compression.kmeans.device import kmeans_device
from uhrbat.compression.kmeans.exact import kmeans_exact
from uhrbat.compression.kmeans.fast import kmeans_fast
from uhrbat.compression.kmeans.means import mean_emulation_lanes, torch_like_sums
from uhrbat.compression.selection import cluster_tokens
from uhrbat.errors import BudgetError, MaskError


def select_kmeans(embeds, scores, budget, *, mode="fast", **grouping):
    """What the `kmeans` selector does on one scale: K-Means grouping, then preserve-and-merge."""
    res = cluster_tokens(embeds, budget, mode=mode, **grouping)
    return preserve_and_merge(embeds, scores, res.labels, budget, exact=mode == "exact"), res


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "parity"
CASES = ["case_a", "case_b"]
SCALES = [672, 1344, 2688, 4032]
TOKENS = {672: 2304, 1344: 9216, 2688: 36864, 4032: 82944}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: these tests run many small ops, which on a busy machine suffer
    from OpenMP thread hand-offs; results do not depend on the thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@cache
def fixture(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    folder = PARITY / case
    return load_file(str(folder / "fixture.safetensors")), json.loads((folder / "meta.json").read_text())


def selection_embeds(case: str, scale: int) -> torch.Tensor:
    """`[N, 64]` embeddings the selection sees: vision_feats + the residual once more."""
    f, _ = fixture(case)
    feats = f[f"vision_feats.{scale}"]
    tiles = feats.shape[0]
    return feats.reshape(-1, feats.shape[-1]) + f[f"scale_residual.{scale}"].repeat(tiles, 1)


@cache
def fixture_kmeans(case: str, scale: int, mode: str) -> KMeansResult:
    f, meta = fixture(case)
    c = meta["case"]
    feats = clustering_features(selection_embeds(case, scale), TOKENS[scale] // 576)
    return kmeans(
        feats,
        c["kmeans_num_clusters"],
        c["kmeans_max_iters"],
        mode=mode,
        init_indices=f[f"kmeans.{scale}.init_idx"],
    )


def budget_of(case: str, scale: int) -> int:
    return fixture(case)[1]["case"]["multiscale_topk"][SCALES.index(scale)]


def tied_rows(case: str, scale: int) -> set[int]:
    meta = fixture(case)[1]
    return {r for t in meta["ties"][str(scale)]["tied_individual_runs"] for r in t["select_rows"]}


def row_signature(sel: Selection) -> list[tuple]:
    """Per row: (merged, group, score, sorted member positions)."""
    out = []
    for i in range(len(sel)):
        members = sel.positions[sel.offsets[i] : sel.offsets[i + 1]].sort().values.tolist()
        out.append((bool(sel.merged[i]), int(sel.group[i]), float(sel.scores[i]), tuple(members)))
    return out


def assert_same_selection(a: Selection, b: Selection, *, embeds_atol: float | None = 0.0) -> None:
    """Same rows in the same order, except that single rows with exactly equal scores may
    swap (their order follows an unstable argsort in the reference). Merged-row scores are
    means and may differ in the last bits between the float64 and float32 computations."""
    sa, sb = row_signature(a), row_signature(b)
    assert len(sa) == len(sb)
    assert [s[:2] for s in sa] == [s[:2] for s in sb]
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)
    assert sorted((s[0], s[1], s[3]) for s in sa) == sorted((s[0], s[1], s[3]) for s in sb)
    for x, y in zip(sa, sb):
        if x[3] != y[3]:  # a swapped pair of single rows: equal scores
            assert not x[0] and x[2] == y[2]
    if embeds_atol is not None:
        rows = torch.tensor([x[3] == y[3] for x, y in zip(sa, sb)], dtype=torch.bool)
        torch.testing.assert_close(a.embeds[rows], b.embeds[rows], atol=embeds_atol, rtol=0)


# ------------------------------------------------------------------------------ features / init


def test_clustering_features_layout() -> None:
    emb = torch.randn(2 * 576, 8)
    feats = clustering_features(emb, 2, feat_scale=2.0, coord_scale=0.5)
    assert feats.shape == (1152, 10) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[:, :8].norm(dim=1), torch.full((1152,), 2.0))
    # token 25 = row 1, col 1 of tile 0; token 576 + 47 = row 1, col 23 of tile 1: (x, y) = (col, row) / 23
    torch.testing.assert_close(feats[25, 8:], torch.tensor([0.5 / 23, 0.5 / 23]))
    torch.testing.assert_close(feats[576 + 47, 8:], torch.tensor([0.5, 0.5 / 23]))
    with pytest.raises(ValueError):
        clustering_features(torch.randn(100, 8), 1)


@pytest.mark.parametrize("case", CASES)
def test_init_indices_from_seeded_generator(case: str) -> None:
    f, _ = fixture(case)
    gen = torch.Generator().manual_seed(0)
    for scale in SCALES:  # four draws from one generator, in scale order
        k = f[f"kmeans.{scale}.init_idx"].numel()
        res = kmeans(torch.zeros(TOKENS[scale], 1), k, 1, generator=gen)
        assert torch.equal(res.init_indices, f[f"kmeans.{scale}.init_idx"]), scale


def test_init_indices_global_rng() -> None:
    f, _ = fixture("case_a")
    torch.manual_seed(0)
    res = kmeans(torch.randn(2304, 3, generator=torch.Generator().manual_seed(1)), 600, 1, mode="fast")
    assert torch.equal(res.init_indices, f["kmeans.672.init_idx"])


# ------------------------------------------------------------------------------ K-Means vs fixture


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale", [672, 1344])
def test_kmeans_matches_fixture(case: str, scale: int, mode: str) -> None:
    f, meta = fixture(case)
    res = fixture_kmeans(case, scale, mode)
    facts = meta["kmeans"][str(scale)]
    assert torch.equal(res.labels_iter1, f[f"kmeans.{scale}.labels_iter1"].long())
    torch.testing.assert_close(res.centers_iter1, f[f"kmeans.{scale}.centers_iter1"], atol=1e-6, rtol=0)
    assert torch.equal(res.labels, f[f"kmeans.{scale}.labels"].long())
    assert res.iterations == facts["iterations_run"]
    assert res.converged == facts["converged_early"]
    assert int(res.labels.unique().numel()) == facts["num_nonempty_clusters"]
    if mode == "fast":
        if res.exact_means:  # the centre update reproduced torch's mean(0) bitwise
            assert torch.equal(res.centers_iter1, f[f"kmeans.{scale}.centers_iter1"])
        assert res.distance_evaluations < res.iterations * TOKENS[scale] * res.num_clusters
    else:
        assert res.distance_evaluations == res.iterations * TOKENS[scale] * res.num_clusters


def test_fast_kmeans_float64_centre_fallback_matches_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the mean(0) emulation (other ISA / GPU), float64 centres still give the
    fixture labels at the small scales, whether the gathered rows fit one batch or many."""
    f, _ = fixture("case_a")
    feats = clustering_features(selection_embeds("case_a", 1344), 16)
    res = kmeans_fast(feats, f["kmeans.1344.init_idx"], 100, emulate_mean_order=False)
    assert not res.exact_means
    assert torch.equal(res.labels, f["kmeans.1344.labels"].long())
    monkeypatch.setattr(means, "CHUNK_BYTES", 2 * 66 * 8 * 50)  # batches of clusters starting in 50 rows
    small = kmeans_fast(feats, f["kmeans.1344.init_idx"], 100, emulate_mean_order=False)
    assert torch.equal(small.labels, res.labels) and torch.equal(small.centers, res.centers)


def test_bounded_engine_matches_exact() -> None:
    """The bound-based engine (used when the N×K cache is too big) gives the same labels."""
    f, _ = fixture("case_b")
    feats = clustering_features(selection_embeds("case_b", 1344), 16)
    res = kmeans_fast(feats, f["kmeans.1344.init_idx"], 20, cache_bytes=0)
    assert torch.equal(res.labels, f["kmeans.1344.labels"].long())
    assert res.distance_evaluations < res.iterations * 9216 * 200


def _blobs(n: int, k: int, dim: int, seed: int, spread: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=gen) * 4
    comp = torch.randint(0, k, (n,), generator=gen)
    return centres[comp] + spread * torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_equals_exact_on_random_clusters(seed: int) -> None:
    x = _blobs(3000, 40, 12, seed, 1.0)
    fast = kmeans(x, 40, 50, generator=torch.Generator().manual_seed(seed))
    exact = kmeans(x, 40, 50, generator=torch.Generator().manual_seed(seed), mode="exact")
    assert torch.equal(fast.labels, exact.labels)
    assert fast.iterations == exact.iterations and fast.converged == exact.converged
    if fast.exact_means:  # torch's mean(0) order reproduced on this machine
        assert torch.equal(fast.centers, exact.centers)
    else:
        torch.testing.assert_close(fast.centers, exact.centers)


@pytest.mark.parametrize("case", CASES)
def test_device_kmeans_loop_matches_fixture(case: str) -> None:
    """The accelerator (CUDA) fast path, run here on the CPU: fixed-shape iterations, float64
    centres, convergence read every few iterations; same labels and stop as the reference."""
    f, meta = fixture(case)
    c = meta["case"]
    for scale in (672, 1344):
        feats = clustering_features(selection_embeds(case, scale), TOKENS[scale] // 576)
        res = kmeans_device(feats, f[f"kmeans.{scale}.init_idx"], c["kmeans_max_iters"], check_every=8)
        assert torch.equal(res.labels_iter1, f[f"kmeans.{scale}.labels_iter1"].long())
        torch.testing.assert_close(res.centers_iter1, f[f"kmeans.{scale}.centers_iter1"], atol=1e-6, rtol=0)
        assert torch.equal(res.labels, f[f"kmeans.{scale}.labels"].long()), scale
        assert res.iterations == meta["kmeans"][str(scale)]["iterations_run"]
        assert res.converged == meta["kmeans"][str(scale)]["converged_early"]


@pytest.mark.parametrize("check_every", [1, 3, 8, 100])
def test_device_kmeans_loop_stops_like_the_reference(check_every: int) -> None:
    """Frozen-after-convergence blocks: the result does not depend on how often the host looks."""
    x = _blobs(3000, 40, 12, 0, 1.0)
    init = torch.randperm(3000, generator=torch.Generator().manual_seed(1))[:40]
    for iters in (1, 4, 50):
        exact = kmeans_exact(x, init, iters)
        dev = kmeans_device(x, init, iters, check_every=check_every)
        assert torch.equal(dev.labels, exact.labels) and torch.equal(dev.labels_iter1, exact.labels_iter1)
        assert (dev.iterations, dev.converged) == (exact.iterations, exact.converged)
        torch.testing.assert_close(dev.centers, exact.centers, atol=1e-6, rtol=1e-6)  # float64 means: <= 1 ulp


def test_fast_kmeans_does_less_distance_work() -> None:
    x = _blobs(6000, 100, 16, 3, 1.5)
    res = kmeans(x, 100, 100, generator=torch.Generator().manual_seed(0))
    assert res.converged and res.iterations > 5
    full = res.iterations * 6000 * 100
    assert res.distance_evaluations < 0.6 * full  # 39 % here
    exact = kmeans(x, 100, 100, generator=torch.Generator().manual_seed(0), mode="exact")
    assert exact.distance_evaluations == full and torch.equal(exact.labels, res.labels)


def test_kmeans_edge_cases() -> None:
    x = torch.randn(30, 4)
    res = kmeans(x, 100, 5)  # K is capped at N: every point its own cluster
    assert res.num_clusters == 30 and res.labels.unique().numel() == 30
    res = kmeans(x, 0, 0)  # K >= 1, at least one iteration
    assert res.num_clusters == 1 and res.iterations == 1 and torch.all(res.labels == 0)
    tiny = kmeans(torch.randn(10, 2), 3, 5, generator=torch.Generator().manual_seed(0))
    ref = kmeans(torch.randn(10, 2), 3, 5, generator=torch.Generator().manual_seed(0), mode="exact")
    assert tiny.labels.shape == ref.labels.shape
    with pytest.raises(ValueError):
        kmeans(x, 3, 5, mode="slow")
    with pytest.raises(ValueError):
        kmeans(x, 3, 5, init_indices=torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        kmeans(x.long(), 3, 5)
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 3, 5)


def test_mean_emulation_is_bitwise_torch_mean() -> None:
    lanes = mean_emulation_lanes(66, torch.float32, torch.device("cpu"))
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert lanes is not None  # the x86 builds the fixtures come from
    if lanes is None:  # elsewhere the fast mode must say that its centres are float64 means
        res = kmeans(torch.randn(500, 66), 10, 3, generator=torch.Generator().manual_seed(0))
        assert not res.exact_means
        return
    gen = torch.Generator().manual_seed(7)
    sizes = torch.tensor([1, 4, 16, 31, 256, 300, 4096, 5000])
    vals = torch.randn(int(sizes.sum()), 66, generator=gen)
    seg = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    rank = torch.arange(vals.shape[0]) - (torch.cumsum(sizes, 0) - sizes)[seg]
    got = torch_like_sums(vals, torch.arange(vals.shape[0]), seg, rank, sizes, lanes) / sizes.float()[:, None]
    want = torch.stack([p.mean(0) for p in vals.split(sizes.tolist())])
    assert torch.equal(got, want)


def test_distance_cache_is_bitwise_cdist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without point skipping every cached entry is bitwise `cdist` (with skipping, see
    `test_distance_cache_skips_points_with_safe_bounds`)."""
    monkeypatch.setattr(cached, "PRUNE_MAX_MOVED", 0.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 66, generator=gen)
    c = torch.randn(300, 66, generator=gen)
    cache = CachedDistances(x, 300)
    labels = cache.first(c)
    full = torch.cdist(x, c)
    assert torch.equal(cache.dist_t.T, full) and torch.equal(labels, full.argmin(1))
    # Move a few centres: the refreshed columns and labels equal a fresh cdist.
    c2 = c.clone()
    moved = torch.tensor([3, 17, 250])
    c2[moved] += 0.5
    labels2 = cache.step(c2, c, moved, labels)
    full2 = torch.cdist(x, c2)
    assert torch.equal(cache.dist_t.T, full2) and torch.equal(labels2, full2.argmin(1))
    # Many moved columns take the transposed GEMM; still bitwise.
    c3 = c2.clone()
    moved = torch.arange(0, 300, 3)
    c3[moved] -= 0.3
    labels3 = cache.step(c3, c2, moved, labels2)
    full3 = torch.cdist(x, c3)
    assert torch.equal(cache.dist_t.T, full3) and torch.equal(labels3, full3.argmin(1))


def _check_cache_invariant(cache: CachedDistances, labels: torch.Tensor, full: torch.Tensor) -> None:
    """Labels are `cdist`'s first-index argmin; own entries are exact; every cached entry is the
    `cdist` value or a lower bound of it (the `cdist` value in rows not flagged `inexact`);
    `second` is <= every non-own value."""
    rows = torch.arange(full.shape[0])
    assert torch.equal(labels, full.argmin(1))
    assert torch.equal(cache.own, full[rows, labels])
    assert torch.equal(cache.dist_t.T[rows, labels], cache.own)
    assert bool((cache.dist_t.T <= full).all())
    # Rows not flagged `inexact` are rescanned from the cache: they must be bitwise `cdist`.
    assert torch.equal(cache.dist_t.T[~cache.inexact], full[~cache.inexact])
    assert bool((cache.second <= _second_smallest(full)).all())


def test_distance_cache_skips_points_with_safe_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Few moved centres: points that no moved centre can take over are skipped (their entries
    become float-error-safe lower bounds); adversarial exact ties and 1-ulp moves still give
    `cdist`'s first-index argmin."""
    monkeypatch.setattr(cached, "PRUNE_MAX_MOVED", 1.0)
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(200, 66, generator=gen)
    # 300 points on the bisector of centres 20 and 10 (ties up to rounding), then 4000 others.
    axis = torch.nn.functional.normalize(c[20] - c[10], dim=0)
    side = 0.3 * torch.randn(300, 66, generator=gen)
    side -= (side @ axis)[:, None] * axis
    x = torch.cat([(c[10] + c[20]) / 2 + side, torch.randn(4000, 66, generator=gen)])
    cache = CachedDistances(x, 200)
    labels = cache.first(c)
    _check_cache_invariant(cache, labels, torch.cdist(x, c))
    # Centre 20 moves 2e-6 towards them: a few-ulp change that flips some of the near-ties.
    c1 = c.clone()
    c1[20] -= 2e-6 * axis
    tied_before = labels[:300].clone()
    labels = cache.step(c1, c, torch.tensor([20]), labels)
    _check_cache_invariant(cache, labels, torch.cdist(x, c1))
    assert bool((labels[:300] != tied_before).any())
    c = c1
    # Small moves of a few centres: most points are skipped.
    c2 = c.clone()
    moved = torch.tensor([3, 50, 120])
    c2[moved] += 0.01 * torch.randn(3, 66, generator=gen)
    before = cache.evaluations
    labels = cache.step(c2, c, moved, labels)
    _check_cache_invariant(cache, labels, torch.cdist(x, c2))
    assert cache.evaluations - before < 0.5 * 4300 * 16
    # Centre 0 jumps exactly onto the largest cluster's centre: exact ties there, won by 0.
    big = int(torch.bincount(labels, minlength=200)[1:].argmax()) + 1
    c3 = c2.clone()
    c3[0] = c2[big]
    labels = cache.step(c3, c2, torch.tensor([0]), labels)
    _check_cache_invariant(cache, labels, torch.cdist(x, c3))
    assert bool((labels == 0).any()) and not bool((labels == big).any())
    # 1-ulp moves of every centre a point is nearly tied with, repeatedly (bounds age).
    prev = c3
    for step in range(4):
        nxt = prev.clone()
        moved = torch.arange(step, 200, 9)
        nxt[moved] = torch.nextafter(nxt[moved], torch.full_like(nxt[moved], math.inf))
        labels = cache.step(nxt, prev, moved, labels)
        _check_cache_invariant(cache, labels, torch.cdist(x, nxt))
        prev = nxt


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_kmeans_with_point_skipping_everywhere_equals_exact(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Point skipping in every column refresh (not only when few centres moved): same labels,
    iterations and centres as the reference loop, on blobs and on the fixture's features."""
    monkeypatch.setattr(cached, "PRUNE_MAX_MOVED", 1.0)
    x = _blobs(3000, 60, 12, seed, 1.5)
    init = torch.randperm(3000, generator=torch.Generator().manual_seed(seed))[:60]
    fast, exact = kmeans_fast(x, init, 60), kmeans_exact(x, init, 60)
    assert torch.equal(fast.labels, exact.labels) and torch.equal(fast.labels_iter1, exact.labels_iter1)
    assert (fast.iterations, fast.converged) == (exact.iterations, exact.converged)
    assert fast.distance_evaluations < exact.distance_evaluations
    if fast.exact_means:
        assert torch.equal(fast.centers, exact.centers)
    f, meta = fixture("case_a")
    feats = clustering_features(selection_embeds("case_a", 1344), 16)
    res = kmeans_fast(feats, f["kmeans.1344.init_idx"], 100)
    assert torch.equal(res.labels, f["kmeans.1344.labels"].long())
    assert res.iterations == meta["kmeans"]["1344"]["iterations_run"]


def _second_smallest(d: torch.Tensor) -> torch.Tensor:
    """`[N]` smallest entry of each row of `d` `[N, K]` other than its first-index argmin."""
    d = d.clone()
    d.scatter_(1, d.argmin(1, keepdim=True), float("inf"))
    return d.amin(1)


def test_distance_cache_full_refresh_by_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Full refreshes by L2-sized row blocks (the first one too, when the N×K matrix is large),
    including a short last block padded with earlier rows: bitwise cdist, its first-index
    argmin and the exact second-smallest distance of every point."""
    monkeypatch.setattr(cached, "CHUNK_BYTES", 1024)  # the first refresh takes the blocked path
    monkeypatch.setattr(cached, "FULL_CHUNK_BYTES", 300 * 100 * 4)  # 100-row blocks
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1030, 130, generator=gen)  # 10 blocks and a 30-row last one
    c = torch.randn(300, 130, generator=gen)
    c[7] = c[3]  # exactly tied columns: the first index wins
    cache = CachedDistances(x, 300)
    labels = cache.first(c)
    full = torch.cdist(x, c)
    assert torch.equal(cache.dist_t.T, full) and torch.equal(labels, full.argmin(1))
    assert not bool((labels == 7).any()) and torch.equal(cache.second, _second_smallest(full))
    # >= 90 % of the centres moved: a full refresh that starts from the previous labels.
    c2 = c + 0.05 * torch.randn(300, 130, generator=gen)
    c2[-10:] = c[-10:]
    labels2 = cache.step(c2, c, torch.arange(290), labels)
    full2 = torch.cdist(x, c2)
    assert torch.equal(cache.dist_t.T, full2) and torch.equal(labels2, full2.argmin(1))
    assert torch.equal(cache.second, _second_smallest(full2))


def test_mean_order_self_check_runs_once_per_key() -> None:
    """The lane count is a cached pure function of (width, dtype, threads, ISA): no module-level
    dict; concurrent first calls from several threads all get the same answer."""
    from concurrent.futures import ThreadPoolExecutor

    width = 37  # a width no other test uses
    with ThreadPoolExecutor(4) as pool:
        got = set(pool.map(lambda _: mean_emulation_lanes(width, torch.float32, torch.device("cpu")), range(8)))
    assert len(got) == 1
    hits = means._lanes_on_cpu.cache_info().hits
    assert mean_emulation_lanes(width, torch.float32, torch.device("cpu")) in got
    assert means._lanes_on_cpu.cache_info().hits == hits + 1
    assert mean_emulation_lanes(width, torch.bfloat16, torch.device("cpu")) is None  # float32/64 only


# ------------------------------------------------------------------------------ selection vs fixture


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale", SCALES)
def test_step5_selection_matches_fixture(case: str, scale: int, exact: bool) -> None:
    """README step-5 check: fixture attention + fixture labels -> fixture selection."""
    f, _ = fixture(case)
    scores = f[f"attn.by_scale.{scale}"].reshape(-1)
    labels = f[f"kmeans.{scale}.labels"].long()
    embeds = torch.randn(scores.numel(), 8, generator=torch.Generator().manual_seed(scale))
    sel = preserve_and_merge(embeds, scores, labels, budget_of(case, scale), exact=exact)
    assert torch.equal(sel.merged.long(), f[f"select.{scale}.aggregated"])
    assert torch.equal(sel.group, f[f"select.{scale}.cluster"])
    assert torch.equal(sel.offsets, f[f"select.{scale}.pos_offsets"])
    torch.testing.assert_close(sel.scores, f[f"select.{scale}.score"], rtol=1e-5, atol=0)
    ties = tied_rows(case, scale)
    pos = f[f"select.{scale}.pos_flat"]
    single = sel.offsets[1:] - sel.offsets[:-1] == 1
    rows = [i for i in range(len(sel)) if i not in ties]
    for i in rows:
        a, b = sel.offsets[i], sel.offsets[i + 1]
        assert torch.equal(sel.positions[a:b], pos[a:b]), i
    if ties:
        assert all(bool(single[i]) for i in ties)
        mine = sorted(int(sel.positions[sel.offsets[i]]) for i in ties)
        ref = sorted(int(pos[f[f"select.{scale}.pos_offsets"][i]]) for i in ties)
        assert mine == ref
        if exact:  # the reference's own (unstable) argsort gives the same order
            assert torch.equal(sel.positions, pos)


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale", [672, 1344])
def test_merged_rows_match_fixture(case: str, scale: int, exact: bool) -> None:
    f, _ = fixture(case)
    offset = sum(budget_of(case, s) for s in SCALES[: SCALES.index(scale)])
    k = budget_of(case, scale)
    ref = f["merged.pre_mlp"][offset : offset + k]
    sel = preserve_and_merge(
        selection_embeds(case, scale),
        f[f"attn.by_scale.{scale}"].reshape(-1),
        f[f"kmeans.{scale}.labels"].long(),
        k,
        exact=exact,
    )
    if exact:
        assert torch.equal(sel.embeds, ref)
    else:
        torch.testing.assert_close(sel.embeds, ref, atol=1e-5, rtol=0)
        single = ~sel.merged
        assert torch.equal(sel.embeds[single], ref[single])  # single rows are plain copies


@pytest.mark.parametrize("case", CASES)
def test_select_kmeans_end_to_end_small_scales(case: str) -> None:
    """select_kmeans with the fixture's seed stream reproduces selection and merged rows."""
    f, meta = fixture(case)
    c = meta["case"]
    gen = torch.Generator().manual_seed(0)
    offset = 0
    for scale in (672, 1344):
        k = budget_of(case, scale)
        sel, res = select_kmeans(
            selection_embeds(case, scale),
            f[f"attn.by_scale.{scale}"].reshape(-1),
            k,
            num_tiles=TOKENS[scale] // 576,
            num_clusters=c["kmeans_num_clusters"],
            max_iters=c["kmeans_max_iters"],
            generator=gen,
        )
        assert torch.equal(res.init_indices, f[f"kmeans.{scale}.init_idx"])
        assert torch.equal(sel.positions, f[f"select.{scale}.pos_flat"])
        torch.testing.assert_close(sel.embeds, f["merged.pre_mlp"][offset : offset + k], atol=1e-5, rtol=0)
        offset += k


# ------------------------------------------------------------------------------ selection semantics


def test_fast_equals_exact_with_ties_and_mean_rounding() -> None:
    gen = torch.Generator().manual_seed(11)
    # A value v whose float32 mean over 3 copies is not v: the strict `>` test then flips.
    v = next(x for x in torch.rand(1000, generator=gen) if torch.stack([x, x, x]).mean() != x)
    n = 400
    scores = (torch.randint(0, 6, (n,), generator=gen).float() * 1e-3).contiguous()
    groups = torch.randint(0, 40, (n,), generator=gen)
    scores[:3], groups[:3] = v, 99  # a group of three equal scores
    scores[3:5] = torch.tensor([0.25, 0.25])
    groups[3:5] = 98  # equal-score pair: mean is exact, both low
    embeds = torch.randn(n, 5, generator=gen)
    for budget in (0, 1, 7, 50, 200, 1000):
        fast = preserve_and_merge(embeds, scores, groups, budget)
        exact = preserve_and_merge(embeds, scores, groups, budget, exact=True)
        assert_same_selection(fast, exact, embeds_atol=1e-6)
    # The three-equal group: the reference's float32 mean decides high/low.
    mean = float(torch.stack([v, v, v]).mean())
    sel = preserve_and_merge(embeds, scores, groups, 1000)
    rows = [i for i in range(len(sel)) if int(sel.positions[sel.offsets[i]]) in (0, 1, 2)]
    assert len(rows) == (3 if float(v) > mean else 1)


def test_group_order_ties_keep_ascending_id() -> None:
    scores = torch.tensor([0.5, 0.5, 0.9, 0.1])
    groups = torch.tensor([7, 3, 5, 5])
    embeds = torch.eye(4)
    for exact in (False, True):
        sel = preserve_and_merge(embeds, scores, groups, 10, exact=exact)
        # group 5 (mean 0.5, id 5) ties group 3 and 7; order by id: 3, 5, 7
        assert sel.group.tolist() == [3, -1, 5, 7]
        assert sel.positions.tolist() == [1, 2, 3, 0]
        assert sel.merged.tolist() == [True, False, True, True]


def test_budget_edge_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    embeds, scores = torch.randn(50, 4, generator=gen), torch.rand(50, generator=gen)
    groups = torch.randint(0, 5, (50,), generator=gen)
    assert len(preserve_and_merge(embeds, scores, groups, 0)) == 0
    assert preserve_and_merge(embeds, scores, groups, 0).embeds.shape == (0, 4)
    cap = max_selectable(scores, groups)
    for exact in (False, True):
        sel = preserve_and_merge(embeds, scores, groups, 10_000, exact=exact)
        assert len(sel) == cap < 50
        assert sorted(sel.positions.tolist()) == list(range(50))  # every token, once
    for bad in (-1, 2.0, True, "3", None):
        with pytest.raises(BudgetError):
            preserve_and_merge(embeds, scores, groups, bad)  # type: ignore[arg-type]
        with pytest.raises(BudgetError):
            select_topk(embeds, scores, bad)  # type: ignore[arg-type]
    assert len(select_topk(embeds, scores, torch.tensor(3))) == 3  # integer scalars are fine
    with pytest.raises(ValueError):
        preserve_and_merge(embeds, scores[:10], groups, 3)
    with pytest.raises(ValueError):
        preserve_and_merge(embeds, scores, -groups - 1, 3)


def test_select_topk() -> None:
    scores = torch.tensor([0.1, 0.7, 0.3, 0.7, 0.5])
    embeds = torch.arange(10.0).reshape(5, 2).to(torch.bfloat16)
    sel = select_topk(embeds, scores, 3)
    assert sel.positions.tolist() == [1, 3, 4]  # ties by position
    assert sel.offsets.tolist() == [0, 1, 2, 3]
    assert not sel.merged.any() and sel.group.tolist() == [-1, -1, -1]
    assert sel.embeds.dtype == torch.bfloat16 and torch.equal(sel.embeds, embeds[[1, 3, 4]])
    assert sel.scores.dtype == torch.float64
    assert len(select_topk(embeds, scores, 99)) == 5
    assert len(select_topk(embeds, scores, 0)) == 0


def test_kmeans_with_k_at_least_n_is_topk() -> None:
    gen = torch.Generator().manual_seed(0)
    embeds, scores = torch.randn(576, 6, generator=gen), torch.rand(576, generator=gen)
    sel, res = select_kmeans(embeds, scores, 40, num_tiles=1, num_clusters=10_000, generator=gen)
    assert res.num_clusters == 576
    top = select_topk(embeds, scores, 40)
    assert torch.equal(sel.positions, top.positions)
    assert torch.equal(sel.embeds, top.embeds)
    assert sel.merged.all()  # one-member clusters come out as (one-token) merged rows
    assert torch.equal(sel.group, res.labels[sel.positions])


def test_select_kmeans_determinism_and_dtype() -> None:
    gen = torch.Generator().manual_seed(5)
    embeds = torch.randn(4 * 576, 16, generator=gen).to(torch.bfloat16)
    scores = torch.rand(4 * 576, generator=gen)
    runs = [
        select_kmeans(embeds, scores, 30, num_tiles=4, num_clusters=None, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    (a, ra), (b, rb) = runs
    assert ra.num_clusters == 30  # K defaults to the budget
    assert torch.equal(ra.labels, rb.labels) and torch.equal(a.positions, b.positions)
    assert torch.equal(a.embeds, b.embeds) and a.embeds.dtype == torch.bfloat16
    assert len(a) == 30
    # merged rows are float32-or-better means of their members, in the input dtype
    c, rc = select_kmeans(embeds, scores, 60, num_tiles=4, num_clusters=200, generator=torch.Generator().manual_seed(3))
    assert rc.num_clusters == 200 and bool(c.merged.any())
    for i in c.merged.nonzero().squeeze(1).tolist():
        members = c.positions[c.offsets[i] : c.offsets[i + 1]]
        want = embeds[members].double().mean(0)
        torch.testing.assert_close(c.embeds[i].double(), want, rtol=2**-8, atol=0)
    exact_sel, exact_res = select_kmeans(
        embeds, scores, 60, num_tiles=4, num_clusters=200, generator=torch.Generator().manual_seed(3), mode="exact"
    )
    assert torch.equal(exact_res.labels, rc.labels)
    assert_same_selection(exact_sel, c, embeds_atol=None)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_selection_ignores_autocast(mode: str) -> None:
    """Under bf16 autocast (mixed-precision training) K-Means, merging and the relevance
    arithmetic give bitwise the results of a run without autocast (they used to run their
    GEMMs in bf16 and crash on mixed dtypes)."""
    from uhrbat.compression.relevance import last_query_attention, upsample_relevance

    gen = torch.Generator().manual_seed(11)
    embeds = torch.randn(4 * 576, 16, generator=gen)
    scores = torch.rand(4 * 576, generator=gen)
    q, keys = torch.randn(4, 8, generator=gen), torch.randn(2, 50, 8, generator=gen)

    def run():
        sel, res = select_kmeans(
            embeds,
            scores,
            60,
            num_tiles=4,
            num_clusters=300,
            max_iters=20,
            generator=torch.Generator().manual_seed(3),
            mode=mode,
        )
        attn = last_query_attention(q, keys, 8)
        up = upsample_relevance(scores, 2, [2, 4])
        return sel, res, attn, up

    sel, res, attn, up = run()
    assert res.iterations > 2  # the cached/partial update path ran
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sel_ac, res_ac, attn_ac, up_ac = run()
    assert torch.equal(res_ac.labels, res.labels) and torch.equal(res_ac.centers, res.centers)
    assert_same_selection(sel_ac, sel)
    assert sel_ac.embeds.dtype == torch.float32
    assert torch.equal(attn_ac, attn) and attn_ac.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(up_ac, up))


def test_singleton_semantics() -> None:
    scores = torch.tensor([0.9, 0.2, 0.4, 0.1])
    groups = torch.tensor([0, 1, 1, 2])
    embeds = torch.randn(4, 3)
    for exact in (False, True):
        merged = preserve_and_merge(embeds, scores, groups, 10, exact=exact)
        single = preserve_and_merge(embeds, scores, groups, 10, exact=exact, singleton_is_merged=False)
        assert merged.merged.tolist() == [True, False, True, True]
        assert merged.group.tolist() == [0, -1, 1, 2]
        assert single.merged.tolist() == [False, False, True, False]
        assert single.group.tolist() == [-1, -1, 1, -1]
        assert torch.equal(single.embeds[0], embeds[0])


# ------------------------------------------------------------------------------ segments


def test_select_segments() -> None:
    n = 2 * 576
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(n, 4, generator=gen)
    scores = torch.full((n,), 0.001)
    seg = torch.zeros(n, dtype=torch.int64)
    seg[10:20] = 4  # one segment spanning two tiles
    seg[576 + 5 : 576 + 9] = 4
    seg[100] = 2  # a one-token segment
    scores[10:20] = 0.5
    scores[576 + 5 : 576 + 9] = 0.2
    scores[100] = 0.3
    scores[200] = 0.3  # background token tying segment 2: background first
    scores[300] = 0.9
    sel = select_segments(embeds, scores, 8, seg)
    assert sel.positions[sel.offsets[0]].item() == 300 and not sel.merged[0]
    rows = row_signature(sel)
    # background 300 (0.9), segment 4 (mean 0.414: 10 high tokens, then the 4 low ones merged)
    assert rows[0] == (False, -1, pytest.approx(0.9), (300,))
    assert [r[3] for r in rows[1:8]] == [(i,) for i in range(10, 17)]
    seg_rows = select_segments(embeds, scores, 100, seg)
    sig = row_signature(seg_rows)
    merged4 = [r for r in sig if r[1] == 4]
    assert merged4 == [(True, 4, pytest.approx(0.2), (581, 582, 583, 584))]
    i200 = next(i for i, r in enumerate(sig) if r[3] == (200,))
    i100 = next(i for i, r in enumerate(sig) if r[3] == (100,))
    assert i200 < i100 and sig[i100][:2] == (True, 2) and sig[i200][:2] == (False, -1)


def test_segment_ids_formats() -> None:
    gen = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 5, (4, 24, 24), generator=gen)
    flat = tiles.reshape(-1)
    assert torch.equal(segment_ids_for_scale(tiles, 672), flat)
    assert torch.equal(segment_ids_for_scale(tiles.reshape(4, 576).int(), 672), flat)
    assert torch.equal(segment_ids_for_scale(flat.numpy(), 672), flat)
    extra = torch.cat([tiles, torch.zeros(2, 24, 24, dtype=torch.int64)])
    assert torch.equal(segment_ids_for_scale(extra, 672), flat)  # trimmed to g²
    # Reference dict, tiles listed out of order with their (row, col)
    order = [3, 0, 2, 1]
    coords = [(i // 2, i % 2) for i in order]
    d = {"tile_masks": [tiles[i].int() for i in order], "tile_coords": coords}
    assert torch.equal(segment_ids_for_scale(d, 672), flat)
    assert torch.equal(segment_ids_for_scale({"masks": tiles.float()}, 672), flat)
    # Full-grid format: the 48×48 token grid of the 672 image, cut into row-major tiles.
    grid = tiles.reshape(2, 2, 24, 24).permute(0, 2, 1, 3).reshape(48, 48)
    assert torch.equal(segment_ids_for_scale(grid, 672), flat)
    assert segment_ids_for_scale(torch.zeros(96, 96, dtype=torch.int32), 1344).shape == (16 * 576,)


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.zeros(3, 24, 24, dtype=torch.int64), r"scale 672: mask of shape \[3, 24, 24\] has 3 tiles, expected 4"),
        (torch.zeros(50, 50, dtype=torch.int64), r"scale 672.*\[50, 50\]"),
        (torch.full((4, 24, 24), -1), "scale 672: segment ids must be >= 0"),
        (torch.full((4, 24, 24), 0.5), "scale 672: segment ids must be integers"),
        ({"segments": torch.zeros(4, 24, 24)}, "scale 672: mask dict"),
        ({"tile_masks": torch.zeros(4, 24, 24), "tile_coords": [(0, 0)] * 4}, "cover"),
        ({"tile_masks": torch.zeros(4, 24, 20)}, r"\(4, 24, 20\)"),
    ],
)
def test_segment_ids_errors(mask: object, match: str) -> None:
    with pytest.raises(MaskError, match=match):
        segment_ids_for_scale(mask, 672)


def test_load_mask_file(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 5, (4, 24, 24), generator=gen, dtype=torch.int32)
    full_1344 = torch.randint(0, 3, (96, 96), generator=gen, dtype=torch.int32)
    # Reference tile format (build_multiscale_tile_masks.py)
    pt = tmp_path / "a.pt"
    torch.save({"scales": {672: {"tile_masks": list(tiles), "tile_coords": [(0, 0), (0, 1), (1, 0), (1, 1)]}}}, pt)
    got = load_mask_file(pt)
    assert list(got) == [672] and torch.equal(got[672], tiles.reshape(-1).long())
    # Reference full-grid format (build_multiscale_token_masks.py)
    pt2 = tmp_path / "b.pt"
    torch.save({"scales": {1344: full_1344}}, pt2)
    got = load_mask_file(pt2)
    assert torch.equal(got[1344], segment_ids_for_scale(full_1344, 1344))
    # This package's safetensors
    st = tmp_path / "c.safetensors"
    save_file({"scale.672": tiles.contiguous(), "scale.1344": full_1344.contiguous()}, str(st))
    got = load_mask_file(st)
    assert sorted(got) == [672, 1344] and torch.equal(got[672], tiles.reshape(-1).long())
    # Errors
    with pytest.raises(MaskError, match="not found"):
        load_mask_file(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(MaskError, match="cannot read"):
        load_mask_file(bad)
    cache = tmp_path / "sam.pt"
    torch.save({"annotations": [{"area": 3}]}, cache)
    with pytest.raises(MaskError, match="pixel-level SAM cache"):
        load_mask_file(cache)
    wrong = tmp_path / "wrong.pt"
    torch.save({"scales": {672: torch.zeros(5, 5, dtype=torch.int64)}}, wrong)
    with pytest.raises(MaskError, match="scale 672"):
        load_mask_file(wrong)
    empty = tmp_path / "e.safetensors"
    save_file({"other": torch.zeros(2)}, str(empty))
    with pytest.raises(MaskError, match="scale"):
        load_mask_file(empty)
