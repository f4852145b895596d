"""`uhrbat demo`: a small local web page to ask questions about an uploaded image.

One HTML page (no external scripts, fonts or CDNs) with an image upload, a question, the
per-scale budgets and the answer-length limit. The page is a client of the serving app
(`uhrbat.serving.app`): `POST /api/ask` reads the upload with the untrusted reader
(`uhrbat.io.open_image_bytes`, inside `uhrbat.io.decode_section()`), queues the question on the
same engine as `/v1/chat/completions` (which the demo serves too), and returns JSON with the
answer, timings and URLs of the overlay PNG and of the kept-token GeoJSON. Errors use the app's
one format, OpenAI's `{"error": {"message", ...}}`.

```python
from uhrbat.serving.demo import create_app
app = create_app(pipeline)          # any object with .chat_batch(images, conversations, ...) (see serving.fake)
```
"""

from __future__ import annotations

import html
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request

from uhrbat.errors import ImageLoadError, UhrBatError
from uhrbat.serving.app import (
    serve_in_thread,  # re-exported: tests and notebooks import it from here
)

log = logging.getLogger("uhrbat.demo")

DEFAULT_BUDGETS = (80, 320, 600, 2000)


class _Store:
    """The last few results (overlay PNG bytes, GeoJSON text), by id."""

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


def _default_budgets(pipeline: Any) -> list[int] | None:
    """The budgets a pipeline uses when a request gives none (fake: `.default_budgets`)."""
    budgets = getattr(pipeline, "default_budgets", None)
    if budgets is None:
        budgets = (getattr(pipeline, "selection", None) or {}).get("budgets")
    if budgets is None:
        budgets = pipeline.model.config.budgets
    return list(budgets) if budgets else None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>UHR-BAT demo</title>
<style>
 body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f5f4;color:#1c1917}
 header{background:#1c1917;color:#fafaf9;padding:12px 20px} header h1{font-size:18px;margin:0}
 header p{margin:4px 0 0;font-size:13px;color:#d6d3d1}
 main{display:grid;grid-template-columns:minmax(280px,380px) 1fr;gap:20px;padding:20px}
 form{background:#fff;border:1px solid #e7e5e4;border-radius:8px;padding:16px;align-self:start}
 label{display:block;font-size:13px;font-weight:600;margin:12px 0 4px}
 input[type=text],input[type=number],textarea{width:100%;box-sizing:border-box;padding:6px 8px;
   border:1px solid #d6d3d1;border-radius:6px;font:inherit}
 textarea{min-height:70px} small{color:#78716c}
 button{margin-top:16px;padding:8px 16px;border:0;border-radius:6px;background:#0f766e;color:#fff;
   font-weight:600;cursor:pointer}
 button:disabled{background:#a8a29e;cursor:wait}
 #result{background:#fff;border:1px solid #e7e5e4;border-radius:8px;padding:16px;min-height:200px}
 #answer{font-size:18px;white-space:pre-wrap;margin:6px 0 12px} #error{color:#b91c1c;white-space:pre-wrap}
 #overlay{max-width:100%;height:auto;border:1px solid #e7e5e4;display:none}
 #meta{font-size:12px;color:#57534e;margin:8px 0} #status{font-size:13px;color:#57534e}
</style></head>
<body data-state="idle">
<header><h1>UHR-BAT &mdash; ask about an ultra-high-resolution image</h1>
<p>Model: __MODEL__ &middot; scales __SCALES__ &middot; runs locally; nothing leaves this machine.</p></header>
<main>
<form id="form" autocomplete="off">
 <label for="image">Image (PNG, JPEG, TIFF / GeoTIFF / COG, JPEG2000)</label>
 <input id="image" name="image" type="file" required>
 <label for="question">Question</label>
 <textarea id="question" name="question" required placeholder="How many ships are in the harbour?"></textarea>
 <label for="budgets">Visual-token budgets per scale</label>
 <input id="budgets" name="budgets" type="text" value="__BUDGETS__">
 <small>Comma-separated, one per scale (__SCALES__); empty = model default.</small>
 <label for="bands">Bands (optional, 1-based, e.g. 4,3,2)</label>
 <input id="bands" name="bands" type="text" value="">
 <label for="max_new_tokens">Max new tokens</label>
 <input id="max_new_tokens" name="max_new_tokens" type="number" min="1" max="2048" value="__MAXNEW__">
 <button id="ask" type="submit">Ask</button>
 <p id="status"></p>
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
form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  document.body.dataset.state = 'running';
  $('ask').disabled = true; $('error').textContent = ''; $('answer').textContent = '';
  $('meta').textContent = ''; $('overlay').style.display = 'none'; $('geojson').style.display = 'none';
  $('status').textContent = 'Running the model\\u2026';
  const t0 = performance.now();
  try {
    const resp = await fetch('api/ask', {method: 'POST', body: new FormData(form)});
    const data = await resp.json();
    if (!resp.ok) throw new Error((data.error && (data.error.message || data.error)) || ('HTTP ' + resp.status));
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
    $('status').textContent = 'Done in ' + ((performance.now() - t0) / 1000).toFixed(1) + ' s';
  } catch (e) {
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


def create_app(
    pipeline: Any = None,
    *,
    pipeline_factory: Callable[[], Any] | None = None,
    model_name: str = "",
    default_budgets: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    max_upload_mb: float = 1024,
    max_pixels: int | None = None,
    overlay_max_side: int = 1200,
    store_size: int = 16,
    max_batch: int = 4,
    max_queue: int = 16,
):
    """The serving app with the demo page on top. Give a ready `pipeline`, or a
    `pipeline_factory` called once (under a lock) on first use. `max_pixels`: None = the
    reader's default, 0 = no limit."""
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from uhrbat.io.geo import kept_tokens_document
    from uhrbat.io.overlay import render_overlay
    from uhrbat.processing.processing_uhrbat import parse_budgets
    from uhrbat.serving.app import ServeOptions, model_scales
    from uhrbat.serving.app import create_app as create_serving_app
    from uhrbat.serving.engine import Engine, Job, UntrustedImage
    from uhrbat.serving.openai_api import APIError

    if pipeline is None and pipeline_factory is None:
        raise ValueError("create_app needs a pipeline or a pipeline_factory")
    engine = Engine(pipeline, pipeline_factory=pipeline_factory, max_batch=max_batch, max_queue=max_queue)
    options = ServeOptions(
        model_name=model_name or "uhrbat",
        max_request_bytes=int(max_upload_mb * 1024 * 1024),
        max_request_option="--max-upload-mb",
        max_new_tokens=max_new_tokens,
        max_pixels=max_pixels,
    )
    app = create_serving_app(engine, options)
    store = _Store(store_size)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        scales = budgets = None
        if engine.loaded:
            scales, budgets = model_scales(engine.pipeline()), _default_budgets(engine.pipeline())
        budgets = list(default_budgets) if default_budgets else (budgets or list(DEFAULT_BUDGETS))
        return (
            PAGE.replace("__MODEL__", html.escape(model_name or "UHR-BAT"))
            .replace("__SCALES__", html.escape(", ".join(map(str, scales)) if scales else "672, 1344, 2688, 4032"))
            .replace("__BUDGETS__", html.escape(",".join(map(str, budgets))))
            .replace("__MAXNEW__", str(int(max_new_tokens)))
        )

    @app.post("/api/ask")
    async def ask(request: Request) -> JSONResponse:
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise APIError(400, "image: choose an image file to upload", param="image")
            question = str(form.get("question") or "").strip()
            budgets_text = str(form.get("budgets") or "").strip()
            bands = str(form.get("bands") or "").strip() or None
            try:
                n_new = int(str(form.get("max_new_tokens") or max_new_tokens))
            except ValueError:
                raise APIError(400, "max_new_tokens must be an integer", param="max_new_tokens") from None
            filename = upload.filename or "upload"
            data = await upload.read()
        if not question:
            raise UhrBatError("the question is empty")
        if not (1 <= n_new <= 4096):
            raise UhrBatError(f"max_new_tokens must be between 1 and 4096, got {n_new}")
        pipe = await run_in_threadpool(engine.pipeline)
        selection = {}
        if budgets_text:
            selection["budgets"] = parse_budgets(budgets_text, len(model_scales(pipe)))
        if not data:
            raise ImageLoadError(f"the uploaded file {filename!r} is empty")
        read_opts = dict(options.read_options(), **({"bands": bands} if bands else {}))
        job = Job(
            image=UntrustedImage(data, filename, read_opts),
            max_new_tokens=n_new,
            selection=selection,
            return_relevance=True,
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        )
        del data
        done = await app.state.wait_for(request, job)  # the engine's worker decodes and runs the model
        res, source = done.result, done.source

        def overlay_and_geojson() -> tuple[bytes, Any, dict[str, Any]]:
            from uhrbat.io import decode_section

            buf = io.BytesIO()
            with decode_section():  # the overlay reads the image's pixels again
                ov = render_overlay(
                    source, res.tokens, res.relevance, question, done.text, None, max_side=overlay_max_side
                )
            ov.image.save(buf, format="PNG", compress_level=3)
            # GeoJSON for a georeferenced upload, else the pixel-space file (never pixels as lon/lat)
            geo, suffix = kept_tokens_document(
                res.tokens, source, properties={"question": question, "answer": done.text}, untransformable="pixels"
            )
            geo["image"]["path"] = filename  # the uploaded file's name, never a server path
            return buf.getvalue(), ov, (geo, suffix)

        t1 = time.perf_counter()
        png, ov, (geo, suffix) = await run_in_threadpool(overlay_and_geojson)
        t_overlay = time.perf_counter() - t1
        key = store.put({"png": png, "geojson": geo, "suffix": suffix})
        timings = {k: float(v) for k, v in (res.timings or {}).items()}
        timings["overlay"] = t_overlay
        log.info("answered (+%.2fs overlay): %r", t_overlay, done.text)
        return JSONResponse(
            {
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
        )

    @app.get("/api/result/{key}/overlay.png")
    def overlay_png(key: str) -> Response:
        item = store.get(key)
        if item is None:
            raise APIError(404, "unknown or expired result", code="not_found")
        return Response(item["png"], media_type="image/png")

    @app.get("/api/result/{key}/kept.geojson")
    def kept_geojson(key: str) -> JSONResponse:
        item = store.get(key)
        if item is None or item["suffix"] != ".geojson":
            raise APIError(404, "unknown or expired result", code="not_found")
        return JSONResponse(item["geojson"], media_type="application/geo+json")

    @app.get("/api/result/{key}/kept.pixels.json")
    def kept_pixels(key: str) -> JSONResponse:
        item = store.get(key)
        if item is None or item["suffix"] != ".pixels.json":
            raise APIError(404, "unknown or expired result", code="not_found")
        return JSONResponse(item["geojson"])

    return app


def serve(app: Any, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocking)."""
    from uhrbat.serving.app import serve as _serve

    _serve(app, host=host, port=port, log_level=log_level)


__all__ = ["create_app", "serve", "serve_in_thread"]
