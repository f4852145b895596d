"""`SceneManager`: from an image to a prepared scene, through the store.

`open(image)` finds the scene of an image (path, PIL image, opened `ImageSource` or an earlier
`OpenedScene`) in the store by a cheap fingerprint of the source, or decodes it once, encodes
it (every tile, or with `encode="gated"` the base scale only) and keeps it. Each question then
gets a `SceneView` of it (`OpenedScene.view`). The manager also provides the opt-in scoring
prefix cache.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uhrbat.errors import ImageLoadError
from uhrbat.scene.keys import FileHasher, digest, scene_key
from uhrbat.scene.pixels import CONTENT_FORMAT, TilePixels, pixels_from_tensors, read_pyramid
from uhrbat.scene.scene import Scene, SceneGeometry
from uhrbat.scene.store import SceneStore
from uhrbat.scene.view import Progress, SceneView

__all__ = ["OpenedScene", "SceneManager"]


@dataclass
class OpenedScene:
    """A scene ready for questions (`UhrBatPipeline.open`); pass it to `ask` instead of the image.

    Attributes:
        key: the scene's store key (None without a store).
        content: the pyramid's content digest.
        size: the image's (width, height).
        source: the opened image (finer tiles are cut from it again if the store lost its pixels).
        features: where the features came from this time: "off" (no store), "miss" (computed
            now), "hit" (memory), "disk".
        timings: seconds spent opening: load, tiles, encode.
        encoded: tiles per scale the opening encoded (empty when the scene was reused).
    """

    key: str | None
    content: str
    size: tuple[int, int]
    source: Any
    features: str
    timings: dict[str, float]
    view: SceneView = field(repr=False)
    encoded: dict[int, int] = field(default_factory=dict)

    @property
    def scene(self) -> Scene:
        return self.view.scene

    @property
    def tiles(self) -> dict[int, int]:
        """Tiles encoded so far per scale."""
        return self.view.scene.tile_counts()


class SceneManager:
    """Opens scenes for one model, through a `SceneStore` (or None: nothing kept across calls).

    Args:
        model, processor: the loaded model and processor.
        store: the scene store, or None.
        model_lock: held around every model run (the pipeline's lock).
        namespace: part of every key (the server's tenant).
    """

    def __init__(
        self, model: Any, processor: Any, store: SceneStore | None, model_lock: Any, namespace: str = ""
    ) -> None:
        self.model = model
        self.processor = processor
        self.store = store
        self.model_lock = model_lock
        self.namespace = namespace
        self.hash_file = FileHasher()
        self._aliases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # opened source -> alias
        self._aliases_lock = threading.Lock()

    @property
    def geometry(self) -> SceneGeometry:
        return SceneGeometry.of(self.model.config)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ opening
    def open(self, image: Any, encode: str = "full", progress: Progress | None = None) -> OpenedScene:
        """The scene of `image`, from the store when possible (query-independent work only)."""
        if isinstance(image, OpenedScene):
            return self._reopen(image, progress)
        store = self.store
        timings = {"load": 0.0, "tiles": 0.0, "encode": 0.0}
        t0 = time.perf_counter()
        alias = fingerprint = None
        if store is not None:
            alias = self._alias_of(image)
            if alias is None:
                fingerprint = self._fingerprint(image)
                alias = store.get_alias(fingerprint) if fingerprint else None
        if alias is not None:
            key = scene_key(alias["content"], self.model, self.namespace)
            with store.key_lock(key):
                got = self._lookup(key)
            if got is not None:
                timings["load"] = time.perf_counter() - t0
                return self._opened(got[0], key, alias, image, got[1], timings, progress)
        if progress is not None:
            progress("load", {})
        from uhrbat.io.sources import open_image

        source = open_image(image)
        t1 = time.perf_counter()
        if progress is not None:
            progress("tiles", {"size": list(source.size)})
        g = self.geometry
        fine = [s for s in g.scales if s != g.base_scale]
        full = encode != "gated"
        tiles, canvases, content = read_pyramid(
            source, self.processor.image_processor, g.scales if full else [g.base_scale], () if full else fine
        )
        t2 = time.perf_counter()
        timings["load"], timings["tiles"] = t1 - t0, t2 - t1
        alias = {"content": content, "size": [int(v) for v in source.size]}
        if store is None:
            scene = self._encode(tiles, full, timings, progress)
            view = SceneView(scene, self.model, canvases, progress=progress)
            return OpenedScene(None, content, tuple(source.size), source, "off", timings, view, scene.tile_counts())
        if fingerprint is not None:
            store.put_alias(fingerprint, content, source.size)
        self._remember_alias(image, alias)
        key = scene_key(content, self.model, self.namespace)
        with store.key_lock(key):
            got = self._lookup(key)
            if got is not None:
                if canvases.nbytes:
                    store.put(digest("canvas", content), canvases.tensors(), disk=False)
                return self._opened(got[0], key, alias, source, got[1], timings, progress)
            scene = self._encode(tiles, full, timings, progress)
            store.put(key, scene.tensors())
            if canvases.nbytes:
                store.put(digest("canvas", content), canvases.tensors(), disk=False)
        opened = self._opened(scene, key, alias, source, "miss", timings, progress)
        opened.encoded = scene.tile_counts()
        return opened

    def _encode(self, tiles: torch.Tensor, full: bool, timings: dict[str, float], progress: Progress | None) -> Scene:
        g = self.geometry
        if progress is not None:
            progress("encode", {"tiles": {s: g.num_tiles(s) for s in (g.scales if full else [g.base_scale])}})
        t = time.perf_counter()
        with self.model_lock:
            if full:
                scene = self.model.encode_scene(tiles)
            else:
                scene = self.model.encode_scene(tiles, layout={g.base_scale: g.all_tiles(g.base_scale)})
        timings["encode"] = time.perf_counter() - t
        return scene

    def _opened(
        self,
        scene: Scene,
        key: str,
        alias: dict[str, Any],
        image: Any,
        where: str,
        timings: dict[str, float],
        progress: Progress | None,
    ) -> OpenedScene:
        view = SceneView(scene, self.model, self._pixels(alias["content"], image), self.store, key, progress)
        return OpenedScene(key, alias["content"], tuple(alias["size"]), image, where, timings, view)

    def _reopen(self, opened: OpenedScene, progress: Progress | None) -> OpenedScene:
        """An earlier `OpenedScene` again: the store's latest state of it (it may have grown or been
        evicted; then it is prepared again from its source)."""
        timings = {"load": 0.0, "tiles": 0.0, "encode": 0.0}
        if opened.key is None:
            view = opened.view.sibling(progress)
            return OpenedScene(None, opened.content, opened.size, opened.source, "off", timings, view)
        with self.store.key_lock(opened.key):
            got = self._lookup(opened.key)
        if got is None:
            return self.open(opened.source, "gated" if not opened.scene.complete() else "full", progress)
        alias = {"content": opened.content, "size": list(opened.size)}
        return self._opened(got[0], opened.key, alias, opened.source, got[1], timings, progress)

    def _lookup(self, key: str) -> tuple[Scene, str] | None:
        got = self.store.get(key, self.device)
        if got is None:
            return None
        scene = Scene.from_tensors(got[0], self.geometry, self.model.projector.fc1.weight.dtype)
        return (scene, got[1]) if scene is not None else None

    def _pixels(self, content: str, image: Any) -> Callable[[], TilePixels]:
        """Where finer tiles come from: the kept canvases, or the source read again (verified to be
        the same pyramid)."""

        def provide() -> TilePixels:
            ip = self.processor.image_processor
            g = self.geometry
            fine = [s for s in g.scales if s != g.base_scale]
            got = self.store.get(digest("canvas", content)) if self.store is not None else None
            if got is not None:
                return pixels_from_tensors(ip, got[0])
            from uhrbat.io.sources import open_image

            _, canvases, again = read_pyramid(open_image(image), ip, (), fine)
            if again != content:
                raise ImageLoadError("the image changed since its scene was prepared; open it again")
            if self.store is not None:
                self.store.put(digest("canvas", content), canvases.tensors(), disk=False)
            return canvases

        return provide

    # ------------------------------------------------------------------ source fingerprints
    def _alias_of(self, image: Any) -> dict[str, Any] | None:
        if not _weakrefable(image):
            return None
        with self._aliases_lock:
            return self._aliases.get(image)

    def _remember_alias(self, image: Any, alias: dict[str, Any]) -> None:
        if _weakrefable(image):
            with self._aliases_lock:
                self._aliases[image] = alias

    def _tiling(self) -> dict[str, Any]:
        """What every source fingerprint adds: the tiling and the content digest's format (an
        alias to a digest of another format is never reused)."""
        ip = self.processor.image_processor
        tiling = {k: getattr(ip, k, None) for k in ("scales", "tile_size", "image_mean", "image_std")}
        return {**tiling, "content_format": CONTENT_FORMAT}

    def _fingerprint(self, image: Any) -> str | None:
        """A cheap key for the *source* (before decoding): file bytes, PIL pixels, or the
        `cache_fingerprint` string an ImageSource may carry; None when unknown."""
        from PIL import Image

        from uhrbat.io import images as io_images

        read = {"stretch": io_images.DEFAULT_STRETCH, "max_pixels": io_images.DEFAULT_MAX_PIXELS}
        if isinstance(image, (str, os.PathLike)):
            try:
                return digest("file", self.hash_file(Path(image)), read, self._tiling(), self.namespace)
            except OSError:
                return None  # open_image reports the problem
        if isinstance(image, Image.Image):
            h = hashlib.sha256(image.tobytes())
            return digest("pil", image.mode, image.size, h.hexdigest(), read, self._tiling(), self.namespace)
        fp = getattr(image, "cache_fingerprint", None)
        return digest("source", fp, self._tiling(), self.namespace) if isinstance(fp, str) else None

    # ------------------------------------------------------------------ scoring prefix (opt-in)
    def scoring_prefix_provider(self, keys: Sequence[str | None]) -> Callable:
        """`scoring_prefix` for `prepare_inputs_embeds`: each row's `ScoringPrefix` from the store,
        keyed by its scene, the exact token ids before the image (another system prompt or compat
        template is another key), the LLM's attention implementation and dtype; computed and kept
        on a miss."""
        from uhrbat.modeling.scoring_pass import ScoringPrefix

        store = self.store
        lm = self.model.language_model
        num_layers = len(self.model.lm_layers)

        def provide(row: int, prefix_ids: torch.Tensor, compute: Callable[[], Any]) -> Any:
            key = keys[row]
            if store is None or key is None:
                return compute()
            pkey = digest(
                "scoring-prefix",
                key,
                [int(t) for t in prefix_ids.tolist()],
                self.model.config.compat,
                getattr(lm.config, "_attn_implementation", None),
                str(lm.get_input_embeddings().weight.dtype),
            )
            with store.key_lock(pkey):
                got = store.get(pkey, self.device)
                state = ScoringPrefix.from_tensors(got[0], num_layers) if got is not None else None
                if state is None:
                    state = compute()
                    store.put(pkey, state.tensors())
            return state

        return provide


def _weakrefable(obj: Any) -> bool:
    """Opened image sources are immutable readers: remember their content key by identity.
    Paths are hashed (files change); PIL images are hashed (they are mutable)."""
    from PIL import Image

    if isinstance(obj, (str, os.PathLike, Image.Image)):
        return False
    try:
        weakref.ref(obj)
        hash(obj)
    except TypeError:
        return False
    return True
