"""Scene handles: the bounded, thread-safe table of scenes an MCP client has opened, and the rule
for which files it may open.

A scene id is `secrets.token_urlsafe(16)` (128 random bits): unguessable, never derived from the
path or the pixels. The table holds at most `max_scenes` scenes; one left unused for `ttl_s`
seconds is dropped at the next access to the table. A full table refuses to open another scene
(one line naming `close_scene` and the TTL) instead of evicting a scene an agent still holds an
id for. No torch and no model here.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from uhrbat.errors import ConfigError, ImageLoadError, UhrBatError


class SceneHandleError(UhrBatError, LookupError):
    """A scene id that is unknown (never opened, closed, or expired), or a full scene table."""


@dataclass
class Question:
    """One question asked about a scene, with what the pipeline reported."""

    question: str
    answer: str
    cache: str
    seconds: float


@dataclass
class Scene:
    """One open scene: the opened source (kept, so the pipeline recognises it and reuses its
    prepared features) and what was asked about it."""

    id: str
    path: str  # the real path that was opened
    source: Any  # the opened ImageSource (untrusted reader)
    handle: Any = None  # what `uhrbat.mcp.adapter.scene_handle` made of `source` (at the first question)
    questions: list[Question] = field(default_factory=list)
    last: tuple[str, Any] | None = None  # (question, AskResult) of the last question: `look` draws it
    windows: OrderedDict = field(default_factory=OrderedDict)  # region key -> window source (`adapter.window`)
    opened_at: float = 0.0  # clock seconds
    used_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one question at a time per scene


#: Longest question history kept per scene (older ones are counted, not kept).
MAX_HISTORY = 100


class SceneTable:
    """`id -> Scene`, at most `max_scenes`, idle ones expire after `ttl_s` (0 = never)."""

    def __init__(self, max_scenes: int = 8, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        if isinstance(max_scenes, bool) or not isinstance(max_scenes, int) or max_scenes < 1:
            raise ConfigError(f"max_scenes must be an integer >= 1, got {max_scenes!r}")
        if not ttl_s >= 0:
            raise ConfigError(f"the scene TTL must be >= 0 seconds (0 = never expire), got {ttl_s!r}")
        self.max_scenes = max_scenes
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._scenes: dict[str, Scene] = {}

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._scenes)

    def _expire(self) -> None:
        if not self.ttl_s:
            return
        now = self._clock()
        for sid in [s.id for s in self._scenes.values() if now - s.used_at > self.ttl_s]:
            del self._scenes[sid]

    def check_room(self) -> None:
        """`SceneHandleError` when the table is full (checked again by `add`)."""
        with self._lock:
            self._check_room()

    def _check_room(self) -> None:
        self._expire()
        if len(self._scenes) >= self.max_scenes:
            ttl = f"after {self.ttl_s:g} s unused" if self.ttl_s else "never (no TTL)"
            raise SceneHandleError(
                f"{len(self._scenes)} scenes are open, the most this server keeps (--max-scenes "
                f"{self.max_scenes}); close one with close_scene (idle scenes expire {ttl})"
            )

    def add(self, path: str, source: Any) -> Scene:
        """Register an opened source under a new id (`SceneHandleError` when the table is full)."""
        with self._lock:
            self._check_room()
            sid = secrets.token_urlsafe(16)
            while sid in self._scenes:  # 128 random bits: never in practice
                sid = secrets.token_urlsafe(16)
            now = self._clock()
            scene = Scene(id=sid, path=path, source=source, opened_at=now, used_at=now)
            self._scenes[sid] = scene
            return scene

    def get(self, scene_id: str) -> Scene:
        """The scene (its idle clock restarts), or `SceneHandleError`."""
        with self._lock:
            self._expire()
            scene = self._scenes.get(scene_id) if isinstance(scene_id, str) else None
            if scene is None:
                raise SceneHandleError(_unknown(scene_id, self.ttl_s))
            scene.used_at = self._clock()
            return scene

    def close(self, scene_id: str) -> Scene:
        with self._lock:
            self._expire()
            scene = self._scenes.pop(scene_id, None) if isinstance(scene_id, str) else None
            if scene is None:
                raise SceneHandleError(_unknown(scene_id, self.ttl_s))
            return scene

    def ids(self) -> list[str]:
        with self._lock:
            self._expire()
            return list(self._scenes)

    def idle_seconds(self, scene: Scene) -> float:
        return max(0.0, self._clock() - scene.used_at)

    def expires_in(self, scene: Scene) -> float | None:
        return None if not self.ttl_s else max(0.0, self.ttl_s - self.idle_seconds(scene))

    @staticmethod
    def record(scene: Scene, question: Question) -> None:
        scene.questions.append(question)
        del scene.questions[:-MAX_HISTORY]


def _unknown(scene_id: Any, ttl_s: float) -> str:
    shown = repr(scene_id if len(str(scene_id)) <= 64 else str(scene_id)[:64] + "...")
    why = f"closed, expired after {ttl_s:g} s unused, or never opened" if ttl_s else "closed or never opened"
    return f"unknown scene id {shown} ({why}); open the image again with open_scene"


# ----------------------------------------------------------------------------- allowed paths
def allowed_roots(folders: Sequence[str | os.PathLike]) -> list[str]:
    """`--allowed-path` folders as real paths (symlinks resolved); each must be a folder."""
    roots = []
    for f in folders:
        real = os.path.realpath(os.fspath(f))
        if not os.path.isdir(real):
            raise ConfigError(f"--allowed-path {os.fspath(f)!r} is not a folder; give an existing folder")
        if real not in roots:
            roots.append(real)
    if not roots:
        raise ConfigError("no --allowed-path folder given; open_scene could open nothing")
    return roots


def resolve_allowed(path: str, roots: Sequence[str]) -> str:
    """The real path of `path` (symlinks resolved) if it lies inside one of `roots`, else an
    `ImageLoadError` naming the allowed folders. A relative path is looked up in each root in
    turn (the first that has it)."""
    from uhrbat.serving.media import inside

    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise ImageLoadError("path must be a non-empty file path")
    shown = ", ".join(roots)
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in roots]
    found = [c for c in candidates if os.path.lexists(c)] or candidates[:1]
    for candidate in found:
        for root in roots:
            real = inside(root, candidate)
            if real is not None:
                return real
    raise ImageLoadError(
        f"{path!r} is outside the allowed folders ({shown}); open_scene reads only files under the "
        f"server's --allowed-path folders"
    )
