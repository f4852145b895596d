"""Serving: `uhrbat serve` (OpenAI-compatible chat completions) and `uhrbat demo` (a web page on
the same app).

- `openai_api`: request/response schemas (pydantic) and OpenAI-shaped errors;
- `media`: OpenAI messages -> the pipeline's conversation and the one image (data: / file://);
- `engine`: bounded queue + micro-batching worker (decodes images, runs `pipeline.chat_batch`);
- `app`: the FastAPI app factory (endpoints, auth, body limit, SSE streaming);
- `metrics`: Prometheus metrics; `demo`: the page; `fake`: a deterministic stand-in pipeline.
"""
