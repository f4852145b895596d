"""Config, image processor, prompt building and tokenisation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS, PARITY
from uhrbat.configuration import UhrBatConfig
from uhrbat.errors import (
    BudgetError,
    ConfigError,
    ContextOverflowError,
    ImageLoadError,
    PromptError,
)
from uhrbat.io.images import PAD_RGB
from uhrbat.io.sources import open_image
from uhrbat.processing import UhrBatImageProcessor, UhrBatProcessor, parse_budgets
from uhrbat.processing.prompt import question_prompt


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_roundtrip(tmp_path) -> None:
    c = UhrBatConfig()
    assert c.scales == [672, 1344, 2688, 4032] and c.budgets == [80, 320, 600, 2000]
    assert [c.num_tiles(s) for s in c.scales] == [4, 16, 64, 144]
    assert [c.residual_grid(s) for s in c.scales] == [48, 64, 64, 64]
    assert c.vision_config.hidden_size == 1024 and c.text_config.model_type == "qwen2"
    c.save_pretrained(tmp_path)
    d = UhrBatConfig.from_pretrained(tmp_path)
    assert d.budgets == c.budgets and d.vision_config.num_hidden_layers == 24


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budgets": [1, 2]}, "budgets has 2 values but there are 4 scales"),
        ({"budgets": [1, 2, -3, 4]}, "budgets must be >= 0"),
        ({"selector": "random"}, "selector must be one of"),
        ({"scales": [672, 336]}, "strictly ascending"),
        ({"base_scale": 1000}, "base_scale 1000 must be one of"),
        ({"kmeans_mode": "slow"}, "kmeans_mode must be one of"),
        ({"compat": "old"}, "compat must be one of"),
        ({"kmeans_iters": 0}, "kmeans_iters must be >= 1"),
    ],
)
def test_config_validation(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        UhrBatConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_reference_config_fields() -> None:
    from transformers import CLIPVisionConfig

    ref = json.loads((PARITY / "uhrbat_tiny" / "config.json").read_text())
    c = UhrBatConfig.from_reference_dict(ref, CLIPVisionConfig.from_pretrained(PARITY / "tiny_clip"))
    assert c.text_config.hidden_size == 64 and c.text_config.num_key_value_heads == 2
    assert c.vision_config.num_hidden_layers == 3 and c.vision_feature_layer == -2
    assert c.enable_scale_pos_residual is True and c.kmeans_clusters == 3000 and c.max_context == 5000
    with pytest.raises(ConfigError, match="mm_projector_type"):
        UhrBatConfig.from_reference_dict(dict(ref, mm_projector_type="linear"))


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize(
    "value, message",
    [
        ("80,320,-1,2000", "negative"),
        ("80,320,1.5,2000", "not an integer"),
        ("80,x,600,2000", "not an integer"),
        ("80,320", "got 2 budgets"),
        ([1, 2, 3, True], "not an integer"),
    ],
)
def test_parse_budgets_errors(value, message) -> None:
    with pytest.raises(BudgetError, match=message):
        parse_budgets(value, 4)


def test_parse_budgets_ok() -> None:
    assert parse_budgets("80, 320,600,2000", 4) == [80, 320, 600, 2000]
    assert parse_budgets([1, 2, "3", 0], 4) == [1, 2, 3, 0]  # floats such as 1.0 are refused (one rule)


# ----------------------------------------------------------------------------- image processor
def _hash_tiles(pv: torch.Tensor) -> list[int]:
    import hashlib

    return [int(hashlib.sha256(t.numpy().tobytes()).hexdigest()[:12], 16) for t in pv]


@pytest.mark.parametrize("case", ["case_a", "case_b"])
def test_tiles_bit_exact_with_reference(case) -> None:
    from safetensors.torch import load_file

    fx = load_file(str(PARITY / case / "fixture.safetensors"))
    meta = json.loads((PARITY / case / "meta.json").read_text())
    ip = UhrBatImageProcessor()
    pv, size = ip.pyramid(PARITY / "images" / meta["case"]["image"])
    assert size == tuple(meta["image_size_wh"])
    assert pv.shape == (228, 3, 336, 336) and pv.dtype == torch.float32
    off = 0
    for s in ip.scales:
        n = (s // 336) ** 2
        assert torch.tensor(_hash_tiles(pv[off : off + n])).equal(fx[f"tiles.{s}.tile_sha256_prefix"])
        off += n


def test_padding_geometry_and_colour() -> None:
    img = Image.new("RGB", (100, 40), (255, 0, 0))
    sq = open_image(img).square(100)
    a = np.asarray(sq)
    assert a.shape == (100, 100, 3)
    assert tuple(a[0, 0]) == PAD_RGB and tuple(a[30, 50]) == (255, 0, 0) and tuple(a[99, 99]) == PAD_RGB
    # Landscape: pasted at y = (100 - 40) // 2 = 30.
    assert tuple(a[29, 50]) == PAD_RGB and tuple(a[69, 50]) == (255, 0, 0) and tuple(a[70, 50]) == PAD_RGB


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGB", (50, 30), (1, 2, 3)),
        lambda: Image.new("RGBA", (50, 30), (1, 2, 3, 128)),
        lambda: Image.new("P", (50, 30), 3),
        lambda: Image.new("L", (50, 30), 7),
        lambda: Image.fromarray(np.full((30, 50), 40000, dtype=np.uint16)),
        lambda: Image.new("CMYK", (50, 30), (0, 50, 100, 0)),
        lambda: Image.new("RGB", (1, 1), (9, 9, 9)),
        lambda: Image.new("RGB", (1, 20000), (9, 9, 9)),
    ],
    ids=["rgb", "rgba", "palette", "gray", "16bit", "cmyk", "1x1", "1x20000"],
)
def test_image_kinds_make_full_pyramid(make, tmp_path) -> None:
    img = make()
    path = tmp_path / ("img.tif" if img.mode == "CMYK" else "img.png")
    img.save(path)
    ip = UhrBatImageProcessor(scales=[672, 1344])
    pv, size = ip.pyramid(path)
    assert size == img.size and pv.shape == (20, 3, 336, 336) and torch.isfinite(pv).all()


def test_exif_rotation_is_applied(tmp_path) -> None:
    img = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert open_image(path).size == (20, 60)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "image not found"),
        (lambda p: p.write_text("hello, not an image"), "not an image"),
        (lambda p: p.write_bytes(_png(Image.new("RGB", (64, 64)))[:60]), "corrupt or unreadable"),
        (lambda p: p.mkdir(), "directory"),
    ],
    ids=["missing", "text", "truncated", "dir"],
)
def test_bad_images(setup, message, tmp_path) -> None:
    p = tmp_path / "x.png"
    setup(p)
    with pytest.raises(ImageLoadError, match=message) as e:
        open_image(p)
    assert str(p) in str(e.value)


# ----------------------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def processor() -> UhrBatProcessor:
    from transformers import AutoTokenizer

    return UhrBatProcessor(
        UhrBatImageProcessor(scales=[672, 1344]),
        AutoTokenizer.from_pretrained(PARITY / "tokenizer"),
        budgets=[10, 20],
        max_context=200,
    )


def test_prompt_matches_reference_template() -> None:
    meta = json.loads((PARITY / "case_a" / "meta.json").read_text())
    assert question_prompt(meta["case"]["question"]) == meta["prompt"]
    # A marker in the question is refused wherever it stands (the reference dropped leading ones).
    for question in ("<image>\n" + meta["case"]["question"], "two <image> markers"):
        with pytest.raises(PromptError, match="contains an extra '<image>' marker; the image is given separately"):
            question_prompt(question)


def test_placeholder_expansion_and_padding(processor) -> None:
    img = Image.new("RGB", (40, 40))
    out = processor(
        images=[img, img],
        text=[processor.build_prompt("short?"), processor.build_prompt("a much longer question here?")],
    )
    ids, mask = out["input_ids"], out["attention_mask"]
    assert (ids == processor.image_token_id).sum(1).tolist() == [30, 30]
    assert ids.min() >= 0  # never negative ids: logits processors can index them
    assert mask[0, 0] == 0 and mask[1].all()  # left padding
    assert out["pixel_values"].shape == (2, 20, 3, 336, 336)
    assert processor.tokens_per_scale([10_000, 5]) == [2304, 5]


def test_reference_compat_overwrites_specials_with_eos(processor) -> None:
    from safetensors.torch import load_file

    fx = load_file(str(PARITY / "case_a" / "fixture.safetensors"))
    meta = json.loads((PARITY / "case_a" / "meta.json").read_text())
    processor.compat = "reference"
    try:
        ids = processor(text=processor.build_prompt(meta["case"]["question"]))["input_ids"][0]
    finally:
        processor.compat = "none"
    run = ids == processor.image_token_id
    start = int(run.nonzero()[0])
    collapsed = torch.cat([ids[:start], torch.tensor([-200]), ids[start + int(run.sum()) :]])
    assert torch.equal(collapsed, fx["input_ids"])
    plain = processor(text=processor.build_prompt(meta["case"]["question"]))["input_ids"][0]
    plain = torch.cat([plain[:start], torch.tensor([-200]), plain[start + int(run.sum()) :]])
    assert torch.equal(plain, fx["input_ids_tokenized"])


def test_marker_and_context_errors(processor) -> None:
    with pytest.raises(PromptError, match="exactly one '<image>' marker, found 0"):
        processor(text="no marker")
    with pytest.raises(PromptError, match="found 2"):
        processor(text="<image> and <image>")
    with pytest.raises(ContextOverflowError, match=r"visual .* context is 200"):
        processor(text=processor.build_prompt("q"), budgets=[100, 100])


def test_processor_save_load(processor, tmp_path) -> None:
    processor.save_pretrained(tmp_path)
    p2 = UhrBatProcessor.from_pretrained(tmp_path)
    assert p2.budgets == [10, 20] and p2.image_processor.scales == [672, 1344] and p2.max_context == 200
    assert p2.image_token_id == processor.image_token_id
    text = processor.build_prompt("How many?")
    assert torch.equal(p2(text=text)["input_ids"], processor(text=text)["input_ids"])


def test_real_qwen2_tokenizer_ids() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "qwen2-tokenizer")
    p = UhrBatProcessor(UhrBatImageProcessor(), tok)
    ids = p(text=p.build_prompt("How many ships?"))["input_ids"][0].tolist()
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert p.image_token_id == 151646 and ids.count(151646) == 3000
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n


# ----------------------------------------------------------------------------- transformers integration
def test_processors_are_transformers_classes(processor, tmp_path) -> None:
    """ProcessorMixin / BaseImageProcessor: the composite processor_config.json, AutoProcessor and
    AutoImageProcessor load it back (registered by `import uhrbat`), outputs identical."""
    from transformers import AutoImageProcessor, AutoProcessor
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.processing_utils import ProcessorMixin

    assert isinstance(processor, ProcessorMixin) and isinstance(processor.image_processor, BaseImageProcessor)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "UhrBatProcessor" and saved["budgets"] == [10, 20]
    assert saved["image_processor"]["image_processor_type"] == "UhrBatImageProcessor"
    assert saved["image_processor"]["scales"] == [672, 1344] and saved["image_processor"]["patch_size"] == 14
    auto = AutoProcessor.from_pretrained(tmp_path)
    assert type(auto) is UhrBatProcessor and auto.max_context == 200 and auto.compat == "none"
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is UhrBatImageProcessor
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    a = processor(images=img, text=processor.build_prompt("q?"))
    b = auto(images=img, text=auto.build_prompt("q?"))
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes"))


def test_round_one_processor_folders_still_load(processor, tmp_path) -> None:
    """Folders written before the ProcessorMixin port (flat processor_config.json next to a
    preprocessor_config.json) load unchanged; overrides replace saved settings."""
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "UhrBatImageProcessor",
                "scales": [672, 1344],
                "tile_size": 336,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
            }
        )
    )
    (tmp_path / "processor_config.json").write_text(
        json.dumps(
            {"processor_class": "UhrBatProcessor", "budgets": [10, 20], "max_context": 200, "compat": "reference"}
        )
    )
    p = UhrBatProcessor.from_pretrained(tmp_path)
    assert p.budgets == [10, 20] and p.max_context == 200 and p.compat == "reference"
    assert p.image_processor.image_mean == [0.5, 0.5, 0.5] and p.image_processor.patch_size == 14
    q = UhrBatProcessor.from_pretrained(tmp_path, budgets=[1, 2], compat="none", patch_size=16)
    assert q.budgets == [1, 2] and q.compat == "none" and q.image_processor.image_mean == [0.5, 0.5, 0.5]
    assert q.image_processor.tokens_per_side == 21 and q.tokens_per_scale([10_000, 10_000]) == [4 * 441, 16 * 441]


def test_token_counts_follow_the_patch_size(processor) -> None:
    """Placeholder counts come from the image processor's tile / patch sides, not CLIP-336/14."""
    p = UhrBatProcessor(
        UhrBatImageProcessor(scales=[448, 896], tile_size=224, patch_size=14),
        processor.tokenizer,
        budgets=[10_000, 50],
        max_context=10_000,
    )
    assert p.tokens_per_scale() == [4 * 256, 50]
    ids = p(text=p.build_prompt("q"))["input_ids"][0]
    assert int((ids == p.image_token_id).sum()) == 1024 + 50
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        UhrBatImageProcessor(tile_size=336, patch_size=15)
    with pytest.raises(ConfigError, match=">= tile_size"):
        UhrBatImageProcessor(scales=[224], tile_size=336)


def test_unknown_keywords_are_refused(processor) -> None:
    """`budget=` (a typo) used to do nothing; now it names the keyword it probably meant."""
    with pytest.raises(ConfigError, match="unknown keyword 'budget'; did you mean 'budgets'"):
        processor(text=processor.build_prompt("q"), budget=[1, 2])
    out = processor(text=processor.build_prompt("q"), budgets=[3, 4])
    assert out["image_budgets"].tolist() == [[3, 4]] and "budgets" not in out  # never clashes with generate(budgets=)
