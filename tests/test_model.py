"""Model behaviour on a tiny random checkpoint: generation, batching, loading, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from conftest import PARITY
from uhrbat.errors import BudgetError, CheckpointError, PromptError

BUDGETS = [8, 16]


def _image(seed: int, size=(300, 200)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    from uhrbat.modeling.loading import load

    return load(tiny_checkpoint)


def _inputs(processor, images, questions, budgets=BUDGETS):
    return processor(images=images, text=[processor.build_prompt(q) for q in questions], budgets=budgets)


def test_generate_returns_only_answer_tokens(loaded) -> None:
    model, proc = loaded
    inp = _inputs(proc, [_image(0)], ["How many ships?"])
    out = model.generate(**inp, max_new_tokens=5, min_new_tokens=5, kmeans_clusters=6, kmeans_iters=3)
    assert out.shape == (1, 5)
    assert not (out == proc.image_token_id).any()
    assert isinstance(proc.batch_decode(out)[0], str)


def test_batch_equals_one_by_one(loaded) -> None:
    model, proc = loaded
    imgs = [_image(1), _image(2, (120, 400))]
    qs = ["Is there a red car?", "Describe where the pond is, in detail please."]
    kw = dict(max_new_tokens=6, min_new_tokens=6, kmeans_clusters=6, kmeans_iters=3)
    batch = model.generate(**_inputs(proc, imgs, qs), **kw)
    singles = [model.generate(**_inputs(proc, [i], [q]), **kw)[0] for i, q in zip(imgs, qs)]
    assert batch.tolist() == [s.tolist() for s in singles]


def test_sampling_beam_and_repetition_penalty(loaded) -> None:
    model, proc = loaded
    inp = _inputs(proc, [_image(3)], ["What is the colour of the roof?"])
    kw = dict(max_new_tokens=6, min_new_tokens=6, kmeans_clusters=6, kmeans_iters=3)
    greedy = model.generate(**inp, **kw)
    pen = model.generate(**inp, repetition_penalty=1.5, **kw)
    assert pen.shape == greedy.shape
    # The penalty really applies to the prompt's text tokens (and never sees the placeholders).
    out = model.generate(
        **inp, repetition_penalty=2.0, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw
    )
    prompt_tok = int(inp["input_ids"][0, 0])
    raw, processed = out.logits[0][0, prompt_tok], out.scores[0][0, prompt_tok]
    assert torch.isclose(processed, raw / 2.0 if raw > 0 else raw * 2.0)
    other = next(t for t in range(model.config.vocab_in_use) if t not in set(inp["input_ids"][0].tolist()))
    assert out.scores[0][0, other] == out.logits[0][0, other]
    beams = model.generate(**inp, num_beams=3, **kw)
    assert beams.shape == (1, 6)
    torch.manual_seed(0)
    s1 = model.generate(**inp, do_sample=True, top_k=20, **kw)
    torch.manual_seed(0)
    s2 = model.generate(**inp, do_sample=True, top_k=20, **kw)
    assert torch.equal(s1, s2)
    for out in (greedy, pen, beams, s1):
        assert (out < model.config.vocab_in_use).all()  # padded vocabulary rows are never produced


def test_selectors_and_seed_determinism(loaded) -> None:
    from uhrbat.modeling.modeling_uhrbat import ImageTrace

    model, proc = loaded
    inp = _inputs(proc, [_image(4)], ["Count the trees."])

    def run(**kw):
        tr = ImageTrace()
        model.generate(**inp, traces=[tr], max_new_tokens=1, **kw)
        return tr

    a, b = run(seed=3, kmeans_clusters=5), run(seed=3, kmeans_clusters=5)
    for s in model.config.scales:
        assert torch.equal(a.selections[s].positions, b.selections[s].positions)
        assert len(a.selections[s]) == min(BUDGETS[model.config.scales.index(s)], model.config.num_tokens(s))
    t = run(selector="topk")
    for s, k in zip(model.config.scales, BUDGETS):
        sel = t.selections[s]
        assert not sel.merged.any() and len(sel) == k
        rel = t.relevance[s].reshape(-1)
        assert torch.equal(rel[sel.positions].sort(descending=True).values, rel.topk(k).values)


def test_forward_with_labels_and_gradients(loaded) -> None:
    model, proc = loaded
    inp = _inputs(proc, [_image(5)], ["How many ships?"])
    labels = torch.full_like(inp["input_ids"], -100)
    labels[:, -3:] = inp["input_ids"][:, -3:]  # supervise the tail as if it were the answer
    model.train()
    try:
        out = model(**inp, labels=labels, kmeans_clusters=6, kmeans_iters=2)
        out.loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(out.loss)
    assert model.projector.fc1.weight.grad is not None and model.token_mlp.fc2.weight.grad is not None
    assert model.scale_residuals.grids["1344"].grad is not None
    assert all(p.grad is None for p in model.vision_tower.parameters())  # CLIP is not differentiated
    model.zero_grad(set_to_none=True)


def test_save_load_roundtrip(loaded, tmp_path) -> None:
    from uhrbat.modeling.loading import load

    model, proc = loaded
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and list(tmp_path.glob("*.safetensors"))
    m2, p2 = load(tmp_path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    inp = _inputs(proc, [_image(6)], ["Where is the river?"])
    kw = dict(max_new_tokens=4, min_new_tokens=4, kmeans_clusters=6, kmeans_iters=3)
    assert torch.equal(model.generate(**inp, **kw), m2.generate(**inp, **kw))


def test_missing_residuals_fail_loudly(tiny_checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from uhrbat.modeling.loading import load

    dst = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, dst)
    w = load_file(str(dst / "model.safetensors"))
    save_file(
        {k: v for k, v in w.items() if not k.startswith("scale_residuals.")},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointError, match="scale_residuals"):
        load(dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        load(dst)


def test_reference_checkpoint_errors(tmp_path) -> None:
    from uhrbat.modeling.loading import load

    dst = tmp_path / "ref"
    shutil.copytree(PARITY / "uhrbat_tiny", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["mm_vision_tower"] = str(PARITY / "tiny_clip")
    (dst / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    shard = dst / "model-00002-of-00002.safetensors"
    w = load_file(str(shard))
    save_file(
        {k: v for k, v in w.items() if "scale_pos_residuals.4032" not in k}, str(shard), metadata={"format": "pt"}
    )
    with pytest.raises(CheckpointError, match=r"scale_residuals\.grids\.4032.*re-randomise"):
        load(dst)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load(tmp_path / "nope")


def test_convert_reference_then_reload_gives_identical_outputs(tmp_path) -> None:
    from uhrbat.cli.main import main
    from uhrbat.modeling.loading import load

    dst = tmp_path / "converted"
    try:
        main(["convert", str(PARITY / "uhrbat_tiny"), str(dst)])
    except SystemExit as e:  # the CLI runs in click's standalone mode: success exits 0
        assert e.code in (0, None)
    assert (dst / "model.safetensors").exists() and (dst / "processor_config.json").exists()
    ref_model, ref_proc = load(PARITY / "uhrbat_tiny")
    conv_model, conv_proc = load(dst)
    assert ref_model.config.image_token_id == conv_model.config.image_token_id
    sd = conv_model.state_dict()
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    budgets = [8, 16, 24, 32]
    inp = ref_proc(images=[_image(7)], text=[ref_proc.build_prompt("Is there a ship?")], budgets=budgets)
    kw = dict(max_new_tokens=5, min_new_tokens=5, kmeans_clusters=6, kmeans_iters=3)
    assert torch.equal(ref_model.generate(**inp, **kw), conv_model.generate(**inp, **kw))


def test_reference_call_signature(loaded) -> None:
    model, proc = loaded
    img = _image(8)
    inp = _inputs(proc, [img], ["How many ships?"])
    ids = inp["input_ids"][0]
    run = ids == proc.image_token_id
    start = int(run.nonzero()[0])
    ref_ids = torch.cat([ids[:start], torch.tensor([-200]), ids[start + int(run.sum()) :]])[None]
    tiles = inp["pixel_values"][0]
    pixels, off = {}, 0
    for s in model.config.scales:
        n = model.config.num_tiles(s)
        g = s // 336
        pixels[s] = {"tiles": tiles[off : off + n], "coords": [(r, c) for r in range(g) for c in range(g)]}
        off += n
    kw = dict(max_new_tokens=4, min_new_tokens=4, kmeans_clusters=6, kmeans_iters=3)
    old = model.generate(
        inputs=ref_ids,
        attention_mask=torch.ones_like(ref_ids),
        images=None,
        image_sizes=[img.size],
        modalities=["image"],
        multiscale_pixels=[pixels],
        multiscale_topk=BUDGETS,
        multiscale_target_sizes=model.config.scales,
        multiscale_masks=[{}],
        **kw,
    )
    new = model.generate(**inp, **kw)
    assert torch.equal(old, new)


def test_placeholder_and_budget_errors(loaded) -> None:
    model, proc = loaded
    inp = {k: v for k, v in _inputs(proc, [_image(9)], ["q?"]).items() if k != "image_budgets"}
    with pytest.raises(BudgetError, match="image placeholders but budgets"):
        model.generate(**inp, budgets=[1, 1], max_new_tokens=1)
    with pytest.raises(PromptError, match="no pixel_values"):
        model.generate(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], max_new_tokens=1)
