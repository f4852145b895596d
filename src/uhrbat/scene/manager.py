"""`SceneManager`: from an image to a prepared scene, through the store.

`open(image)` finds the scene of an image (path, PIL image, opened `ImageSource`, an `Origin` or
an earlier `OpenedScene`) in the store by a cheap fingerprint of the source, or decodes it once,
encodes it (every tile, or with `encode="gated"` the base scale only) and keeps it. Each question
then gets a `SceneView` of it (`OpenedScene.view`). `open_window(image, request)` does the same
for one window of the image's scene (a region, a zoom window): a child scene, found again by its
origin's identity + the region (`uhrbat.scene.origin`), read exactly as the window cut into its
own file. The manager also provides the opt-in scoring prefix cache.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uhrbat.errors import ImageLoadError
from uhrbat.scene.keys import FileHasher, digest, scene_key
from uhrbat.scene.origin import (
    Origin,
    WindowFacts,
    WindowMemo,
    WindowSource,
    origin_of,
    window_fingerprint,
    window_request,
)
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
        origin: where the scene's pixels come from (`uhrbat.scene.origin.Origin`), so windows of
            it can be read; None when unknown (a source opened elsewhere).
        region: for a window of a larger scene (a child scene), its place in the scene
            (`uhrbat.io.regions.Region`); None for a whole image.
    """

    key: str | None
    content: str
    size: tuple[int, int]
    source: Any
    features: str
    timings: dict[str, float]
    view: SceneView = field(repr=False)
    encoded: dict[int, int] = field(default_factory=dict)
    origin: Origin | None = None
    region: Any = None

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
        self._windows = WindowMemo()  # window alias -> its place in the scene (no pixels)

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
        source = self._source(image)
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
            return OpenedScene(
                None,
                content,
                tuple(source.size),
                source,
                "off",
                timings,
                view,
                scene.tile_counts(),
                origin_of(source),
                _region_of(source),
            )
        if fingerprint is not None:
            store.put_alias(fingerprint, content, source.size)
            if _region_of(source) is not None:
                self._windows.put(fingerprint, WindowFacts.of(source))
        self._remember_alias(image, alias)
        key = scene_key(content, self.model, self.namespace)
        with store.key_lock(key):
            got = self._lookup(key)
            if got is not None:
                if canvases.nbytes:
                    store.put(self._canvas_key(content), canvases.tensors(), disk=False)
                return self._opened(got[0], key, alias, source, got[1], timings, progress)
            scene = self._encode(tiles, full, timings, progress)
            store.put(key, scene.tensors())
            if canvases.nbytes:
                store.put(self._canvas_key(content), canvases.tensors(), disk=False)
        opened = self._opened(scene, key, alias, source, "miss", timings, progress)
        opened.encoded = scene.tile_counts()
        return opened

    def open_all(
        self, targets: Sequence[tuple[Any, Any, Any]], encode: str = "full", progress: Progress | None = None
    ) -> list[OpenedScene]:
        """The scenes of one request's `(image, target, region request or None)` rows
        (`uhrbat.scene.origin.reading_targets`): `open(target)` or `open_window(target, request)`,
        the same image (and window) again prepared once."""
        opened: list[OpenedScene] = []
        first: dict[Any, OpenedScene] = {}
        for image, target, request in targets:
            memo = (id(image), None if request is None else repr(request.key()))
            got = first.get(memo)
            if got is not None:
                opened.append(self.open(got, encode, progress))
            elif request is not None:
                opened.append(self.open_window(target, request, encode, progress))
            else:
                opened.append(self.open(target, encode, progress))
            first.setdefault(memo, opened[-1])
        return opened

    def open_window(
        self, image: Any, request: Any, encode: str = "full", progress: Progress | None = None
    ) -> OpenedScene:
        """The child scene of one window (`request`, a `uhrbat.io.regions.RegionRequest` in the
        scene's coordinates) of the scene `image` shows (a path, PIL image, `Origin`, or a scene
        or source that remembers its origin). A window asked about before is found by its alias
        without reading a pixel; otherwise only the window is read (`RegionError` when it does
        not fit the image), exactly as if it had been cut into its own file."""
        origin, request = window_request(image, request)
        if self.store is not None:
            try:
                fingerprint = window_fingerprint(
                    origin.fingerprint(self.hash_file, self._tiling(), self.namespace), request
                )
            except OSError:
                fingerprint = None  # the reader reports the problem
            facts = self._windows.get(fingerprint) if fingerprint is not None else None
            if facts is not None:
                return self.open(WindowSource(origin, request, facts), encode, progress)
        if progress is not None:
            progress("load", {})
        t = time.perf_counter()
        source = origin.open(request)
        seconds = time.perf_counter() - t
        opened = self.open(source, encode, progress)
        opened.timings["load"] += seconds
        return opened

    @staticmethod
    def _source(image: Any) -> Any:
        """An `ImageSource` of `image` (a path / PIL image is read with the default options and
        remembers its origin)."""
        from PIL import Image

        if isinstance(image, (str, os.PathLike, Image.Image)):
            image = Origin(image)
        if isinstance(image, Origin):
            return image.open()
        from uhrbat.io.sources import open_image

        return open_image(image)

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
        region = _region_of(image)
        return OpenedScene(
            key, alias["content"], tuple(alias["size"]), image, where, timings, view, {}, origin_of(image), region
        )

    def _reopen(self, opened: OpenedScene, progress: Progress | None) -> OpenedScene:
        """An earlier `OpenedScene` again: the store's latest state of it (it may have grown or been
        evicted; then it is prepared again from its source)."""
        timings = {"load": 0.0, "tiles": 0.0, "encode": 0.0}
        if opened.key is None:
            view = opened.view.sibling(progress)
            return OpenedScene(
                None, opened.content, opened.size, opened.source, "off", timings, view, {}, opened.origin, opened.region
            )
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

    def _canvas_key(self, content: str) -> str:
        """Store key of a scene's pixel canvases: the content and the namespace (a tenant never
        finds another tenant's canvases, not even by timing)."""
        return digest("canvas", content, self.namespace)

    def _pixels(self, content: str, image: Any) -> Callable[[], TilePixels]:
        """Where finer tiles come from: the kept canvases, or the source read again (verified to be
        the same pyramid)."""

        def provide() -> TilePixels:
            ip = self.processor.image_processor
            g = self.geometry
            fine = [s for s in g.scales if s != g.base_scale]
            got = self.store.get(self._canvas_key(content)) if self.store is not None else None
            if got is not None:
                return pixels_from_tensors(ip, got[0])
            _, canvases, again = read_pyramid(self._source(image), ip, (), fine)
            if again != content:
                raise ImageLoadError("the image changed since its scene was prepared; open it again")
            if self.store is not None:
                self.store.put(self._canvas_key(content), canvases.tensors(), disk=False)
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
        """A cheap key for the *source* (before decoding): file bytes or PIL pixels with the
        reading options (a path, a PIL image, an `Origin`, or a source that remembers its origin;
        for a window, + the region as given), or the `cache_fingerprint` string an ImageSource
        may carry; None when unknown."""
        origin = origin_of(image)
        if origin is not None:
            region = _region_of(image)
            request = getattr(region, "request", None)
            if region is not None and request is None:
                return None  # a window placed without its request: no stable identity
            try:
                base = origin.fingerprint(self.hash_file, self._tiling(), self.namespace)
            except OSError:
                return None  # open_image reports the problem
            return base if region is None else window_fingerprint(base, request)
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


def _region_of(image: Any) -> Any:
    """The window a source shows (`source.region`), None for a whole image or a path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike, Image.Image, Origin)):
        return None
    return getattr(image, "region", None)


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
