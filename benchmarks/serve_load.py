"""Load test of `uhrbat serve` on loopback: N concurrent OpenAI clients for a bounded time.

    python benchmarks/serve_load.py                                  # tiny random model, 8 clients, 20 s per mode
    python benchmarks/serve_load.py --clients 16 --seconds 60 --model RL-MIND/UHR-BAT --device cuda --dtype bf16

Each client repeatedly takes a fresh scene (a random PNG of --side px), asks a first question
about it (a scene-cache miss) and then --follow-ups follow-up questions in the same
conversation (cache hits: clients resend the image, as OpenAI clients do). Every request is
timed from the client. The same load runs twice on one loaded pipeline: with micro-batching
(--max-batch) and without (max batch 1).

Reports per mode: completed requests, throughput (requests/s), p50/p95 latency overall and for
first vs follow-up questions, mean model batch size, and the process's peak RSS while the mode
ran (server and clients share this process; RSS is sampled every 10 ms). Nothing leaves
127.0.0.1; the run stops by itself after 2 x --seconds (+ the requests in flight).
Request bodies and their memory under concurrency: `benchmarks/serve_bodies.py`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image


class PeakRSS:
    """Samples the process RSS in a thread; `take()` returns the peak since the last call (MiB)."""

    def __init__(self, period: float = 0.01) -> None:
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.period = period
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def take(self) -> float:
        peak, self.peak = max(self.peak, self.proc.memory_info().rss), self.proc.memory_info().rss
        return peak / 2**20


def scene_url(seed: int, side: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return float(np.percentile(np.asarray(xs), q))


def client_loop(
    client, model: str, cid: int, deadline: float, args, out: list, lock: threading.Lock, seed_base: int
) -> None:
    cycle = 0
    while time.time() < deadline:
        url = scene_url(seed_base + 10_000 * cid + cycle, args.side)  # a scene no mode has seen
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in this scene?"},
                ],
            }
        ]
        for turn in range(1 + args.follow_ups):
            if time.time() >= deadline:
                break
            t0 = time.perf_counter()
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens)
            dt = time.perf_counter() - t0
            ext = r.model_extra["uhrbat"]
            with lock:
                out.append(
                    {
                        "kind": "first" if turn == 0 else "follow-up",
                        "seconds": dt,
                        "cache": ext["cache"],
                        "batch": ext["batch_size"],
                    }
                )
            messages += [
                {"role": "assistant", "content": r.choices[0].message.content},
                {"role": "user", "content": f"And what about part {turn + 1}?"},
            ]
        cycle += 1


def run_mode(pipe, args, max_batch: int, rss: PeakRSS) -> dict:
    import openai

    from uhrbat.serving import ChatService, ServeOptions, create_app, serve_in_thread

    options = ServeOptions(
        model_name="bench",
        max_batch=max_batch,
        max_queue=max(64, 2 * args.clients),
        batch_wait_s=args.batch_wait_ms / 1000,
        max_connections=max(128, 4 * args.clients),
    )
    app = create_app(ChatService(pipe, options))
    rows: list[dict] = []
    lock = threading.Lock()
    rss.take()
    with serve_in_thread(app, options) as url:
        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=600)
        t0 = time.time()
        deadline = t0 + args.seconds
        threads = [
            threading.Thread(
                target=client_loop, args=(client, "bench", c, deadline, args, rows, lock, max_batch * 10**7)
            )
            for c in range(args.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
    lat = [r["seconds"] for r in rows]
    first = [r["seconds"] for r in rows if r["kind"] == "first"]
    follow = [r["seconds"] for r in rows if r["kind"] == "follow-up"]

    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 1)

    return {
        "mode": f"max_batch={max_batch}",
        "clients": args.clients,
        "requests": len(rows),
        "elapsed_s": round(elapsed, 2),
        "throughput_rps": round(len(rows) / elapsed, 3),
        "p50_ms": ms(percentile(lat, 50)),
        "p95_ms": ms(percentile(lat, 95)),
        "first_p50_ms": ms(percentile(first, 50)),
        "follow_up_p50_ms": ms(percentile(follow, 50)),
        "follow_up_cache_hits": sum(r["cache"] in ("hit", "disk") for r in rows if r["kind"] == "follow-up"),
        "follow_ups": len(follow),
        "mean_batch": round(statistics.fmean([r["batch"] for r in rows]), 2) if rows else None,
        "peak_rss_mib": round(rss.take(), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="checkpoint, or 'tiny' (a random 2-scale test model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--budgets", default="8,16", help="budgets per scale (tiny model: 2 scales)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20, help="load duration per mode")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--follow-ups", type=int, default=2)
    ap.add_argument("--side", type=int, default=256, help="scene side in px")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from uhrbat.pipeline import UhrBatPipeline
    from uhrbat.processing.processing_uhrbat import parse_budgets

    rss = PeakRSS()
    model = args.model
    if model == "tiny":
        from uhrbat.testing import make_tiny_checkpoint

        model = make_tiny_checkpoint(
            Path(tempfile.mkdtemp(prefix="uhrbat-bench-")) / "tiny", seed=0, scales=[672, 1344], budgets=[8, 16]
        )
    budgets = [int(b) for b in args.budgets.split(",")]
    pipe = UhrBatPipeline.from_pretrained(model, device=args.device, dtype=args.dtype, budgets=budgets)
    parse_budgets(budgets, len(pipe.model.config.scales))
    print(
        json.dumps(
            {
                "model": str(args.model),
                "device": args.device,
                "torch_threads": args.threads,
                "cpu_count": psutil.cpu_count(),
                "load_rss_mib": round(rss.take(), 1),
            }
        ),
        flush=True,
    )
    for max_batch in (args.max_batch, 1):
        print(json.dumps(run_mode(pipe, args, max_batch, rss)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
