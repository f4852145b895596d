"""OpenAI messages -> (conversation in the pipeline's format, the one image part), and an
`image_url` -> an `ImageHandle` (`uhrbat.serving.uploads`).

`image_url` parts may be `data:` URLs (base64 PNG / JPEG / TIFF / GeoTIFF bytes; big ones arrive
already spooled to disk by `serving.body`) or, only when the server was started with
`--allowed-local-media-path DIR`, `file://` URLs of regular files whose real path (symlinks
resolved) lies inside DIR — vLLM's convention. Anything else is a 400 that says what is
accepted. Both are later opened with the untrusted reader (`open_image(..., trust="untrusted")`:
PNG, JPEG, TIFF only, no VRT, no sidecars), never with the local-file one.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from uhrbat.serving.openai_api import (
    APIError,
    ImagePart,
    Message,
    TextPart,
    bad_request,
)
from uhrbat.serving.uploads import AllowedFile, ImageHandle, Spool, SpooledImage, inside

if TYPE_CHECKING:
    from uhrbat.serving.body import SpooledURL

_IMAGE_MEDIA_TYPES = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/tiff",
    "image/geotiff",
    "image/tif",
    "application/octet-stream",
)


def conversation(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], ImagePart, str]:
    """OpenAI messages -> (pipeline conversation, the one image part, its JSON path for errors).

    The conversation uses the pipeline's content format (`{"type": "text"|"image"}`), with
    `developer` mapped to `system`. Exactly one image, in a user message; the last message must
    be the user's."""
    out: list[dict[str, Any]] = []
    images: list[tuple[ImagePart, str]] = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": _unicode(content, f"messages.{i}.content")})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": _unicode(part.text, f"messages.{i}.content.{j}.text")})
            else:
                where = f"messages.{i}.content.{j}.image_url"
                if role != "user":
                    raise bad_request(f"{where}: images are only accepted in user messages, not {m.role!r}", where)
                images.append((part, where))
                parts.append({"type": "image"})
        out.append({"role": role, "content": parts})
    if len(images) != 1:
        what = "no image" if not images else f"{len(images)} images"
        raise bad_request(
            f"the conversation has {what}; UHR-BAT answers about exactly one image per conversation "
            "(one image_url part in a user message; resend it with each follow-up)",
            "messages",
        )
    if out[-1]["role"] != "user":
        raise bad_request("the last message must be the user's question", "messages")
    return out, images[0][0], images[0][1]


def _unicode(text: str, where: str) -> str:
    """`text`, or a 400 when it holds a lone surrogate (JSON allows "\\ud800"; the tokenizer does not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(
            f"{where}: the text holds a lone UTF-16 surrogate, which is not valid Unicode", where
        ) from None
    return text


def image_handle(
    url: str,
    *,
    spools: Mapping[str, SpooledURL],
    allowed_local_media_path: str | os.PathLike | None,
    max_bytes: int,
    read_opts: dict[str, Any],
    param: str = "image_url",
) -> ImageHandle:
    """An `image_url` -> the handle the engine opens later (see the module docstring). A data:
    URL that the body reader spooled to disk arrives as its placeholder (`spools`); a short one
    is decoded here. Files are not read here, so `max_bytes` (the body limit) applies to data:
    URLs only."""
    if url in spools:
        spooled = spools[url]
        spool = spooled.body.spool
        spool.label = _upload_name(spooled.header, param)
        if spooled.error is not None:
            raise bad_request(f"{param}: {spooled.error}", param)
        return _nonempty(spool, read_opts, param)
    if url.startswith("data:"):
        return _read_data_url(url, max_bytes, read_opts, param)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return _read_file_url(url, allowed_local_media_path, read_opts, param)
    shown = url if len(url) <= 60 else url[:57] + "..."
    if url.startswith("\x00uhrbat-spool:"):
        shown = "a placeholder this server did not issue"
    raise bad_request(
        f"{param}: unsupported image URL {shown!r}; send the image as a data: URL "
        "(data:image/png;base64,...) — the server does not fetch remote URLs",
        param,
    )


def _upload_name(header: str, param: str) -> str:
    """Check a data: URL header (`image/png;base64`); the name the image goes by in messages
    and GeoJSON (`upload.png`)."""
    fields = [f.strip().lower() for f in header.split(";")]
    media = fields[0] or "text/plain"
    if "base64" not in fields[1:]:
        raise bad_request(f"{param}: data: URLs must be base64 (data:image/png;base64,...)", param)
    if media not in _IMAGE_MEDIA_TYPES:
        raise bad_request(
            f"{param}: media type {media!r} is not an accepted image type (image/png, image/jpeg, image/tiff)", param
        )
    ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg"}.get(media, ".tif" if "tif" in media else "")
    return f"upload{ext}"


def _read_data_url(url: str, max_bytes: int, read_opts: dict[str, Any], param: str) -> ImageHandle:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{param}: malformed data: URL (no comma)", param)
    name = _upload_name(header, param)
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(
            413,
            f"{param}: the image is larger than the server's limit of {max_bytes} bytes",
            param=param,
            code="request_too_large",
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URL is not valid base64", param) from None
    spool = Spool(name)
    spool.write(data)
    return _nonempty(spool, read_opts, param)


def _nonempty(spool: Spool, read_opts: dict[str, Any], param: str) -> ImageHandle:
    spool.close()
    if spool.size == 0:
        spool.discard()
        raise bad_request(f"{param}: the data: URL holds no bytes", param)
    return SpooledImage(spool, read_opts, where=param)


def _read_file_url(url: str, allowed: str | os.PathLike | None, read_opts: dict[str, Any], param: str) -> ImageHandle:
    if allowed is None:
        raise bad_request(
            f"{param}: file:// URLs are disabled on this server (start it with "
            "--allowed-local-media-path DIR to allow files under DIR); send a data: URL",
            param,
        )
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(
            f"{param}: file:// URLs must name a local path (file:///path), got host {parsed.netloc!r}", param
        )
    asked = unquote(parsed.path)
    if not asked.isprintable():
        # NUL, control characters, lone surrogates (JSON "\ud800"): os.stat would raise, not answer
        raise bad_request(f"{param}: the file:// URL is not a valid local path", param)
    # Containment is decided on the resolved path before touching the file, so the answer never
    # tells whether a path outside the root exists.
    real = inside(allowed, asked)
    if real is None:
        raise APIError(
            400, f"{param}: {asked!r} is outside the allowed local media path", param=param, code="path_not_allowed"
        )
    rel = os.path.relpath(real, os.path.realpath(allowed))
    try:
        st = os.stat(real)
    except OSError as e:
        raise bad_request(
            f"{param}: cannot open {rel!r} under the allowed local media path ({e.strerror})", param
        ) from None
    if not stat.S_ISREG(st.st_mode):  # FIFOs, devices, folders
        raise bad_request(f"{param}: {rel!r} is not a regular file", param)
    return AllowedFile(real, str(allowed), read_opts, where=param)


__all__ = ["conversation", "image_handle", "inside"]
