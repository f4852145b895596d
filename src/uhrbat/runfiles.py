"""Run-directory files shared by `uhrbat eval` and `uhrbat batch`, and their one corruption policy.

* `RunLock(out_dir, what)` — an advisory `fcntl.flock` on `out_dir/.lock`, so two runs never
  write into the same directory at once. The lock file records who holds it (pid, command,
  start time) so the second run can say so. The kernel drops the lock when the holder dies,
  so a killed run never leaves a stale lock behind.
* `JsonlAppender(path)` — append-only JSONL: one `os.write` of a whole line per row on an
  `O_APPEND` descriptor, then fsync, so a kill can only leave a torn *last* line.
* `RowFile(path)` — reads such a file back under the corruption policy below.
* `check_run_settings(out, settings)` — `run.json`: the settings the rows were made with.
* `atomic_write(path, data)` — the one atomic file write (temporary file, fsync, rename).
* `RowProgress` — the progress bar of a run over rows (true average rate and ETA).
* `read_jsonl(path)` — a *tolerant* reader for files we did not write (`uhrbat score`).

**Corruption policy** (eval and batch alike): a run file is refused, never rewritten and never
silently skipped. The error names the file, the line and the fix. The only damage a run itself
can cause is a torn last line (a write cut by a kill): it is cut off with a printed note and its
question runs again. Anything else (a line that is not a JSON object with an `id`, an id that
repeats a row that was not an error, a garbage `run.json`, a directory where a file belongs) can
only come from a hand edit, another program or a disk fault, so uhrbat stops and says which line
to delete (or which file to move away). A repeated id is normal only when it retries an error row
(`--retry-errors`): the later row wins.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from uhrbat.errors import ConfigError, RunFileError, RunLockedError

__all__ = [
    "LOCK_NAME",
    "RUN_JSON",
    "JsonlAppender",
    "RowFile",
    "RowProgress",
    "RunLock",
    "atomic_write",
    "check_run_settings",
    "read_jsonl",
    "refuse_directories",
]

LOCK_NAME = ".lock"
RUN_JSON = "run.json"

try:  # POSIX only; on Windows the lock is a no-op with the same interface
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------- lock
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
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RunFileError(
                f"--out {self.out_dir} is a file, not a folder; give a folder (new or from this kind of run)"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        refuse_directories(self.path)
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


# ---------------------------------------------------------------------------------------- atomic write
def _umask() -> int:
    """The process umask, read without changing it where Linux allows (threads may be running)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(old)
    return old


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[str], Any], *, encoding: str = "utf-8") -> Path:
    """Write `path` so that readers see the old file or the whole new one, never half of it.

    data: text, bytes, or a function that writes the file at the temporary path it is given
    (e.g. `lambda tmp: pq.write_table(table, tmp)` or safetensors' `save_file`). The data goes
    to a temporary file beside `path`, is flushed to disk (fsync) and renamed over `path`; the
    folder is fsynced so the rename survives a power cut. The file gets the usual permissions of
    a new file (0666 minus the umask), not the private 0600 of the temporary file. A failure
    leaves `path` as it was and no temporary file behind.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file; move it away", str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        if callable(data):
            os.close(fd)
            fd = -1
            data(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            fd = -1
        else:
            raw = data.encode(encoding) if isinstance(data, str) else bytes(data)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
        os.replace(tmp, p)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(p.parent)
    return p


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def refuse_directories(*paths: str | os.PathLike) -> None:
    """`RunFileError` when a path where the run writes a file is a directory (checked up front,
    so the run does not fail after hours of work when it writes its report)."""
    for p in map(Path, paths):
        if p.is_dir():
            raise RunFileError(
                f"{p} is a directory, but the run writes a file there; move it away (or use another --out)"
            )


# ---------------------------------------------------------------------------------------- rows
def _delete_hint(path: Path, line: int) -> str:
    return f"sed -i '{line}d' {shlex.quote(str(path))}"


class RowFile:
    """An append-only JSONL run file of rows keyed by `id`, read under the corruption policy.

    `rows()` yields `(line number, row)` for every whole line, in file order, and raises
    `RunFileError` naming the file, the line and the fix for a line that is not a JSON object
    with an id, or for an id that repeats a row that was not an error. After iterating:
    `torn_bytes` is the size of a torn last line (0 if none; it is not yielded), `superseded`
    counts rows replaced by a later row of the same id (retried errors).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.torn_bytes = 0
        self.superseded = 0

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        path = self.path
        refuse_directories(path)
        self.torn_bytes = self.superseded = 0
        seen: dict[str, tuple[int, bool]] = {}  # id -> (line, was an error row)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return
        except OSError as e:
            raise RunFileError(
                f"{path}: cannot read it ({e.strerror or e}); fix its permissions or use another --out"
            ) from None
        with f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):  # the last line of a write cut by a kill
                    self.torn_bytes = len(line)
                    return
                if not line.strip():
                    continue
                row = self._parse(line, n)
                rid = str(row["id"])
                is_error = bool(row.get("error"))
                if rid in seen:
                    first, was_error = seen[rid]
                    if not was_error:
                        raise RunFileError(
                            f"{path}:{n}: id {rid!r} again, already answered on line {first}; uhrbat repeats an id "
                            "only to retry an error row, so one of the two lines comes from a hand edit or another "
                            f"program: delete the one you do not want (e.g. {_delete_hint(path, n)}) and rerun"
                        )
                    self.superseded += 1
                seen[rid] = (n, is_error)
                yield n, row

    def _parse(self, line: bytes, n: int) -> dict[str, Any]:
        problem = None
        try:
            row = json.loads(line)
        except ValueError as e:
            problem = f"not valid JSON ({e})"
        else:
            if not isinstance(row, dict):
                problem = f"a JSON {type(row).__name__}, not a row object"
            elif not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool):
                problem = "a row without an id"
        if problem is None:
            return row
        raise RunFileError(
            f"{self.path}:{n}: {problem}; uhrbat only appends whole rows, so this line comes from a hand edit, "
            f"another program or a disk fault: delete it (e.g. {_delete_hint(self.path, n)}) and rerun, which "
            "answers its question again"
        )

    def torn_note(self) -> str | None:
        """The line to print when a torn last line was found (it is cut before the next append)."""
        if not self.torn_bytes:
            return None
        return (
            f"{self.path}: cut a torn last line ({self.torn_bytes} bytes, no newline) left by an interrupted "
            "write; its question runs again"
        )


class JsonlAppender:
    """Append JSON rows to a file, one durable line per row.

    Each row is serialised first and written with a single `write` on an `O_APPEND`
    descriptor, then flushed to disk (`fsync`), so a crash loses at most the row being
    written and readers drop it as torn. A torn last line already in the file (from a killed
    writer; see `RowFile.torn_note`) is cut before the first append, so new rows never glue onto it.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        refuse_directories(self.path)
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
    """(rows, n_skipped): the JSON objects of a JSONL file *we did not write*, in file order.

    Tolerant, for user files such as `uhrbat score --predictions` (run files go through
    `RowFile`): a missing file gives `([], 0)`; a torn last line and any line that is not a JSON
    object are skipped and counted; `problems`, when given, receives one "line N: ..." note per
    skipped line.
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


# ---------------------------------------------------------------------------------------- run.json
def check_run_settings(
    out: str | os.PathLike,
    settings: dict[str, Any],
    *,
    what: str,
    write: bool = True,
    normalise: Mapping[str, Callable[[Any], Any]] | None = None,
) -> None:
    """Compare `settings` with `out/run.json` (the settings its rows were made with), or write it.

    A rerun with other settings is refused (`ConfigError` naming the first difference); a
    `run.json` that cannot be read is refused (`RunFileError`), never rewritten — rewriting it
    would let rows made with other settings pass as this run's. `normalise` maps a key to a
    function applied to both values before comparing (e.g. a model folder given two ways).
    `write=False`: compare only (ranks other than 0 of a sharded eval).
    """
    out = Path(out)
    path = out / RUN_JSON
    refuse_directories(path)
    settings = json.loads(json.dumps(settings, default=str))
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError(f"a JSON {type(old).__name__}, not an object")
        except (OSError, ValueError) as e:
            raise RunFileError(
                f"{path} is unreadable or corrupt ({e}); it records the settings the rows in {out} were made with, "
                "so it is never rewritten: restore it, or move it away to start afresh in that folder (its rows "
                "are then taken as made with the new settings), or use another --out"
            ) from None
        norm = dict(normalise or {})
        for k in [*settings, *(k for k in old if k not in settings)]:
            a, b = old.get(k), settings.get(k)
            if k in norm and a is not None and b is not None:
                a, b = norm[k](a), norm[k](b)
            if a != b:
                raise ConfigError(
                    f"{out} holds a {what} run with different settings ({k}: {old.get(k)!r} != {settings.get(k)!r}); "
                    "rerun with the same options or use another --out"
                )
        return
    if write:
        atomic_write(path, json.dumps(settings, indent=2) + "\n")


# ---------------------------------------------------------------------------------------- progress
def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RowProgress:
    """The progress bar of a run over rows, on stderr (a context manager).

    Shows done/total, the **average** rate of this run (rows written by this run divided by the
    seconds since the work started: `start_clock()` is called once the model is loaded) and the
    ETA from that rate. Rich's own speed column averages over a short window and swings wildly
    when rows come in bursts (a batch of questions, a scene's questions at once). Rows done by an
    earlier run (`done`) count toward done/total, not toward the rate. When stderr is not a
    terminal (a log file), nothing is drawn while rows run and the final state is one plain line.
    """

    def __init__(
        self,
        enabled: bool,
        description: str,
        total: int,
        *,
        done: int = 0,
        unit: str = "rows",
        get_time: Callable[[], float] | None = None,
    ) -> None:
        self.enabled = enabled
        self.description = description
        self.total = total
        self.done_before = done
        self.unit = unit
        self._get_time = get_time or time.monotonic
        self._progress: Any = None
        self._task: Any = None
        self._plain = False  # stderr is not a terminal: print the final state as one line
        self._entered = 0.0
        self.clock_start = self._get_time()
        self.completed = done

    def rate(self, now: float | None = None) -> float:
        """Rows per second written by this run since `start_clock` (0.0 before any)."""
        now = self._get_time() if now is None else now
        span = now - self.clock_start
        new = self.completed - self.done_before
        return new / span if span > 0 and new > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        left = max(0, self.total - self.completed)
        if left == 0:
            return 0.0
        r = self.rate(now)
        return left / r if r > 0 else None

    def status(self) -> str:
        """'12/40 rows, 0.21 rows/s, ETA 0:02:13' (what the bar's rate and ETA columns show)."""
        return f"{self.completed}/{self.total} {self.unit}, {self.rate():.2f} {self.unit}/s, ETA {_clock(self.eta())}"

    def start_clock(self) -> None:
        """The work starts now (e.g. the model has loaded): the rate counts from here."""
        self.clock_start = self._get_time()
        self.done_before = self.completed

    def advance(self, n: int = 1) -> None:
        self.completed += n
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __enter__(self) -> RowProgress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
        from rich.text import Text

        self._entered = self._get_time()
        console = Console(stderr=True)
        if not console.is_terminal:  # a log file: one plain line at the end, never a bar wrapped at 80 columns
            self._plain = self.enabled and self.total > 0
            return self
        bar = self

        class _Rate(ProgressColumn):
            def render(self, task) -> Text:  # type: ignore[override]
                return Text(f"{bar.rate():.2f} {bar.unit}/s")

        class _Eta(ProgressColumn):
            def render(self, task) -> Text:  # type: ignore[override]
                return Text(f"ETA {_clock(bar.eta())}")

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            _Eta(),
            console=console,
            disable=not self.enabled,
            transient=False,
            get_time=self._get_time,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
        if self._plain:
            self._plain = False
            elapsed = _clock(self._get_time() - self._entered)
            print(f"{self.description} {self.status()}, elapsed {elapsed}", file=sys.stderr, flush=True)
