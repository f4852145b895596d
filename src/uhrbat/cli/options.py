"""Every option shared by the commands that run the model, defined once.

Commands declare a parameter with one of these `Annotated` aliases and give the default in
their own signature (`budgets: Budgets = None`), so `--budgets` means, parses and validates the
same everywhere (`ask`, `chat`, `trace`, `eval`, `demo`, `serve`, `batch`). Malformed values are
usage errors (click's "Usage: ... / Error: Invalid value for '--x': ..." format) raised while the
command line is parsed, i.e. before an image or a model is loaded. Options whose default comes
from the checkpoint say so in their help, with the released model's value.

Helpers turn the parsed values into keyword arguments:
`selection_kwargs(...)` -> `UhrBatPipeline.ask(**)` / `from_pretrained(**)` selection keys,
`load_kwargs(...)` -> `UhrBatPipeline.from_pretrained(**)`, `read_kwargs(...)` -> `open_image(**)`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from uhrbat.errors import UhrBatError

SELECTORS = ("kmeans", "segments", "topk")
KMEANS_MODES = ("fast", "exact")
COMPAT_MODES = ("none", "reference")
DTYPES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")

DEFAULT_MAX_PIXELS = 1_500_000_000  # == uhrbat.io.images.DEFAULT_MAX_PIXELS (checked in tests)
DEFAULT_STRETCH = "2,98"


# ----------------------------------------------------------------------------- parsers (callbacks)
def _budgets(value: Optional[str]) -> Optional[list[int]]:
    """`--budgets` text -> list of ints via the one budget parser (the count is checked
    against the model's scales once the model is loaded)."""
    if value is None:
        return None
    from uhrbat.processing.processing_uhrbat import parse_budgets

    try:
        return parse_budgets(value)
    except UhrBatError as e:
        raise typer.BadParameter(str(e)) from None


def _bands(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    from uhrbat.io.images import parse_bands

    try:
        bands = parse_bands(value)
    except UhrBatError as e:
        raise typer.BadParameter(str(e)) from None
    if not bands or len(bands) not in (1, 3) or any(b < 1 for b in bands):
        raise typer.BadParameter(f"give 1 band (grey) or 3 bands (R,G,B), 1-based, e.g. 4,3,2; got {value!r}")
    return bands


def _stretch(value: Optional[str]) -> Optional[tuple[float, float]]:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise typer.BadParameter(f"give two percentiles LOW,HIGH, e.g. 2,98; got {value!r}") from None
    if not 0 <= lo < hi <= 100:
        raise typer.BadParameter(f"percentiles must satisfy 0 <= LOW < HIGH <= 100, e.g. 2,98; got {value!r}")
    return lo, hi


def check_writable(path: Path) -> Path:
    """Raise `typer.BadParameter` unless `path` can be written as a file. Nothing is left behind:
    an existing file is opened for appending and closed untouched; otherwise a temporary file is
    created and removed in its folder (this also catches read-only filesystems, even as root)."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file name inside it, e.g. {path / 'out'}")
    parent = path.parent
    if not parent.is_dir():
        raise typer.BadParameter(f"folder {parent} does not exist; create it first (mkdir -p {parent})")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".uhrbat-write-check-"):
                pass
    except OSError as e:
        raise typer.BadParameter(f"cannot write {path} ({e.strerror}); choose a writable location") from None
    return path


def _out_file(value: Optional[Path]) -> Optional[Path]:
    return None if value is None else check_writable(value)


# ----------------------------------------------------------------------------- model / device
Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        metavar="DIR|HUB_ID",
        help="Checkpoint folder or hub id (this package's format or the reference's LlavaQwen format).",
    ),
]
Device = Annotated[str, typer.Option("--device", help="Where to run: cpu, cuda, cuda:1, ...")]
Dtype = Annotated[
    Optional[Literal[DTYPES]],
    typer.Option(  # type: ignore[valid-type]
        "--dtype", help="Weights dtype.  [default: the dtype the checkpoint was saved in]"
    ),
]
Attn = Annotated[
    Optional[Literal[ATTN_IMPLEMENTATIONS]],
    typer.Option(  # type: ignore[valid-type]
        "--attn",
        help="LLM attention implementation "
        "(unset: flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else sdpa).",
    ),
]
VisionTower = Annotated[
    Optional[str],
    typer.Option(
        "--vision-tower",
        metavar="DIR",
        help="CLIP folder, for reference checkpoints that do not ship one.  [default: the checkpoint's]",
    ),
]
Compat = Annotated[
    Optional[Literal[COMPAT_MODES]],
    typer.Option(  # type: ignore[valid-type]
        "--compat",
        help="reference: reproduce the reference's inference bugs (ChatML specials -> EOS, first answer line only).  "
        "[default: the checkpoint's: none]",
    ),
]
CacheDir = Annotated[
    Optional[Path],
    typer.Option(
        "--cache-dir",
        file_okay=False,
        metavar="DIR",
        help="Also keep prepared scenes (tiles, CLIP features, groups) on disk here, reused across runs.  "
        "[default: memory only]",
    ),
]

# ----------------------------------------------------------------------------- token selection
Budgets = Annotated[
    Optional[str],
    typer.Option(
        "--budgets",
        metavar="B1,B2,...",
        callback=_budgets,
        help="Visual tokens kept per scale: comma-separated integers >= 0, one per scale, not all 0.  "
        "[default: the checkpoint's: 80,320,600,2000 for the released model]",
    ),
]
Selector = Annotated[
    Optional[Literal[SELECTORS]],
    typer.Option(  # type: ignore[valid-type]
        "--selector", help="How tokens are grouped before preserve-and-merge.  [default: the checkpoint's: kmeans]"
    ),
]
Clusters = Annotated[
    Optional[int],
    typer.Option(
        "--clusters",
        min=0,
        help="K-Means clusters per scale; 0 = the scale's budget.  [default: the checkpoint's: 3000 for the "
        "released model (clamped to the tokens at each scale)]",
    ),
]
Iters = Annotated[
    Optional[int],
    typer.Option(
        "--iters",
        min=1,
        help="Maximum K-Means (Lloyd) iterations.  [default: the checkpoint's: 10 for the released model]",
    ),
]
Seed = Annotated[
    Optional[int], typer.Option("--seed", help="Seed of the K-Means initialisation.  [default: the checkpoint's: 0]")
]
KMeans = Annotated[
    Optional[Literal[KMEANS_MODES]],
    typer.Option(  # type: ignore[valid-type]
        "--kmeans",
        help="fast: same clustering, less work; exact: the reference's loop order, bit for bit.  "
        "[default: the checkpoint's: fast]",
    ),
]
Masks = Annotated[
    Optional[Path],
    typer.Option(
        "--masks",
        exists=True,
        dir_okay=False,
        metavar="FILE",
        help="Segment-id mask file (from `uhrbat masks`), required by --selector segments.",
    ),
]

# ----------------------------------------------------------------------------- generation
MaxNewTokens = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens.")]

# ----------------------------------------------------------------------------- image reading
Bands = Annotated[
    Optional[str],
    typer.Option(
        "--bands",
        metavar="R,G,B",
        callback=_bands,
        help="Raster bands to use as R,G,B (or one grey band), 1-based, e.g. 4,3,2.  "
        "[default: the image's colour bands]",
    ),
]
Stretch = Annotated[
    str,
    typer.Option(
        "--stretch", metavar="LOW,HIGH", callback=_stretch, help="Percentiles that map 16-bit/float bands to 8-bit."
    ),
]
MaxPixels = Annotated[
    int, typer.Option("--max-pixels", min=0, help="Refuse images with more full-resolution pixels (0 = no limit).")
]

# ----------------------------------------------------------------------------- outputs
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of the plain answer.")]
GeoJson = Annotated[
    Optional[Path],
    typer.Option(
        "--geojson",
        dir_okay=False,
        metavar="FILE",
        callback=_out_file,
        help="Write the kept tokens as GeoJSON (checked writable before the model runs).",
    ),
]
Explain = Annotated[
    Optional[Path],
    typer.Option(
        "--explain",
        dir_okay=False,
        metavar="FILE.png",
        callback=_out_file,
        help="Write an overlay PNG of relevance and kept tokens (checked writable before the model runs).",
    ),
]


# ----------------------------------------------------------------------------- helpers
def selection_kwargs(
    budgets: Optional[list[int]] = None,
    selector: Optional[str] = None,
    clusters: Optional[int] = None,
    iters: Optional[int] = None,
    seed: Optional[int] = None,
    kmeans: Optional[str] = None,
) -> dict[str, Any]:
    """Parsed selection options -> the pipeline's keyword arguments (unset ones left out, so the
    checkpoint's values apply)."""
    sel = {
        "budgets": budgets,
        "selector": selector,
        "kmeans_clusters": clusters,
        "kmeans_iters": iters,
        "seed": seed,
        "kmeans_mode": kmeans,
    }
    return {k: v for k, v in sel.items() if v is not None}


def load_kwargs(
    device: str = "cpu",
    dtype: Optional[str] = None,
    attn: Optional[str] = None,
    vision_tower: Optional[str] = None,
    compat: Optional[str] = None,
    cache_dir: Optional[Path] = None,
) -> dict[str, Any]:
    """Parsed model options -> `UhrBatPipeline.from_pretrained` keyword arguments. The device is
    checked here (before any image or weight is read) when `uhrbat.devices` is available."""
    try:
        from uhrbat.devices import resolve_device
    except ImportError:
        resolve_device = None
    if resolve_device is not None and device != "auto":
        resolve_device(device)  # raises ConfigError with one line, e.g. when CUDA is missing
    out: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "vision_tower": vision_tower,
        "attn_implementation": attn,
        "compat": compat,
    }
    if cache_dir is not None:
        out["cache_dir"] = str(cache_dir)
    return out


def read_kwargs(
    bands: Optional[tuple[int, ...]] = None,
    stretch: Optional[tuple[float, float]] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Parsed image-reading options -> `uhrbat.io.open_image` keyword arguments."""
    out: dict[str, Any] = {"bands": bands, "max_pixels": None if max_pixels == 0 else max_pixels}
    if stretch is not None:
        out["stretch"] = stretch
    return out


__all__ = [
    "Attn",
    "Bands",
    "Budgets",
    "CacheDir",
    "Clusters",
    "Compat",
    "Device",
    "Dtype",
    "Explain",
    "GeoJson",
    "Iters",
    "Json",
    "KMeans",
    "Masks",
    "MaxNewTokens",
    "MaxPixels",
    "Model",
    "Seed",
    "Selector",
    "Stretch",
    "VisionTower",
    "check_writable",
    "load_kwargs",
    "read_kwargs",
    "selection_kwargs",
]
