"""OpenAI messages -> (image bytes, conversation in the pipeline's format).

`image_url` parts may be `data:` URLs (base64 PNG / JPEG / TIFF / GeoTIFF bytes) or, only when the
server was started with `--allowed-local-media-path DIR`, `file://` URLs of regular files whose
real path (symlinks resolved) lies inside DIR — vLLM's convention. Anything else is a 400 that
says what is accepted. Both are later opened with the untrusted reader
(`uhrbat.io.open_image_bytes` / `open_image(..., trust="untrusted")`: PNG, JPEG, TIFF only, no
VRT, no sidecars), never with the local-file one.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from uhrbat.serving.openai_api import (
    APIError,
    ImagePart,
    Message,
    TextPart,
    bad_request,
)

_IMAGE_MEDIA_TYPES = (
    "image/png",
    "image/jpeg",
    "image/jpg",
    "image/tiff",
    "image/geotiff",
    "image/tif",
    "application/octet-stream",
)


@dataclass
class ImageInput:
    """The conversation's one image, still undecoded: request bytes, or a checked file path."""

    data: bytes | None
    filename: str  # a name for messages / GeoJSON (never a server path)
    path: str | None = None  # a file:// image: its real path, inside `root`
    root: str | None = None


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


def read_image_url(
    url: str, *, allowed_local_media_path: str | os.PathLike | None, max_bytes: int, param: str = "image_url"
) -> ImageInput:
    """Resolve an `image_url` to its bytes or checked path (see the module docstring). Files are
    not read here: the worker opens them with the untrusted reader, so `max_bytes` (the body
    limit) applies to data: URLs only."""
    if url.startswith("data:"):
        return _read_data_url(url, max_bytes, param)
    scheme = urlparse(url).scheme.lower()
    if scheme == "file":
        return _read_file_url(url, allowed_local_media_path, param)
    shown = url if len(url) <= 60 else url[:57] + "..."
    raise bad_request(
        f"{param}: unsupported image URL {shown!r}; send the image as a data: URL "
        "(data:image/png;base64,...) — the server does not fetch remote URLs",
        param,
    )


def _read_data_url(url: str, max_bytes: int, param: str) -> ImageInput:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad_request(f"{param}: malformed data: URL (no comma)", param)
    fields = [f.strip().lower() for f in header.split(";")]
    media = fields[0] or "text/plain"
    if "base64" not in fields[1:]:
        raise bad_request(f"{param}: data: URLs must be base64 (data:image/png;base64,...)", param)
    if media not in _IMAGE_MEDIA_TYPES:
        raise bad_request(
            f"{param}: media type {media!r} is not an accepted image type (image/png, image/jpeg, image/tiff)", param
        )
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
    if not data:
        raise bad_request(f"{param}: the data: URL holds no bytes", param)
    ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg"}.get(media, ".tif" if "tif" in media else "")
    return ImageInput(data, f"upload{ext}")


def inside(root: str | os.PathLike, path: str) -> str | None:
    """The real path of `path` (symlinks resolved) when it lies inside real `root`, else None."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real if os.path.commonpath([real_root, real]) == real_root else None


def _read_file_url(url: str, allowed: str | os.PathLike | None, param: str) -> ImageInput:
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
    return ImageInput(None, Path(real).name, path=real, root=str(allowed))


__all__ = ["ImageInput", "conversation", "inside", "read_image_url"]
