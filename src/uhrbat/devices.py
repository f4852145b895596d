"""Device names -> `torch.device`, checked against what this machine has.

`resolve_device("cuda")` on a machine without CUDA raises `ConfigError` with one line saying so
(instead of a later, unrelated failure such as "pin_memory=True requires a CUDA ... backend"),
and the same for a CUDA index that does not exist, Apple `mps` and Intel `xpu`. Every entry that
puts a model on a device (`uhrbat.modeling.loading.load`, training, evaluation) goes through it.
"""

from __future__ import annotations

import os

import torch

from uhrbat.errors import ConfigError

__all__ = ["cuda_unavailable_reason", "resolve_device"]

_KNOWN = ("cpu", "cuda", "mps", "xpu")


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here (a short phrase), or None when it can."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return "no CUDA GPU is visible"


def resolve_device(name: str | torch.device | None = "cpu") -> torch.device:
    """Check a device name and return it as a `torch.device`.

    Args:
        name: "cpu", "cuda", "cuda:N", "mps", "xpu[:N]", a `torch.device`, or None / "auto"
            (the first CUDA device when there is one, else the CPU).

    Raises:
        ConfigError: the name is not a device, or the device is not available on this machine.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(name).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {text}: not a device name; use cpu, cuda, cuda:N, mps or xpu") from None
    if dev.type not in _KNOWN:
        raise ConfigError(f"--device {text}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N, mps or xpu")
    if dev.type == "cuda":
        why = cuda_unavailable_reason()
        if why is not None:
            raise ConfigError(f"--device {text}: CUDA is not available on this machine ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"--device {text}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {text}: Apple MPS is not available on this machine; use --device cpu")
    elif dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ConfigError(f"--device {text}: Intel XPU is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= xpu.device_count():
            raise ConfigError(f"--device {text}: this machine has {xpu.device_count()} XPU device(s)")
    return dev
