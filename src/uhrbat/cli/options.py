"""Every option shared by the commands that run the model, read from the one vocabulary.

The names, help texts, choices and checks come from `uhrbat.options` (selection, generation,
reading) and the selector registry (`uhrbat.selectors`), so `--kmeans-clusters` means, parses
and validates the same here as `kmeans_clusters=` in Python, `/kmeans-clusters` in chat and
`kmeans_clusters` in HTTP bodies and batch/eval configs. The old flags `--clusters`, `--iters`
and `--kmeans` stay as aliases. Malformed values are usage errors (click's "Usage: ... / Error:
Invalid value for '--x': ..." format) raised while the command line is parsed, i.e. before an
image or a model is loaded. Options whose default comes from the checkpoint say so in their
help, with the released model's value.

Two ways to use them: a command declares a parameter with one of the `Annotated` aliases below
(`budgets: Budgets = None`), or takes whole groups with `@shared(...)` and receives them as one
`Shared` object. Helpers turn parsed values into keyword arguments: `selection_kwargs(...)`,
`load_kwargs(...)`, `read_kwargs(...)`.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer

from uhrbat.errors import UhrBatError
from uhrbat.modeling.hub import DEFAULT_MODEL
from uhrbat.options import (
    COMPAT_MODES,
    DEFAULT_MAX_PIXELS,
    ENCODE_MODES,
    KMEANS_MODES,
    MAX_ZOOM,
    GenerationOptions,
    ReadOptions,
    SelectionOptions,
    field_flags,
    parse_budgets,
)
from uhrbat.selectors import selector_names

SELECTOR_NAMES = selector_names()
DTYPES = ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DEFAULT_STRETCH = "2,98"  # the text form of uhrbat.options.DEFAULT_STRETCH


# ----------------------------------------------------------------------------- parsers (callbacks)
def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A Typer callback: None passes, a `UhrBatError` becomes a usage error."""

    def callback(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except UhrBatError as e:
            raise typer.BadParameter(str(e)) from None

    return callback


def _field_check(model: type, name: str) -> Callable[[Any], Any]:
    """The vocabulary's own validation of one field (`SelectionOptions.of(gate_margin=...)`)."""
    return _checked(lambda v: getattr(model.of(**{name: v}), name))


_budgets = _checked(parse_budgets)  # the count is checked against the model's scales once it is loaded
_bands = _field_check(ReadOptions, "bands")
_stretch = _field_check(ReadOptions, "stretch")
_gate_margin = _field_check(SelectionOptions, "gate_margin")


def _region_syntax(value: Any) -> Any:
    """--region: four numbers (whether they are whole pixels depends on --region-crs, which is
    checked with them once every flag is parsed: `read_kwargs`)."""
    from uhrbat.io.regions import region_numbers

    region_numbers(value)
    return value


_region = _checked(_region_syntax)


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


def _help(model: type, name: str, default: str = "") -> str:
    """Help text of a vocabulary field: its description, capitalised, plus the default note."""
    text = model.model_fields[name].description
    return text[0].upper() + text[1:] + "." + (f"  [default: {default}]" if default else "")


def _flags(model: type, name: str) -> list[str]:
    return field_flags(model, name)


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
        help="Also keep prepared scenes (CLIP features, groups) on disk here, reused across runs; the folder is "
        "bounded (oldest files deleted past 32 GiB).  [default: memory only]",
    ),
]

# ----------------------------------------------------------------------------- token selection
_S = SelectionOptions
Budgets = Annotated[
    Optional[str],
    typer.Option(
        *_flags(_S, "budgets"),
        metavar="B1,B2,...",
        callback=_budgets,
        help=_help(_S, "budgets", "the checkpoint's: 80,320,600,2000 for the released model"),
    ),
]
Selector = Annotated[
    Optional[Literal[SELECTOR_NAMES]],
    typer.Option(  # type: ignore[valid-type]
        *_flags(_S, "selector"), help=_help(_S, "selector", "the checkpoint's: kmeans")
    ),
]
KMeansClusters = Annotated[
    Optional[int],
    typer.Option(
        *_flags(_S, "kmeans_clusters"),
        min=0,
        metavar="K",
        help=_help(
            _S,
            "kmeans_clusters",
            "the checkpoint's: 3000 for the released model (clamped to the tokens at each scale)",
        ),
    ),
]
KMeansIters = Annotated[
    Optional[int],
    typer.Option(
        *_flags(_S, "kmeans_iters"),
        min=1,
        metavar="N",
        help=_help(_S, "kmeans_iters", "the checkpoint's: 10 for the released model"),
    ),
]
Seed = Annotated[Optional[int], typer.Option(*_flags(_S, "seed"), help=_help(_S, "seed", "the checkpoint's: 0"))]
KMeansMode = Annotated[
    Optional[Literal[KMEANS_MODES]],
    typer.Option(  # type: ignore[valid-type]
        *_flags(_S, "kmeans_mode"), help=_help(_S, "kmeans_mode", "the checkpoint's: fast")
    ),
]
Encode = Annotated[
    Optional[Literal[ENCODE_MODES]],
    typer.Option(  # type: ignore[valid-type]
        *_flags(_S, "encode"), help=_help(_S, "encode", "full")
    ),
]
GateMargin = Annotated[
    Optional[float],
    typer.Option(*_flags(_S, "gate_margin"), metavar="M", callback=_gate_margin, help=_help(_S, "gate_margin")),
]
Zoom = Annotated[
    Optional[int],
    typer.Option(*_flags(_S, "zoom"), min=0, max=MAX_ZOOM, metavar="N", help=_help(_S, "zoom", "0 (off)")),
]
# The names other commands knew them by.
Clusters, Iters, KMeans = KMeansClusters, KMeansIters, KMeansMode
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
MaxNewTokens = Annotated[
    Optional[int],
    typer.Option(*_flags(GenerationOptions, "max_new_tokens"), min=1, help=_help(GenerationOptions, "max_new_tokens")),
]

# ----------------------------------------------------------------------------- image reading
_R = ReadOptions
Bands = Annotated[
    Optional[str],
    typer.Option(
        *_flags(_R, "bands"), metavar="R,G,B", callback=_bands, help=_help(_R, "bands", "the image's colour bands")
    ),
]
Stretch = Annotated[
    str,
    typer.Option(*_flags(_R, "stretch"), metavar="LOW,HIGH", callback=_stretch, help=_help(_R, "stretch")),
]
MaxPixels = Annotated[int, typer.Option(*_flags(_R, "max_pixels"), min=0, help=_help(_R, "max_pixels"))]
Region = Annotated[
    Optional[str],
    typer.Option(
        *_flags(_R, "region"), metavar="X0,Y0,X1,Y1", callback=_region, help=_help(_R, "region", "the whole image")
    ),
]
RegionCrs = Annotated[
    Optional[str], typer.Option(*_flags(_R, "region_crs"), metavar="CRS", help=_help(_R, "region_crs"))
]
RegionFile = Annotated[
    Optional[Path],
    typer.Option(
        *_flags(_R, "region_file"), exists=True, dir_okay=False, metavar="FILE", help=_help(_R, "region_file")
    ),
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
        help="Write an overlay PNG of relevance and kept tokens (checked writable before the model runs); for a "
        "georeferenced image also a world file (.pgw) and CRS sidecar (.png.aux.xml), so a GIS places it.",
    ),
]
RelevanceTif = Annotated[
    Optional[Path],
    typer.Option(
        "--relevance-tif",
        dir_okay=False,
        metavar="FILE.tif",
        callback=_out_file,
        help="Write the relevance map as a Cloud-Optimized GeoTIFF in the image's CRS (georeferenced images only; "
        "checked before the model runs).",
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
    encode: Optional[str] = None,
    gate_margin: Optional[float] = None,
    zoom: Optional[int] = None,
) -> dict[str, Any]:
    """Parsed selection options -> the vocabulary's keyword arguments (unset ones left out, so the
    checkpoint's values apply). Positional order as the commands declare them."""
    sel = {
        "budgets": budgets,
        "selector": selector,
        "kmeans_clusters": clusters,
        "kmeans_iters": iters,
        "seed": seed,
        "kmeans_mode": kmeans,
        "encode": encode,
        "gate_margin": gate_margin,
        "zoom": zoom,
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
    region: Optional[str] = None,
    region_crs: Optional[str] = None,
    region_file: Optional[Path] = None,
) -> dict[str, Any]:
    """Parsed image-reading options -> `uhrbat.io.open_image` keyword arguments (the region ones
    only when given, see `region_kwargs`)."""
    out: dict[str, Any] = {"bands": bands, "max_pixels": None if max_pixels == 0 else max_pixels}
    if stretch is not None:
        out["stretch"] = stretch
    out.update(region_kwargs(region, region_crs, region_file))
    return out


def region_kwargs(
    region: Optional[str] = None, region_crs: Optional[str] = None, region_file: Optional[Path] = None
) -> dict[str, Any]:
    """The region flags that were given, checked together (whole pixels without a CRS, one
    region, the CRS, the file: `RegionError`, one line, before any image is read)."""
    file = None if region_file is None else str(region_file)
    given = {k: v for k, v in (("region", region), ("region_crs", region_crs), ("region_file", file)) if v is not None}
    if given:
        ReadOptions.of(**given)
    return given


# ----------------------------------------------------------------------------- option groups
#: Group name -> (parameter name, annotation, default) of every option in it, in help order.
GROUPS: dict[str, list[tuple[str, Any, Any]]] = {
    "selection": [
        ("budgets", Budgets, None),
        ("selector", Selector, None),
        ("kmeans_clusters", KMeansClusters, None),
        ("kmeans_iters", KMeansIters, None),
        ("seed", Seed, None),
        ("kmeans_mode", KMeansMode, None),
        ("encode", Encode, None),
        ("gate_margin", GateMargin, None),
        ("zoom", Zoom, None),
    ],
    "masks": [("masks", Masks, None)],
    "model": [
        ("model", Model, None),
        ("compat", Compat, None),
        ("device", Device, "cpu"),
        ("dtype", Dtype, None),
        ("attn", Attn, None),
        ("vision_tower", VisionTower, None),
    ],
    "cache": [("cache_dir", CacheDir, None)],
    "generation": [("max_new_tokens", MaxNewTokens, 512)],
    "reading": [
        ("bands", Bands, None),
        ("stretch", Stretch, DEFAULT_STRETCH),
        ("max_pixels", MaxPixels, None),
        ("region", Region, None),
        ("region_crs", RegionCrs, None),
        ("region_file", RegionFile, None),
    ],
}


@dataclass(frozen=True)
class Shared:
    """The shared options one command received (`@shared`), as the keyword arguments they feed."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def selection(self) -> dict[str, Any]:
        """`UhrBatPipeline` selection keywords (given ones only)."""
        v = self.values
        return selection_kwargs(
            v.get("budgets"),
            v.get("selector"),
            v.get("kmeans_clusters"),
            v.get("kmeans_iters"),
            v.get("seed"),
            v.get("kmeans_mode"),
            v.get("encode"),
            v.get("gate_margin"),
            v.get("zoom"),
        )

    @property
    def load(self) -> dict[str, Any]:
        """`UhrBatPipeline.from_pretrained` keywords (the device is checked here)."""
        v = self.values
        return load_kwargs(v["device"], v["dtype"], v["attn"], v["vision_tower"], v["compat"], v.get("cache_dir"))

    @property
    def read(self) -> dict[str, Any]:
        """`uhrbat.io.open_image` keywords."""
        v = self.values
        return read_kwargs(
            v.get("bands"),
            v.get("stretch"),
            v.get("max_pixels", DEFAULT_MAX_PIXELS),
            v.get("region"),
            v.get("region_crs"),
            v.get("region_file"),
        )


def shared(*groups: str, **defaults: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a Typer command: add the option `groups` (names of `GROUPS`) to its
    parameters; the command receives them as one keyword argument `opts: Shared`. `defaults`
    override a group's default for this command (e.g. `attn="eager"`)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn)
        # Typer reads the annotations from this signature: evaluate the (postponed) strings now.
        own = [
            p.replace(annotation=eval(p.annotation, fn.__globals__)) if isinstance(p.annotation, str) else p  # noqa: S307
            for name, p in sig.parameters.items()
            if name != "opts"
        ]
        added = []
        for g in groups:
            for name, annotation, default in GROUPS[g]:
                default = defaults.get(name, default)
                if name == "model" and default is None:
                    default = DEFAULT_MODEL
                if name == "max_pixels" and default is None:
                    default = DEFAULT_MAX_PIXELS
                added.append(
                    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                )
        names = [p.name for p in added]

        @functools.wraps(fn)
        def command(*args: Any, **kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return fn(*args, opts=Shared(values), **kwargs)

        command.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        command.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in added}}
        command.__annotations__.pop("opts", None)
        return command

    return wrap


__all__ = [
    "Attn",
    "Bands",
    "Budgets",
    "CacheDir",
    "Clusters",
    "Compat",
    "Device",
    "Dtype",
    "Encode",
    "Explain",
    "GateMargin",
    "GeoJson",
    "Iters",
    "Json",
    "KMeans",
    "KMeansClusters",
    "KMeansIters",
    "KMeansMode",
    "Masks",
    "MaxNewTokens",
    "MaxPixels",
    "Model",
    "Region",
    "RegionCrs",
    "RegionFile",
    "RelevanceTif",
    "Seed",
    "Selector",
    "Shared",
    "Stretch",
    "VisionTower",
    "Zoom",
    "check_writable",
    "load_kwargs",
    "read_kwargs",
    "region_kwargs",
    "selection_kwargs",
    "shared",
]
