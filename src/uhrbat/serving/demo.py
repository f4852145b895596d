"""`uhrbat demo`: a small local web page to ask questions about an uploaded image.

One HTML page (no external scripts, fonts or CDNs) with an image upload, a question, the
per-scale budgets and the answer-length limit. The page is a client of the serving app
(`uhrbat.serving.app`) and of its `ChatService`: `POST /api/ask` spools the upload to a private
file, and the service checks the options, reads the image with the untrusted reader off the
request path and queues the question on the same engine as `/v1/chat/completions` (which the
demo serves too). With `Accept: text/event-stream` (what the page sends) the answer comes as
server-sent events: `stage` events while it runs (the page shows the stage and the elapsed time),
then one `result` (or `error`) event; otherwise one JSON body. The result holds the answer,
timings and URLs of the overlay PNG and of the kept tokens (GeoJSON for a georeferenced upload,
else the pixel-space `kept.pixels.json`). Errors use the app's one
format, OpenAI's `{"error": {"message", ...}}`.

```python
from uhrbat.serving import ChatService
from uhrbat.serving.demo import create_app, demo_options
app = create_app(ChatService(pipeline, demo_options(model_name="uhrbat")))
```
"""

from __future__ import annotations

import asyncio
import html
import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from uhrbat.errors import ImageLoadError, UhrBatError
from uhrbat.serving.app import create_app as create_serving_app
from uhrbat.serving.chat_service import ChatInput, ChatService, ImageRef, RawOptions, api_error_of
from uhrbat.serving.engine import Completion
from uhrbat.serving.limits import SERVER_MAX_PIXELS, MiB, ServeOptions
from uhrbat.serving.openai_api import APIError
from uhrbat.serving.uploads import Spool, accepted_formats, accepted_suffixes

log = logging.getLogger("uhrbat.demo")

DEFAULT_BUDGETS = (80, 320, 600, 2000)
MAX_NEW_TOKENS = 4096  # the page's upper limit of "Max new tokens"


def demo_options(
    model_name: str = "uhrbat",
    *,
    max_upload_mb: float | None = None,
    max_pixels: int | None = SERVER_MAX_PIXELS,
    max_batch: int = 4,
    max_queue: int = 16,
    **kw: Any,
) -> ServeOptions:
    """The serving settings of the demo: the server's defaults, a smaller engine, answers up to
    `MAX_NEW_TOKENS`, and the body limit named `--max-upload-mb` in messages."""
    if max_upload_mb is not None:
        kw["max_request_bytes"] = int(max_upload_mb * MiB)
    return ServeOptions(
        model_name=model_name or "uhrbat",
        max_pixels=max_pixels,
        max_batch=max_batch,
        max_queue=max_queue,
        max_new_tokens=MAX_NEW_TOKENS,
        **kw,
    ).with_flags(max_request_bytes="--max-upload-mb")


class _Store:
    """The last few results (overlay PNG bytes, GeoJSON), by id."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, item: dict[str, Any]) -> str:
        key = uuid.uuid4().hex[:16]
        with self._lock:
            self._items[key] = item
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._items.get(key)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>UHR-BAT demo</title>
<style>
 body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f5f4;color:#1c1917}
 header{background:#1c1917;color:#fafaf9;padding:12px 20px} header h1{font-size:18px;margin:0}
 header p{margin:4px 0 0;font-size:13px;color:#d6d3d1}
 main{display:grid;grid-template-columns:minmax(280px,380px) minmax(0,1fr);gap:20px;padding:20px}
 form{background:#fff;border:1px solid #e7e5e4;border-radius:8px;padding:16px;align-self:start}
 label{display:block;font-size:13px;font-weight:600;margin:12px 0 4px}
 input[type=text],input[type=number],textarea{width:100%;box-sizing:border-box;padding:6px 8px;
   border:1px solid #d6d3d1;border-radius:6px;font:inherit}
 textarea{min-height:70px} small{color:#78716c}
 button{margin-top:16px;padding:8px 16px;border:0;border-radius:6px;background:#0f766e;color:#fff;
   font-weight:600;cursor:pointer}
 button:disabled{background:#a8a29e;cursor:wait}
 #result{background:#fff;border:1px solid #e7e5e4;border-radius:8px;padding:16px;min-height:200px;min-width:0}
 #answer,#error,#meta{white-space:pre-wrap;overflow-wrap:anywhere}
 #answer{font-size:18px;margin:6px 0 12px} #error{color:#b91c1c}
 #overlay{max-width:100%;height:auto;border:1px solid #e7e5e4;display:none}
 #meta{font-size:12px;color:#57534e;margin:8px 0} #status{font-size:13px;color:#57534e;overflow-wrap:anywhere}
</style></head>
<body data-state="idle" data-stage="">
<header><h1>UHR-BAT &mdash; ask about an ultra-high-resolution image</h1>
<p>Model: __MODEL__ &middot; scales __SCALES__ &middot; runs locally; nothing leaves this machine.</p></header>
<main>
<form id="form" autocomplete="off">
 <label for="image">Image (__FORMATS__)</label>
 <input id="image" name="image" type="file" accept="__ACCEPT__" required>
 <label for="question">Question</label>
 <textarea id="question" name="question" required placeholder="How many ships are in the harbour?"></textarea>
 <label for="budgets">Visual-token budgets per scale</label>
 <input id="budgets" name="budgets" type="text" value="__BUDGETS__">
 <small>Comma-separated, one per scale (__SCALES__); empty = model default.</small>
 <label for="bands">Bands (optional, 1-based, e.g. 4,3,2)</label>
 <input id="bands" name="bands" type="text" value="">
 <label for="max_new_tokens">Max new tokens</label>
 <input id="max_new_tokens" name="max_new_tokens" type="number" min="1" max="__MAXLIMIT__" value="__MAXNEW__">
 <button id="ask" type="submit">Ask</button>
 <p id="status" aria-live="polite"></p>
</form>
<section id="result">
 <div id="error"></div>
 <div id="answer"></div>
 <div id="meta"></div>
 <a id="geojson" href="#" style="display:none" download="kept.geojson">Download kept regions</a>
 <p><img id="overlay" alt="relevance heatmap and kept tokens"></p>
</section>
</main>
<script>
const form = document.getElementById('form');
const $ = (id) => document.getElementById(id);
const STAGES = {uploading: 'Uploading the image', queued: 'Waiting in the queue', reading: 'Reading the image',
  waiting: 'Waiting for the model', model: 'Preparing the scene', load: 'Opening the image',
  tiles: 'Cutting the pyramid into tiles', encode: 'Encoding tiles', score: 'Scoring relevance',
  select: 'Selecting visual tokens', prefill: 'Reading the question', answering: 'Writing the answer',
  group: 'Grouping tokens', decode: 'Writing the answer', overlay: 'Drawing the overlay'};
let stage = '', t0 = 0, timer = null;
function showStatus() {
  const s = ((performance.now() - t0) / 1000).toFixed(1);
  $('status').textContent = (STAGES[stage] || stage) + '\\u2026 ' + s + ' s';
}
function setStage(name) { stage = name; document.body.dataset.stage = name; showStatus(); }
async function* sseEvents(resp) {
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf('\\n\\n')) >= 0) {
      const block = buf.slice(0, i); buf = buf.slice(i + 2);
      let ev = 'message', data = '';
      for (const line of block.split('\\n')) {
        if (line.startsWith('event: ')) ev = line.slice(7);
        else if (line.startsWith('data: ')) data += line.slice(6);
      }
      yield [ev, JSON.parse(data)];
    }
  }
}
function errorText(data, status) {
  return (data && data.error && (data.error.message || data.error)) || ('HTTP ' + status);
}
function show(data) {
  $('answer').textContent = data.answer;
  const t = Object.entries(data.timings || {}).map(([k, v]) => k + ' ' + v.toFixed(2) + 's').join(' \\u00b7 ');
  $('meta').textContent = data.num_visual_tokens + ' visual tokens (' + data.kept + ' kept, ' + data.merged +
    ' merged) \\u00b7 image ' + data.image_size.join('\\u00d7') + (t ? ' \\u00b7 ' + t : '');
  $('geojson').href = data.geojson_url; $('geojson').download = data.geojson_url.split('/').pop();
  $('geojson').textContent = 'Download kept regions (' + (data.georeferenced ? 'GeoJSON' : 'pixel boxes, JSON') + ')';
  $('geojson').style.display = 'inline';
  const img = $('overlay');
  img.onload = () => { document.body.dataset.state = 'done'; };
  img.onerror = () => { document.body.dataset.state = 'error'; $('error').textContent = 'overlay failed to load'; };
  img.src = data.overlay_url; img.style.display = 'block';
}
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  document.body.dataset.state = 'running';
  $('ask').disabled = true; $('error').textContent = ''; $('answer').textContent = '';
  $('meta').textContent = ''; $('overlay').style.display = 'none'; $('geojson').style.display = 'none';
  t0 = performance.now(); setStage('uploading'); timer = setInterval(showStatus, 100);
  try {
    const resp = await fetch('api/ask', {method: 'POST', body: new FormData(form),
                                         headers: {'Accept': 'text/event-stream'}});
    if (!resp.ok) throw new Error(errorText(await resp.json(), resp.status));
    let result = null;
    for await (const [name, data] of sseEvents(resp)) {
      if (name === 'stage') setStage(data.stage);
      else if (name === 'error') throw new Error(errorText(data, 500));
      else if (name === 'result') result = data;
    }
    if (!result) throw new Error('the server closed the connection before answering');
    clearInterval(timer);
    show(result);
    $('status').textContent = 'Done in ' + ((performance.now() - t0) / 1000).toFixed(1) + ' s';
  } catch (e) {
    clearInterval(timer);
    $('error').textContent = String(e.message || e);
    $('status').textContent = '';
    document.body.dataset.state = 'error';
  } finally {
    $('ask').disabled = false;
  }
});
</script>
</body></html>
"""


class DemoPage:
    """The page and its API (`/`, `/api/ask`, `/api/result/...`) over a `ChatService`."""

    def __init__(
        self,
        service: ChatService,
        *,
        default_budgets: Sequence[int] | None = None,
        default_max_new_tokens: int = 64,
        overlay_max_side: int = 1200,
        store_size: int = 16,
    ) -> None:
        self.service = service
        self.default_budgets = list(default_budgets) if default_budgets else None
        self.default_max_new_tokens = default_max_new_tokens
        self.overlay_max_side = overlay_max_side
        self.store = _Store(store_size)

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/", self.index, methods=["GET"], response_class=HTMLResponse)
        r.add_api_route("/api/ask", self.ask, methods=["POST"])
        r.add_api_route("/api/result/{key}/overlay.png", self.overlay_png, methods=["GET"])
        r.add_api_route("/api/result/{key}/kept.geojson", self.kept_geojson, methods=["GET"])
        r.add_api_route("/api/result/{key}/kept.pixels.json", self.kept_pixels, methods=["GET"])
        return r

    # ------------------------------------------------------------------ page
    def index(self) -> str:
        service = self.service
        scales = budgets = None
        if service.engine.loaded:
            scales, budgets = service.facts.scales, service.facts.default_budgets
        budgets = self.default_budgets or budgets or list(DEFAULT_BUDGETS)
        return (
            PAGE.replace("__MODEL__", html.escape(service.options.model_name))
            .replace("__SCALES__", html.escape(", ".join(map(str, scales)) if scales else "672, 1344, 2688, 4032"))
            .replace("__BUDGETS__", html.escape(",".join(map(str, budgets))))
            .replace("__FORMATS__", html.escape(accepted_formats()))
            .replace("__ACCEPT__", html.escape(",".join(accepted_suffixes())))
            .replace("__MAXNEW__", str(int(self.default_max_new_tokens)))
            .replace("__MAXLIMIT__", str(MAX_NEW_TOKENS))
        )

    # ------------------------------------------------------------------ ask
    async def _read_form(self, request: Request) -> tuple[ChatInput, str]:
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "image: choose an image file to upload", param="image")
            question = str(form.get("question") or "").strip()
            budgets = str(form.get("budgets") or "").strip() or None
            bands = str(form.get("bands") or "").strip() or None
            try:
                n_new = int(str(form.get("max_new_tokens") or self.default_max_new_tokens))
            except ValueError:
                raise APIError(400, "max_new_tokens must be an integer", param="max_new_tokens") from None
            filename = upload.filename or "upload"
            spool = Spool(filename)
            try:
                await asyncio.to_thread(spool.copy_from, upload.file)
            except BaseException:
                spool.discard()
                raise
        try:
            spool.close()
            if not question:
                raise UhrBatError("the question is empty")
            if not (1 <= n_new <= MAX_NEW_TOKENS):
                raise UhrBatError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {n_new}")
            if spool.size == 0:
                raise ImageLoadError(f"the uploaded file {filename!r} is empty")
        except BaseException:
            spool.discard()
            raise
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        options = RawOptions(max_new_tokens=n_new, budgets=budgets, bands=bands, return_relevance=True)
        return ChatInput(messages, ImageRef(upload=spool, where="image"), options), question

    async def ask(self, request: Request) -> Response:
        chat, question = await self._read_form(request)
        service = self.service
        events = service.events(chat, service.context(), request.is_disconnected)
        try:
            first = await anext(events)  # errors before the job is queued are plain HTTP errors
        except BaseException:
            await events.aclose()
            raise
        if "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(
                self._sse(first, events, question),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            kind, value = first
            while kind != "done":
                kind, value = await anext(events)
        finally:
            await events.aclose()
        return JSONResponse(await self._result(value, question))

    async def _sse(self, first: tuple[str, Any], events: AsyncIterator[tuple[str, Any]], question: str):
        def event(name: str, data: Any) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        try:
            kind, value = first
            while kind != "done":
                if kind == "stage":
                    yield event("stage", {"stage": value})
                kind, value = await anext(events)
            yield event("stage", {"stage": "overlay"})
            yield event("result", await self._result(value, question))
        except Exception as e:  # noqa: BLE001  (the response has started: the error is an event)
            err = api_error_of(e, self.service.options.retry_after_s)
            if err.status == 500 and not isinstance(e, APIError):  # a model crash was logged already
                log.error("request failed: %s", err.message, exc_info=e)
            yield event("error", err.body())
        finally:
            await events.aclose()

    async def _result(self, done: Completion, question: str) -> dict[str, Any]:
        res, source = done.result, done.source
        t1 = time.perf_counter()
        png, ov, (geo, suffix) = await asyncio.to_thread(self._overlay_and_geojson, done, question)
        t_overlay = time.perf_counter() - t1
        key = self.store.put({"png": png, "geojson": geo, "suffix": suffix})
        timings = {k: float(v) for k, v in (res.timings or {}).items()}
        timings["overlay"] = t_overlay
        log.info("answered (+%.2fs overlay): %r", t_overlay, done.text)
        return {
            "id": key,
            "answer": done.text,
            "num_visual_tokens": int(getattr(res, "num_visual_tokens", len(res.tokens))),
            "kept": sum(1 for t in res.tokens if not t.merged),
            "merged": sum(1 for t in res.tokens if t.merged),
            "image_size": list(source.size),
            "georeferenced": getattr(source, "georef", None) is not None,
            "cache": res.cache,
            "timings": timings,
            "overlay_url": f"api/result/{key}/overlay.png",
            "overlay_size": list(ov.size),
            "geojson_url": f"api/result/{key}/kept{suffix}",
        }

    def _overlay_and_geojson(self, done: Completion, question: str) -> tuple[bytes, Any, tuple[dict[str, Any], str]]:
        from uhrbat.io import decode_section
        from uhrbat.io.geo import kept_tokens_document
        from uhrbat.io.overlay import render_overlay

        res, source = done.result, done.source
        buf = io.BytesIO()
        with decode_section():  # the overlay reads the image's pixels again
            ov = render_overlay(
                source, res.tokens, res.relevance, question, done.text, None, max_side=self.overlay_max_side
            )
        ov.image.save(buf, format="PNG", compress_level=3)
        # GeoJSON for a georeferenced upload, else the pixel-space file (never pixels as lon/lat)
        geo, suffix = kept_tokens_document(
            res.tokens, source, properties={"question": question, "answer": done.text}, untransformable="pixels"
        )
        geo["image"]["path"] = done.filename  # the uploaded file's name, never a server path
        return buf.getvalue(), ov, (geo, suffix)

    # ------------------------------------------------------------------ results
    def overlay_png(self, key: str) -> Response:
        item = self.store.get(key)
        if item is None:
            raise APIError(404, "unknown or expired result", code="not_found")
        return Response(item["png"], media_type="image/png")

    def kept_geojson(self, key: str) -> JSONResponse:
        item = self.store.get(key)
        if item is None or item["suffix"] != ".geojson":
            raise APIError(404, "unknown or expired result", code="not_found")
        return JSONResponse(item["geojson"], media_type="application/geo+json")

    def kept_pixels(self, key: str) -> JSONResponse:
        item = self.store.get(key)
        if item is None or item["suffix"] != ".pixels.json":
            raise APIError(404, "unknown or expired result", code="not_found")
        return JSONResponse(item["geojson"])


def create_app(service: ChatService, **page: Any) -> FastAPI:
    """The serving app with the demo page on top (`page`: `DemoPage` settings)."""
    app = create_serving_app(service, extra_routes=("/", "/api/ask"))
    app.include_router(DemoPage(service, **page).router())
    return app


__all__ = ["DemoPage", "create_app", "demo_options"]
