"""Device names -> `torch.device`, checked against what this machine has.

`resolve_device("cuda")` on a machine without CUDA raises `ConfigError` with one line saying so
(instead of a later, unrelated failure such as "pin_memory=True requires a CUDA ... backend"),
and the same for a CUDA index that does not exist, Apple `mps` and Intel `xpu`. Every entry that
puts a model on a device (`uhrbat.modeling.loading.load`, training, evaluation) goes through it.

Importing this module is cheap (torch is imported by the functions that need it): `import
uhrbat` installs `quiet_deepspeed_cpu_notice` before anything can import DeepSpeed.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from uhrbat.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["cuda_unavailable_reason", "quiet_deepspeed_cpu_notice", "resolve_device"]

_KNOWN = ("cpu", "cuda", "mps", "xpu")


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here (a short phrase), or None when it can."""
    import torch

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
    import torch

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


# DeepSpeed's logger (created when `deepspeed` is first imported; a filter set before then stays).
_DEEPSPEED_LOGGER = "DeepSpeed"
_CPU_NOTICE = "Setting accelerator to CPU"


class _DeepSpeedCpuNotice(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." warning when this
    machine really has no CUDA device (then it is noise on every CPU run: DeepSpeed is imported
    by accelerate's `save_pretrained` path and the Trainer whenever it is installed). With a
    CUDA device visible the warning means DeepSpeed missed it, and it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_CPU_NOTICE):
            return True
        return cuda_unavailable_reason() is None


def quiet_deepspeed_cpu_notice() -> None:
    """Install the filter on DeepSpeed's logger (idempotent; does not import DeepSpeed)."""
    logger = logging.getLogger(_DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DeepSpeedCpuNotice) for f in logger.filters):
        logger.addFilter(_DeepSpeedCpuNotice())
