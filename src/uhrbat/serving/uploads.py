"""Untrusted image bytes on their way to the reader: private spool files and image handles.

- `Spool`: a private temporary file (0600 in a fresh 0700 folder, like `uhrbat.io.open_image_bytes`)
  that request bytes are written into as they arrive — never whole in memory — and hashed on the
  way (the scene cache's fingerprint); opened once with the untrusted reader.
- `Base64Spool`: strict base64 decoded incrementally into a `Spool`; equal to
  `base64.b64decode(text, validate=True)` of the whole text, for any split into pieces.
- `ImageHandle`: what a request's image resolves to (`ChatService.resolve_image`) and what the
  engine's prepare stage opens, off the request path: `SpooledImage` (request bytes),
  `AllowedFile` (a `file://` path under the allowed media root), `LocalImage` (the caller's own
  image: Python, batch). A scene-handle lookup (issue 22) adds one more kind.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from typing import Any, BinaryIO

from uhrbat.errors import ImageLoadError, UhrBatError

_CHUNK = 1 << 20


class Spool:
    """A private temporary file for untrusted bytes (see the module docstring)."""

    def __init__(self, label: str = "upload") -> None:
        self.label = label  # the client's name for the bytes, for messages
        self._dir: str | None = tempfile.mkdtemp(prefix="uhrbat-upload-")  # mode 0700
        self.path = os.path.join(self._dir, "upload")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self.head = b""  # the first 32 bytes (format sniffing)

    def write(self, data: bytes) -> None:
        if len(self.head) < 32:
            self.head += data[: 32 - len(self.head)]
        self._sha.update(data)
        self.size += len(data)
        self._file.write(data)  # type: ignore[union-attr]

    def copy_from(self, f: BinaryIO) -> None:
        """Copy a file object in 1 MiB pieces (the demo's multipart upload)."""
        while chunk := f.read(_CHUNK):
            self.write(chunk)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def discard(self) -> None:
        """Remove the file (idempotent); an opened lazy source keeps its own reference."""
        self.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def open(self, **read_opts: Any) -> Any:
        """The bytes as an image, read with the untrusted reader. Messages name `label`, never
        the private path. A source decoded in memory no longer needs the file (removed now); a
        lazy one (GDAL) re-reads it, so the folder is removed with the source."""
        from uhrbat.io.formats import SUFFIX, UNTRUSTED_FORMATS, describe_head, sniff
        from uhrbat.io.images import PILSource
        from uhrbat.io.sources import open_image

        self.close()
        name = repr(self.label)
        if self._dir is None:
            raise ImageLoadError(f"the uploaded image {name} was already released")
        if self.size == 0:
            self.discard()
            raise ImageLoadError(f"the uploaded image {name} is empty")
        kind = sniff(self.head)
        if kind not in UNTRUSTED_FORMATS:
            self.discard()
            raise ImageLoadError(
                f"the uploaded image {name} is {describe_head(self.head)}, which is not accepted from untrusted "
                f"input; send a {accepted_formats()} file"
            )
        path = self.path + SUFFIX[kind]  # the readers pick drivers by suffix too
        os.replace(self.path, path)
        self.path = path
        try:
            src = open_image(path, trust="untrusted", **read_opts)
        except ImageLoadError as e:
            self.discard()
            raise ImageLoadError(str(e).replace(os.path.realpath(path), name).replace(path, name)) from None
        except BaseException:
            self.discard()
            raise
        folder, self._dir = self._dir, None
        if isinstance(src, PILSource):
            shutil.rmtree(folder, ignore_errors=True)
        else:
            src.label = name
            weakref.finalize(src, shutil.rmtree, folder, True)
        return src

    def __del__(self) -> None:  # a request that failed before its image was claimed
        try:
            self.discard()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


#: Display names of the formats accepted from untrusted input (`uhrbat.io.formats.UNTRUSTED_FORMATS`,
#: the one allow-list); a format added there without a name here fails loudly (KeyError).
FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF/GeoTIFF"}
#: File suffixes an upload form may offer for each accepted format.
FORMAT_SUFFIXES = {"png": (".png",), "jpeg": (".jpg", ".jpeg"), "tiff": (".tif", ".tiff")}


def accepted_formats() -> str:
    """ "PNG, JPEG or TIFF/GeoTIFF": the untrusted reader's allow-list in words."""
    from uhrbat.io.formats import UNTRUSTED_FORMATS

    names = [FORMAT_NAMES[k] for k in UNTRUSTED_FORMATS]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def accepted_suffixes() -> list[str]:
    from uhrbat.io.formats import UNTRUSTED_FORMATS

    return [s for k in UNTRUSTED_FORMATS for s in FORMAT_SUFFIXES[k]]


class Base64Spool:
    """Strict base64 text -> a `Spool`, piece by piece (see the module docstring).

    `write` takes base64 alphabet characters (`A-Z a-z 0-9 + / =`); `invalid()` marks the text as
    not base64 (a character outside the alphabet was seen) and drops what was written. The last
    complete quantum is held back until `finish`, which decodes it with the padding, so that
    CPython's strict rules at the end of the text (`binascii.a2b_base64(..., strict_mode=True)`)
    apply unchanged."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending = b""  # at most 7 characters: the last complete quantum and a partial one
        self._padding = 0  # '=' seen so far; once there is one, only '=' may follow
        self.error: str | None = None

    def write(self, text: bytes) -> None:
        if self.error is not None or not text:
            return
        if not self._padding:
            k = text.find(b"=")
            if k >= 0:
                text, pad = text[:k], text[k:]
                self._padding = len(pad)
                if pad.strip(b"="):  # data after padding
                    return self.invalid()
            buf = self._pending + text
            n = (len(buf) // 4 - 1) * 4  # every complete quantum but the last
            if n > 0:
                self.spool.write(binascii.a2b_base64(buf[:n], strict_mode=True))
                buf = buf[n:]
            self._pending = buf
        elif text.strip(b"="):
            self.invalid()
        else:
            self._padding += len(text)

    def invalid(self) -> None:
        if self.error is None:
            self.error = "the data: URL is not valid base64"
            self.spool.discard()

    def finish(self) -> None:
        tail = self._pending + b"=" * min(self._padding, 5)  # more than 5 '=' behave as 5
        if self.error is None and tail:
            try:
                self.spool.write(binascii.a2b_base64(tail, strict_mode=True))
            except binascii.Error:
                self.invalid()
        self.spool.close()


# ----------------------------------------------------------------------------- handles
class ImageHandle:
    """A request's image, resolved but not read yet (see the module docstring)."""

    filename: str = "image"  # the client's name for it (messages, GeoJSON `image.path`)
    where: str | None = None  # JSON path of the image in the request, prefixed to read errors

    def read(self) -> Any:
        """Open the image (untrusted reader where the bytes are a stranger's); the engine calls
        this inside its prepare stage, in `uhrbat.io.decode_section()`."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what the handle holds (called when its request ends)."""

    def open(self) -> Any:
        from uhrbat.io import decode_section

        try:
            with decode_section():
                return self.read()
        except UhrBatError as e:
            if self.where is None:
                raise
            raise type(e)(f"{self.where}: {e}") from None


def _fingerprint(source: Any, what: list[Any], read_opts: dict[str, Any]) -> Any:
    # Clients resend the image with every follow-up: this key lets the pipeline's scene cache
    # recognise it without re-tiling (same bytes and read options -> same pixels).
    source.cache_fingerprint = json.dumps([*what, sorted(read_opts.items())], default=str)
    return source


class SpooledImage(ImageHandle):
    """Request bytes in a `Spool` (a data: URL or an upload)."""

    def __init__(self, spool: Spool, read_opts: dict[str, Any], where: str | None = None) -> None:
        self.spool = spool
        self.filename = spool.label
        self.read_opts = dict(read_opts)
        self.where = where

    def read(self) -> Any:
        sha = self.spool.sha256
        return _fingerprint(self.spool.open(**self.read_opts), ["bytes", sha], self.read_opts)

    def release(self) -> None:
        self.spool.discard()


def inside(root: str | os.PathLike, path: str) -> str | None:
    """The real path of `path` (symlinks resolved) when it lies inside real `root`, else None."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real if os.path.commonpath([real_root, real]) == real_root else None


class AllowedFile(ImageHandle):
    """A `file://` image: its real path, re-checked to lie inside the allowed root when read."""

    def __init__(self, path: str, root: str, read_opts: dict[str, Any], where: str | None = None) -> None:
        self.path, self.root = path, root
        self.filename = os.path.basename(path)
        self.read_opts = dict(read_opts)
        self.where = where

    def read(self) -> Any:
        from uhrbat.io.sources import open_image

        real = inside(self.root, self.path)
        if real is None:  # the file was swapped for a link out of the root since the request
            raise ImageLoadError(f"{self.filename!r} is outside the allowed local media path")
        source = open_image(real, trust="untrusted", **self.read_opts)
        st = os.stat(real)
        return _fingerprint(source, ["file", real, st.st_size, st.st_mtime_ns, st.st_ino], self.read_opts)


class LocalImage(ImageHandle):
    """The caller's own image (a path, PIL image or opened source), read with the local reader by
    the pipeline itself: for Python callers and batch jobs, never for HTTP requests."""

    def __init__(self, image: Any, filename: str | None = None) -> None:
        self.image = image
        if filename is None:
            filename = os.path.basename(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else "image"
        self.filename = filename

    def open(self) -> Any:
        return self.image


__all__ = [
    "FORMAT_NAMES",
    "AllowedFile",
    "Base64Spool",
    "ImageHandle",
    "LocalImage",
    "Spool",
    "SpooledImage",
    "accepted_formats",
    "accepted_suffixes",
    "inside",
]
