"""`uhrbat demo`: a small local web page to ask questions about an uploaded image.

One HTML page (no external scripts, fonts or CDNs) with an image upload, a question, the
per-scale budgets and the answer-length limit. `POST /api/ask` reads the upload with the same
reader as the CLI (`uhrbat.io.open_image`: PNG/JPEG/GeoTIFF/COG/JPEG2000, band selection), runs
the pipeline and returns JSON with the answer, timings and URLs of the overlay PNG and of the
kept-token GeoJSON, which the page shows / links.

```python
from uhrbat.serving.demo import create_app
app = create_app(pipeline)          # any object with .ask(image, question, ...) -> AskResult
```

The pipeline contract: `pipeline.ask(source, question, max_new_tokens=N, budgets=[...] | None,
return_relevance=True) -> AskResult` (see `uhrbat.results`). Calls are serialised with a lock.
"""


import html
import io
import logging
import re
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

from uhrbat.errors import BudgetError, ImageLoadError, UhrBatError

log = logging.getLogger("uhrbat.demo")

DEFAULT_BUDGETS = (80, 320, 600, 2000)


def parse_budget_field(text: str | None, n_scales: int | None = None) -> list[int] | None:
    """'80, 320,600,2000' -> [80, 320, 600, 2000]; '' -> None (the model's defaults)."""
    if text is None or not text.strip():
        return None
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    out = []
    for p in parts:
        if not re.fullmatch(r"\d+", p):
            raise BudgetError(f"budgets must be non-negative integers separated by commas, got {text!r}")
        out.append(int(p))
    if n_scales is not None and len(out) != n_scales:
        raise BudgetError(f"got {len(out)} budgets {out} but the model has {n_scales} scales")
    return out


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


def _model_info(pipeline: Any) -> tuple[list[int] | None, list[int] | None]:
    """(scales, default budgets) of a pipeline, when it exposes them."""
    scales = budgets = None
    cfg = getattr(getattr(pipeline, "model", None), "config", None)
    if cfg is not None:
        scales = list(getattr(cfg, "scales", []) or []) or None
        budgets = list(getattr(cfg, "budgets", []) or []) or None
    sel = getattr(pipeline, "selection", None)
    if isinstance(sel, dict) and sel.get("budgets"):
        budgets = list(sel["budgets"])
    scales = getattr(pipeline, "scales", scales)
    budgets = getattr(pipeline, "default_budgets", budgets)
    return (list(scales) if scales else None), (list(budgets) if budgets else None)


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
 input[type=text],input[type=number],textarea{width:100%;box-sizing:border-box;padding:6px 8px;border:1px solid #d6d3d1;border-radius:6px;font:inherit}
 textarea{min-height:70px} small{color:#78716c}
 button{margin-top:16px;padding:8px 16px;border:0;border-radius:6px;background:#0f766e;color:#fff;font-weight:600;cursor:pointer}
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
 <a id="geojson" href="#" style="display:none" download="kept.geojson">Download kept regions (GeoJSON)</a>
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
    if (!resp.ok) throw new Error(data.error || ('HTTP ' + resp.status));
    $('answer').textContent = data.answer;
    const t = Object.entries(data.timings || {}).map(([k, v]) => k + ' ' + v.toFixed(2) + 's').join(' \\u00b7 ');
    $('meta').textContent = data.num_visual_tokens + ' visual tokens (' + data.kept + ' kept, ' + data.merged +
      ' merged) \\u00b7 image ' + data.image_size.join('\\u00d7') + (t ? ' \\u00b7 ' + t : '');
    $('geojson').href = data.geojson_url; $('geojson').style.display = 'inline';
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
):
    """The FastAPI app. Give a ready `pipeline`, or a `pipeline_factory` called on first use."""
    from fastapi import FastAPI, File, Form, HTTPException, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from uhrbat.io.geo import tokens_geojson
    from uhrbat.io.images import DEFAULT_MAX_PIXELS, open_image
    from uhrbat.io.overlay import render_overlay

    if pipeline is None and pipeline_factory is None:
        raise ValueError("create_app needs a pipeline or a pipeline_factory")
    state: dict[str, Any] = {"pipeline": pipeline}
    run_lock = threading.Lock()
    store = _Store(store_size)
    limit_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else (None if max_pixels <= 0 else max_pixels)
    max_bytes = int(max_upload_mb * 1024 * 1024)

    def get_pipeline() -> Any:
        if state["pipeline"] is None:
            state["pipeline"] = pipeline_factory()  # type: ignore[misc]
        return state["pipeline"]

    app = FastAPI(title="UHR-BAT demo", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(UhrBatError)
    async def _typed(_req, exc: UhrBatError):  # noqa: ANN001
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def _crash(_req, exc: Exception):  # noqa: ANN001
        log.exception("demo request failed")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        scales, budgets = (None, None)
        if state["pipeline"] is not None:
            scales, budgets = _model_info(state["pipeline"])
        budgets = list(default_budgets) if default_budgets else (budgets or list(DEFAULT_BUDGETS))
        return (PAGE.replace("__MODEL__", html.escape(model_name or type(state["pipeline"]).__name__))
                .replace("__SCALES__", html.escape(", ".join(map(str, scales)) if scales else "672, 1344, 2688, 4032"))
                .replace("__BUDGETS__", html.escape(",".join(map(str, budgets))))
                .replace("__MAXNEW__", str(int(max_new_tokens))))

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "model_loaded": state["pipeline"] is not None}

    @app.post("/api/ask")
    def ask(
        image: UploadFile = File(...),
        question: str = Form(...),
        budgets: str = Form(""),
        bands: str = Form(""),
        max_new_tokens: int = Form(64),
    ) -> JSONResponse:
        question = question.strip()
        if not question:
            raise UhrBatError("the question is empty")
        if not (1 <= max_new_tokens <= 4096):
            raise UhrBatError(f"max_new_tokens must be between 1 and 4096, got {max_new_tokens}")
        pipe = get_pipeline()
        scales, _ = _model_info(pipe)
        budget_list = parse_budget_field(budgets, len(scales) if scales else None)
        suffix = re.sub(r"[^A-Za-z0-9.]", "", Path(image.filename or "upload").suffix)[:10]
        with tempfile.TemporaryDirectory(prefix="uhrbat-demo-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            size = 0
            with open(path, "wb") as f:
                while chunk := image.file.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise HTTPException(413, f"upload larger than {max_upload_mb:g} MB")
                    f.write(chunk)
            if size == 0:
                raise ImageLoadError(f"the uploaded file {image.filename!r} is empty")
            try:
                source = open_image(path, bands=bands.strip() or None, max_pixels=limit_pixels)
            except ImageLoadError as e:  # name the upload, not the temp file
                raise ImageLoadError(str(e).replace(str(path), repr(image.filename or "upload"))) from e
            t0 = time.perf_counter()
            with run_lock:
                res = pipe.ask(source, question, max_new_tokens=max_new_tokens, budgets=budget_list,
                               return_relevance=True)
            t_ask = time.perf_counter() - t0
            t1 = time.perf_counter()
            buf = io.BytesIO()
            ov = render_overlay(source, res.tokens, res.relevance, question, res.answer, None,
                                max_side=overlay_max_side)
            ov.image.save(buf, format="PNG", compress_level=3)
            geo = tokens_geojson(res.tokens, source, properties={"question": question, "answer": res.answer})
            t_overlay = time.perf_counter() - t1
        key = store.put({"png": buf.getvalue(), "geojson": geo})
        timings = {k: float(v) for k, v in (res.timings or {}).items()}
        timings["overlay"] = t_overlay
        log.info("answered in %.2fs (+%.2fs overlay): %r", t_ask, t_overlay, res.answer)
        return JSONResponse({
            "id": key,
            "answer": res.answer,
            "num_visual_tokens": int(getattr(res, "num_visual_tokens", len(res.tokens))),
            "kept": sum(1 for t in res.tokens if not t.merged),
            "merged": sum(1 for t in res.tokens if t.merged),
            "image_size": list(source.size),
            "georeferenced": getattr(source, "georef", None) is not None,
            "timings": timings,
            "overlay_url": f"api/result/{key}/overlay.png",
            "overlay_size": list(ov.size),
            "geojson_url": f"api/result/{key}/kept.geojson",
        })

    @app.get("/api/result/{key}/overlay.png")
    def overlay_png(key: str) -> Response:
        item = store.get(key)
        if item is None:
            raise HTTPException(404, "unknown or expired result")
        return Response(item["png"], media_type="image/png")

    @app.get("/api/result/{key}/kept.geojson")
    def kept_geojson(key: str) -> JSONResponse:
        item = store.get(key)
        if item is None:
            raise HTTPException(404, "unknown or expired result")
        return JSONResponse(item["geojson"], media_type="application/geo+json")

    return app


def serve(app: Any, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Run the app with uvicorn (blocking)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: the demo has no authentication; anyone who can reach it can run the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class _ServerThread(threading.Thread):
    """uvicorn in a background thread (tests, notebooks): `with serve_in_thread(app) as url:`."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        super().__init__(daemon=True)
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))

    def run(self) -> None:
        self.server.run()


class serve_in_thread:
    """Context manager: start the app on 127.0.0.1 (free port), yield its base URL, stop it."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}/"
        self._thread = _ServerThread(app, host, port)

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.time() + 20
        while not self._thread.server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("demo server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self._thread.server.should_exit = True
        self._thread.join(timeout=10)
