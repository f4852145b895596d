"""The one pipeline factory: how `uhrbat eval`, `uhrbat batch` (local engine and every Ray actor)
and the CLI build a `UhrBatPipeline` from a model name and options.

* `load_pipeline(model, device=..., dtype=..., ..., budgets=..., selector=...)` — model/load
  options and the default selection options, with the names of the options vocabulary; unset
  (None) options are left out, so the checkpoint's own values apply.
* `pick_device(device, local_rank)` — "auto" means `cuda:LOCAL_RANK` when CUDA is available,
  else cpu; any other device is checked (one clear line when, e.g., CUDA is missing).
* `model_identity(model)` — what makes two `--model` values the same model (a folder given as a
  relative or an absolute path, or through a symlink, is one model), for resuming runs.

`UHRBAT_PIPELINE_CLASS=module:Class` swaps in another class with the same `from_pretrained`
(a plugin, or the tests' deterministic fake, in subprocesses too).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

__all__ = ["LOAD_OPTIONS", "PIPELINE_CLASS_ENV", "load_pipeline", "model_identity", "pick_device", "pipeline_class"]

PIPELINE_CLASS_ENV = "UHRBAT_PIPELINE_CLASS"

#: `from_pretrained` options that decide how the model is loaded (not how questions are answered).
LOAD_OPTIONS = ("device", "dtype", "attn_implementation", "vision_tower", "compat", "cache_dir", "scene_cache")


def pick_device(device: str | None, local_rank: int | None = None) -> str:
    """The device to load on: "auto"/None -> `cuda:<local_rank>` (default: $LOCAL_RANK or 0) when
    CUDA is available, else "cpu"; anything else is validated by `uhrbat.devices.resolve_device`."""
    if device and device != "auto":
        from uhrbat.devices import resolve_device

        return str(resolve_device(device))
    import torch

    if torch.cuda.is_available():
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0") or 0)
        return f"cuda:{rank}"
    return "cpu"


def model_identity(model: str | os.PathLike) -> str:
    """The real path of a local checkpoint folder (symlinks resolved), else the hub id as given."""
    text = str(model)
    p = Path(text).expanduser()
    if p.exists():
        return str(p.resolve())
    return text


def pipeline_class() -> Any:
    """`UhrBatPipeline`, or the class named by `$UHRBAT_PIPELINE_CLASS` ("module:Class")."""
    hook = os.environ.get(PIPELINE_CLASS_ENV)
    if hook:
        mod_name, _, attr = hook.partition(":")
        return getattr(importlib.import_module(mod_name), attr or "Pipeline")
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: str | None = "cpu",
    dtype: str | None = None,
    attn_implementation: str | None = None,
    vision_tower: str | os.PathLike | None = None,
    compat: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    scene_cache: Any = None,
    **selection: Any,
) -> Any:
    """Load a pipeline with load options and default selection options (budgets, selector,
    kmeans_clusters, kmeans_iters, kmeans_mode, seed, ...). None means "not given": the
    pipeline's (checkpoint's) default applies. `device="auto"`: see `pick_device`."""
    kwargs: dict[str, Any] = {"device": pick_device(device) if device in (None, "auto") else device}
    given = {
        "dtype": dtype,
        "attn_implementation": attn_implementation,
        "vision_tower": None if vision_tower is None else str(vision_tower),
        "compat": compat,
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "scene_cache": scene_cache,
    }
    kwargs.update({k: v for k, v in given.items() if v is not None})
    kwargs.update({k: v for k, v in selection.items() if v is not None})
    return pipeline_class().from_pretrained(str(model), **kwargs)
