"""Fine-tuning on a tiny random checkpoint: loss goes down, saves, resumes bit-exactly, answers
through `uhrbat ask`; freeze policies; answer tokens never influence token selection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

SCALES = [336, 672]
BUDGETS = [4, 8]
SELECTION = dict(kmeans_clusters=4, kmeans_iters=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from uhrbat.training.testing import make_tiny_training_setup

    return make_tiny_training_setup(tmp_path_factory.mktemp("train"), n=6, scales=SCALES, budgets=BUDGETS)


def _recipe(setup, out: Path, **kw):
    from uhrbat.training.recipe import load_recipe

    base = dict(
        model=str(setup.checkpoint),
        data=str(setup.manifest),
        output_dir=str(out),
        budgets=BUDGETS,
        kmeans_clusters=4,
        kmeans_iters=2,
        deepspeed="none",
        bf16=False,
        tf32=False,
        max_steps=20,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        lr_scheduler_type="cosine",
        gradient_accumulation_steps=1,
        report_to="none",
        save_steps=10,
        logging_steps=1,
        dataloader_drop_last=False,
        seed=7,
    )
    base.update(kw)
    return load_recipe(None, [], **base)


class _StopAt:
    """Trainer callback: stop after global step `n` (to take one step after a resume)."""

    def __init__(self, n: int) -> None:
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= outer.n:
                    control.should_training_stop = True
                    control.should_save = False
                return control

        self.n = n
        self.callback = CB()


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    from uhrbat.training.trainer import run_training

    out = tmp_path_factory.mktemp("run") / "run"
    res = run_training(_recipe(setup, out))
    return out, res


def test_tiny_model_trains_loss_goes_down(trained) -> None:
    out, res = trained
    assert res.global_step == 20
    losses = res.step_losses
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert (out / "checkpoint-10").is_dir() and (out / "checkpoint-20").is_dir()
    # Safetensors only for the weights; the processor travels with every checkpoint.
    for d in (out, out / "checkpoint-10"):
        names = {p.name for p in d.iterdir()}
        assert "model.safetensors" in names and "config.json" in names
        assert {"tokenizer.json", "processor_config.json"} <= names  # image processor nested in the latter
        assert not any(n.endswith(".bin") for n in names)


def test_checkpoints_load_and_only_trained_parts_changed(setup, trained) -> None:
    from uhrbat.modeling.loading import load

    out, _ = trained
    start, _ = load(setup.checkpoint)
    for d in (out / "checkpoint-10", out):
        model, proc = load(d)
        assert proc.image_processor.scales == SCALES
        assert model.config.image_token_id == proc.image_token_id
        s0, s1 = start.state_dict(), model.state_dict()
        for k in s0:
            same = torch.equal(s0[k], s1[k])
            if k.startswith(("vision_tower.", "scale_residuals.")):
                assert same, f"frozen {k} changed"
        assert not torch.equal(s0["projector.fc1.weight"], s1["projector.fc1.weight"])
        assert not torch.equal(s0["token_mlp.fc2.weight"], s1["token_mlp.fc2.weight"])
        assert not torch.equal(
            s0["language_model.model.layers.0.mlp.up_proj.weight"],
            s1["language_model.model.layers.0.mlp.up_proj.weight"],
        )


def test_resume_gives_identical_next_step_loss(setup, trained, tmp_path) -> None:
    from uhrbat.training.trainer import run_training

    out, res = trained
    run2 = tmp_path / "run"
    run2.mkdir()
    shutil.copytree(out / "checkpoint-10", run2 / "checkpoint-10")  # a run that crashed after step 10
    stop = _StopAt(11)
    res2 = run_training(_recipe(setup, run2), callbacks=[stop.callback])
    assert res2.resumed_from == str(run2 / "checkpoint-10")
    assert res2.global_step == 11
    assert res2.step_losses[0] == res.step_losses[10]  # bit-identical


def test_saved_checkpoint_answers_through_uhrbat_ask(setup, trained, capsys) -> None:
    from uhrbat.cli.main import main

    out, _ = trained
    code = 0
    try:
        main(
            [
                "ask",
                str(setup.images[0]),
                "How many ships are in the harbour?",
                "--model",
                str(out),
                "--max-new-tokens",
                "4",
                "--clusters",
                "4",
                "--iters",
                "2",
            ]
        )
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # 20 steps on 6 samples are enough for the tiny model to start the memorised answer.
    assert captured.out.strip().startswith("There"), captured.out


# ----------------------------------------------------------------------------- freeze policies
def _grads(model, batch) -> set[str]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _batch(setup, processor, idx=0):
    from uhrbat.training.collator import UhrBatCollator
    from uhrbat.training.dataset import SftDataset

    ds = SftDataset(str(setup.manifest), processor, BUDGETS, 512)
    return UhrBatCollator(processor.tokenizer.pad_token_id, BUDGETS, selection=SELECTION)([ds[idx], ds[idx + 1]])


@pytest.mark.parametrize(
    "policy, prefixes",
    [
        ("vision_projector,token_mlp,llm", ("projector.", "token_mlp.", "language_model.")),
        ("token_mlp,scale_residuals", ("token_mlp.", "scale_residuals.")),
        ("vision_projector", ("projector.",)),
        ("llm", ("language_model.",)),
    ],
)
def test_gradients_reach_exactly_the_named_parts(setup, policy, prefixes) -> None:
    from uhrbat.modeling.loading import load
    from uhrbat.training.freeze import apply_freeze

    model, proc = load(setup.checkpoint)
    apply_freeze(model, policy)
    model.train()
    got = _grads(model, _batch(setup, proc))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(prefixes) for n in trainable)
    assert got <= trainable
    # Every named module gets gradient (embedding rows of unused tokens aside: check per module).
    for pre in prefixes:
        assert any(n.startswith(pre) for n in got), f"no gradient reached {pre}"
    # Everything the policy names has a gradient tensor; nothing else does.
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    assert not any(n.startswith("vision_tower.") for n in with_grad)


def test_clip_cannot_be_trained_and_bad_parts_rejected() -> None:
    from uhrbat.errors import ConfigError
    from uhrbat.training.freeze import parse_parts

    assert parse_parts(None) == ["vision_projector", "token_mlp", "llm"]
    assert parse_parts("mm_mlp_adapter,mm_language_model") == ["vision_projector", "llm"]
    with pytest.raises(ConfigError, match="CLIP"):
        parse_parts("vision_tower,llm")
    with pytest.raises(ConfigError, match="unknown"):
        parse_parts("llm,decoder")


def test_lora_trains_adapters_and_saves_merged_weights(setup, tmp_path) -> None:
    pytest.importorskip("peft")
    from uhrbat.modeling.loading import load
    from uhrbat.training.freeze import LoraSettings, apply_freeze, merged_state_dict

    model, proc = load(setup.checkpoint)
    apply_freeze(model, "vision_projector,token_mlp,llm", LoraSettings(r=4, alpha=8, dropout=0.0))
    model.train()
    batch = _batch(setup, proc)
    got = _grads(model, batch)
    lm_grads = {n for n in got if n.startswith("language_model.")}
    assert lm_grads and all("lora_" in n for n in lm_grads)
    assert any(n.startswith("projector.") for n in got) and any(n.startswith("token_mlp.") for n in got)
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(tmp_path / "m", state_dict=merged_state_dict(model))
    proc.save_pretrained(tmp_path / "m")
    merged, _ = load(tmp_path / "m")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        out = merged(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- selection invariance
def _selection_trace(model, proc, answer: str, image, options):
    from uhrbat.modeling.modeling_uhrbat import ImageTrace
    from uhrbat.training.tokenize import encode_conversation

    msgs = [
        {"role": "user", "content": "<image>\nHow many ships are in the harbour?"},
        {"role": "assistant", "content": answer},
    ]
    enc = encode_conversation(proc, msgs, proc.num_visual_tokens(BUDGETS), options=options)
    ids = torch.tensor([enc.input_ids])
    tiles, _ = proc.image_processor.pyramid(image)
    trace = ImageTrace()
    with torch.no_grad():
        model.prepare_inputs_embeds(
            ids,
            torch.ones_like(ids),
            tiles[None],
            traces=[trace],
            query_index=torch.tensor([enc.query_index]),
            budgets=BUDGETS,
            **SELECTION,
        )
    return trace, enc


def test_answer_tokens_do_not_change_selected_visual_tokens(setup) -> None:
    from uhrbat.modeling.loading import load
    from uhrbat.modeling.modeling_uhrbat import ImageTrace
    from uhrbat.training.tokenize import TokenizeOptions

    model, proc = load(setup.checkpoint)
    img = setup.images[1]
    a, ea = _selection_trace(model, proc, "There are three ships near the pier.", img, TokenizeOptions())
    b, eb = _selection_trace(model, proc, "None.", img, TokenizeOptions())
    assert ea.input_ids != eb.input_ids
    torch.testing.assert_close(a.relevance_base, b.relevance_base, rtol=0, atol=0)
    for s in SCALES:
        assert torch.equal(a.selections[s].positions, b.selections[s].positions)
        assert torch.equal(a.selections[s].offsets, b.selections[s].offsets)
    # The training relevance is the inference relevance (same prompt ids, same query token).
    inf = proc(
        images=[str(img)],
        text=[proc.build_prompt("How many ships are in the harbour?")],
        budgets=BUDGETS,
        padding_side="right",
    )
    assert inf["input_ids"][0].tolist() == ea.input_ids[: ea.query_index + 1]
    t = ImageTrace()
    with torch.no_grad():
        model.prepare_inputs_embeds(
            inf["input_ids"], inf["attention_mask"], inf["pixel_values"], traces=[t], budgets=BUDGETS, **SELECTION
        )
    torch.testing.assert_close(t.relevance_base, a.relevance_base, rtol=0, atol=0)
    # The reference's leak (query = last token of the answer) does depend on the answer.
    ra, _ = _selection_trace(
        model, proc, "There are three ships near the pier.", img, TokenizeOptions(query="reference")
    )
    rb, _ = _selection_trace(model, proc, "None.", img, TokenizeOptions(query="reference"))
    assert not torch.equal(ra.relevance_base, rb.relevance_base)


def test_selection_under_bf16_autocast_equals_inference(setup) -> None:
    """bf16 mixed-precision training (autocast, fp32 weights, gradient on) keeps exactly the
    tokens that fp32 inference keeps: scoring, K-Means and merging run with autocast off."""
    from uhrbat.modeling.loading import load
    from uhrbat.modeling.modeling_uhrbat import ImageTrace
    from uhrbat.training.freeze import apply_freeze

    model, proc = load(setup.checkpoint)
    inf = proc(
        images=[str(setup.images[2])], text=[proc.build_prompt("How many ships are in the harbour?")], budgets=BUDGETS
    )
    args = (inf["input_ids"], inf["attention_mask"], inf["pixel_values"])
    sel = dict(budgets=BUDGETS, kmeans_clusters=6, kmeans_iters=10)  # enough iterations for the cached updates
    ref = ImageTrace()
    with torch.no_grad():
        model.prepare_inputs_embeds(*args, traces=[ref], **sel)
    apply_freeze(model, "vision_projector,token_mlp,llm")
    model.train()
    got = ImageTrace()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeds, _ = model.prepare_inputs_embeds(*args, traces=[got], **sel)
    assert embeds.requires_grad  # the kept rows were re-projected with gradient
    assert torch.equal(got.relevance_base, ref.relevance_base)
    for s in SCALES:
        assert torch.equal(got.kmeans[s].labels, ref.kmeans[s].labels), s
        for name in ("positions", "offsets", "merged", "group"):
            assert torch.equal(getattr(got.selections[s], name), getattr(ref.selections[s], name)), (s, name)


def test_shipped_recipe_trains_in_bf16_on_cpu(setup, tmp_path) -> None:
    """`uhrbat train --config recipes/uhrbat-sft.yaml --deepspeed none --max-steps 2` (bf16,
    3000 clusters, 10 K-Means iterations) on the tiny model: HF Trainer runs the step under CPU
    bf16 autocast; selection must not crash on mixed dtypes."""
    from uhrbat.training.recipe import load_recipe
    from uhrbat.training.trainer import run_training

    recipe_file = Path(__file__).resolve().parents[1] / "recipes" / "uhrbat-sft.yaml"
    recipe = load_recipe(
        recipe_file,
        ["report_to=none"],
        model=str(setup.checkpoint),
        data=str(setup.manifest),
        output_dir=str(tmp_path / "run"),
        budgets=BUDGETS,
        deepspeed="none",
        max_steps=2,
    )
    assert recipe.bf16 and recipe.kmeans_clusters == 3000
    res = run_training(recipe)
    assert res.global_step == 2
    assert res.step_losses and all(torch.isfinite(torch.tensor(res.step_losses)))


def test_forward_with_labels_scores_from_prompt_only(setup) -> None:
    """The model's own default (no query_index) agrees with the collator's explicit query."""
    from uhrbat.modeling.loading import load

    model, proc = load(setup.checkpoint)
    batch = _batch(setup, proc)
    with torch.no_grad():
        explicit = model(**batch).loss
        batch.pop("query_index")
        implicit = model(**batch).loss
    torch.testing.assert_close(explicit, implicit, rtol=0, atol=0)


def test_segments_selector_trains_with_mask_files(setup, tmp_path) -> None:
    """Masks named in the manifest reach the model through the collator and the Trainer."""
    from safetensors.torch import save_file

    from uhrbat.training.data import prepare_sft, sanitize
    from uhrbat.training.trainer import run_training

    masks = tmp_path / "masks"
    masks.mkdir()
    for p in setup.images:
        ids = {
            f"scale.{s}": (torch.arange((s // 336) ** 2 * 576, dtype=torch.int32) // 97 % 5).reshape(-1, 24, 24)
            for s in SCALES
        }
        save_file(ids, str(masks / f"{sanitize(p.name)}.safetensors"))
    manifest = tmp_path / "m.jsonl"
    rep = prepare_sft([setup.images[0].parent / "sft.json"], manifest, mask_dir=masks, scales=SCALES)
    assert rep.with_masks == len(setup.images)
    res = run_training(
        _recipe(
            setup,
            tmp_path / "run",
            data=str(manifest),
            selector="segments",
            max_steps=2,
            save_steps=100,
            per_device_train_batch_size=2,
        )
    )
    assert res.global_step == 2 and all(torch.isfinite(torch.tensor(res.step_losses)))


def test_lora_run_saves_merged_checkpoints_and_resumes(setup, tmp_path) -> None:
    pytest.importorskip("peft")
    from uhrbat.modeling.loading import load
    from uhrbat.training.trainer import LORA_ADAPTER_FILE, run_training

    kw = dict(max_steps=4, save_steps=2, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    out = tmp_path / "a"
    res = run_training(_recipe(setup, out, **kw))
    assert (out / "checkpoint-2" / LORA_ADAPTER_FILE).exists()
    model, _ = load(out / "checkpoint-2")  # merged: a plain checkpoint in our format
    assert not any("lora" in k for k in model.state_dict())
    run2 = tmp_path / "b"
    run2.mkdir()
    shutil.copytree(out / "checkpoint-2", run2 / "checkpoint-2")
    stop = _StopAt(3)
    res2 = run_training(_recipe(setup, run2, **kw), callbacks=[stop.callback])
    assert res2.step_losses[0] == res.step_losses[2]
