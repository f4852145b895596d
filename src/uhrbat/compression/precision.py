"""Token selection runs with autocast off.

Which tokens are kept must not depend on whether the caller runs under `torch.autocast`
(bf16 mixed-precision training does): K-Means distances, "score > group mean" tests and merged
means are computed in the dtype of their inputs (float32 features for K-Means), exactly as at
inference. Under autocast the distance GEMM would silently run in bf16, change labels, and
mix dtypes in in-place updates.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TypeVar

import torch

__all__ = ["autocast_off", "without_autocast"]

F = TypeVar("F", bound=Callable)

# Device types whose autocast state is checked (those this torch build knows).
_DEVICE_TYPES = tuple(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))


@contextmanager
def without_autocast() -> Iterator[None]:
    """Disable autocast on every device type where it is enabled (a no-op otherwise)."""
    with ExitStack() as stack:
        for dev in _DEVICE_TYPES:
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        yield


def autocast_off(fn: F) -> F:
    """Decorator: run `fn` inside `without_autocast()`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with without_autocast():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
