"""The released model card's `generate` call signature, as a thin translation layer.

Old user code calls

    model.generate(inputs=input_ids_with_-200, attention_mask=..., images=..., image_sizes=...,
                   modalities=["image"], multiscale_pixels=[{672: {"tiles": T, "coords": ...}, ...}],
                   multiscale_topk=[80, 320, 600, 2000], multiscale_target_sizes=[...],
                   multiscale_masks=[{}])

The `-200` placeholder becomes our placeholder run, the per-scale tile dict becomes the
`[B, T, 3, 336, 336]` tile tensor, `multiscale_topk` the budgets (a short list is padded with
its last value, as in the reference) and a non-empty `multiscale_masks` dict the segment masks.
"""

from __future__ import annotations

from typing import Any

import torch

from uhrbat.errors import BudgetError, ConfigError, PromptError

REFERENCE_IMAGE_INDEX = -200


def from_reference_call(
    model: Any, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
):
    cfg = model.config
    kwargs = dict(kwargs)
    ids = kwargs.pop("inputs", None) if input_ids is None else input_ids
    if ids is None:
        raise PromptError("generate needs inputs= (token ids with one -200 image placeholder)")
    pixels = kwargs.pop("multiscale_pixels", None)
    topk = kwargs.pop("multiscale_topk", None)
    sizes = kwargs.pop("multiscale_target_sizes", None)
    masks = kwargs.pop("multiscale_masks", None)
    for k in ("images", "image_sizes", "modalities"):
        kwargs.pop(k, None)
    if pixels is None:
        raise PromptError("multiscale_pixels is required with the reference call signature")
    if sizes is not None and [int(s) for s in sizes] != list(cfg.scales):
        raise ConfigError(f"multiscale_target_sizes {list(sizes)} differ from the model's scales {cfg.scales}")
    budgets = list(cfg.budgets) if topk is None else [int(k) for k in topk]
    if not budgets:
        raise BudgetError("multiscale_topk is empty")
    budgets = (budgets + [budgets[-1]] * len(cfg.scales))[: len(cfg.scales)]
    per_image = pixels if isinstance(pixels, (list, tuple)) else [pixels]
    tiles = []
    for d in per_image:
        missing = [s for s in cfg.scales if s not in d and str(s) not in d]
        if missing:
            raise PromptError(f"multiscale_pixels lacks scales {missing}")
        parts = []
        for s in cfg.scales:
            entry = d.get(s, d.get(str(s)))
            parts.append(entry["tiles"] if isinstance(entry, dict) else entry)
        tiles.append(torch.cat([p.reshape(-1, *p.shape[-3:]) for p in parts]))
    pixel_values = torch.stack(tiles)
    n_visual = sum(min(k, cfg.num_tokens(s)) for k, s in zip(budgets, cfg.scales))
    rows, masks_out = [], []
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    am = torch.ones_like(ids) if attention_mask is None else attention_mask
    for b in range(ids.shape[0]):
        r = ids[b][am[b].bool()].tolist()
        if r.count(REFERENCE_IMAGE_INDEX) != 1:
            raise PromptError(f"inputs row {b} must contain exactly one {REFERENCE_IMAGE_INDEX} image placeholder")
        p = r.index(REFERENCE_IMAGE_INDEX)
        rows.append(r[:p] + [cfg.image_token_id] * n_visual + r[p + 1 :])
    longest = max(len(r) for r in rows)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.text_config.eos_token_id or 0)
    pad = pad[0] if isinstance(pad, list) else pad
    new_ids = torch.full((len(rows), longest), int(pad), dtype=torch.long)
    new_mask = torch.zeros_like(new_ids)
    for b, r in enumerate(rows):
        new_ids[b, longest - len(r) :] = torch.tensor(r)
        new_mask[b, longest - len(r) :] = 1
    if masks is not None:
        for m in masks:
            masks_out.append(
                None
                if not m
                else {int(k): (v["masks"] if isinstance(v, dict) and "masks" in v else v) for k, v in m.items()}
            )
        if any(m is not None for m in masks_out):
            kwargs.setdefault("selector", "segments")
    return new_ids, new_mask, pixel_values, (masks_out or None), budgets, kwargs
