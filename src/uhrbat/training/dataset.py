"""Lazy SFT dataset: manifest rows -> token ids / labels (eager, cheap) + image tiles (lazy)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from uhrbat.errors import UhrBatError
from uhrbat.training.data import Sample, read_manifest, read_mask_file
from uhrbat.training.tokenize import TokenizeOptions, encode_conversation

logger = logging.getLogger(__name__)


@dataclass
class Dropped:
    id: str
    reason: str


class SftDataset(Dataset):
    """Training samples of a manifest.

    At construction every conversation is tokenised once (text only, no image I/O) to drop
    samples that cannot train: too long for `max_length` with the visual tokens, no supervised
    tokens, malformed turns. They are listed in `self.dropped` and logged, never raised mid-run.
    Images (and masks) are read lazily in `__getitem__` through
    `processor.image_processor.pyramid`.

    Args:
        manifest: a JSONL manifest path or a list of `Sample`.
        processor: the model's `UhrBatProcessor`.
        budgets: visual tokens per scale used in training.
        max_length: longest sample in tokens (visual tokens included).
        options: `TokenizeOptions` (layout / labels / query).
        use_masks: read per-image segment masks named in the manifest.
    """

    def __init__(
        self,
        manifest: str | Sequence[Sample],
        processor: Any,
        budgets: Sequence[int],
        max_length: int | None = 5000,
        options: TokenizeOptions | None = None,
        use_masks: bool = True,
    ) -> None:
        self.processor = processor
        self.budgets = list(budgets)
        self.num_visual = processor.num_visual_tokens(self.budgets)
        self.max_length = max_length
        self.options = options or TokenizeOptions()
        self.use_masks = use_masks
        samples = (
            read_manifest(manifest)
            if isinstance(manifest, (str, bytes)) or hasattr(manifest, "__fspath__")
            else list(manifest)
        )
        self.samples: list[Sample] = []
        self.lengths: list[int] = []
        self.dropped: list[Dropped] = []
        for s in samples:
            try:
                enc = self.encode(s)
            except UhrBatError as e:
                self.dropped.append(Dropped(s.id, str(e)))
                continue
            self.samples.append(s)
            self.lengths.append(len(enc))
        if self.dropped:
            logger.warning(
                "dropped %d of %d samples that cannot train, e.g. %s: %s",
                len(self.dropped),
                len(samples),
                self.dropped[0].id,
                self.dropped[0].reason,
            )
        if not self.samples:
            raise UhrBatError(
                f"no trainable samples ({len(self.dropped)} dropped; first: "
                f"{self.dropped[0].reason if self.dropped else 'empty manifest'})"
            )

    def encode(self, sample: Sample):
        return encode_conversation(self.processor, sample.messages, self.num_visual, self.max_length, self.options)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, sample: Sample) -> torch.Tensor:
        tiles, _ = self.processor.image_processor.pyramid(sample.image)
        return tiles

    def __getitem__(self, i: int) -> dict[str, Any]:
        # An image that became unreadable since `prepare-sft` is replaced by the next sample
        # (deterministically, so a resumed run sees the same batches) instead of killing the run.
        for attempt in range(len(self.samples)):
            s = self.samples[(i + attempt) % len(self.samples)]
            try:
                tiles = self.load_image(s)
                masks = read_mask_file(s.masks) if (self.use_masks and s.masks) else None
            except (UhrBatError, OSError, ValueError) as e:
                logger.warning("sample %s unreadable (%s); using the next one", s.id, e)
                continue
            enc = self.encode(s)
            return {
                "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                "labels": torch.tensor(enc.labels, dtype=torch.long),
                "query_index": enc.query_index,
                "pixel_values": tiles,
                "image_masks": masks,
            }
        raise UhrBatError("every sample's image is unreadable")
