"""SAM segment masks for the `segments` selector and training (`uhrbat masks`).

Per image (method §4.3, with the producer the reference never shipped):

1. the image is padded to the centred square and resized to `resolution` (default 1024) through
   `uhrbat.io.images.open_image`, the same geometry as the model's pyramid;
2. automatic mask generation with transformers' `SamModel` (no torchvision needed): a
   `points_per_side²` grid of point prompts, three masks per point, kept when the predicted IoU
   and the stability score pass their thresholds, then greedy box-NMS;
3. masks are painted into an int32 id map **by area, descending** (ids 1..M, so smaller masks
   overwrite larger ones; 0 = no segment, and the padding outside the image is 0);
4. per pyramid scale S the map is NEAREST-resized to S×S, cut into the row-major 336-px tiles, and
   each 14×14 pixel block gets its **majority** id (ties: the smallest id) -> int32 `[g², 24, 24]`.

Output: one safetensors file per image, `<out>/<sanitized relative path>.safetensors`
(`a/b.png` -> `a__b.png.safetensors`) with keys `scale.{S}`; with `keep_pixels` also `pixels`
(the working id map). Existing outputs are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uhrbat.configuration.geometry import CLIP_336_14
from uhrbat.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".jp2", ".gif"}
FORMAT = "uhrbat-segments"


@dataclass
class MaskSettings:
    """Automatic mask generation knobs (SAM's `SamAutomaticMaskGenerator` defaults)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    min_mask_area: int = 0
    resolution: int = 1024

    def check(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ConfigError("points_per_side and points_per_batch must be >= 1")
        if self.resolution < 14:
            raise ConfigError(f"resolution must be >= 14, got {self.resolution}")


# ----------------------------------------------------------------------------- id maps -> tiles
def paint_by_area(masks: Sequence[np.ndarray] | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean masks -> int32 id map: sorted by area descending, painted in order with ids 1..M."""
    out = np.zeros(shape, dtype=np.int32)
    if len(masks) == 0:
        return out
    areas = [int(np.count_nonzero(m)) for m in masks]
    order = sorted(range(len(masks)), key=lambda i: -areas[i])  # stable: ties keep input order
    for new_id, i in enumerate(order, start=1):
        m = masks[i]
        if m.shape != shape:  # as the reference: a mask of another size is resized NEAREST
            from PIL import Image

            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(shape[::-1], Image.Resampling.NEAREST)) > 0
        out[m] = new_id
    return out


def relabel(ids: np.ndarray) -> np.ndarray:
    """Renumber the non-zero ids to 1..M keeping their order (0 stays 0)."""
    vals = np.unique(ids)
    vals = vals[vals != 0]
    lut = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=np.int32)
    lut[vals] = np.arange(1, len(vals) + 1, dtype=np.int32)
    return lut[ids]


def block_majority(labels: np.ndarray, block: int) -> np.ndarray:
    """`[R, C]` ids -> `[R/block, C/block]` majority id per block (ties: the smallest id)."""
    r, c = labels.shape[0] // block, labels.shape[1] // block
    x = labels[: r * block, : c * block].reshape(r, block, c, block).transpose(0, 2, 1, 3).reshape(r * c, block * block)
    s = np.sort(x, axis=1)
    starts = np.ones(s.shape, dtype=bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    run = np.cumsum(starts, axis=1, dtype=np.int32) - 1
    n = s.shape[1]
    rows = np.arange(s.shape[0], dtype=np.int64)[:, None]
    counts = np.bincount((rows * n + run).ravel(), minlength=s.shape[0] * n).reshape(s.shape[0], n)
    best = counts.argmax(axis=1)  # first maximum = smallest id among ties (runs are ascending)
    pos = np.argmax(run == best[:, None], axis=1)
    return s[np.arange(s.shape[0]), pos].reshape(r, c).astype(np.int32)


def tile_masks(
    square_ids: np.ndarray, scale: int, tile: int = CLIP_336_14.tile_size, patch: int = CLIP_336_14.patch_size
) -> torch.Tensor:
    """Square id map (the padded image) -> int32 `[g², t, t]` tile-format mask at `scale`."""
    from PIL import Image

    if square_ids.shape[0] != square_ids.shape[1]:
        raise ValueError(f"expected a square id map, got {square_ids.shape}")
    img = Image.fromarray(square_ids.astype(np.int32), mode="I")
    big = np.asarray(img.resize((scale, scale), Image.Resampling.NEAREST), dtype=np.int32)
    g, t = scale // tile, tile // patch
    tok = block_majority(big[: g * tile, : g * tile], patch)  # [g*t, g*t]
    return torch.from_numpy(np.ascontiguousarray(tok.reshape(g, t, g, t).transpose(0, 2, 1, 3).reshape(g * g, t, t)))


def image_rect_on_square(size: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the image inside its padded square resized to `side`."""
    from uhrbat.io.images import pad_offsets

    W, H = size
    L, ox, oy = pad_offsets(size)
    f = side / L
    return int(round(ox * f)), int(round(oy * f)), int(round((ox + W) * f)), int(round((oy + H) * f))


# ----------------------------------------------------------------------------- SAM AMG
def _point_grid(n: int) -> np.ndarray:
    offset = 1 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def _stability(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    inter = (logits > threshold + offset).flatten(-2).sum(-1, dtype=torch.int32)
    union = (logits > threshold - offset).flatten(-2).sum(-1, dtype=torch.int32)
    return inter.float() / union.clamp_min(1).float()


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """`[M, H, W]` bool -> `[M, 4]` xyxy boxes (0s for empty masks)."""
    if masks.numel() == 0:
        return torch.zeros(0, 4)
    rows, cols = masks.any(-1), masks.any(-2)
    h, w = masks.shape[-2:]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    y0 = torch.where(rows, ar_h, h).min(-1).values
    y1 = torch.where(rows, ar_h, -1).max(-1).values
    x0 = torch.where(cols, ar_w, w).min(-1).values
    x1 = torch.where(cols, ar_w, -1).max(-1).values
    return torch.stack([x0, y0, x1, y1], -1).float()


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Greedy NMS (torchvision.ops.nms semantics); returns kept indices, by descending score."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    area = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp_min(1e-9)
    keep: list[int] = []
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > thresh
    return order[torch.tensor(keep, dtype=torch.long)]


class SamMaskGenerator:
    """Automatic mask generation with a transformers `SamModel` (grid-point prompting)."""

    def __init__(self, model: Any, image_processor: Any, settings: MaskSettings | None = None) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self.settings = settings or MaskSettings()
        self.settings.check()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        settings: MaskSettings | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
    ) -> SamMaskGenerator:
        from transformers import SamModel

        from uhrbat.devices import resolve_device
        from uhrbat.modeling.loading import resolve_dtype

        device = resolve_device(device)  # one clear line when e.g. CUDA is not available here
        p = Path(path)
        if not (p / "config.json").exists():
            if str(path).startswith((".", "/")) or p.exists():
                raise ConfigError(f"SAM checkpoint folder not found or has no config.json: {path}")
        try:
            model = SamModel.from_pretrained(str(path), dtype=resolve_dtype(dtype, device))
        except OSError as e:
            raise ConfigError(f"cannot load SAM from {path}: {e}") from e
        return cls(model.to(device), sam_image_processor(path, model.config), settings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, image: Any) -> list[dict[str, Any]]:
        """PIL RGB image -> SAM records.

        Each record: `segmentation` bool [H, W], `area`, `predicted_iou`, `stability_score`, `bbox`."""
        st = self.settings
        inputs = self.image_processor(images=image, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        emb = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device, dtype))
        h, w = (int(v) for v in inputs["reshaped_input_sizes"][0])
        H, W = (int(v) for v in inputs["original_sizes"][0])
        grid = torch.from_numpy(_point_grid(st.points_per_side)).float() * torch.tensor([w, h], dtype=torch.float32)
        all_masks, all_iou, all_stab = [], [], []
        for i in range(0, grid.shape[0], st.points_per_batch):
            pts = grid[i : i + st.points_per_batch].to(self.device, dtype)
            out = self.model(
                image_embeddings=emb,
                input_points=pts[None, :, None, :],
                input_labels=torch.ones(1, pts.shape[0], 1, dtype=torch.long, device=self.device),
                multimask_output=True,
            )
            low = out.pred_masks[0].float()  # [P, 3, h', w']
            iou = out.iou_scores[0].float()  # [P, 3]
            low, iou = low.flatten(0, 1), iou.flatten(0, 1)
            keep = iou > st.pred_iou_thresh if st.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
            if not keep.any():
                continue
            low, iou = low[keep], iou[keep]
            # Upscale only the survivors, in small chunks (each is H x W float).
            for j in range(0, low.shape[0], 16):
                logits = self.image_processor.post_process_masks(
                    [low[j : j + 16, None].cpu()], [(H, W)], [(h, w)], binarize=False
                )[0][:, 0]
                stab = _stability(logits, st.mask_threshold, st.stability_score_offset)
                ok = (
                    stab > st.stability_score_thresh
                    if st.stability_score_thresh > 0
                    else torch.ones_like(stab, dtype=torch.bool)
                )
                binm = logits[ok] > st.mask_threshold
                all_masks.append(binm)
                all_iou.append(iou[j : j + 16][ok.to(iou.device)].cpu())
                all_stab.append(stab[ok])
        if not all_masks:
            return []
        masks = torch.cat(all_masks)
        iou, stab = torch.cat(all_iou), torch.cat(all_stab)
        area = masks.flatten(1).sum(-1)
        ok = area > max(0, st.min_mask_area - 1)
        masks, iou, stab, area = masks[ok], iou[ok], stab[ok], area[ok]
        boxes = _boxes(masks)
        keep = box_nms(boxes, iou, st.box_nms_thresh)
        return [
            {
                "segmentation": masks[k].numpy(),
                "area": int(area[k]),
                "predicted_iou": float(iou[k]),
                "stability_score": float(stab[k]),
                "bbox": boxes[k].tolist(),
            }
            for k in keep.tolist()
        ]


def sam_image_processor(path: str | os.PathLike, config: Any) -> Any:
    """The checkpoint's SAM image processor (PIL backend: no torchvision), sized for the model."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    if (Path(path) / "preprocessor_config.json").exists():
        try:
            return SamImageProcessorPil.from_pretrained(str(path))
        except Exception:  # a fast-processor config this backend cannot read: rebuild from the model config
            pass
    side = int(config.vision_config.image_size)
    low = side // int(config.vision_config.patch_size) * 4
    return SamImageProcessorPil(
        size={"longest_edge": side},
        pad_size={"height": side, "width": side},
        mask_size={"longest_edge": low},
        mask_pad_size={"height": low, "width": low},
    )


# ----------------------------------------------------------------------------- files
def segment_map(generator: SamMaskGenerator, image_path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int], int]:
    """Image -> (square int32 id map at `settings.resolution`, original (W, H), number of SAM masks)."""
    from uhrbat.io.sources import open_image

    src = open_image(image_path)
    side = generator.settings.resolution
    square = src.square(side)
    records = generator.generate(square)
    ids = paint_by_area([r["segmentation"] for r in records], (side, side))
    x0, y0, x1, y1 = image_rect_on_square(tuple(src.size), side)
    outside = np.ones_like(ids, dtype=bool)
    outside[y0:y1, x0:x1] = False
    ids[outside] = 0  # padding is background, as in the reference
    return relabel(ids), tuple(src.size), len(records)


def masks_from_map(
    ids: np.ndarray, scales: Sequence[int], tile: int = CLIP_336_14.tile_size, patch: int = CLIP_336_14.patch_size
) -> dict[str, torch.Tensor]:
    return {f"scale.{s}": tile_masks(ids, s, tile, patch) for s in scales}


def output_path(out_dir: Path, rel: str) -> Path:
    from uhrbat.training.data import sanitize

    return out_dir / f"{sanitize(rel)}.safetensors"


def is_complete(path: Path, scales: Sequence[int]) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    except Exception:
        return False
    return all(f"scale.{s}" in keys for s in scales)


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class MaskReport:
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.written} mask files written, {self.skipped} already present, "
            f"{len(self.failed)} failed ({self.seconds:.1f}s)"
        )


def generate_masks(
    images: str | os.PathLike,
    out: str | os.PathLike,
    sam: str | os.PathLike | SamMaskGenerator,
    scales: Sequence[int] = (672, 1344, 2688, 4032),
    settings: MaskSettings | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    keep_pixels: bool = False,
    limit: int | None = None,
    tile: int = CLIP_336_14.tile_size,
    patch: int = CLIP_336_14.patch_size,
    progress: Callable[[str], None] | None = None,
) -> MaskReport:
    """Write one tile-format mask file per image under `out` (existing complete files are skipped)."""
    from safetensors.torch import save_file

    root, out_dir = Path(images), Path(out)
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = list_images(root)
    if limit is not None:
        files = files[:limit]
    report = MaskReport()
    t0 = time.perf_counter()
    todo = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        dst = output_path(out_dir, rel)
        if is_complete(dst, scales):
            report.skipped += 1
        else:
            todo.append((p, rel, dst))
    if todo:
        gen = (
            sam if isinstance(sam, SamMaskGenerator) else SamMaskGenerator.from_pretrained(sam, settings, device, dtype)
        )
        for k, (p, rel, dst) in enumerate(todo):
            try:
                ids, size, n = segment_map(gen, p)
                tensors = masks_from_map(ids, scales, tile, patch)
                if keep_pixels:
                    tensors["pixels"] = torch.from_numpy(ids)
                meta = {
                    "format": FORMAT,
                    "version": "1",
                    "image": rel,
                    "width": str(size[0]),
                    "height": str(size[1]),
                    "segments": str(int(ids.max())),
                    "sam_masks": str(n),
                    "resolution": str(gen.settings.resolution),
                    "sam": str(sam) if not isinstance(sam, SamMaskGenerator) else "in-memory",
                }
                tmp = dst.with_name(dst.name + ".tmp")
                save_file(tensors, str(tmp), metadata=meta)
                os.replace(tmp, dst)
                report.written += 1
                if progress:
                    progress(f"[{k + 1}/{len(todo)}] {rel}: {int(ids.max())} segments")
            except Exception as e:  # one bad image must not stop a long run
                report.failed.append((rel, f"{type(e).__name__}: {e}"))
                if progress:
                    progress(f"[{k + 1}/{len(todo)}] {rel}: FAILED {type(e).__name__}: {e}")
    report.seconds = time.perf_counter() - t0
    return report
