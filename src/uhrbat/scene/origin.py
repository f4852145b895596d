"""Where a scene's pixels come from, so that windows of it (regions, zoom) can be read again.

An `Origin` is a local image file (or a PIL image), the trust level it is read at and its
reading options (bands, stretch, pixel limit): everything `uhrbat.io.open_image` needs except
the window. `open_source(image, **read)` opens an image through its origin and records the
origin on the source (`source.origin`), so any front end's source can later give a window of the
same scene (`Origin.open(request)`), read exactly as that window cut into its own file.

Identities (cache aliases, `uhrbat.scene.manager`):

* a whole image: the file's bytes (SHA-256, memoised by path and change stamps) or the PIL
  image's pixels, with the reading options; the default reading gives the key a plain path
  always had;
* a window (a **child scene**): its origin's identity + the region as given
  (`RegionRequest.key()`: pixels or map box and CRS, or the GeoJSON polygons' digest), so asking
  about the same region again finds its scene without reading a pixel. Two requests that land on
  the same window share the features anyway: a scene's store key is its pyramid's content.

`WindowSource` stands for a window whose scene is already prepared: it knows the window's
place in the scene (`region`, `georef`, `size`, what outputs need) and reads pixels only when
something asks for them (`square`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import ConfigError, RegionError
from uhrbat.options import ReadOptions
from uhrbat.scene.keys import FileHasher, digest

__all__ = [
    "Origin",
    "WindowFacts",
    "WindowSource",
    "open_source",
    "origin_of",
    "reading_targets",
    "refuse_window_masks",
    "window_request",
]

#: Reading options that say how a file becomes pixels (not which window of it).
_PIXEL_READ_KEYS = ("bands", "stretch", "max_pixels")


@dataclass(frozen=True, eq=False)
class Origin:
    """A local image file path (or a PIL image), the trust level and the reading options of a
    scene (`read` has no region: windows are asked for separately)."""

    image: Any
    trust: str = "local"
    read: ReadOptions = field(default_factory=ReadOptions)

    def __post_init__(self) -> None:
        if self.read.region_request() is not None:
            object.__setattr__(self, "read", self.read.without_region())

    def open(self, region: Any = None) -> Any:
        """The image (or the window `region`, a `RegionRequest`) as an `ImageSource` that
        remembers this origin. `RegionError` for a region that does not fit the image."""
        from uhrbat.io.sources import open_image

        kwargs = self.read.open_kwargs()
        if region is not None:
            kwargs["region"] = region
        source = open_image(self.image, trust=self.trust, **kwargs)
        source.origin = self
        return source

    def fingerprint(self, hasher: FileHasher, tiling: dict[str, Any], namespace: str) -> str:
        """Cache alias of the whole image (see the module docstring); `OSError` when the file
        cannot be read (the reader reports it)."""
        from PIL import Image

        read = self.read.key()
        if self.trust != "local":
            read["trust"] = self.trust
        if isinstance(self.image, Image.Image):
            h = hashlib.sha256(self.image.tobytes()).hexdigest()
            return digest("pil", self.image.mode, self.image.size, h, read, tiling, namespace)
        return digest("file", hasher(Path(self.image)), read, tiling, namespace)


def window_fingerprint(origin_fingerprint: str, request: Any) -> str:
    """Cache alias of a window of a scene: its origin's alias + the region as given."""
    return digest("window", origin_fingerprint, request.key())


def origin_of(image: Any, read: ReadOptions | None = None) -> Origin | None:
    """The origin of `image`: a path or PIL image (read with `read`), an `OpenedScene` or a
    source that remembers one (`open_source`); None when unknown (e.g. a source opened by
    `uhrbat.io.open_image` directly)."""
    from PIL import Image

    if isinstance(image, Origin):
        return image
    if isinstance(image, (str, os.PathLike, Image.Image)):
        return Origin(image, "local", read if read is not None else ReadOptions())
    got = getattr(image, "origin", None)
    return got if isinstance(got, Origin) else None


def window_request(image: Any, request: Any) -> tuple[Origin, Any]:
    """(origin, request) for a window of the scene `image` shows; `RegionError` when the window
    cannot be read again from it."""
    origin = origin_of(image)
    if origin is None:
        raise RegionError(
            "a region is read from the image file: pass the path (or a PIL image), or a scene or source opened "
            "from it (pipe.open(path), uhrbat.scene.origin.open_source(path)), not a source opened elsewhere"
        )
    return origin, request


def open_source(image: Any, *, trust: str = "local", **read: Any) -> Any:
    """`uhrbat.io.open_image(image, trust=..., **read)` (read: `uhrbat.options.ReadOptions`
    names, the region fields included) for a path or PIL image; the source remembers its
    origin, so windows of its scene (regions, zoom) can be read from it later."""
    opts = ReadOptions.of(**read)
    return Origin(image, trust, opts).open(opts.region_request())


def reading_targets(images: Any, given: dict[str, Any]) -> list[tuple[Any, Any, Any]]:
    """`(image, what the scene manager opens, region request or None)` per image, from the
    reading options in `given` (`uhrbat.options.ReadOptions` names; other keys are ignored). A
    path or PIL image is read with them (an `Origin`); an opened scene or source keeps its own
    reading, so giving bands, stretch or max_pixels with one is refused (`ConfigError`)."""
    from PIL import Image

    read = {k: v for k, v in given.items() if k in ReadOptions.model_fields and v is not None}
    if not read:
        return [(im, im, None) for im in images]
    opts = ReadOptions.of(**read)
    request, pixels = opts.region_request(), [k for k in _PIXEL_READ_KEYS if k in read]
    out = []
    for im in images:
        if isinstance(im, (str, os.PathLike, Image.Image)):
            out.append((im, Origin(im, "local", opts.without_region()), request))
        elif pixels:
            raise ConfigError(
                f"{', '.join(pixels)} apply when the pipeline reads the image file; this image is already opened: "
                f"pass them to pipe.open(path, ...) (or to the reader) instead"
            )
        else:
            out.append((im, im, request))
    return out


def refuse_window_masks(selector: str, targets: Any) -> None:
    """`RegionError` when a selector that reads segment masks (one mask file per image) is asked
    about a window: the masks of the image do not describe the window's pyramid."""
    if any(request is not None or getattr(target, "region", None) is not None for _, target, request in targets):
        raise RegionError(
            f"selector {selector} needs the segment masks of the window, which a mask file of the image does not "
            f"give; ask about the whole image, or use another selector for a region"
        )


@dataclass(frozen=True)
class WindowFacts:
    """What outputs need of a window without reading its pixels: its place in the scene
    (`uhrbat.io.regions.Region`), the image's label and georeference note."""

    region: Any
    label: str | None = None
    georef_note: str | None = None

    @classmethod
    def of(cls, source: Any) -> WindowFacts:
        return cls(source.region, getattr(source, "label", None), getattr(source, "georef_note", None))


class WindowSource:
    """A window of a scene (an `ImageSource`) that reads its pixels only when asked (`square`):
    a prepared child scene found again by its alias needs none."""

    def __init__(self, origin: Origin, request: Any, facts: WindowFacts) -> None:
        self.origin = origin
        self.request = request
        self.region = facts.region
        self.label = facts.label
        self.georef_note = facts.georef_note
        self._source: Any = None
        self._lock = threading.Lock()

    @property
    def size(self) -> tuple[int, int]:
        return self.region.size

    @property
    def georef(self) -> Any:
        return self.region.georef

    @property
    def path(self) -> Any:
        return None if not isinstance(self.origin.image, (str, os.PathLike)) else self.origin.image

    def source(self) -> Any:
        """The window read now (once)."""
        with self._lock:
            if self._source is None:
                self._source = self.origin.open(self.request)
            return self._source

    def square(self, side: int) -> Any:
        return self.source().square(side)

    def padded_square(self) -> Any:
        """The window's exact padded square, or None (`uhrbat.scene.pixels.read_pyramid`: the
        pyramid's content is the same as when the window was first read)."""
        padded = getattr(self.source(), "padded_square", None)
        return padded() if padded is not None else None

    def __repr__(self) -> str:
        return f"WindowSource({self.label or self.origin.image!r}, pixels={list(self.region.pixels)})"


class WindowMemo:
    """Bounded, thread-safe `window alias -> WindowFacts` (least recently used dropped)."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, WindowFacts] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: str) -> WindowFacts | None:
        with self._lock:
            got = self._items.get(key)
            if got is not None:
                self._items.move_to_end(key)
            return got

    def put(self, key: str, facts: WindowFacts) -> None:
        with self._lock:
            self._items[key] = facts
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
