"""Serving: `uhrbat serve` (OpenAI-compatible chat completions) and `uhrbat demo` (a web page on
the same app). A request flows through:

- `http_server`: uvicorn with connection limits (connection cap, request-head deadline, keep-alive);
- `guard`: every request body: size cap (413), bytes-in-flight cap (503), stall timeout (408);
- `app`: thin routes (auth -> tenant, body -> `body` reader, hand-over), error format, lifespan;
- `body`: the JSON body read off the event loop, big data: URLs spooled to disk as they arrive;
- `openai_chat`: the OpenAI protocol (`OpenAIServingChat`) on top of the service;
- `demo`: the demo page and its `/api/ask` (stage events), on top of the same service;
- `chat_service`: `ChatService` — options -> image handle -> job -> answer or events; the one entry
  for every front end;
- `limits`: every limit and default (`ServeOptions`), model facts, deadlines, K-Means work;
- `media`, `uploads`: OpenAI messages -> conversation + image handle; spool files, handles;
- `engine`: prepare stage (decodes images) + micro-batching model thread;
- `openai_api`: wire schemas and the error type; `metrics`: Prometheus metrics.

The main names are importable from here (lazily: `import uhrbat.serving` loads no web framework).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ChatService": "uhrbat.serving.chat_service",
    "ChatInput": "uhrbat.serving.chat_service",
    "ImageRef": "uhrbat.serving.chat_service",
    "RawOptions": "uhrbat.serving.chat_service",
    "RequestContext": "uhrbat.serving.chat_service",
    "ServeOptions": "uhrbat.serving.limits",
    "create_app": "uhrbat.serving.app",
    "serve": "uhrbat.serving.http_server",
    "serve_in_thread": "uhrbat.serving.http_server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
