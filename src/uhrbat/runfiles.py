"""Run-directory files shared by `uhrbat eval` and `uhrbat batch`.

* `RunLock(out_dir, what)` — an advisory `fcntl.flock` on `out_dir/.lock`, so two runs never
  write into the same directory at once. The lock file records who holds it (pid, command,
  start time) so the second run can say so. The kernel drops the lock when the holder dies,
  so a killed run never leaves a stale lock behind.
* `JsonlAppender(path)` — append-only JSONL: one `os.write` of a whole line per row on an
  `O_APPEND` descriptor, then fsync, so concurrent readers never see half a row except a torn
  last line after a kill.
* `read_jsonl(path) -> (rows, n_torn)` — every well-formed object row; a torn last line (no
  trailing newline, or not valid JSON) is dropped and counted, never fatal.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from uhrbat.errors import RunLockedError

__all__ = ["RunLock", "JsonlAppender", "read_jsonl", "progress_bar", "LOCK_NAME"]

LOCK_NAME = ".lock"

try:  # POSIX only; on Windows the lock is a no-op with the same interface
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """Advisory exclusive lock on a run directory (context manager).

    `what` names the kind of run ("eval", "batch") for the message the second run prints;
    `name` is the lock file (ranks of one sharded run each lock their own).
    Raises `RunLockedError` at `__enter__` when another process holds the lock.
    """

    def __init__(self, out_dir: str | os.PathLike, what: str, *, name: str = LOCK_NAME) -> None:
        self.out_dir = Path(out_dir)
        self.what = what
        self.path = self.out_dir / name
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.out_dir} is in use by {holder}; wait for it to finish or use another --out"
                ) from None
        info = {
            "pid": os.getpid(),
            "what": self.what,
            "command": " ".join(sys.argv) or "python",
            "since": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # the file stays (removing it would race another run's open)
        finally:
            os.close(fd)  # closing drops the flock


def _holder(fd: int) -> str:
    """'pid N (command ...) since ...' from the lock file, or a generic phrase if unreadable."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (
            f"{info.get('what', 'a run')} pid {info['pid']} (command {info.get('command', '?')}) "
            f"since {info.get('since', '?')}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"


class JsonlAppender:
    """Append JSON rows to a file, one durable line per row.

    Each row is serialised first and written with a single `write` on an `O_APPEND`
    descriptor, then flushed to disk (`fsync`), so a crash loses at most the row being
    written and readers using `read_jsonl` drop it as torn.
    A torn last line already in the file (from a killed writer) is cut before the first append,
    so new rows never glue onto it.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        # find the last newline; anything after it is a torn line
        chunk = 65536
        end = size
        while end > 0:
            start = max(0, end - chunk)
            buf = os.pread(self._fd, end - start, start)
            i = buf.rfind(b"\n")
            if i != -1:
                keep = start + i + 1
                if keep != size:
                    os.ftruncate(self._fd, keep)
                return
            end = start
        os.ftruncate(self._fd, 0)  # no newline at all: the single line is torn

    def write(self, row: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: appender is closed")
        data = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike, problems: list[str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """(rows, n_torn): the JSON objects of a JSONL file, in file order.

    A missing file gives `([], 0)`. A last line without its newline is torn (a write cut by a
    kill) and is dropped; so is any line that is not a JSON object (counted in `n_torn`) —
    appenders only ever write whole lines, so such a line can only come from a crash or a
    hand edit. `problems`, when given, receives one "line N: ..." note per dropped line.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return [], 0
    rows: list[dict[str, Any]] = []
    found: list[str] = []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            found.append(f"line {lineno}: invalid JSON skipped ({e})")
            continue
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            found.append(f"line {lineno}: not a JSON object, skipped")
    if torn:
        found.append(f"line {len(lines) + 1}: torn last line ({len(torn)} bytes, no newline) ignored")
    if problems is not None:
        problems.extend(found)
    return rows, len(found)


def progress_bar(enabled: bool, unit: str = "rows"):
    """A rich progress bar on stderr for a run over many rows: done/total, rate, elapsed time and ETA."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:  # type: ignore[override]
            return Text(f"?  {unit}/s" if not task.speed else f"{task.speed:.2f} {unit}/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
