"""`SceneStore`: the query-independent work on images, kept across questions.

Items are dicts of tensors under string keys (`uhrbat.scene.keys`): a scene's features
(`Scene.tensors()`), K-Means labels keyed by the scene and every option that changes them,
the opt-in scoring-prefix KV, and memory-only pixel canvases of partly encoded scenes.
Source aliases map a cheap fingerprint of a source to its content digest and size.

* **Memory**: an LRU bounded in bytes per device (0 keeps nothing in memory).
* **Disk** (`cache_dir`, optional): one safetensors file per item, written atomically (temporary
  file + `os.replace`) with its key and a SHA-256 of its tensors in the metadata; a corrupt,
  partial or foreign file is ignored with a warning and recomputed, never trusted. The folder is
  bounded too (`disk_max_bytes`, default `DEFAULT_DISK_MAX_BYTES`): past it, the least recently
  used files (reads refresh a file's time) are deleted.
* **Threads**: every method is thread-safe; `key_lock(key)` lets two threads that need the same
  item compute it once. Aliases are bounded (`max_aliases`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from uhrbat.scene.keys import tensor_digest

__all__ = ["DEFAULT_DISK_MAX_BYTES", "DEFAULT_MAX_BYTES", "SceneStore"]

#: Default in-memory bound per device: about four scenes of the released model in bf16
#: (228 tiles x 576 tokens x 3584 x 2 bytes = 0.94 GB each), two in fp32.
DEFAULT_MAX_BYTES = 4 * 2**30
#: Default bound of the on-disk layer: about 34 scenes of the released model in bf16.
DEFAULT_DISK_MAX_BYTES = 32 * 2**30
_FORMAT = "uhrbat-scene-store-2"
_MAX_ALIASES = 4096


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when it is a view into a larger buffer (safetensors refuses shared storage;
    a full scene's scales are views of one encoder output)."""
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def _device_of(tensors: dict[str, torch.Tensor]) -> str:
    return str(next(iter(tensors.values())).device) if tensors else "cpu"


class SceneStore:
    """Thread-safe LRU of tensor dicts, bounded in bytes per device, with a bounded disk layer.

    Args:
        max_bytes: in-memory bound per device in bytes (0 = keep nothing in memory).
        cache_dir: folder of the on-disk layer (created on first write), or None.
        disk_max_bytes: bound of the on-disk layer in bytes.
        max_aliases: source fingerprints remembered in memory.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_dir: str | os.PathLike | None = None,
        disk_max_bytes: int = DEFAULT_DISK_MAX_BYTES,
        max_aliases: int = _MAX_ALIASES,
    ) -> None:
        for name, value in (("max_bytes", max_bytes), ("disk_max_bytes", disk_max_bytes), ("max_aliases", max_aliases)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        self.max_bytes = max_bytes
        self.disk_max_bytes = disk_max_bytes
        self.max_aliases = max_aliases
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._items: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes: dict[str, int] = {}  # device -> bytes held
        self._aliases: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.RLock()
        self._key_locks: dict[str, list] = {}  # key -> [lock, users]
        self._disk_bytes: int | None = None  # bytes on disk, counted on first write
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0, "evictions": 0, "disk_evictions": 0, "disk_errors": 0}

    # ------------------------------------------------------------------ memory layer
    def nbytes(self, device: str | torch.device | None = None) -> int:
        """Bytes held in memory (on `device`, or in all)."""
        with self._lock:
            return self._bytes.get(str(device), 0) if device is not None else sum(self._bytes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        """Drop every in-memory item and alias (the disk layer is kept)."""
        with self._lock:
            self._items.clear()
            self._bytes.clear()
            self._aliases.clear()

    def get(self, key: str, device: str | torch.device | None = None) -> tuple[dict[str, torch.Tensor], str] | None:
        """`(tensors, "hit" | "disk")` for `key`, or None. Disk items are loaded onto `device`
        (default CPU) and promoted into memory."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.stats["hits"] += 1
                return item, "hit"
        item = self._read(key, "cpu" if device is None else str(device))
        if item is not None:
            self._remember(key, item)
            with self._lock:
                self.stats["disk_hits"] += 1
            return item, "disk"
        with self._lock:
            self.stats["misses"] += 1
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor], disk: bool = True) -> None:
        """Keep `tensors` under `key` in memory (if they fit the bound) and, unless `disk` is
        False, on disk (if enabled)."""
        tensors = {k: v.detach() for k, v in tensors.items()}
        self._remember(key, tensors)
        if disk and self.cache_dir is not None:
            self._write(key, tensors)

    def _remember(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size, device = _nbytes(tensors), _device_of(tensors)
        with self._lock:
            self._forget(key)
            if size > self.max_bytes:
                return
            # Evict least recently used items on the same device until this one fits.
            while self._bytes.get(device, 0) + size > self.max_bytes:
                victim = next((k for k, v in self._items.items() if _device_of(v) == device), None)
                if victim is None:
                    break
                self._forget(victim)
                self.stats["evictions"] += 1
            self._items[key] = tensors
            self._bytes[device] = self._bytes.get(device, 0) + size

    def _forget(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes[_device_of(item)] -= _nbytes(item)

    @contextmanager
    def key_lock(self, key: str) -> Iterator[None]:
        """Hold a per-key lock: a second thread that needs the same item waits, then finds it cached."""
        with self._lock:
            entry = self._key_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    self._key_locks.pop(key, None)

    # ------------------------------------------------------------------ source aliases
    def get_alias(self, fingerprint: str) -> dict[str, Any] | None:
        """What a source fingerprint resolved to (`{"content": digest, "size": [w, h]}`), or None."""
        with self._lock:
            value = self._aliases.get(fingerprint)
            if value is not None:
                self._aliases.move_to_end(fingerprint)
                return value
        if self.cache_dir is None:
            return None
        path = self._path(fingerprint, ".alias.json")
        try:
            value = json.loads(path.read_text())
            if value.get("fingerprint") != fingerprint or not isinstance(value.get("content"), str):
                raise ValueError("alias for another fingerprint")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            self._disk_error(fingerprint, e)
            return None
        self._touch(path)
        self._alias_memory(fingerprint, value)
        return value

    def put_alias(self, fingerprint: str, content: str, size: tuple[int, int]) -> None:
        value = {"fingerprint": fingerprint, "content": content, "size": [int(size[0]), int(size[1])]}
        self._alias_memory(fingerprint, value)
        if self.cache_dir is not None:
            data = json.dumps(value).encode()
            self._atomic_write(self._path(fingerprint, ".alias.json"), lambda p: Path(p).write_bytes(data))

    def _alias_memory(self, fingerprint: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._aliases[fingerprint] = value
            self._aliases.move_to_end(fingerprint)
            while len(self._aliases) > self.max_aliases:
                self._aliases.popitem(last=False)

    # ------------------------------------------------------------------ disk layer
    def _path(self, key: str, suffix: str = ".safetensors") -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}{suffix}"

    def disk_bytes(self) -> int:
        """Bytes the on-disk layer holds (0 without one)."""
        return sum(size for _, size, _ in self._disk_files())

    def _disk_files(self) -> list[tuple[Path, int, float]]:
        """`(path, size, mtime)` of every item file in the disk layer."""
        out = []
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return out
        for sub in self.cache_dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith(".tmp-"):
                    continue
                try:
                    st = f.stat()
                except OSError:
                    continue
                out.append((f, st.st_size, st.st_mtime))
        return out

    def _atomic_write(self, path: Path, write: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
            os.close(fd)
            try:
                write(tmp)
                size = os.path.getsize(tmp)
                old = path.stat().st_size if path.exists() else 0
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a full or read-only disk costs speed, never the answer
            self._disk_error(str(path), e)
            return
        self._account(size - old, keep=path)

    def _account(self, delta: int, keep: Path) -> None:
        """Track the disk layer's size; past `disk_max_bytes`, delete least recently used files."""
        with self._lock:
            if self._disk_bytes is None:
                self._disk_bytes = self.disk_bytes()
            else:
                self._disk_bytes += delta
            if self._disk_bytes <= self.disk_max_bytes:
                return
            # Over the bound: re-read the folder (other processes may share it), oldest first.
            files = sorted(self._disk_files(), key=lambda f: f[2])
            total = sum(size for _, size, _ in files)
            for path, size, _ in files:
                if total <= self.disk_max_bytes:
                    break
                if path == keep:
                    continue
                try:
                    path.unlink()
                except OSError:
                    continue
                total -= size
                self.stats["disk_evictions"] += 1
            self._disk_bytes = total

    @staticmethod
    def _touch(path: Path) -> None:
        """Mark a file as recently used (disk eviction goes by modification time)."""
        try:
            os.utime(path)
        except OSError:
            pass

    def _write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        cpu = {k: _own(v.cpu().contiguous()) for k, v in tensors.items()}
        meta = {"format": _FORMAT, "key": key, "sha256": tensor_digest(cpu)}
        self._atomic_write(self._path(key), lambda p: save_file(cpu, p, metadata=meta))

    def _read(self, key: str, device: str) -> dict[str, torch.Tensor] | None:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT or meta.get("key") != key:
                    raise ValueError(f"holds key {meta.get('key')!r}, not {key!r}")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
            if tensor_digest(tensors) != meta.get("sha256"):
                raise ValueError("tensor checksum mismatch")
        except Exception as e:  # noqa: BLE001 - corrupt, truncated, foreign: recompute, never trust it
            self._disk_error(str(path), e)
            return None
        self._touch(path)
        return {k: v.to(device) for k, v in tensors.items()}

    def _disk_error(self, what: str, error: BaseException) -> None:
        with self._lock:
            self.stats["disk_errors"] += 1
        warnings.warn(
            f"scene cache: ignoring {what} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "recomputing",
            RuntimeWarning,
            stacklevel=3,
        )
