"""`RequestGuard`: the ASGI middleware every request body passes through before the app reads it.

- **413** for a body over `max_bytes`: from `Content-Length` before reading, else while reading;
- **503 + Retry-After** when the body would take request bytes in flight (all requests being
  received or answered together, `InFlight`) past their cap: a declared body reserves its size
  before it is read (a refused one is read and dropped, never stored, so the client — which sends
  the whole body before it reads — gets the 503), a chunked one reserves as it arrives;
- **408** when a body stalls: no bytes for `read_timeout_s` (nginx's `client_body_timeout`); the
  request head has its own deadline in the HTTP protocol (`serving.http_server`);
- a client that goes away mid-upload is logged as **one line** (bytes received of bytes
  announced), never a traceback.

Rejections here happen before the app sees the request, so they are counted in the metrics here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uhrbat.serving.limits import InFlight, MiB
from uhrbat.serving.metrics import Metrics
from uhrbat.serving.openai_api import APIError

log = logging.getLogger("uhrbat.serve")


class RequestGuard:
    """See the module docstring."""

    def __init__(
        self,
        app: Any,
        *,
        max_bytes: int,
        inflight: InFlight,
        read_timeout_s: float,
        metrics: Metrics,
        flags: Any,
        retry_after_s: int = 2,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.inflight = inflight
        self.read_timeout_s = read_timeout_s
        self.metrics = metrics
        self.flags = flags  # ServeOptions.flag
        self.retry_after_s = retry_after_s

    def _too_large(self) -> APIError:
        return APIError(
            413,
            f"request body larger than the server's limit of {self.max_bytes / MiB:g} MiB "
            f"({self.flags('max_request_bytes')})",
            code="request_too_large",
        )

    def _busy(self) -> APIError:
        return APIError(
            503,
            f"the server is already receiving or answering {self.inflight.limit / MiB:g} MiB of requests "
            f"({self.flags('max_inflight_bytes')}); retry later",
            type="server_error",
            code="overloaded",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def _slow(self) -> APIError:
        return APIError(
            408,
            f"the request body stalled: no bytes for {self.read_timeout_s:g} s ({self.flags('read_timeout_s')})",
            code="request_timeout",
            headers={"Connection": "close"},
        )

    async def _reject(self, send: Any, err: APIError) -> None:
        self.metrics.errors.labels(err.type).inc()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items() if k.lower() != "connection"]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(err.body()).encode()})

    async def _drain(self, receive: Any) -> None:
        """Read and drop a refused body (at most `max_bytes`, declared), so that the client, which
        sends it before reading any answer, gets to read the 503 instead of a reset connection."""
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length_header = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(length_header) if length_header is not None and length_header.isdigit() else None
        if declared is not None and declared > self.max_bytes:
            await self._reject(send, self._too_large())
            return
        reserved = 0
        if declared:
            if not self.inflight.try_reserve(declared):
                await self._drain(receive)
                await self._reject(send, self._busy())
                return
            reserved = declared
        state = {"seen": 0, "done": False, "started": False}

        async def _receive() -> dict:
            nonlocal reserved
            if state["done"]:  # the body is complete: only a disconnect can come (no timeout)
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise self._slow() from None
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                state["seen"] += n
                if state["seen"] > self.max_bytes:
                    raise self._too_large()
                if declared is None and n:
                    if not self.inflight.try_reserve(n):
                        raise self._busy()
                    reserved += n
                state["done"] = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                state["done"] = True
                if declared and state["seen"] < declared:
                    client = scope.get("client") or ("?", 0)
                    log.info(
                        "client %s:%s went away during the upload (%d of %d bytes received): %s %s",
                        client[0],
                        client[1],
                        state["seen"],
                        declared,
                        scope.get("method"),
                        scope.get("path"),
                    )
            return message

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except APIError as e:  # raised by `_receive` where the app did not handle it (middleware order)
            if state["started"] or e.status not in (408, 413, 503):
                raise
            await self._reject(send, e)
        finally:
            self.inflight.release(reserved)


__all__ = ["RequestGuard"]
