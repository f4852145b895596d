"""Intermediate tensors of one query under the parity fixtures' names (`uhrbat trace`).

The names follow `shared/parity/README.md` so any new case can be compared with the
reference the same way: input_ids (with the reference's single -200 placeholder),
attn.*, kmeans.{s}.*, select.{s}.*, merged.*, final.*, logits.last_prompt, gen.*.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from uhrbat.modeling.model_card import REFERENCE_IMAGE_INDEX
from uhrbat.modeling.trace import ImageTrace


def trace_query(
    pipe: Any, image: Any, question: str, max_new_tokens: int = 8, **options: Any
) -> dict[str, torch.Tensor]:
    """Run one query with greedy decoding and return its intermediates (CPU tensors)."""
    from uhrbat.io.sources import open_image

    model = pipe.model
    opts = pipe.options.updated(**options).given()  # the pipeline's defaults + this call's options
    proc = pipe.processor
    inputs = proc(images=[open_image(image)], text=[proc.build_prompt(question)], budgets=opts.get("budgets"))
    ids = inputs["input_ids"].to(pipe.device)
    mask = inputs["attention_mask"].to(pipe.device)
    tr = ImageTrace(want_clip=True)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=inputs["pixel_values"],
        traces=[tr],
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        do_sample=False,
        num_beams=1,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **opts,
    )
    n_vocab = model.config.vocab_in_use or model.config.text_config.vocab_size
    image_id = model.config.image_token_id
    row = ids[0].cpu()
    is_img = row == image_id
    start = int(is_img.nonzero()[0])
    n_img = int(is_img.sum())
    t: dict[str, torch.Tensor] = {}
    t["input_ids"] = torch.cat([row[:start], torch.tensor([REFERENCE_IMAGE_INDEX]), row[start + n_img :]])
    pv = inputs["pixel_values"][0]
    off = 0
    for s in model.config.scales:
        n = model.config.num_tiles(s)
        tiles = pv[off : off + n]
        off += n
        t[f"tiles.{s}.tile_channel_sum"] = tiles.double().sum(dim=(2, 3))
        t[f"tiles.{s}.tile_sha256_prefix"] = torch.tensor(
            [int(hashlib.sha256(x.numpy().tobytes()).hexdigest()[:12], 16) for x in tiles], dtype=torch.int64
        )
        t[f"clip_feats.{s}.token_norm"] = tr.clip_features[s].float().norm(dim=-1).cpu()
        t[f"vision_feats.{s}.token_norm"] = tr.features[s].float().norm(dim=-1).cpu()
        t[f"vision_feats.{s}.tile_sum"] = tr.features[s].double().sum(dim=(1, 2)).cpu()
        t[f"scale_residual.{s}"] = model.scale_residuals(s).detach().float().cpu()
        t[f"attn.by_scale.{s}"] = tr.relevance[s].float().cpu()
        sel = tr.selections[s]
        t[f"select.{s}.aggregated"] = sel.merged.long().cpu()
        t[f"select.{s}.score"] = sel.scores.double().cpu()
        t[f"select.{s}.cluster"] = sel.group.long().cpu()
        t[f"select.{s}.pos_flat"] = sel.positions.long().cpu()
        t[f"select.{s}.pos_offsets"] = sel.offsets.long().cpu()
        km = tr.kmeans.get(s)
        if km is not None:
            t[f"kmeans.{s}.init_idx"] = km.init_indices.long().cpu()
            t[f"kmeans.{s}.labels"] = km.labels.to(torch.int16).cpu()
            t[f"kmeans.{s}.labels_iter1"] = km.labels_iter1.to(torch.int16).cpu()
            t[f"kmeans.{s}.centers_iter1"] = km.centers_iter1.float().cpu()
    base = model.config.base_scale
    t[f"clip_feats.{base}"] = tr.clip_features[base].float().cpu()
    t[f"vision_feats.{base}"] = tr.features[base].float().cpu()
    t["attn.base_scale_attention"] = tr.relevance_base.float().cpu()
    t["merged.pre_mlp"] = tr.pre_mlp.float().cpu()
    t["merged.post_mlp"] = tr.post_mlp.float().cpu()
    # The LLM's input as the reference builds it: prompt text with the visual block spliced in.
    emb = model.get_input_embeddings()(row.masked_fill(is_img, 0).to(pipe.device)).detach().float().cpu()
    vis = tr.post_mlp.float().cpu()
    t["final.inputs_embeds"] = torch.cat([emb[:start], vis, emb[start + n_img :]])
    t["final.attention_mask"] = torch.ones(t["final.inputs_embeds"].shape[0], dtype=torch.int64)
    t["final.mm_input_ids"] = torch.cat(
        [row[:start], torch.full((vis.shape[0],), REFERENCE_IMAGE_INDEX), row[start + n_img :]]
    )
    logits = torch.stack([x[0] for x in out.logits]).float().cpu()[:, :n_vocab]
    scores = torch.stack([x[0] for x in out.scores]).float().cpu()[:, :n_vocab]
    t["logits.last_prompt"] = logits[0].clone()
    t["gen.step_logits_raw"] = logits
    t["gen.scores_processed"] = scores
    t["gen.new_token_ids"] = out.sequences[0].cpu().long()
    return t
