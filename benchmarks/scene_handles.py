"""Scene handles vs resending the image: client-side seconds per step of `uhrbat serve` on loopback.

    python benchmarks/scene_handles.py                      # ../shared/parity/uhrbat_tiny, NEON GeoTIFF, 3 repeats
    python benchmarks/scene_handles.py --model RL-MIND/UHR-BAT --device cuda --dtype bf16 --image scene.tif

Two flows about the same image, each repeated --repeats times, each repeat under a fresh API key
(its own scene-cache namespace, so every repeat starts cold):

- **resend**: a first question with the image as a data: URL, then --follow-ups follow-ups that
  resend it (what OpenAI clients do without handles: a content-hash hit, but the bytes travel and
  are decoded every time);
- **handle**: `POST /v1/scenes` once, then 1 + --follow-ups questions by `scene_id`.

Prints one JSON line per repeat and the median seconds per step, with the server's reported
`cache` of each question. Server and clients share this process; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["How many trees are there?", "Which one is the tallest?", "Is there a road?", "Any water?"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "parity" / "uhrbat_tiny"))
    p.add_argument("--image", default=str(ROOT.parent / "shared" / "assets" / "aerial" / "neon_osbs_400.tif"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--budgets", default="8,16,24,32")
    p.add_argument("--kmeans-clusters", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--follow-ups", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()

    import httpx2 as httpx  # the HTTP client the openai package runs on
    import openai

    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

    budgets = [int(b) for b in args.budgets.split(",")]
    pipe = UhrBatPipeline.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, budgets=budgets, kmeans_clusters=args.kmeans_clusters
    )
    data = Path(args.image).read_bytes()
    url = "data:image/tiff;base64," + base64.b64encode(data).decode()
    keys = [f"bench-{flow}-{i}" for flow in ("resend", "handle") for i in range(args.repeats)]
    opts = ServeOptions(model_name="m", api_keys=tuple(keys), request_timeout_s=None, max_batch=1)
    rows: dict[str, list[list[float]]] = {"resend": [], "handle": []}
    with serve_in_thread(create_app(ChatService(pipe, opts)), opts) as base:
        for i in range(args.repeats):
            for flow in ("resend", "handle"):
                key = f"bench-{flow}-{i}"
                client = openai.OpenAI(base_url=base + "v1", api_key=key, max_retries=0, timeout=None)
                steps, caches, messages = [], [], []
                extra: dict = {}
                if flow == "handle":
                    t = time.perf_counter()
                    r = httpx.post(
                        base + "v1/scenes",
                        json={"image": url},
                        headers={"Authorization": f"Bearer {key}"},
                        timeout=None,
                    )
                    r.raise_for_status()
                    steps.append(time.perf_counter() - t)
                    caches.append("upload:" + r.json()["features"])
                    extra = {"scene_id": r.json()["id"]}
                for turn in range(1 + args.follow_ups):
                    q = QUESTIONS[turn % len(QUESTIONS)]
                    if flow == "resend":
                        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
                        messages.append({"role": "user", "content": content if turn == 0 else q})
                    else:
                        messages.append({"role": "user", "content": q})
                    t = time.perf_counter()
                    r = client.chat.completions.create(
                        model="m", messages=messages, max_tokens=args.max_tokens, extra_body=extra
                    )
                    steps.append(time.perf_counter() - t)
                    caches.append(r.model_extra["uhrbat"]["cache"])
                    messages.append({"role": "assistant", "content": r.choices[0].message.content})
                rows[flow].append(steps)
                print(json.dumps({"flow": flow, "repeat": i, "seconds": [round(s, 3) for s in steps], "cache": caches}))
    print(f"\nmedian seconds over {args.repeats} repeats ({Path(args.model).name}, {Path(args.image).name}):")
    for flow, label in (
        ("resend", ["first", *["follow-up"] * args.follow_ups]),
        ("handle", ["upload", "first", *["follow-up"] * args.follow_ups]),
    ):
        med = [statistics.median(r[j] for r in rows[flow]) for j in range(len(label))]
        print(f"  {flow:7s} " + "  ".join(f"{n} {m:.2f}" for n, m in zip(label, med)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
