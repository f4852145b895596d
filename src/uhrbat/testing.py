"""Tiny random-weight checkpoints for tests, examples and benchmarks (no downloads).

`make_tiny_checkpoint(path)` writes a complete checkpoint in this package's format: a small
CLIP tower, Qwen2 LM, projector, token MLP and scale residuals, a byte-level BPE tokenizer in
the Qwen2 style (ChatML specials) and the processor configs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

_CORPUS = [
    "How many ships are in the harbour? There are three ships near the pier.",
    "Is there a red car in the parking lot? Yes, one red car is parked by the road.",
    "Describe where the pond is. The pond lies in the north west corner of the image.",
    "What is the colour of the roof? The roof is grey. Answer with the option letter only.",
    "A. building B. road C. forest D. water E. field F. bridge",
    "Select the best answer based on the image. The answer is (B).",
    "airport runway river forest farmland tree storage tank vehicle count left right top bottom",
]


def make_tiny_tokenizer(vocab_size: int = 400):
    """A Qwen2-style byte-level BPE tokenizer with <|endoftext|>, <|im_start|>, <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    # Same order as Qwen2: <|endoftext|>, <|im_start|>, <|im_end|> right after the BPE ranks.
    fast.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    fast.eos_token = "<|im_end|>"
    fast.pad_token = "<|endoftext|>"
    return fast


def tiny_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    clip_hidden: int = 32,
    clip_layers: int = 3,
    clip_image_size: int = 336,
    clip_patch_size: int = 14,
    **overrides: Any,
):
    from uhrbat.configuration import UhrBatConfig

    text = dict(
        model_type="qwen2",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 5 // 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=clip_hidden,
        intermediate_size=clip_hidden * 2,
        num_hidden_layers=clip_layers,
        num_attention_heads=4,
        image_size=clip_image_size,
        patch_size=clip_patch_size,
        hidden_act="quick_gelu",
        projection_dim=clip_hidden,
    )
    return UhrBatConfig(text_config=text, vision_config=vision, **overrides)


def make_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, **config_overrides: Any) -> Path:
    """Write a random tiny UHR-BAT checkpoint + processor to `path` and return it."""
    from uhrbat.modeling.modeling_uhrbat import UhrBatForConditionalGeneration
    from uhrbat.processing.image_processing_uhrbat import UhrBatImageProcessor
    from uhrbat.processing.processing_uhrbat import UhrBatProcessor

    path = Path(path)
    tok = make_tiny_tokenizer()
    base_len = len(tok)
    tok.add_tokens(["<image>"], special_tokens=True)
    vocab = ((len(tok) + 63) // 64) * 64  # padded like real checkpoints
    config_overrides.setdefault("image_token_id", tok.convert_tokens_to_ids("<image>"))
    config_overrides.setdefault("vocab_in_use", base_len)
    config = tiny_config(vocab, **config_overrides)
    processor = UhrBatProcessor(
        UhrBatImageProcessor(scales=config.scales, tile_size=config.tile_size, patch_size=config.patch_size),
        tok,
        budgets=config.budgets,
        max_context=config.max_context,
    )
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = UhrBatForConditionalGeneration(config)
    with torch.no_grad():  # make every parameter matter (HF init zeroes biases / sets norms to 1)
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif "scale_residuals" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.pad_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
