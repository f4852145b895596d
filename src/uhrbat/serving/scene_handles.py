"""Scene handles (issue 22): upload an image once (`POST /v1/scenes`), ask about it by id
(`extra_body={"scene_id": ...}`) as often as you like, each question reusing the prepared scene.

- **Ids** are `secrets.token_urlsafe(16)` (128 random bits), never derived from the bytes.
- **Tenants**: every handle belongs to the API key that created it (`ApiKeys` names a key's
  tenant by a digest, never the key). Lookups go by `(tenant, id)`: another key's id is answered
  exactly like an unknown one (404, same message, same dictionary lookup), and a tenant's scenes
  are prepared by `Engine.pipeline_for(tenant)`, whose store keys carry the tenant's namespace, so
  one tenant's upload never turns another tenant's question into a cache hit.
- **Preparation**: the upload is kept as a private file (0600) and read with the untrusted reader;
  its scene is prepared once (`pipeline.open`) and *pinned*: the handle holds the `OpenedScene`, so
  its features stay in memory while the handle lives (they go back into the store if the store's
  LRU dropped them). The decoded pixels are not kept. A question runs on the handle's
  `SceneOrigin` — the stored file plus what outputs need (size, georeference) — which the
  pipeline finds prepared (and says so: `cache: "hit"`); pixels are read again only when a
  question needs them (a region, gated tiles).
- **Limits**: handles per tenant (`--max-scenes`), bytes of pinned features over all tenants
  (`--max-scene-mb`), and an idle TTL (`--scene-ttl`); each refusal names the flag and the fix.
- **Restarts**: with `--cache-dir`, each handle is a folder `<cache-dir>/handles/<tenant>/<id>/`
  (the image and `scene.json`, with the georeference); a restarted server finds its handles there
  without reading an image, and the first question finds the features in the store's disk layer
  (`cache: "disk"`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.errors import ConfigError, ImageLoadError, ServerBusyError, UhrBatError
from uhrbat.scene.origin import Origin
from uhrbat.serving.limits import MiB, ServeOptions
from uhrbat.serving.openai_api import APIError
from uhrbat.serving.uploads import ImageHandle, Spool

#: What `secrets.token_urlsafe(16)` makes; anything else is not an id (and never a path).
_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_META = "scene.json"
log = logging.getLogger("uhrbat.serve")
_FORMAT = "uhrbat-scene-handle-1"


@dataclass(frozen=True, eq=False)
class SceneOrigin(Origin):
    """A handle's stored image as the pipeline sees it: an `Origin` (the file, read untrusted
    with the handle's reading options; windows of it are regions) that also carries what outputs
    need — size, georeference, the client's file name — without reading a pixel."""

    size: tuple[int, int] = (0, 0)
    georef: Any = None
    label: str | None = None
    georef_note: str | None = None
    bands: tuple[int, ...] | None = None


@dataclass
class SceneRecord:
    """One handle (see the module docstring). `opened` is the pinned scene (None until prepared,
    e.g. after a restart); `lock` makes two first questions prepare it once."""

    id: str
    tenant: str
    filename: str
    folder: Path
    image: str  # the stored image's file name inside `folder`
    read: dict[str, Any]  # reading options (`uhrbat.options.ReadOptions` names)
    facts: dict[str, Any]  # width, height, crs, bounds, bands, georeference_note
    created: float  # unix seconds
    used: float  # unix seconds (the idle clock)
    questions: int = 0
    found: bool = False  # restored after a restart and asked about since (its scene is in memory)
    prepared: dict[str, Any] = field(default_factory=dict)  # features ("miss" | "hit" | "disk"), seconds
    origin: SceneOrigin | None = None  # what questions run on (None until the image was read)
    opened: Any = None  # the pinned `OpenedScene`
    nbytes: int = 0  # bytes of its pinned features
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> Path:
        return self.folder / self.image

    def describe(self, ttl_s: float) -> dict[str, Any]:
        """The handle as the API shows it (`POST` / `GET /v1/scenes`)."""
        f = self.facts
        return {
            "id": self.id,
            "object": "scene",
            "created": int(self.created),
            "filename": self.filename,
            "width": f["width"],
            "height": f["height"],
            "crs": f["crs"],
            "bounds": f["bounds"],
            "bands": f["bands"],
            "georeference_note": f.get("georeference_note"),
            "questions": self.questions,
            "prepared": self.opened is not None,
            "features": self.prepared.get("features"),
            "prepare_seconds": self.prepared.get("seconds"),
            "expires_at": None if not ttl_s else int(self.used + ttl_s),
        }

    def meta(self) -> dict[str, Any]:
        georef = None if self.origin is None else self.origin.georef
        return {
            "georef": None if georef is None else {"crs": _crs_text(georef.crs), "transform": georef.coefficients},
            "format": _FORMAT,
            "id": self.id,
            "tenant": self.tenant,
            "filename": self.filename,
            "image": self.image,
            "read": self.read,
            "facts": self.facts,
            "created": self.created,
            "used": self.used,
            "questions": self.questions,
        }


class SceneHandles:
    """The handle table of one server (thread-safe; see the module docstring).

    `pipeline_for(tenant)` is the tenant's pipeline (`Engine.pipeline_for`); `clock` gives unix
    seconds (tests move it)."""

    def __init__(
        self,
        options: ServeOptions,
        pipeline_for: Callable[[str], Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.pipeline_for = pipeline_for
        self.clock = clock
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], SceneRecord] = {}
        self._reserved = 0  # bytes promised to scenes being prepared now
        # Uploads prepared at once (each holds a decoded image until its scene is encoded).
        self._preparing = threading.BoundedSemaphore(max(1, options.decode_workers))
        self._last_scene_bytes = 0  # a full scene's features (every scene of one model has the same)
        self._temporary = not options.cache_dir
        self._root: Path | None = None if self._temporary else Path(options.cache_dir).expanduser() / "handles"
        if self._root is not None:
            self._restore(self._root)

    @property
    def root(self) -> Path:
        """Where handles keep their images: `<cache-dir>/handles`, or a private temporary folder
        (0700, made on first upload, removed by `close`)."""
        with self._lock:
            if self._root is None:
                self._root = Path(tempfile.mkdtemp(prefix="uhrbat-scenes-"))
            return self._root

    # ------------------------------------------------------------------ table
    def close(self) -> None:
        """Drop every pinned scene; without `--cache-dir` the stored images go too."""
        with self._lock:
            self._records.clear()
            root, temporary = self._root, self._temporary
        if temporary and root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def _expire(self) -> None:
        """Delete handles idle for longer than the TTL (under `_lock`)."""
        ttl = self.options.scene_ttl_s
        if not ttl:
            return
        now = self.clock()
        for key in [k for k, r in self._records.items() if now - r.used > ttl]:
            self._drop(self._records.pop(key))

    @staticmethod
    def _drop(record: SceneRecord) -> None:
        record.opened = None
        shutil.rmtree(record.folder, ignore_errors=True)

    def get(self, tenant: str, scene_id: Any) -> SceneRecord:
        """The tenant's handle `scene_id` (its idle clock restarts), or a 404 that reads the same
        whether the id never existed, expired, was deleted or belongs to another API key."""
        with self._lock:
            self._expire()
            record = self._records.get((tenant, scene_id)) if isinstance(scene_id, str) else None
            if record is None:
                raise self._unknown(scene_id)
            record.used = self.clock()
            return record

    def list(self, tenant: str) -> list[SceneRecord]:
        with self._lock:
            self._expire()
            return sorted((r for (t, _), r in self._records.items() if t == tenant), key=lambda r: r.created)

    def delete(self, tenant: str, scene_id: Any) -> SceneRecord:
        with self._lock:
            self._expire()
            record = self._records.pop((tenant, scene_id), None) if isinstance(scene_id, str) else None
            if record is None:
                raise self._unknown(scene_id)
        self._drop(record)
        return record

    def _unknown(self, scene_id: Any) -> APIError:
        shown = str(scene_id)
        shown = repr(shown if len(shown) <= 40 else shown[:40] + "...")
        ttl = self.options.scene_ttl_s
        why = f"deleted, idle for more than {ttl:g} s, or" if ttl else "deleted, or"
        return APIError(
            404,
            f"no scene {shown} for this API key ({why} never created with it); upload the image with "
            "POST /v1/scenes and use the id it returns",
            param="scene_id",
            code="scene_not_found",
        )

    # ------------------------------------------------------------------ create
    def create(self, tenant: str, spool: Spool, read: dict[str, Any]) -> SceneRecord:
        """Keep the upload, prepare its scene and register a new handle (blocking: decode and
        encode; call it off the event loop). The spool is spent either way."""
        try:
            reserve = self._admit(tenant)
        except BaseException:
            spool.discard()
            raise
        scene_id = secrets.token_urlsafe(16)
        folder = self.root / _tenant_dir(tenant) / scene_id
        slot = False
        try:
            folder.mkdir(mode=0o700, parents=True)
            image = os.path.basename(spool.keep(folder))
            now = self.clock()
            record = SceneRecord(scene_id, tenant, spool.label, folder, image, dict(read), {}, now, now)
            slot = self._preparing.acquire(timeout=self.options.request_timeout_s or None)
            if not slot:
                raise ServerBusyError(
                    f"every scene-preparation slot stayed busy for {self.options.request_timeout_s:g} s "
                    f"({self.options.flag('decode_workers')} {self.options.decode_workers}); retry later"
                )
            self.prepare(record)
            with self._lock:
                self._reserved -= reserve
                reserve = 0
                self._check_room(tenant, record.nbytes)
                self._records[(tenant, scene_id)] = record
            self._save(record)
            return record
        except BaseException:
            spool.discard()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            if slot:
                self._preparing.release()
            if reserve:
                with self._lock:
                    self._reserved -= reserve

    def _admit(self, tenant: str) -> int:
        """Refuse before any decoding when the tenant or the memory bound is full; reserve one
        scene's bytes meanwhile."""
        with self._lock:
            self._expire()
            reserve = self._last_scene_bytes
            self._check_room(tenant, reserve)
            self._reserved += reserve
            return reserve

    def _check_room(self, tenant: str, nbytes: int) -> None:
        o = self.options
        mine = sum(1 for t, _ in self._records if t == tenant)
        ttl = f"; handles idle for {o.scene_ttl_s:g} s are deleted" if o.scene_ttl_s else ""
        if mine >= o.max_scenes:
            raise _limit(
                f"this API key already holds {mine} scenes, the most this server keeps per key "
                f"({o.flag('max_scenes')} {o.max_scenes}); DELETE /v1/scenes/ID one you no longer need{ttl}"
            )
        held = sum(r.nbytes for r in self._records.values()) + self._reserved
        if held + nbytes > o.max_scene_bytes:
            raise _limit(
                f"the server's scene memory is full ({held / MiB:,.0f} MiB of prepared features held, a scene needs "
                f"{nbytes / MiB:,.0f} MiB, limit {o.flag('max_scene_bytes')} {o.max_scene_bytes / MiB:g}); "
                f"DELETE /v1/scenes/ID a scene you no longer need{ttl}"
            )

    # ------------------------------------------------------------------ prepare
    def prepare(self, record: SceneRecord) -> SceneOrigin:
        """What a question about the handle runs on (its `SceneOrigin`), with its scene pinned.

        A new handle: read the stored image (untrusted reader; messages name the client's file,
        never the server's path), prepare its scene in the tenant's namespace, pin it. A handle
        restored after a restart: its first question finds the features where the previous server
        left them (the store's disk layer) and the next call pins them (a memory hit). Later calls
        put the pinned features back into the store if its LRU dropped them, so a question by id
        never prepares the scene again."""
        with record.lock:
            pipe = self.pipeline_for(record.tenant)
            if record.opened is not None:
                _repin(pipe, record.opened)
            elif record.origin is None:
                self._prepare_new(pipe, record)
            elif record.found:  # restored, asked about once since: its scene is in memory now
                self._pin(record, pipe.open(record.origin))
            else:
                record.found = True
            return record.origin  # type: ignore[return-value]

    def _prepare_new(self, pipe: Any, record: SceneRecord) -> None:
        from uhrbat.io import decode_section
        from uhrbat.mcp.service import scene_facts
        from uhrbat.options import ReadOptions

        if getattr(pipe, "scene_cache", None) is None:
            raise ConfigError(
                "scene handles keep prepared scenes in the pipeline's scene cache, and this pipeline has none; "
                "serve a pipeline made with scene_cache=True"
            )
        t = time.perf_counter()
        base = Origin(str(record.path), "untrusted", ReadOptions.of(**record.read))
        try:
            with decode_section():
                source = base.open()
        except ImageLoadError as e:
            raise ImageLoadError(_named(str(e), record)) from None
        record.facts = scene_facts(source)
        if record.facts["bands"] is None and record.read.get("bands"):  # a PNG/JPEG source keeps no band list
            record.facts["bands"] = [int(b) for b in record.read["bands"]]
        first = pipe.open(source)  # the work: tiles, CLIP features (or this tenant's cached scene)
        record.origin = _origin(record, getattr(source, "georef", None))
        del source  # the decoded pixels: a question that needs pixels reads the file again
        # The same scene again with the stored file as its source (a store lookup, no work).
        self._pin(record, pipe.open(record.origin) if first.key is not None else first)
        record.prepared = {"features": first.features, "seconds": round(time.perf_counter() - t, 6)}

    def _pin(self, record: SceneRecord, opened: Any) -> None:
        record.opened = opened
        record.nbytes = sum(v.numel() * v.element_size() for v in opened.scene.tensors().values())
        with self._lock:
            self._last_scene_bytes = max(self._last_scene_bytes, record.nbytes)

    def image(self, tenant: str, scene_id: Any, where: str = "scene_id", region: Any = None) -> ImageHandle:
        """What a chat request's `scene_id` resolves to (`ChatService.resolve_image`): a 404 now
        for an id this key does not hold; the scene itself (or the window `region`, a
        `uhrbat.io.regions.RegionRequest`) is reached in the engine's prepare stage."""
        record = self.get(tenant, scene_id)
        return SceneImage(self, record, where, region)

    def asked(self, record: SceneRecord) -> None:
        """Count a question and refresh the handle's idle clock (kept on disk with `--cache-dir`)."""
        with self._lock:
            record.questions += 1
            record.used = self.clock()
            alive = self._records.get((record.tenant, record.id)) is record
        if alive:
            try:
                self._save(record)
            except OSError as e:  # deleted meanwhile, or a full disk: the question goes on
                log.warning("scene %s: could not update its scene.json (%s)", record.id, e)

    # ------------------------------------------------------------------ disk
    def _save(self, record: SceneRecord) -> None:
        if self._temporary:
            return
        data = json.dumps(record.meta()).encode()
        fd, tmp = tempfile.mkstemp(dir=record.folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, record.folder / _META)
        except OSError:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _restore(self, root: Path) -> None:
        """Find the handles a previous server kept under `root` (unprepared until first used);
        a folder that is not a complete handle is left alone, never trusted."""
        if not root.is_dir():
            return
        for tenant_dir in root.iterdir():
            if not tenant_dir.is_dir():
                continue
            for folder in tenant_dir.iterdir():
                if not _ID.fullmatch(folder.name):
                    continue
                try:
                    m = json.loads((folder / _META).read_text())
                    if m.get("format") != _FORMAT or m.get("id") != folder.name:
                        continue
                    tenant = str(m["tenant"])
                    if _tenant_dir(tenant) != tenant_dir.name or not (folder / str(m["image"])).is_file():
                        continue
                    record = SceneRecord(
                        folder.name,
                        tenant,
                        str(m["filename"]),
                        folder,
                        os.path.basename(str(m["image"])),
                        dict(m["read"]),
                        dict(m["facts"]),
                        float(m["created"]),
                        float(m["used"]),
                        int(m.get("questions", 0)),
                    )
                    record.origin = _origin(record, _georef(m.get("georef"), record.facts))
                except (OSError, ValueError, KeyError, TypeError, UhrBatError):
                    continue
                self._records[(tenant, record.id)] = record
        self._expire()


class SceneImage(ImageHandle):
    """A chat request's scene handle, opened by the engine's prepare stage: the handle's
    `SceneOrigin` (its scene pinned), or for a region the window read from the stored file
    (a child scene, in the tenant's namespace like every scene of the handle). Either source
    remembers the file, so zoom reads its windows too."""

    def __init__(self, handles: SceneHandles, record: SceneRecord, where: str, region: Any = None) -> None:
        self.handles = handles
        self.record = record
        self.filename = record.filename
        self.where = where
        self.region = region

    def read(self) -> Any:
        from uhrbat.errors import RegionError
        from uhrbat.io import decode_section

        origin = self.handles.prepare(self.record)
        self.handles.asked(self.record)
        if self.region is None:
            return origin
        try:
            with decode_section():
                return origin.open(self.region)
        except (ImageLoadError, RegionError) as e:  # e.g. a region outside the image: name the client's file
            raise type(e)(_named(str(e), self.record)) from None

    def open(self) -> Any:  # `prepare` bounds its own decode (`decode_section`), not the whole encode
        try:
            return self.read()
        except ImageLoadError as e:
            raise ImageLoadError(f"{self.where}: {e}") from None


def _named(message: str, record: SceneRecord) -> str:
    """A reader's message with the stored file's path replaced by the client's file name."""
    shown = repr(record.filename)
    return message.replace(os.path.realpath(record.path), shown).replace(str(record.path), shown)


def _origin(record: SceneRecord, georef: Any) -> SceneOrigin:
    from uhrbat.options import ReadOptions

    f = record.facts
    return SceneOrigin(
        str(record.path),
        "untrusted",
        ReadOptions.of(**record.read),
        size=(int(f["width"]), int(f["height"])),
        georef=georef,
        label=record.filename,
        georef_note=f.get("georeference_note"),
        bands=None if f.get("bands") is None else tuple(f["bands"]),
    )


def _crs_text(crs: Any) -> str:
    to_wkt = getattr(crs, "to_wkt", None)
    return to_wkt() if callable(to_wkt) else str(crs)


def _georef(saved: Any, facts: dict[str, Any]) -> Any:
    """A georeference kept in `scene.json` -> `GeoRef` (checked again, as a reader checks it)."""
    if saved is None:
        return None
    from rasterio.crs import CRS

    from uhrbat.io.geo import GeoRef

    ref = GeoRef(CRS.from_user_input(saved["crs"]), tuple(float(v) for v in saved["transform"]))
    return ref.checked_wgs84((int(facts["width"]), int(facts["height"])))


def _repin(pipe: Any, opened: Any) -> None:
    """Put a pinned scene's features back into the store if its LRU dropped them."""
    store = getattr(pipe, "scene_cache", None)
    if store is not None and opened.key is not None and opened.key not in store:
        store.put(opened.key, opened.scene.tensors(), disk=False)


def _tenant_dir(tenant: str) -> str:
    """A tenant's folder name (tenants are `key-<hex>` digests, or "" without API keys)."""
    return tenant or "open"


def _limit(message: str) -> APIError:
    # 429 is a quota; `x-should-retry: false` keeps OpenAI clients from retrying what only a
    # DELETE (or the TTL) can change.
    return APIError(429, message, code="scene_limit", headers={"x-should-retry": "false"})


__all__ = ["SceneHandles", "SceneImage", "SceneOrigin", "SceneRecord"]
