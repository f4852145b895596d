"""`/v1/scenes`: the scene-handle routes (`serving.scene_handles` does the work).

- `POST /v1/scenes`: a JSON body `{"image": "data:image/...;base64,...", "filename"?, "bands"?}`
  (read like a chat body: a big data: URL is decoded to a private file as it arrives) or a
  multipart form (`file`, optional `bands`) -> the scene's description, prepared once.
- `GET /v1/scenes` (this key's handles), `GET /v1/scenes/{id}`, `DELETE /v1/scenes/{id}`.

Every route authenticates first; the key's tenant scopes every lookup (404 for another key's id).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request

from uhrbat.errors import UhrBatError
from uhrbat.serving.body import scene_image_at
from uhrbat.serving.openai_api import APIError, bad_request
from uhrbat.serving.uploads import Spool, SpooledImage, accepted_formats

_FIELDS = ("image", "filename", "bands")


def scenes_router(service: Any, keys: Any, read_json_body: Callable[..., Awaitable[Any]]) -> APIRouter:
    """The routes over `service.scenes` (a `SceneHandles`), authenticated by `keys` (`ApiKeys`);
    JSON bodies are read by the app's `read_json_body`."""
    router = APIRouter()
    handles = service.scenes
    ttl = service.options.scene_ttl_s

    @router.post("/v1/scenes")
    async def create(request: Request) -> dict[str, Any]:
        tenant = keys.tenant(request) or ""
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            spool, bands = await _read_form(request)
        else:
            body = await read_json_body(request, image_at=scene_image_at)
            try:
                spool, bands = _from_json(body, service)
            finally:
                body.release()  # spools the handle did not claim
        try:
            read = _read_options(service, bands)
        except BaseException:
            spool.discard()
            raise
        record = await asyncio.to_thread(handles.create, tenant, spool, read)
        return record.describe(ttl)

    @router.get("/v1/scenes")
    def listing(request: Request) -> dict[str, Any]:
        tenant = keys.tenant(request) or ""
        return {"object": "list", "data": [r.describe(ttl) for r in handles.list(tenant)]}

    @router.get("/v1/scenes/{scene_id}")
    def get(scene_id: str, request: Request) -> dict[str, Any]:
        return handles.get(keys.tenant(request) or "", scene_id).describe(ttl)

    @router.delete("/v1/scenes/{scene_id}")
    def delete(scene_id: str, request: Request) -> dict[str, Any]:
        record = handles.delete(keys.tenant(request) or "", scene_id)
        return {"id": record.id, "object": "scene.deleted", "deleted": True}

    return router


def _from_json(body: Any, service: Any) -> tuple[Spool, Any]:
    from uhrbat.serving.media import image_handle

    value = body.value
    unknown = [k for k in value if k not in _FIELDS]
    if unknown:
        raise bad_request(f"{unknown[0]}: unknown field; a scene upload takes {', '.join(_FIELDS)}", unknown[0])
    url = value.get("image")
    if not isinstance(url, str) or not url.startswith(("data:", "\x00uhrbat-spool:")):
        raise bad_request(
            "image: give the image as a data: URL (data:image/png;base64,...), or upload it as multipart form "
            "field 'file'",
            "image",
        )
    filename = value.get("filename")
    if filename is not None and (not isinstance(filename, str) or not filename.isprintable() or len(filename) > 255):
        raise bad_request("filename: give a printable file name of at most 255 characters", "filename")
    o = service.options
    handle = image_handle(
        url,
        spools=body.spools,
        allowed_local_media_path=None,
        max_bytes=o.max_request_bytes,
        read_opts={},
        param="image",
    )
    assert isinstance(handle, SpooledImage)  # data: URLs only (checked above)
    spool = handle.spool
    if filename:
        spool.label = filename
    body.spools = {k: v for k, v in body.spools.items() if v.body.spool is not spool}  # claimed
    return spool, value.get("bands")


async def _read_form(request: Request) -> tuple[Spool, Any]:
    async with request.form(max_files=1, max_fields=2) as form:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(
                400, f"file: attach the image as multipart form field 'file' ({accepted_formats()})", param="file"
            )
        unknown = [k for k in form if k not in ("file", "bands")]
        if unknown:
            raise bad_request(f"{unknown[0]}: unknown form field; a scene upload takes file and bands", unknown[0])
        bands = form.get("bands")
        spool = Spool(upload.filename or "upload")
        try:
            await asyncio.to_thread(spool.copy_from, upload.file)
        except BaseException:
            spool.discard()
            raise
    spool.close()
    return spool, (str(bands).strip() or None) if bands is not None else None


def _read_options(service: Any, bands: Any) -> dict[str, Any]:
    """The untrusted reader's options for a scene: the server's pixel limit, the client's bands."""
    from uhrbat.options import ReadOptions

    read = dict(service.options.read_options())
    if bands is not None:
        try:
            read["bands"] = ReadOptions.of(bands=bands).bands
        except UhrBatError as e:
            raise bad_request(f"bands: {e}", "bands") from None
    return read


__all__ = ["scenes_router"]
