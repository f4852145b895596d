"""Reading a JSON request body without holding it twice: big base64 `data:` URLs go to disk as
they arrive.

`JsonBodyReader.feed(piece)` scans the raw bytes (C-speed searches, never a Python loop over
characters). A JSON string that starts `data:<media>;base64,` and whose payload grows past
`SPOOL_AFTER` bytes is cut out of the JSON text: its base64 is decoded piece by piece into a
private `Spool` (`uhrbat.serving.uploads`), and the text keeps a placeholder,
`"\\u0000uhrbat-spool:<nonce>:<i>"` (a NUL and this request's random nonce, so a client cannot
forge one). What remains — messages and options — is small and parsed once by `json.loads`
(`finish`), which refuses the non-standard `NaN` / `Infinity` constants and integers of more
digits than Python converts. Smaller data URLs stay in the text and are decoded in memory.

Equivalence: for every body, the parsed value and the bytes of each spooled image equal what
`json.loads(body)` and `base64.b64decode(url_payload, validate=True)` give (tests check it for
random bodies split at random points); only the wording of some errors in invalid requests differs.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from uhrbat.serving.openai_api import APIError, bad_request
from uhrbat.serving.uploads import Base64Spool, Spool

#: A data: URL payload is spooled once it is longer than this; shorter ones stay in the text.
SPOOL_AFTER = 64 * 1024
_HEAD_MAX = 256  # a data: URL header ("data:image/png;base64,") longer than this is not spooled

_QUOTE_OR_BACKSLASH = re.compile(rb'["\\]')
_B64 = re.compile(rb"[A-Za-z0-9+/=]*")
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_JSON_ESCAPES = frozenset(b'"\\/bfnrtu')

_OUT, _HEAD, _STRING, _PAYLOAD, _SKIP = range(5)


@dataclass
class SpooledURL:
    """A data: URL whose payload went to disk: its header (`image/png;base64`) and bytes."""

    header: str
    body: Base64Spool

    @property
    def error(self) -> str | None:
        return self.body.error


@dataclass
class ParsedBody:
    """A request body after `JsonBodyReader.finish`: the JSON value and its spooled data: URLs
    by placeholder. `release()` drops every spool that no image handle claimed."""

    value: Any
    spools: dict[str, SpooledURL] = field(default_factory=dict)

    def release(self) -> None:
        for s in self.spools.values():
            s.body.spool.discard()


class JsonBodyReader:
    """Incremental JSON body reader (see the module docstring). Not thread-safe: feed it from
    one thread at a time."""

    def __init__(self, max_text_bytes: int, spool_after: int = SPOOL_AFTER) -> None:
        self.max_text_bytes = max_text_bytes
        self.spool_after = spool_after
        self.nonce = secrets.token_hex(8)
        self.prefix = "\x00uhrbat-spool:" + self.nonce + ":"
        self._text = bytearray()
        self._head = bytearray()  # the current string's first bytes (raw), while undecided
        self._carry = b""  # an escape split between two pieces
        self._state = _OUT
        self._escaped = False  # _HEAD/_STRING: the previous byte was a backslash
        self._json_error: str | None = None
        self._spools: dict[str, SpooledURL] = {}
        self._current: SpooledURL | None = None
        self._first = True

    # ------------------------------------------------------------------ feeding
    def feed(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[:1] == b"\x00" or data[1:2] == b"\x00" or data[:2] in (b"\xff\xfe", b"\xfe\xff"):
                self._fail_json("the request body must be UTF-8 JSON (RFC 8259)")
        if self._carry:
            data, self._carry = self._carry + data, b""
        i, n = 0, len(data)
        while i < n:
            if self._state == _OUT:
                j = data.find(b'"', i)
                if j < 0:
                    self._emit(data[i:])
                    break
                self._emit(data[i : j + 1])
                i = j + 1
                self._state, self._escaped = _HEAD, False
                self._head.clear()
            elif self._state in (_HEAD, _STRING):
                i = self._scan_string(data, i)
            elif self._state == _PAYLOAD:
                i = self._scan_payload(data, i)
            else:  # _SKIP: the body is already known to be invalid; drain it
                break
        if len(self._text) + len(self._head) > self.max_text_bytes:
            raise APIError(
                413,
                f"the request's JSON text (everything but its images) is larger than the server's limit of "
                f"{self.max_text_bytes // (1024 * 1024)} MiB",
                code="request_too_large",
            )

    def _emit(self, b: bytes | bytearray) -> None:
        self._text += b

    def _scan_string(self, data: bytes, i: int) -> int:
        """Copy a string's bytes to the text until its closing quote; while in `_HEAD`, keep the
        first bytes back until it is known whether this is a data: URL worth spooling. Returns
        where it stopped (the state says what comes next)."""
        n = len(data)
        if self._escaped:  # the byte after a backslash that ended the previous piece
            self._escaped = False
            self._take(data[i : i + 1])
            i += 1
        while i < n and self._state in (_HEAD, _STRING):
            m = _QUOTE_OR_BACKSLASH.search(data, i)
            end = m.start() if m else n
            if end > i:
                self._take(data[i:end])
                if self._state not in (_HEAD, _STRING):  # spooling from here on
                    return end
            if m is None:
                return n
            if data[end] == 0x22:  # the closing quote
                self._flush_head()
                self._emit(b'"')
                self._state = _OUT
                return end + 1
            if end + 1 >= n:  # a backslash ends the piece: its escaped byte comes next
                self._take(b"\\")
                self._escaped = True
                return n
            self._take(data[end : end + 2])
            i = end + 2
        return i

    def _take(self, b: bytes) -> None:
        if self._state == _STRING:
            self._emit(b)
            return
        self._head += b
        head = self._head
        if not b"data:".startswith(bytes(head[:5])) or (len(head) >= _HEAD_MAX and b"," not in head[:_HEAD_MAX]):
            self._flush_head()  # not a data: URL (or a header too long to be one): plain copy
            return
        comma = head.find(b",")
        if comma < 0 or len(head) - comma - 1 <= self.spool_after or b"\\" in head[-6:]:
            return  # undecided (a trailing escape is completed first, so the payload never splits one)
        try:  # the header as JSON reads it ("image\\/png" is "image/png")
            header = json.loads(b'"' + bytes(head[5:comma]) + b'"')
        except ValueError:
            header = None
        if header is None or "base64" not in [f.strip().lower() for f in header.split(";")][1:]:
            self._flush_head()
            return
        self._start_spool(header, bytes(head[comma + 1 :]))

    def _flush_head(self) -> None:
        if self._state == _HEAD:
            self._emit(self._head)
            self._head.clear()
            self._state = _STRING

    def _start_spool(self, header: str, payload: bytes) -> None:
        key = self.prefix + str(len(self._spools))
        self._current = SpooledURL(header, Base64Spool(Spool("upload")))
        self._spools[key] = self._current
        self._emit(json.dumps(key).encode()[1:-1])  # both quotes come from the body itself
        self._head.clear()
        self._state = _PAYLOAD
        self._scan_payload(payload, 0)  # complete escapes only (see `_take`), no closing quote

    def _scan_payload(self, data: bytes, i: int) -> int:
        """Base64 characters to the spool until the string's closing quote."""
        out = self._current.body  # type: ignore[union-attr]
        n = len(data)
        while i < n:
            if out.error is not None:  # not base64: skip to the end of the string
                m = _QUOTE_OR_BACKSLASH.search(data, i)
                if m is None:
                    return n
                i = m.start()
            else:
                end = _B64.match(data, i).end()  # type: ignore[union-attr]
                out.write(data[i:end])
                i = end
                if i >= n:
                    return n
            c = data[i]
            if c == 0x22:
                out.finish()
                self._emit(b'"')
                self._state, self._current = _OUT, None
                return i + 1
            if c == 0x5C:  # an escape: "\/" is "/" (some JSON writers escape slashes)
                if i + 1 >= n or (data[i + 1] == 0x75 and i + 6 > n):
                    self._carry = data[i:]
                    return n
                e = data[i + 1]
                if e not in _JSON_ESCAPES:
                    self._fail_json(f"invalid escape {data[i : i + 2]!r}")
                    return n
                if e == 0x75:
                    try:
                        ch = int(data[i + 2 : i + 6], 16)
                    except ValueError:
                        self._fail_json("invalid \\u escape")
                        return n
                    i += 6
                else:  # "\/" is "/"; "\n", "\"" ... are characters outside the alphabet
                    ch, i = (e if e == 0x2F else -1), i + 2
                if ch in _B64_CHARS:
                    out.write(bytes([ch]))
                else:
                    out.invalid()
            elif c < 0x20:
                self._fail_json("a control character inside a string")
                return n
            else:  # whitespace, URL-safe '-'/'_', non-ASCII, ...: not base64
                out.invalid()
                i += 1
        return i

    def _fail_json(self, why: str) -> None:
        if self._json_error is None:
            self._json_error = why
        self._state = _SKIP

    # ------------------------------------------------------------------ result
    def abandon(self) -> None:
        """Drop every spool: the body was not read to its end (client gone, a limit hit)."""
        ParsedBody(None, self._spools).release()

    def finish(self) -> ParsedBody:
        """Parse what remains (call once, after the last piece). Raises a 400 `APIError` for a
        body that is not a JSON object; unclaimed spools are released then."""
        spools = self._spools
        try:
            if self._json_error is not None:
                raise bad_request(f"the request body is not valid JSON ({self._json_error})")
            if self._state == _PAYLOAD:
                raise bad_request("the request body is not valid JSON (it ends inside a string)")
            self._emit(self._head + self._carry)
            try:
                value = json.loads(self._text.decode("utf-8"), parse_constant=_refuse_constant)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad_request(f"the request body is not valid JSON ({e})") from None
            except RecursionError:  # "[[[[...": json.loads recurses once per level
                raise bad_request("the request body is nested too deeply to be a chat request") from None
            except _Constant as e:
                raise bad_request(
                    f"the request body holds {e.args[0]}, which is not JSON (RFC 8259 has no NaN or Infinity); "
                    "send a finite number",
                ) from None
            except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
                raise bad_request(f"the request body holds a number that cannot be read ({e})") from None
            if not isinstance(value, dict):
                raise bad_request("the request body must be a JSON object")
            if spools:
                _check_placeholders(value, self.prefix, ())
            return ParsedBody(value, spools)
        except BaseException:
            ParsedBody(None, spools).release()
            raise
        finally:
            self._text = bytearray()


class _Constant(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Constant(name)


def _check_placeholders(value: Any, prefix: str, path: tuple) -> None:
    """A spooled data: URL is only accepted as an image part's URL
    (`messages.N.content.M.image_url.url`); anywhere else it would be text for the model."""
    if isinstance(value, str):
        if value.startswith(prefix) and not (
            len(path) == 6 and path[0] == "messages" and path[2] == "content" and path[4:] == ("image_url", "url")
        ):
            where = ".".join(map(str, path)) or "request"
            raise bad_request(
                f"{where}: a data: URL longer than {SPOOL_AFTER // 1024} KiB is only accepted as an image_url", where
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_placeholders(k, prefix, (*path, "key"))
            _check_placeholders(v, prefix, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_placeholders(v, prefix, (*path, i))


__all__ = ["SPOOL_AFTER", "JsonBodyReader", "ParsedBody", "SpooledURL"]
