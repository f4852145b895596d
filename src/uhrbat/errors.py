"""Typed exceptions. Every user-facing failure is one of these, with a one-line message
that names the offending input; the CLI prints the message and exits non-zero."""

from __future__ import annotations


class UhrBatError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageLoadError(UhrBatError, ValueError):
    """An image is missing, unreadable, corrupt, not an image, or too large."""


class BudgetError(UhrBatError, ValueError):
    """Per-scale token budgets are malformed (negative, non-integer, wrong length, ...)."""


class ContextOverflowError(BudgetError):
    """Visual tokens + prompt would exceed the model's context length."""


class PromptError(UhrBatError, ValueError):
    """A prompt has zero or several `<image>` markers, or is otherwise malformed."""


class ConfigError(UhrBatError, ValueError):
    """A configuration value is invalid."""


class CheckpointError(UhrBatError):
    """A checkpoint folder is missing weights / residuals or has unexpected contents."""


class MaskError(UhrBatError, ValueError):
    """A segment mask has the wrong shape or cannot be read."""


class BenchmarkDataError(UhrBatError, ValueError):
    """A benchmark file or row is malformed."""


class RunLockedError(UhrBatError):
    """An output directory is in use by another run (an advisory lock is held on it)."""


class RunFileError(UhrBatError):
    """A file of an `eval` / `batch` run folder is corrupt or in the way (the message names the
    file, the line and the fix; such files are never rewritten or skipped silently)."""


class BatchInputError(UhrBatError, ValueError):
    """A `uhrbat batch` input list is malformed (unreadable file, missing column, duplicate ids, ...)."""


class BatchEngineError(UhrBatError):
    """A `uhrbat batch` engine failed as a whole (e.g. the Ray job died); rerun to resume."""


class ServerBusyError(UhrBatError):
    """`uhrbat serve`'s request queue is full (the server answers 503 with Retry-After)."""


class DecodeBusyError(UhrBatError):
    """Every `uhrbat.io.decode_section()` slot stayed busy past the caller's timeout."""


class GeoError(UhrBatError, ValueError):
    """Map coordinates cannot be produced for an image: no (usable) georeference, or a CRS that
    cannot be transformed. Raised by `uhrbat.io.geo`; callers turn it into one error row / 400."""


class NotGeoreferencedError(GeoError):
    """Map output (GeoJSON, GeoTIFF, world file) asked for an image without a georeference."""


class GeoTransformError(GeoError):
    """The image's CRS cannot be transformed to the one asked for (e.g. WGS84)."""


class RegionError(UhrBatError, ValueError):
    """A region (pixels, map coordinates or GeoJSON) is malformed or does not fit the image."""
