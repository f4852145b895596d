"""Training data: `uhrbat data prepare-sft`, tokenisation/labels, collation, recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from uhrbat.training.tokenize import IGNORE_INDEX, TokenizeOptions, encode_conversation


def _img(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 30)).save(path)
    return path


def _conv(q: str, a: str) -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def sft_tree(tmp_path: Path) -> Path:
    """A released-style dataset: train/metadata.parquet + train/images/, with bad rows."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    train = tmp_path / "UHR-BAT-SFT-10K" / "train"
    for n in ("a.png", "sub/b.jpg", "c.png", "d.png", "e.png"):
        _img(train / "images" / n)
    (train / "images" / "corrupt.png").write_bytes(b"not a png at all")
    masks = tmp_path / "masks"
    masks.mkdir()
    save_file({"scale.672": torch.ones(4, 24, 24, dtype=torch.int32)}, str(masks / "a.png.safetensors"))
    (masks / "c.png.safetensors").write_bytes(b"garbage")  # unreadable mask
    rows = [
        # ok: conversations as a list, image_paths with the images/ prefix, mask present
        dict(
            id="r0",
            image_paths=["images/a.png"],
            conversations=json.dumps(_conv("<image>\nWhat is this?", "A field.")),
            question=None,
            answer=None,
        ),
        # ok: question/answer columns; "<image>\n" is added; nested path
        dict(id="r1", image_paths=["images/sub/b.jpg"], conversations=None, question="How many cars?", answer="Two."),
        # bad: missing image
        dict(id="r2", image_paths=["images/missing.png"], conversations=None, question="Q?", answer="A."),
        # bad: no <image> in the conversation
        dict(
            id="r3",
            image_paths=["images/d.png"],
            conversations=json.dumps(_conv("What?", "X.")),
            question=None,
            answer=None,
        ),
        # bad: empty answer
        dict(id="r4", image_paths=["images/e.png"], conversations=None, question="Where?", answer="  "),
        # bad: unreadable mask
        dict(id="r5", image_paths=["images/c.png"], conversations=None, question="Colour?", answer="Green."),
        # bad: corrupt image
        dict(id="r6", image_paths=["images/corrupt.png"], conversations=None, question="Q?", answer="A."),
        # bad: two images
        dict(id="r7", image_paths=["images/a.png", "images/c.png"], conversations=None, question="Q?", answer="A."),
    ]
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    pq.write_table(table, str(train / "metadata.parquet"))
    return tmp_path


def test_prepare_sft_parquet_and_json_with_bad_rows(sft_tree: Path, capsys) -> None:
    from uhrbat.cli.main import main
    from uhrbat.training.data import read_manifest

    root = sft_tree
    llava = [
        {"id": "j0", "image": "a.png", "conversations": _conv("<image>\nDescribe.", "Grass.")},
        {"id": "j1", "image": "a.png", "conversations": _conv("Two <image> <image>", "No.")},  # several markers
        {"id": "j2", "image": "nope.png", "conversations": _conv("<image>\nQ", "A")},  # missing image
        {"id": "j3", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},  # no answer
        {"id": "j4", "image": "a.png", "conversations": _conv("Where is it?\n<image>", "North.")},  # marker at end: ok
    ]
    js = root / "UHR-BAT-SFT-10K" / "train" / "images" / "llava.json"
    js.write_text(json.dumps(llava))
    jl = root / "extra.jsonl"
    jl.write_text(
        json.dumps(
            {
                "id": "l0",
                "image": str(root / "UHR-BAT-SFT-10K/train/images/d.png"),
                "conversations": _conv("<image>\nQ", "A"),
            }
        )
        + "\n{not json\n"
    )
    out = root / "manifest.jsonl"
    bad = root / "bad.jsonl"
    code = 0
    try:
        main(
            [
                "data",
                "prepare-sft",
                str(root / "UHR-BAT-SFT-10K"),
                str(js),
                str(jl),
                "--out",
                str(out),
                "--masks",
                str(root / "masks"),
                "--bad-rows",
                str(bad),
            ]
        )
    except SystemExit as e:
        code = e.code or 0
    err = capsys.readouterr().err
    assert code == 0, err
    samples = read_manifest(out)
    assert [s.id for s in samples] == ["r0", "r1", "j0", "j4", "l0"]
    assert "5 samples written (3 with masks), 10 bad rows skipped" in err
    reasons = [json.loads(line) for line in bad.read_text().splitlines()]
    assert len(reasons) == 10
    by_row = {r["row"]: r["reason"] for r in reasons}
    assert "image not found" in by_row["metadata.parquet row 3"]
    assert "no <image>" in by_row["metadata.parquet row 4"]
    assert "empty answer" in by_row["metadata.parquet row 5"]
    assert "mask" in by_row["metadata.parquet row 6"]
    assert "unreadable image" in by_row["metadata.parquet row 7"]
    assert "2 images" in by_row["metadata.parquet row 8"]
    assert "2 <image> markers" in by_row["llava.json item 2"]
    assert "not found" in by_row["llava.json item 3"]
    assert "no assistant answer" in by_row["llava.json item 4"]
    assert "invalid JSON" in by_row["extra.jsonl:2"]  # the file's 2nd line, 1-based (issue 23.9)
    assert "skipped extra.jsonl:2: invalid JSON line" in err
    r0, r1 = samples[0], samples[1]
    assert Path(r0.image).name == "a.png" and r0.masks and r0.masks.endswith("a.png.safetensors")
    assert Path(r1.image).parts[-2:] == ("sub", "b.jpg") and r1.masks is None
    assert r1.messages == [
        {"role": "user", "content": "<image>\nHow many cars?"},
        {"role": "assistant", "content": "Two."},
    ]
    assert samples[3].messages[0]["content"] == "Where is it?\n<image>"  # moved at tokenisation time


def test_prepare_sft_relative_paths_and_empty_result(tmp_path: Path, capsys) -> None:
    from uhrbat.cli.main import main
    from uhrbat.training.data import prepare_sft, read_manifest

    _img(tmp_path / "imgs" / "x.png")
    src = tmp_path / "imgs" / "d.json"
    src.write_text(json.dumps([{"id": 1, "image": "x.png", "conversations": _conv("<image>\nQ?", "A.")}]))
    out = tmp_path / "out" / "m.jsonl"
    rep = prepare_sft([src], out, relative=True)
    assert rep.written == 1
    line = json.loads(out.read_text())
    assert line["image"] == "../imgs/x.png"
    assert read_manifest(out)[0].image == str((tmp_path / "imgs" / "x.png").resolve())
    src.write_text(json.dumps([{"id": 1, "image": "gone.png", "conversations": _conv("<image>\nQ?", "A.")}]))
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare-sft", str(src), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "0 samples written" in err and "no usable sample" in err


# ----------------------------------------------------------------------------- tokenisation
@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from uhrbat.processing.processing_uhrbat import UhrBatProcessor

    return UhrBatProcessor.from_pretrained(tiny_checkpoint)


def _budgets(processor, first: int) -> list[int]:
    return [first] + [0] * (len(processor.image_processor.scales) - 1)


MSGS = [
    {"role": "user", "content": "<image>\nIs there a red car?"},
    {"role": "assistant", "content": "Yes, one red car."},
]


def test_labels_supervise_only_the_answer(processor) -> None:
    tok = processor.tokenizer
    enc = encode_conversation(processor, MSGS, num_visual=7)
    ids, labels = enc.input_ids, enc.labels
    assert ids.count(processor.image_token_id) == 7
    sup = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert all(labels[i] == ids[i] for i in sup)
    assert tok.decode([ids[i] for i in sup]) == "Yes, one red car.<|im_end|>"
    assert sup[0] == enc.query_index + 1  # supervision starts right after the assistant header
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == processor.image_token_id)
    # The prompt part is exactly the inference prompt (one "\n" after the image).
    inf = processor(text=processor.build_prompt("Is there a red car?"), budgets=_budgets(processor, 7))["input_ids"][
        0
    ].tolist()
    assert ids[: enc.query_index + 1] == inf
    after = ids[enc.image_start + 7 :]
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    assert after[: len(nl)] == nl and after[len(nl) : 2 * len(nl)] != nl


def test_reference_layout_and_labels(processor) -> None:
    tok = processor.tokenizer
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    ref = encode_conversation(processor, MSGS, 7, options=TokenizeOptions.from_compat("reference"))
    fixed = encode_conversation(processor, MSGS, 7)
    assert len(ref) == len(fixed) + len(nl)
    after = ref.input_ids[ref.image_start + 7 :]
    assert after[: 2 * len(nl)] == nl + nl  # two newlines between image and question
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for i, t in enumerate(ref.input_ids):
        if t in (im_start, im_end):
            assert ref.labels[i] == t  # reference: turn delimiters supervised
    assert ref.query_index == len(ref) - 1  # reference: relevance query = last token (answer leak)
    only_layout = encode_conversation(processor, MSGS, 7, options=TokenizeOptions(layout="reference"))
    assert only_layout.input_ids == ref.input_ids and only_layout.query_index < ref.query_index


def test_multi_turn_and_errors(processor) -> None:
    from uhrbat.errors import ContextOverflowError, PromptError

    tok = processor.tokenizer
    msgs = MSGS + [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "By the road."}]
    enc = encode_conversation(processor, msgs, 5)
    sup = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert sup == "Yes, one red car.<|im_end|>By the road.<|im_end|>"
    with pytest.raises(ContextOverflowError):
        encode_conversation(processor, MSGS, 5, max_length=20)
    with pytest.raises(PromptError):
        encode_conversation(processor, [{"role": "user", "content": "no image"}, MSGS[1]], 5)
    with pytest.raises(PromptError):
        encode_conversation(processor, MSGS[:1], 5)


def test_collator_right_and_left_padding(processor) -> None:
    from uhrbat.training.collator import UhrBatCollator

    short = encode_conversation(processor, MSGS, 3)
    long = encode_conversation(
        processor, [MSGS[0], {"role": "assistant", "content": "Yes, a red car is parked by the road."}], 3
    )
    feats = [
        {
            "input_ids": torch.tensor(e.input_ids),
            "labels": torch.tensor(e.labels),
            "query_index": e.query_index,
            "pixel_values": torch.zeros(2, 3, 4, 4),
            "image_masks": None,
        }
        for e in (short, long)
    ]
    pad = processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        b = UhrBatCollator(pad, [3, 0], padding_side=side, selection={"seed": 1})(feats)
        assert b["input_ids"].shape == (2, len(long)) and b["pixel_values"].shape == (2, 2, 3, 4, 4)
        assert b["image_masks"] is None and b["budgets"] == [3, 0] and b["seed"] == 1
        n = len(short)
        row = b["input_ids"][0]
        valid = b["attention_mask"][0].bool()
        assert valid.sum() == n and (b["labels"][0][~valid] == IGNORE_INDEX).all() and (row[~valid] == pad).all()
        q = int(b["query_index"][0])
        assert row[q] == short.input_ids[short.query_index]
        assert b["labels"][0][q + 1] != IGNORE_INDEX and (b["labels"][0][: q + 1] == IGNORE_INDEX).all()


def test_dataset_drops_untrainable_samples(tmp_path, processor) -> None:
    from uhrbat.training.data import Sample
    from uhrbat.training.dataset import SftDataset

    img = str(_img(tmp_path / "a.png"))
    long_answer = "word " * 300
    samples = [Sample("ok", img, MSGS), Sample("long", img, [MSGS[0], {"role": "assistant", "content": long_answer}])]
    ds = SftDataset(samples, processor, _budgets(processor, 8), max_length=120)
    assert len(ds) == 1 and [d.id for d in ds.dropped] == ["long"]
    item = ds[0]
    assert item["pixel_values"].shape[0] == processor.image_processor.num_tiles()
    assert item["input_ids"].shape == item["labels"].shape


# ----------------------------------------------------------------------------- recipes
def test_released_recipe_matches_the_paper_settings() -> None:
    from uhrbat.training.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    r = load_recipe(root / "recipes" / "uhrbat-sft.yaml")
    assert r.learning_rate == 2e-6 and r.lr_scheduler_type == "cosine" and r.warmup_ratio == 0.2
    assert (r.per_device_train_batch_size, r.gradient_accumulation_steps) == (1, 2)
    assert r.max_length == 5000 and r.bf16 and r.gradient_checkpointing and r.max_grad_norm == 0.5
    assert r.budgets == [80, 320, 600, 2000] and r.train == "vision_projector,token_mlp,llm"
    assert Path(r.deepspeed_path()).name == "zero2_offload.json"
    cfg = json.loads(Path(r.deepspeed_path()).read_text())
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    sam = load_recipe(root / "recipes" / "uhrbat-sft-sam.yaml", ["lora.r=8", "learning_rate=1e-5", "deepspeed=zero3"])
    assert sam.selector == "segments" and sam.num_train_epochs == 2 and sam.lora.r == 8 and sam.learning_rate == 1e-5
    assert Path(sam.deepspeed_path()).name == "zero3.json"


def test_recipe_errors() -> None:
    from uhrbat.errors import ConfigError
    from uhrbat.training.recipe import load_recipe

    with pytest.raises(ConfigError, match="unknown keys"):
        load_recipe(None, ["model=m", "data=d", "learning_rat=1"])
    with pytest.raises(ConfigError, match="model"):
        load_recipe(None, ["data=d"])
    with pytest.raises(ConfigError, match="not both"):
        load_recipe(None, ["model=m", "data=d", "fsdp=true"])
    with pytest.raises(ConfigError, match="shipped"):
        load_recipe(None, ["model=m", "data=d", "deepspeed=zero9"]).deepspeed_path()
    with pytest.raises(ConfigError, match="quantize"):
        load_recipe(None, ["model=m", "data=d", "lora.quantize=4bit"])
    r = load_recipe(None, ["model=m", "data=d", "fsdp=full_shard auto_wrap", "deepspeed=none"])
    assert r.fsdp_settings()["reshard_after_forward"] is True
