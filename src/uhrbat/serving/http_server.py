"""Running the app with uvicorn, with the connection limits a public server needs.

uvicorn's defaults leave three doors open (issue 18, item 9): no cap on connections, no timeout
for a request head that trickles in (`timeout_keep_alive` is reset by every byte, see
Kludex/uvicorn#1192 and the Slowloris fixes that wrap its protocol), and no timeout for a stalled
body. Here: `limit_concurrency` (`--max-connections`; beyond it uvicorn answers 503), a
keep-alive timeout, h11's limit on the size of a request head, a **request-head deadline**
(`HeadDeadlineH11`: a connection that has not sent a complete head within `--header-timeout`
seconds of connecting, or of its previous response, is closed) and, in the app, the body idle
timeout (`serving.guard`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from uhrbat.serving.limits import ServeOptions

log = logging.getLogger("uhrbat.serve")

MAX_HEAD_BYTES = 64 * 1024  # request line + headers (h11 refuses bigger heads with a 400)


class HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request head (see the module docstring).
    `head_timeout_s` is set on the subclass `protocol_class` makes."""

    head_timeout_s: float = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_timer: Any = None
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a complete request head arrived
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is None or self.cycle.response_complete:  # idle again: the next head is due
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            client = self.client or ("?", 0)
            log.info(
                "closed a connection from %s:%s: no complete request head within %g s (--header-timeout)",
                client[0],
                client[1],
                self.head_timeout_s,
            )
            self.transport.close()


def protocol_class(head_timeout_s: float) -> type[HeadDeadlineH11]:
    return type("HeadDeadlineH11", (HeadDeadlineH11,), {"head_timeout_s": head_timeout_s})


def uvicorn_config(app: Any, options: ServeOptions, host: str, port: int, log_level: str = "info", **kw: Any) -> Any:
    """A `uvicorn.Config` with the connection limits of `options` (see the module docstring)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol_class(options.header_timeout_s),
        limit_concurrency=options.max_connections,
        timeout_keep_alive=max(1, round(options.keep_alive_s)),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=5,
        **kw,
    )


def log_config() -> dict[str, Any]:
    """uvicorn's logging setup plus the `uhrbat` loggers on the same stderr handler and format
    (`INFO:     client ... went away during the upload ...`)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["uhrbat"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def serve(app: Any, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocking)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, options, host, port, log_level, log_config=log_config())).run()


class serve_in_thread:
    """Context manager: run the app with uvicorn on 127.0.0.1 (a free port) in a thread, with the
    app's lifespan (the engine starts and stops with it); yields the base URL."""

    def __init__(self, app: Any, options: ServeOptions | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}/"
        config = uvicorn_config(app, options or ServeOptions(), host, port, "warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)


__all__ = ["HeadDeadlineH11", "protocol_class", "serve", "serve_in_thread", "uvicorn_config"]
