"""`uhrbat masks`: SAM automatic mask generation (tiny random SamModel) -> tile-format id maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uhrbat.training.masks import block_majority, box_nms, paint_by_area, relabel, tile_masks


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory) -> Path:
    from transformers import SamConfig, SamModel

    cfg = SamConfig(
        vision_config=dict(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=128,
            patch_size=16,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=16,
            mlp_dim=64,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "tiny-sam"
    SamModel(cfg).save_pretrained(path)
    return path


def test_block_majority_matches_np_unique() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(28, 42)).astype(np.int32)
    got = block_majority(labels, 14)
    for r in range(2):
        for c in range(3):
            vals, counts = np.unique(labels[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14], return_counts=True)
            assert got[r, c] == vals[np.argmax(counts)]  # the reference's `_tile_label` (ties: smallest id)


def test_paint_by_area_smaller_masks_win_and_tiles() -> None:
    big = np.zeros((672, 672), bool)
    big[:, :400] = True
    small = np.zeros((672, 672), bool)
    small[100:300, 100:300] = True
    ids = paint_by_area([small, big], (672, 672))  # input order does not matter: sorted by area
    assert ids[0, 0] == 1 and ids[150, 150] == 2 and ids[0, 600] == 0
    t = tile_masks(ids, 672)
    assert t.shape == (4, 24, 24) and t.dtype == torch.int32
    assert t[0, 0, 0] == 1 and t[0, 10, 10] == 2 and t[1, 0, 23] == 0  # tile (0,1) right edge: background
    assert t[2, 23, 0] == 1  # tile (1,0): still the big mask
    assert relabel(np.array([[0, 5, 9], [9, 5, 0]])).tolist() == [[0, 1, 2], [2, 1, 0]]


def test_box_nms() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = box_nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.7)
    assert keep.tolist() == [1, 2]


def test_masks_command_writes_resumable_tile_masks(tiny_sam, tmp_path, capsys) -> None:
    from uhrbat.cli.main import main
    from uhrbat.compression.segments import load_mask_file, segment_ids_for_scale

    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8)).save(images / "a.png")
    Image.fromarray((rng.random((80, 50, 3)) * 255).astype(np.uint8)).save(images / "sub" / "b.jpg")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "masks"
    args = [
        "masks",
        "--images",
        str(images),
        "--out",
        str(out),
        "--sam",
        str(tiny_sam),
        "--scales",
        "672,1344",
        "--points-per-side",
        "4",
        "--points-per-batch",
        "8",
        "--pred-iou-thresh",
        "0",
        "--stability-thresh",
        "0",
        "--resolution",
        "128",
        "--keep-pixels",
    ]

    def run() -> str:
        try:
            main(args)
        except SystemExit as e:
            assert not e.code, capsys.readouterr().err
        return capsys.readouterr().err

    err = run()
    assert "2 mask files written, 0 already present, 0 failed" in err
    files = sorted(p.name for p in out.iterdir())
    assert files == ["a.png.safetensors", "sub__b.jpg.safetensors"]
    from safetensors.torch import load_file

    masks = load_file(str(out / "sub__b.jpg.safetensors"))
    assert set(masks) == {"scale.672", "scale.1344", "pixels"}
    masks = {int(k.split(".")[1]): v for k, v in masks.items() if k.startswith("scale.")}
    assert masks[672].shape == (4, 24, 24) and masks[1344].shape == (16, 24, 24)
    assert masks[672].dtype == torch.int32 and int(masks[672].max()) >= 1
    assert segment_ids_for_scale(masks[1344], 1344).numel() == 16 * 576
    loaded = load_mask_file(out / "sub__b.jpg.safetensors")  # the model's reader accepts the files
    assert torch.equal(loaded[672], masks[672].reshape(-1).long())
    # b.jpg is portrait (50 x 80): the padded left/right margins are background.
    assert (masks[672][0, :, 0] == 0).all() and (masks[672][1, :, 23] == 0).all()
    from safetensors import safe_open

    with safe_open(str(out / "a.png.safetensors"), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("pixels").shape == (128, 128)
    assert meta["format"] == "uhrbat-segments" and meta["image"] == "a.png" and meta["width"] == "90"
    # Resumable: complete outputs are skipped, a missing one is regenerated.
    (out / "a.png.safetensors").unlink()
    err = run()
    assert "1 mask files written, 1 already present" in err
    err = run()
    assert "0 mask files written, 2 already present" in err


def test_masks_feed_prepare_sft_and_the_segments_selector(tiny_sam, tmp_path) -> None:
    from uhrbat.training.data import prepare_sft, read_manifest
    from uhrbat.training.masks import MaskSettings, generate_masks

    img = tmp_path / "imgs" / "x.png"
    img.parent.mkdir()
    Image.fromarray((np.random.default_rng(1).random((70, 70, 3)) * 255).astype(np.uint8)).save(img)
    st = MaskSettings(
        points_per_side=3, points_per_batch=9, pred_iou_thresh=0, stability_score_thresh=0, resolution=128
    )
    rep = generate_masks(img.parent, tmp_path / "m", tiny_sam, scales=[672, 1344], settings=st)
    assert rep.written == 1
    (img.parent / "d.json").write_text(
        '[{"id": 0, "image": "x.png", "conversations": '
        '[{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}]}]'
    )
    out = prepare_sft([img.parent / "d.json"], tmp_path / "m.jsonl", mask_dir=tmp_path / "m", scales=[672, 1344])
    assert out.with_masks == 1
    assert read_manifest(tmp_path / "m.jsonl")[0].masks.endswith("x.png.safetensors")
