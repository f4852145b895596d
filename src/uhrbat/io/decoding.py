"""`decode_section()`: bounds how many untrusted images are decoded at the same time.

A decode costs memory in proportion to the image (up to ~1.5 GB for a 256 MP exact decode, see
the README "Untrusted input"), so a server that decodes every request at once can be pushed
out of memory by a handful of uploads. The demo, the server and batch jobs wrap each
`open_image(..., trust="untrusted")` / `open_image_bytes(...)` call in::

    with decode_section():
        source = open_image_bytes(data, filename=name)

At most `concurrency` threads are inside a section at once (default 1; set it with
`set_decode_concurrency(n)` or the `UHRBAT_DECODE_CONCURRENCY` environment variable); the others
wait. The section is re-entrant within a thread. `timeout=` turns a long wait into a
`DecodeBusyError` (a server answers 503 instead of queueing forever).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from uhrbat.errors import ConfigError, DecodeBusyError


class _Slots:
    """A counting semaphore whose size can change while it is in use."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.limit = n
        self.busy = 0
        self.local = threading.local()

    def acquire(self, timeout: float | None) -> None:
        depth = getattr(self.local, "depth", 0)
        if depth:  # re-entrant: a nested section in the same thread holds no extra slot
            self.local.depth = depth + 1
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.busy >= self.limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DecodeBusyError(
                        f"all {self.limit} image-decode slot(s) stayed busy for {timeout:g} s; retry later "
                        f"(or raise the concurrency with UHRBAT_DECODE_CONCURRENCY)"
                    )
                self.cond.wait(left)
            self.busy += 1
        self.local.depth = 1

    def release(self) -> None:
        self.local.depth -= 1
        if self.local.depth:
            return
        with self.cond:
            self.busy -= 1
            self.cond.notify()


def _env_concurrency() -> int:
    raw = os.environ.get("UHRBAT_DECODE_CONCURRENCY", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"UHRBAT_DECODE_CONCURRENCY must be a positive integer, got {raw!r}") from None
    if n < 1:
        raise ConfigError(f"UHRBAT_DECODE_CONCURRENCY must be a positive integer, got {raw!r}")
    return n


_SLOTS = _Slots(_env_concurrency())


def set_decode_concurrency(n: int) -> None:
    """How many decodes may run at once in this process (>= 1)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"decode concurrency must be a positive integer, got {n!r}")
    with _SLOTS.cond:
        _SLOTS.limit = n
        _SLOTS.cond.notify_all()


def decode_concurrency() -> int:
    return _SLOTS.limit


@contextmanager
def decode_section(timeout: float | None = None) -> Iterator[None]:
    """Hold one of the process's decode slots for the duration of the block (see the module doc)."""
    _SLOTS.acquire(timeout)
    try:
        yield
    finally:
        _SLOTS.release()


__all__ = ["decode_concurrency", "decode_section", "set_decode_concurrency"]
