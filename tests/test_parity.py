"""Parity with the reference implementation on the fixtures in ../shared/parity (the contract),
on whatever x86-64 CPU the suite runs.

Bitwise parity is a property of identical kernels, not of the code: on another CPU (e.g. AMD
EPYC, where MKL picks other GEMM kernels) the CLIP features differ from the fixture in the last
bits, and 50-100 chaotic Lloyd iterations amplify that into a few different K-Means labels at
4032. So the suite first detects the **regime** (`probe_regime`: does this CPU reproduce the
fixture's CLIP features and projected features at 672 bitwise, the tensors the fixture holds in
full?) and says which one ran in the terminal summary ("parity regime"):

* ``same-kernels``: every upstream tensor is bitwise the fixture's, and every bitwise assertion
  runs (init indices, labels, selection, ids; float tensors bitwise where they are today).
* ``other-kernels``: each stage is checked at the README tolerances; K-Means and selection are
  checked bitwise wherever the *inputs* of that stage are bitwise equal - the ``test_stage_*``
  tests inject the fixture's own inputs into each stage (K-Means on the fixture's features,
  selection on the fixture's relevance and labels, the token MLP on the fixture's merged rows,
  generation on the fixture's LLM input), and end to end a scale is compared exactly when its
  inputs are equal; else its labels must agree with the fixture's at a high rate and its
  selection must be the reference loop's on that run's own labels and relevance. Generated ids
  stay identical.

Both regimes run on every machine: the ``perturbed`` upstream moves the projected (and CLIP)
features of every tile by one ulp in ~88 % of the elements, as other kernels do, which forces
the other-kernels regime (and the probe must detect it). Fast and exact K-Means are compared on
the same machine and the same inputs in both.
"""

from __future__ import annotations

import json
import math
from functools import cache

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARITY, PARITY_REPORT
from uhrbat.compression.selection import preserve_and_merge

CASES = ["case_a", "case_b"]
SCALES = [672, 1344, 2688, 4032]
SAME, OTHER = "same-kernels", "other-kernels"
# End-to-end runs: every case and K-Means mode on this CPU's own upstream tensors, plus the forced
# other-kernels regime on case_a (K-Means 100 iterations: the chaotic one) and case_b (both modes,
# for fast == exact on perturbed inputs). case_a exact on perturbed inputs would add ~100 s.
RUNS = [(c, "native", m) for c in CASES for m in ("exact", "fast")] + [
    ("case_a", "perturbed", "fast"),
    ("case_b", "perturbed", "exact"),
    ("case_b", "perturbed", "fast"),
]
# Where upstream tensors differ: lower bounds on agreement with the fixture (README "Determinism":
# 96.7 % of the 4032 labels after eager-vs-sdpa CLIP; the issue reports 98.5 % on AMD EPYC).
MIN_LABELS_ITER1_AGREEMENT = 0.995  # one assignment from the same initial centres
MIN_LABELS_AGREEMENT = 0.95  # after up to 100 Lloyd iterations


@cache
def fixture(case: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(PARITY / case / "fixture.safetensors")), json.loads((PARITY / case / "meta.json").read_text())


def _nudge_last_bit(x: torch.Tensor, salt: int) -> torch.Tensor:
    """Move ~88 % of the float32 elements one ulp up or down, as other GEMM kernels do to the
    CLIP features (the issue: 12 % of the elements equal, differences of about 1e-6). Which
    elements move, and where, is a hash of each value's bits: equal values (e.g. the tokens of
    identical padding tiles) stay equal, as they do under any deterministic kernel."""
    bits = x.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    h = ((bits ^ salt) * 0x9E3779B1) & 0xFFFFFFFF
    pick = (h >> 8) % 100 < 88
    up = ((h >> 4) & 1) == 1
    target = torch.where(up, torch.full_like(x, math.inf), torch.full_like(x, -math.inf))
    return torch.where(pick, torch.nextafter(x, target), x)


@cache
def pipeline(upstream: str = "native"):
    from uhrbat.pipeline import UhrBatPipeline

    pipe = UhrBatPipeline.from_pretrained(PARITY / "uhrbat_tiny", compat="reference", attn_implementation="eager")
    if upstream == "perturbed":
        encode = pipe.model.encode_tiles

        def encode_tiles(tiles: torch.Tensor, *args, **kwargs):
            feats, clip = encode(tiles, *args, **kwargs)
            return _nudge_last_bit(feats, 1), (None if clip is None else _nudge_last_bit(clip, 2))

        pipe.model.encode_tiles = encode_tiles  # instance attribute: this pipeline only
    return pipe


@cache
def probe_regime(upstream: str) -> str:
    """Does this CPU reproduce the fixture's upstream tensors bitwise? Encodes the 4 tiles of
    case_a at 672 and compares the CLIP features and projected features (+ residual), which
    the fixture holds in full."""
    from uhrbat.io import open_image

    fx, _ = fixture("case_a")
    pipe = pipeline(upstream)
    proc, model = pipe.processor.image_processor, pipe.model
    tiles = torch.from_numpy(proc.tiles_for_square(open_image(PARITY / "images" / "image_a.png").square(672)))
    with torch.no_grad():
        feats, clip = model.encode_tiles(tiles, keep_clip=True)
        vision = feats + model.scale_residuals(672).to(feats.dtype)
    same = torch.equal(clip.float().cpu(), fx["clip_feats.672"]) and torch.equal(
        vision.float().cpu(), fx["vision_feats.672"]
    )
    regime = SAME if same else OTHER
    equal = float((clip.float().cpu() == fx["clip_feats.672"]).float().mean())
    how = "forced: upstream tensors perturbed in the last bit" if upstream == "perturbed" else "detected on this CPU"
    PARITY_REPORT[f"{upstream} upstream"] = (
        f"{regime} ({how}; CLIP features at 672: {equal:.1%} of elements bitwise equal to the fixture)"
    )
    return regime


@cache
def traced(case: str, mode: str, upstream: str = "native") -> dict[str, torch.Tensor]:
    from uhrbat.tracing import trace_query

    _, meta = fixture(case)
    c = meta["case"]
    return trace_query(
        pipeline(upstream),
        str(PARITY / "images" / c["image"]),
        c["question"],
        max_new_tokens=c["max_new_tokens"],
        budgets=c["multiscale_topk"],
        kmeans_clusters=c["kmeans_num_clusters"],
        kmeans_iters=c["kmeans_max_iters"],
        seed=c["seed"],
        kmeans_mode=mode,
        selector="kmeans",
    )


def tied_rows(meta: dict, scale: int) -> set[int]:
    return {r for t in meta["ties"][str(scale)]["tied_individual_runs"] for r in t["select_rows"]}


def check(mine: torch.Tensor, ref: torch.Tensor, bitwise: bool, what: str, **tol) -> None:
    """Bitwise where `bitwise`, else at the README tolerance `tol`."""
    if bitwise:
        assert torch.equal(mine, ref), f"{what}: not bitwise equal"
    else:
        torch.testing.assert_close(mine, ref, **tol, msg=lambda m: f"{what}: {m}")


def assert_rows_equal(mine: torch.Tensor, ref: torch.Tensor, ties: set[int], **tol) -> None:
    """Row-wise comparison; exactly tied rows (unstable argsort order) are compared as a set."""
    assert mine.shape == ref.shape
    keep = torch.tensor([i not in ties for i in range(ref.shape[0])], dtype=torch.bool)
    torch.testing.assert_close(mine[keep], ref[keep], **tol)
    if ties:
        idx = sorted(ties)
        torch.testing.assert_close(
            torch.tensor(sorted(mine[idx].tolist())), torch.tensor(sorted(ref[idx].tolist())), **tol
        )


def csr_rows(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    o, f = offsets.tolist(), flat.tolist()
    return [sorted(f[o[i] : o[i + 1]]) for i in range(len(o) - 1)]


def selection_mismatch(
    mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], ties: set[int], exact_scores: bool
) -> str | None:
    """Why two selections of one scale differ, or None. `mine`/`ref`: aggregated, cluster,
    pos_flat, pos_offsets, score; rows in `ties` are compared as a set."""
    if not torch.equal(mine["aggregated"], ref["aggregated"]):
        return "aggregated differs"
    if not torch.equal(mine["cluster"], ref["cluster"]):
        return "cluster differs"
    a = csr_rows(mine["pos_flat"], mine["pos_offsets"])
    b = csr_rows(ref["pos_flat"], ref["pos_offsets"])
    if [r for i, r in enumerate(a) if i not in ties] != [r for i, r in enumerate(b) if i not in ties]:
        return "positions differ"
    if sorted(a[i] for i in ties) != sorted(b[i] for i in ties):
        return "tied rows differ"
    if exact_scores and not torch.equal(mine["score"], ref["score"]):
        return "scores not bitwise equal"
    if not torch.allclose(mine["score"], ref["score"], rtol=1e-5, atol=0):
        return "scores differ beyond rtol 1e-5"
    return None


def assert_selection_equal(
    mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], ties: set[int], exact_scores: bool
) -> None:
    why = selection_mismatch(mine, ref, ties, exact_scores)
    assert why is None, why


def kept_tokens(sel: dict[str, torch.Tensor]) -> set[int]:
    """Positions of the single (kept, not merged) rows."""
    return set(sel["pos_flat"][sel["pos_offsets"][:-1][sel["aggregated"] == 0]].tolist())


def score_ties(sel: dict[str, torch.Tensor]) -> set[int]:
    """Single rows whose score equals another single row's: their order follows an unstable
    argsort in exact mode and position order in fast mode, so they are compared as a set."""
    single = sel["aggregated"] == 0
    vals, counts = torch.unique(sel["score"][single], return_counts=True)
    return set((single & torch.isin(sel["score"], vals[counts > 1])).nonzero().flatten().tolist())


def sel_of(t: dict[str, torch.Tensor], s: int) -> dict[str, torch.Tensor]:
    return {k: t[f"select.{s}.{k}"] for k in ("aggregated", "cluster", "pos_flat", "pos_offsets", "score")}


def scale_rows(fx: dict[str, torch.Tensor]) -> dict[int, slice]:
    out, off = {}, 0
    for s in SCALES:
        n = len(fx[f"select.{s}.aggregated"])
        out[s] = slice(off, off + n)
        off += n
    return out


# ------------------------------------------------------------------------------------ regime


def test_regime_detection() -> None:
    """The probe reports this CPU's regime; perturbing upstream tensors by one ulp is detected."""
    native = probe_regime("native")
    assert native in (SAME, OTHER)
    assert probe_regime("perturbed") == OTHER


# ------------------------------------------------------------- stages on the fixture's inputs


@pytest.mark.parametrize("case", CASES)
def test_stage_relevance_on_fixture_inputs(case: str) -> None:
    """Scoring pass on the fixture's relevance-pass LLM input, then the upsampling to every scale
    on the fixture's base-scale relevance."""
    from uhrbat.compression.relevance import upsample_relevance

    fx, _ = fixture(case)
    same = probe_regime("native") == SAME
    model = pipeline().model
    emb, ids = fx["attn_pass.inputs_embeds"], fx["attn_pass.mm_input_ids"]
    img = (ids == -200).nonzero().squeeze(1)
    start, stop = int(img[0]), int(img[-1]) + 1
    rel = model.score_relevance(emb[:start], emb[start:stop], emb[stop:]).float()
    check(rel, fx["attn.base_scale_attention"], same, "attn.base_scale_attention", rtol=1e-5, atol=1e-9)
    cfg = model.config
    ups = upsample_relevance(fx["attn.base_scale_attention"], cfg.grid(cfg.base_scale), [cfg.grid(s) for s in SCALES])
    for s, up in zip(SCALES, ups):
        check(up, fx[f"attn.by_scale.{s}"], same, f"attn.by_scale.{s}", rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", CASES)
def test_stage_kmeans_on_fixture_features(case: str, mode: str) -> None:
    """K-Means on the fixture's own features (672 and 1344, held in full) and init indices:
    labels and iteration count bitwise on any CPU; centres bitwise where the kernels match."""
    from uhrbat.compression.kmeans import clustering_features, kmeans

    fx, meta = fixture(case)
    same = probe_regime("native") == SAME
    cfg = pipeline().model.config
    c = meta["case"]
    for s in (672, 1344):
        vf = fx[f"vision_feats.{s}"]
        emb = (vf + fx[f"scale_residual.{s}"]).reshape(-1, vf.shape[-1])  # the residual's second add
        feats = clustering_features(emb, vf.shape[0], cfg.kmeans_feat_scale, cfg.kmeans_coord_scale)
        init = fx[f"kmeans.{s}.init_idx"]
        km = kmeans(feats, init.numel(), c["kmeans_max_iters"], mode=mode, init_indices=init)
        assert torch.equal(km.labels_iter1.to(torch.int16), fx[f"kmeans.{s}.labels_iter1"]), s
        assert torch.equal(km.labels.to(torch.int16), fx[f"kmeans.{s}.labels"]), s
        assert km.iterations == meta["kmeans"][str(s)]["iterations_run"], s
        assert km.converged == meta["kmeans"][str(s)]["converged_early"], s
        check(km.centers_iter1, fx[f"kmeans.{s}.centers_iter1"], same, f"kmeans.{s}.centers_iter1", atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("case", CASES)
def test_stage_selection_on_fixture_relevance_and_labels(case: str, mode: str) -> None:
    """Preserve-and-merge on the fixture's relevance and labels at every scale: the selection is
    bitwise the fixture's on any CPU; merged rows (672/1344, whose features the fixture holds)
    are bitwise in exact mode where the kernels match (fast mode: float64 means, <= 1 ulp)."""
    fx, meta = fixture(case)
    same = probe_regime("native") == SAME
    rows = scale_rows(fx)
    for s, budget in zip(SCALES, meta["case"]["multiscale_topk"]):
        scores = fx[f"attn.by_scale.{s}"].reshape(-1)
        labels = fx[f"kmeans.{s}.labels"].long()
        held = f"vision_feats.{s}" in fx
        if held:
            vf = fx[f"vision_feats.{s}"]
            emb = (vf + fx[f"scale_residual.{s}"]).reshape(-1, vf.shape[-1])
        else:  # features not shipped at 2688/4032: which tokens are chosen does not depend on them
            emb = torch.zeros(scores.numel(), 64)
        sel = preserve_and_merge(emb, scores, labels, budget, exact=mode == "exact")
        mine = {
            "aggregated": sel.merged.long(),
            "cluster": sel.group,
            "pos_flat": sel.positions,
            "pos_offsets": sel.offsets,
            "score": sel.scores,
        }
        ties = tied_rows(meta, s)
        assert_selection_equal(mine, sel_of(fx, s), ties, exact_scores=same and mode == "exact")
        if held:
            ref = fx["merged.pre_mlp"][rows[s]]
            if same and mode == "exact":
                keep = [i for i in range(len(ref)) if i not in ties]
                assert torch.equal(sel.embeds[keep], ref[keep]), s
            assert_rows_equal(sel.embeds, ref, ties, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_stage_token_mlp_and_splice_on_fixture_rows(case: str) -> None:
    """Token MLP on the fixture's merged rows; the LLM input spliced from the fixture's rows."""
    fx, _ = fixture(case)
    same = probe_regime("native") == SAME
    model = pipeline().model
    with torch.no_grad():
        post = model.token_mlp(fx["merged.pre_mlp"])
        check(post, fx["merged.post_mlp"], same, "merged.post_mlp", atol=1e-5, rtol=1e-5)
        ids = fx["final.mm_input_ids"]
        vis = ids == -200
        text = model.get_input_embeddings()(ids.masked_fill(vis, 0))
    spliced = text.clone()
    spliced[vis] = fx["merged.post_mlp"]
    assert torch.equal(spliced, fx["final.inputs_embeds"])  # an embedding lookup is a copy


@pytest.mark.parametrize("case", CASES)
def test_stage_generation_on_fixture_embeds(case: str) -> None:
    """Greedy decoding (KV cache, eos masked at step 0 by min_new_tokens=1) from the fixture's
    LLM input: logits at the README tolerance, identical token ids."""
    fx, meta = fixture(case)
    model = pipeline().model
    lm = model.language_model
    n_vocab = fx["logits.last_prompt"].numel()
    eos = meta["gen_kwargs"]["eos_token_id"]
    steps, ids = [], []
    with torch.no_grad():
        out = lm(inputs_embeds=fx["final.inputs_embeds"][None], use_cache=True)
        for i in range(len(fx["gen.new_token_ids"])):
            logits = out.logits[0, -1, :n_vocab].float()
            steps.append(logits)
            processed = logits.clone()
            if i == 0:
                processed[eos] = -math.inf
            ids.append(int(processed.argmax()))
            out = lm(input_ids=torch.tensor([[ids[-1]]]), cache=out.cache, use_cache=True)
    torch.testing.assert_close(torch.stack(steps), fx["gen.step_logits_raw"], atol=1e-4, rtol=0)
    assert ids == fx["gen.new_token_ids"].tolist()


# ------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("upstream", ["native", "perturbed"])
@pytest.mark.parametrize("case", CASES)
def test_inputs_tiles_features_and_relevance(case: str, upstream: str) -> None:
    fx, _ = fixture(case)
    same = probe_regime(upstream) == SAME
    t = traced(case, "fast", upstream)
    assert torch.equal(t["input_ids"], fx["input_ids"])
    for s in SCALES:
        assert torch.equal(t[f"tiles.{s}.tile_sha256_prefix"], fx[f"tiles.{s}.tile_sha256_prefix"]), s
        check(t[f"scale_residual.{s}"], fx[f"scale_residual.{s}"], same, f"scale_residual.{s}", rtol=1e-5, atol=1e-5)
        for name in (f"clip_feats.{s}.token_norm", f"vision_feats.{s}.token_norm"):
            check(t[name], fx[name], same, name, rtol=1e-5, atol=1e-5)
        # A tile sums 576 x 64 features, each within the README's atol 1e-5 when not bitwise.
        check(
            t[f"vision_feats.{s}.tile_sum"],
            fx[f"vision_feats.{s}.tile_sum"],
            same,
            f"vision_feats.{s}.tile_sum",
            rtol=1e-5,
            atol=1e-5 * 576 * 64,
        )
        check(t[f"attn.by_scale.{s}"], fx[f"attn.by_scale.{s}"], same, f"attn.by_scale.{s}", rtol=1e-5, atol=1e-9)
    for name in ("clip_feats.672", "vision_feats.672"):
        check(t[name], fx[name], same, name, rtol=1e-5, atol=1e-5)
    check(
        t["attn.base_scale_attention"],
        fx["attn.base_scale_attention"],
        same,
        "attn.base_scale_attention",
        rtol=1e-5,
        atol=1e-9,
    )


def _features_equal(t: dict[str, torch.Tensor], fx: dict[str, torch.Tensor], s: int) -> bool:
    """K-Means inputs of scale `s` bitwise the fixture's (in full where it holds them, else by
    the per-token norm and per-tile sum fingerprints of the projected features)."""
    same = torch.equal(t[f"vision_feats.{s}.token_norm"], fx[f"vision_feats.{s}.token_norm"])
    same = same and torch.equal(t[f"vision_feats.{s}.tile_sum"], fx[f"vision_feats.{s}.tile_sum"])
    if s == 672:
        same = same and torch.equal(t["vision_feats.672"], fx["vision_feats.672"])
    return same and torch.equal(t[f"scale_residual.{s}"], fx[f"scale_residual.{s}"])


@pytest.mark.parametrize(("case", "upstream", "mode"), RUNS)
def test_end_to_end_matches_fixture(case: str, upstream: str, mode: str) -> None:
    """Every stage of a full query against the fixture. Same-kernels regime: everything that is
    bitwise today stays bitwise. Other-kernels: a scale's K-Means is bitwise when its features
    are, its selection when its labels and relevance are; otherwise label agreement and kept-token
    overlap are bounded below; merged rows and logits are compared where the selection matched,
    and the generated ids are identical."""
    fx, meta = fixture(case)
    regime = probe_regime(upstream)
    t = traced(case, mode, upstream)
    rows = scale_rows(fx)
    matched, kmeans_notes, select_notes = [], [], []
    for s, budget in zip(SCALES, meta["case"]["multiscale_topk"]):
        assert torch.equal(t[f"kmeans.{s}.init_idx"], fx[f"kmeans.{s}.init_idx"]), s  # the seeded RNG stream
        feats_equal = _features_equal(t, fx, s)
        if regime == SAME:
            assert feats_equal, f"{s}: same-kernels regime but the features differ from the fixture"
        lab1, ref1 = t[f"kmeans.{s}.labels_iter1"], fx[f"kmeans.{s}.labels_iter1"]
        lab, ref = t[f"kmeans.{s}.labels"], fx[f"kmeans.{s}.labels"]
        if feats_equal:
            assert torch.equal(lab1, ref1), s
            assert torch.equal(lab, ref), s
            torch.testing.assert_close(
                t[f"kmeans.{s}.centers_iter1"], fx[f"kmeans.{s}.centers_iter1"], atol=1e-6, rtol=0
            )
            kmeans_notes.append(f"{s} bitwise")
        else:
            agree1 = float((lab1 == ref1).double().mean())
            agree = float((lab == ref).double().mean())
            assert agree1 >= MIN_LABELS_ITER1_AGREEMENT, (s, "labels_iter1", agree1)
            assert agree >= MIN_LABELS_AGREEMENT, (s, "labels", agree)
            # Centres after the first update, wherever a cluster's members agree: means of
            # normalised features that are themselves within the README's atol 1e-5.
            moved = torch.zeros(fx[f"kmeans.{s}.centers_iter1"].shape[0], dtype=torch.bool)
            diff = lab1 != ref1
            moved[lab1[diff].long()] = True
            moved[ref1[diff].long()] = True
            torch.testing.assert_close(
                t[f"kmeans.{s}.centers_iter1"][~moved], fx[f"kmeans.{s}.centers_iter1"][~moved], atol=1e-5, rtol=0
            )
            n1, n = int(diff.sum()), int((lab != ref).sum())
            kmeans_notes.append(
                f"{s} labels equal (features not bitwise)"
                if n1 == n == 0
                else f"{s} {n1} labels differ after iteration 1, {n} ({1 - agree:.2%}) at the end"
            )
        mine, want = sel_of(t, s), sel_of(fx, s)
        if torch.equal(lab, ref) and torch.equal(t[f"attn.by_scale.{s}"], fx[f"attn.by_scale.{s}"]):
            assert_selection_equal(mine, want, tied_rows(meta, s), exact_scores=False)  # same inputs: same selection
            matched.append(s)
            continue
        assert regime == OTHER, f"{s}: same-kernels regime but the selection inputs differ"
        # Other labels or relevance: the selection must be the reference loop's on *this run's*
        # inputs (which rows and members are chosen does not depend on the features).
        rel = t[f"attn.by_scale.{s}"].reshape(-1)
        own = preserve_and_merge(torch.zeros(rel.numel(), 1), rel, lab.long(), budget, exact=True)
        own_sel = {
            "aggregated": own.merged.long(),
            "cluster": own.group,
            "pos_flat": own.positions,
            "pos_offsets": own.offsets,
            "score": own.scores,
        }
        assert_selection_equal(mine, own_sel, score_ties(own_sel), exact_scores=mode == "exact")
        if selection_mismatch(mine, want, tied_rows(meta, s), exact_scores=False) is None:
            matched.append(s)
        else:
            share = len(kept_tokens(mine) & kept_tokens(want)) / max(1, len(kept_tokens(want)))
            select_notes.append(f"{s} differs ({share:.0%} of the fixture's kept tokens)")
    # Merged rows and the LLM input where the selection matched (tied rows compared as a set).
    ties = {rows[s].start + r for s in matched for r in tied_rows(meta, s)}
    pick = [i for s in matched for i in range(rows[s].start, rows[s].stop)]
    remap = {i: j for j, i in enumerate(pick)}
    for name in ("merged.pre_mlp", "merged.post_mlp"):
        assert t[name].shape == fx[name].shape
        assert_rows_equal(t[name][pick], fx[name][pick], {remap[i] for i in ties}, atol=1e-5, rtol=1e-5)
    assert torch.equal(t["final.mm_input_ids"], fx["final.mm_input_ids"])
    logits = "logits not compared (another selection)"
    if matched == SCALES:
        prefix = int((fx["final.mm_input_ids"] == -200).nonzero()[0])
        assert_rows_equal(
            t["final.inputs_embeds"], fx["final.inputs_embeds"], {prefix + r for r in ties}, atol=1e-5, rtol=1e-5
        )
        logits = "logits not compared (fast mode orders tied rows by position: another LLM input order)"
        if mode == "exact":
            # Logits over the 1003 real vocabulary rows.
            torch.testing.assert_close(t["logits.last_prompt"], fx["logits.last_prompt"], atol=1e-4, rtol=0)
            torch.testing.assert_close(t["gen.step_logits_raw"], fx["gen.step_logits_raw"], atol=1e-4, rtol=0)
            logits = "logits within 1e-4"
    assert torch.equal(t["gen.new_token_ids"], fx["gen.new_token_ids"])
    PARITY_REPORT[f"{case} {upstream} {mode}"] = (
        f"{regime}: K-Means {', '.join(kmeans_notes)}; selection equal to the fixture at {matched or 'no scale'}"
        + (
            f", {'; '.join(select_notes)} (each = the reference loop on this run's labels and relevance)"
            if select_notes
            else ""
        )
        + f"; {logits}; generated ids identical"
    )


@pytest.mark.parametrize(("case", "upstream"), [("case_a", "native"), ("case_b", "native"), ("case_b", "perturbed")])
def test_fast_kmeans_matches_exact_on_the_same_inputs(case: str, upstream: str) -> None:
    """Whatever the CPU and whatever the upstream tensors: fast and exact K-Means on the same
    features give the same labels and centres, hence the same selection and answer."""
    e, f = traced(case, "exact", upstream), traced(case, "fast", upstream)
    ties: set[int] = set()
    off = 0
    for s in SCALES:
        assert torch.equal(e[f"vision_feats.{s}.token_norm"], f[f"vision_feats.{s}.token_norm"]), s  # same inputs
        for name in ("init_idx", "labels_iter1", "labels", "centers_iter1"):
            assert torch.equal(e[f"kmeans.{s}.{name}"], f[f"kmeans.{s}.{name}"]), (s, name)
        tied = score_ties(sel_of(e, s))
        assert_selection_equal(sel_of(f, s), sel_of(e, s), tied, exact_scores=False)
        ties |= {off + r for r in tied}
        off += len(e[f"select.{s}.aggregated"])
    # Merged rows: float64 means (fast) against float32 `mean(0)` (exact).
    assert_rows_equal(f["merged.pre_mlp"], e["merged.pre_mlp"], ties, atol=1e-6, rtol=1e-6)
    assert torch.equal(f["gen.new_token_ids"], e["gen.new_token_ids"])
