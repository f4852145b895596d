"""`SceneCache`: the query-independent work on an image, kept across questions.

Every question about one image repeats the same expensive, question-independent steps: decode and
tile the image, encode its tiles with CLIP and project them (`SceneFeatures`), and cluster every
scale with K-Means. The cache keeps their results, keyed by *content*:

* ``scene`` items: the `SceneFeatures` tensors of one tiled image, keyed by a SHA-256 of the tile
  tensor (so the read options - bands, stretch, window, pixel limit - are part of it), the model's
  identity (config + weights fingerprint), dtype, device and the software/hardware it ran on;
* ``groups`` items: K-Means labels per scale, keyed by the scene key and every option that changes
  them (selector, K per scale, iterations, seed, mode, clustering scales);
* ``scoring-prefix`` items (only with the pipeline's opt-in `reuse_scoring_prefix=True`): the
  scoring pass's KV for the text before the image + the image (`ScoringPrefix`), keyed by the
  scene key, the exact token ids before the image, compat, the LLM's attention and dtype;
* source aliases: a cheap fingerprint of the *source* (file bytes + read options + tiling
  settings, or the pixels of a PIL image) -> the content key and image size, so a follow-up
  question skips decoding and tiling too.

The in-memory layer is an LRU bounded in bytes per device (0 disables it). The optional on-disk
layer (`cache_dir`) stores each item as one safetensors file, written atomically (temporary file +
`os.replace`), with its key and a SHA-256 of its tensors in the metadata; a file that is corrupt,
partial, or holds another key is ignored (and recomputed), never trusted. Everything is
thread-safe; `key_lock(key)` lets two threads that need the same item compute it once.
"""

from __future__ import annotations

import hashlib
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

__all__ = ["DEFAULT_MAX_BYTES", "SceneCache", "digest", "tensor_digest"]

#: Default in-memory bound per device: about four scenes of the released model in bf16
#: (228 tiles x 576 tokens x 3584 x 2 bytes = 0.94 GB each), two in fp32.
DEFAULT_MAX_BYTES = 4 * 2**30
_FORMAT = "uhrbat-scene-cache-1"
_MAX_ALIASES = 4096


def digest(*parts: Any) -> str:
    """SHA-256 hex of the JSON form of `parts` (keys built from plain values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of `tensors` (moved to CPU)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _device_of(tensors: dict[str, torch.Tensor]) -> str:
    return str(next(iter(tensors.values())).device) if tensors else "cpu"


class SceneCache:
    """Thread-safe LRU of tensor dicts, bounded in bytes per device, with an optional disk layer.

    Args:
        max_bytes: in-memory bound per device in bytes (0 = keep nothing in memory).
        cache_dir: folder for the on-disk layer (created on first write), or None.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, cache_dir: str | os.PathLike | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._items: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes: dict[str, int] = {}  # device -> bytes held
        self._aliases: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.RLock()
        self._key_locks: dict[str, list] = {}  # key -> [lock, users]
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0, "evictions": 0, "disk_errors": 0}

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

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors` under `key` in memory (if they fit the bound) and on disk (if enabled)."""
        tensors = {k: v.detach() for k, v in tensors.items()}
        self._remember(key, tensors)
        if self.cache_dir is not None:
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
            device = _device_of(item)
            self._bytes[device] -= _nbytes(item)

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
        """What a source fingerprint resolved to (`{"content": key, "size": [w, h]}`), or None."""
        with self._lock:
            value = self._aliases.get(fingerprint)
            if value is not None:
                self._aliases.move_to_end(fingerprint)
                return value
        if self.cache_dir is None:
            return None
        try:
            value = json.loads(self._path(fingerprint, ".alias.json").read_text())
            if value.get("fingerprint") != fingerprint or not isinstance(value.get("content"), str):
                raise ValueError("alias for another fingerprint")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as e:
            self._disk_error(fingerprint, e)
            return None
        self._alias_memory(fingerprint, value)
        return value

    def put_alias(self, fingerprint: str, content: str, size: tuple[int, int]) -> None:
        value = {"fingerprint": fingerprint, "content": content, "size": [int(size[0]), int(size[1])]}
        self._alias_memory(fingerprint, value)
        if self.cache_dir is not None:
            self._atomic_write(self._path(fingerprint, ".alias.json"), lambda p: Path(p).write_text(json.dumps(value)))

    def _alias_memory(self, fingerprint: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._aliases[fingerprint] = value
            self._aliases.move_to_end(fingerprint)
            while len(self._aliases) > _MAX_ALIASES:
                self._aliases.popitem(last=False)

    # ------------------------------------------------------------------ disk layer
    def _path(self, key: str, suffix: str = ".safetensors") -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}{suffix}"

    def _atomic_write(self, path: Path, write: Any) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a full or read-only disk costs speed, never the answer
            self._disk_error(str(path), e)

    def _write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        cpu = {k: v.cpu().contiguous() for k, v in tensors.items()}
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
