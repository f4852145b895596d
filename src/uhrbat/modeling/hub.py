"""Hub helpers: a local folder for a checkpoint name, and its weight files.

No model code here, so every loader (ours, the reference format, the vision tower) can use
it without importing each other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from uhrbat.errors import CheckpointError

DEFAULT_MODEL = "RL-MIND/UHR-BAT"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]


def local_dir(model: str | os.PathLike) -> Path:
    """A local folder for `model`, downloading a hub snapshot (weights as safetensors only)."""
    p = Path(model)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file, not a checkpoint folder")
    if str(model).startswith((".", "/")) or os.sep in str(model) and str(model).count("/") != 1:
        raise CheckpointError(f"checkpoint folder not found: {model}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as e:  # offline, unknown repo, auth
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(
            f"could not fetch {model!r} from the hub ({type(e).__name__}: {first}); pass a local folder"
        ) from e


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (sharded via the index, or single)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / f for f in files]
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no safetensors weights in {directory} (expected model.safetensors or an index)")
    return found
