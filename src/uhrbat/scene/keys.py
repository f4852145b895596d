"""Content identities and store keys: what makes two scenes the same.

* `digest(*parts)`: SHA-256 of plain values (the one way every key is built);
* `FileHasher`: SHA-256 of a file's bytes, memoised by (path, size, mtime, inode, ctime) in a
  bounded, thread-safe LRU;
* `model_identity(model)`: the model's config, a fingerprint of its weights, dtype, device, the
  torch build and the CPU/GPU it runs on (kernels, hence last bits, differ between CPUs);
* `scene_key(...)`: content + model identity + every setting the features depend on, within a
  namespace (the server puts the tenant there).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import weakref
from collections import OrderedDict
from functools import cache
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FileHasher",
    "cpu_model",
    "digest",
    "model_identity",
    "reset_model_identity",
    "scene_key",
    "tensor_digest",
]


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


class FileHasher:
    """SHA-256 of files' bytes, memoised by identity and change stamps (an edited file is hashed
    again), at most `max_entries` remembered (least recently used dropped)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._memo: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._memo)

    def __call__(self, path: str | os.PathLike) -> str:
        p = Path(path)
        st = p.stat()
        stamp = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        with self._lock:
            got = self._memo.get(stamp)
            if got is not None:
                self._memo.move_to_end(stamp)
                return got
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        with self._lock:
            self._memo[stamp] = h.hexdigest()
            while len(self._memo) > self.max_entries:
                self._memo.popitem(last=False)
        return h.hexdigest()


@cache
def cpu_model() -> str:
    """The CPU's model name (kernels, hence last bits, differ between CPUs; part of cache keys)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor()


_IDENTITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IDENTITY_LOCK = threading.Lock()


def model_identity(model: Any) -> str:
    """Fingerprint of `model`: config, every weight's name/shape/dtype and a strided sample of its
    values, its device, the torch build and the hardware; computed once per model object. Call
    `reset_model_identity(model)` after changing the weights in place."""
    with _IDENTITY_LOCK:
        got = _IDENTITIES.get(model)
    if got is not None:
        return got
    h = hashlib.sha256(model.config.to_json_string().encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].to("cpu", torch.float64)
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{p.device}|".encode())
            h.update(sample.numpy().tobytes())
    dev = model.get_input_embeddings().weight.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    identity = digest(h.hexdigest(), torch.__version__, str(dev), hw, cpu_model())
    with _IDENTITY_LOCK:
        _IDENTITIES[model] = identity
    return identity


def reset_model_identity(model: Any) -> None:
    with _IDENTITY_LOCK:
        _IDENTITIES.pop(model, None)


def scene_key(content: str, model: Any, namespace: str = "") -> str:
    """Store key of the scene of `content` (a pyramid digest, see `uhrbat.scene.pixels`) as seen
    by `model`: its identity, the feature dtype and every config value the features depend on."""
    if not isinstance(content, str) or not content:
        raise TypeError(f"a scene key needs the content digest, got {content!r}")
    cfg = model.config
    return digest(
        "scene",
        namespace,
        content,
        model_identity(model),
        str(model.projector.fc1.weight.dtype),
        cfg.encode_chunk_size,
        cfg.vision_feature_layer,
        cfg.enable_scale_pos_residual,
        list(cfg.scales),
        getattr(cfg.vision_config, "_attn_implementation", None),
    )
