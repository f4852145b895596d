"""Validated records shared by the loaders, the benchmark modules, the scorers and the runner.

A `Sample` is one benchmark question in a format-independent shape. Loaders never raise on
a bad row: they return a `Sample` whose `error` says what is wrong (with the row index), and
the runner/scorers count it as an error that is never correct. A benchmark's row normaliser
gets a `LoadContext` and raises `RowError` / `ImageRowError` for a bad row.

This is the bottom layer of `uhrbat.evaluation`: it imports no other module of the package.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from uhrbat.errors import ImageLoadError

__all__ = [
    "ImageRef",
    "ImageRowError",
    "LoadContext",
    "Prediction",
    "RowError",
    "Sample",
    "decode_base64_image",
    "open_images",
    "pixel_limit",
]

# Remote-sensing images routinely exceed Pillow's 178-MP decompression-bomb guard; every
# official harness lifts it (lmms-eval tasks/xlrs/mcq_utils.py sets 1e9, LRS-VQA
# Script/evaluation_LRSVQA.py 1e10). We lift it only while *we* decode an image.
EVAL_MAX_IMAGE_PIXELS = 10_000_000_000


def pixel_limit(limit: int | None = EVAL_MAX_IMAGE_PIXELS) -> contextlib.AbstractContextManager[None]:
    """Pillow's decompression-bomb guard set to `limit` for one decode (the shared reader's lock-guarded helper)."""
    from uhrbat.io.images import pil_pixel_limit

    return pil_pixel_limit(limit)


class RowError(ValueError):
    """A row is malformed; becomes an error Sample."""


class ImageRowError(RowError):
    """A row's image is missing, outside the image root, or unusable; an error Sample of kind "image"."""


@dataclass
class LoadContext:
    """What a row normaliser may need: the benchmark, the data file, the image root and options.

    check_images: False when only scoring saved outputs (image problems are ignored);
    allow_outside: image paths may resolve outside `root`; notes: remarks for the report."""

    benchmark: str
    source: Path
    root: Path
    notes: list[str] = field(default_factory=list)
    check_images: bool = True
    allow_outside: bool = False
    _blobs: dict[bytes, bytes] = field(default_factory=dict)

    def blob(self, data: bytes) -> bytes:
        """Share identical embedded images (HR-Bench repeats each image in every option cycle)."""
        key = hashlib.blake2b(data, digest_size=16).digest()
        return self._blobs.setdefault(key, data)


@dataclass(frozen=True)
class ImageRef:
    """Where one image of a sample lives: an absolute file path or encoded bytes (never both)."""

    path: str | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("ImageRef needs exactly one of path / data")

    def describe(self) -> str:
        return self.path if self.path is not None else f"<embedded {len(self.data or b'')} bytes>"

    def to_json(self) -> str:
        return self.describe()

    def check(self) -> None:
        """Cheap readability check (file exists and its header is an image); raises ImageLoadError."""
        try:
            with pixel_limit():
                if self.path is not None:
                    p = Path(self.path)
                    if not p.is_file():
                        raise ImageLoadError(f"image not found: {p}")
                    with Image.open(p) as im:
                        _ = im.size  # header only
                else:
                    with Image.open(io.BytesIO(self.data or b"")) as im:
                        _ = im.size
        except ImageLoadError:
            raise
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
            raise ImageLoadError(f"unreadable image {self.describe()}: {type(e).__name__}: {e}") from e

    def open(self) -> Any:
        """An image source for the pipeline, through the shared reader (`uhrbat.io.open_image`:
        GeoTIFF/COG, huge PNG/JPEG, 16-bit, pixel limit); raises ImageLoadError on any failure."""
        from uhrbat.io.images import PILSource
        from uhrbat.io.sources import open_image

        if self.path is not None:
            p = Path(self.path)
            if not p.is_file():
                raise ImageLoadError(f"image not found: {p}")
            try:
                return open_image(p, max_pixels=EVAL_MAX_IMAGE_PIXELS)
            except ImageLoadError:
                raise
            except Exception as e:
                raise ImageLoadError(f"unreadable image {self.describe()}: {type(e).__name__}: {e}") from e
        return PILSource(self.open_pil())

    def open_pil(self) -> Image.Image:
        """Decode to an RGB PIL image (used to paste multi-image items side by side)."""
        from uhrbat.io.images import to_rgb

        try:
            with pixel_limit():
                if self.path is not None:
                    p = Path(self.path)
                    if not p.is_file():
                        raise ImageLoadError(f"image not found: {p}")
                    with Image.open(p) as im:
                        im.load()
                        return to_rgb(im)
                with Image.open(io.BytesIO(self.data or b"")) as im:
                    im.load()
                    return to_rgb(im)
        except ImageLoadError:
            raise
        except Exception as e:
            raise ImageLoadError(f"unreadable image {self.describe()}: {type(e).__name__}: {e}") from e


def decode_base64_image(text: str) -> bytes:
    """Decode a (possibly `data:image/...;base64,`-prefixed) base64 string; ValueError if invalid."""
    s = text.strip()
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode("".join(s.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64 image data: {e}") from e


def open_images(refs: list[ImageRef], gap: int = 0) -> Any:
    """Open one image, or paste several side by side (left to right, top-aligned) into one.

    The pipeline takes exactly one image per question; XLRS change-detection items carry two.
    Concatenation keeps every pixel visible to the model; it is recorded in each row.
    """
    if len(refs) == 1:
        return refs[0].open()
    images = [r.open_pil() for r in refs]
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    from uhrbat.io.images import PAD_RGB

    canvas = Image.new("RGB", (width, height), PAD_RGB)
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


class Sample(BaseModel):
    """One benchmark question, validated.

    `answer` is the ground truth exactly as distributed (some official scorers compare the raw
    string); `options` maps option letters to their text without the "(A)" prefix, and
    `option_lines` keeps the option strings as distributed (official prompts print those).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    id: str
    row: int = Field(ge=0, description="0-based row index in the source file")
    images: list[ImageRef] = Field(default_factory=list)
    question: str = ""
    options: dict[str, str] = Field(default_factory=dict)
    option_lines: list[str] = Field(default_factory=list)
    answer: str | None = None
    category: str | None = None
    subcategory: str | None = None
    source_format: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None  # "data" (malformed row) or "image" (missing / outside / unusable image)
    region: str | None = None  # the row's window of its image ("x0,y0,x1,y1"; map coordinates in region_crs)
    region_crs: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, v: Any) -> str:
        if v is None:
            raise ValueError("id is missing")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        s = str(v).strip()
        if not s:
            raise ValueError("id is empty")
        return s

    @field_validator("options")
    @classmethod
    def _letters(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if len(k) != 1 or not ("A" <= k <= "Z"):
                raise ValueError(f"option key {k!r} is not a single upper-case letter")
        return v

    @property
    def ok(self) -> bool:
        return self.error is None

    def region_kwargs(self) -> dict[str, Any]:
        """The row's region as reading options (empty without one)."""
        if self.region is None:
            return {}
        return {"region": self.region, **({"region_crs": self.region_crs} if self.region_crs else {})}


@dataclass
class Prediction:
    """One model output joined to a sample (by id). `output` None means no usable output."""

    id: str
    output: str | None = None
    error: str | None = None
    logit_choice: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Prediction:
        out = row.get("output")
        if out is not None and not isinstance(out, str):
            out = str(out)
        err = row.get("error")
        lc = row.get("logit_choice")
        rid = row["id"]
        if isinstance(rid, float) and rid.is_integer():
            rid = int(rid)
        return cls(
            id=str(rid).strip(),
            output=out,
            error=str(err) if err else None,
            logit_choice=lc if isinstance(lc, str) else None,
        )


def is_within(root: str | os.PathLike, candidate: str | os.PathLike) -> bool:
    """Lexical containment check (after normalising `..`), so symlinked data folders still work."""
    r = os.path.normpath(os.path.abspath(root))
    c = os.path.normpath(os.path.abspath(candidate))
    return c == r or c.startswith(r.rstrip(os.sep) + os.sep)
