"""Server memory under N concurrent maximum-size request bodies (issue 18, item 4).

    python benchmarks/serve_bodies.py                          # 6 clients x ~127 MiB bodies, caps 512 MiB and none
    python benchmarks/serve_bodies.py --clients 1,6,12 --caps 512 --baseline-src /work/main/src

Starts `uhrbat serve` (tiny random 2-scale model, CPU) as a subprocess on 127.0.0.1 for each
in-flight cap in `--caps` (MiB; `none` = large enough for every body), with its own TMPDIR, and
sends `--clients` chat requests at once, each a body just under the body limit: a data: URL of a
random-noise PNG (incompressible, so the body really is that big). Samples the server process's
RSS and the bytes in its TMPDIR (the spooled uploads) every 20 ms, and prints one JSON line per
run: answers (200), refusals (503 + Retry-After), idle and peak RSS, peak spool bytes.

`--clients` and `--caps` take comma-separated lists (every combination runs). `--baseline-src DIR`
adds runs of another checkout's server (e.g. main before this change: it buffers and parses bodies
in memory and has no in-flight cap) with the same client counts. What a decode costs (one 33 MP
image: ~400 MiB over idle) is in every run; the bodies are what differs.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

MiB = 2**20


def body_of(mib: float, seed: int = 0) -> tuple[bytes, int]:
    """A chat request of about `mib` MiB: a random-noise PNG as a data: URL. Returns (body, side)."""
    side = int(((mib * MiB - 4096) * 3 / 4 / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]}
    return json.dumps({"model": "bench", "messages": [msg], "max_tokens": 4}).encode(), side


class Sampler:
    """Peak RSS of a process and peak bytes under a folder, sampled in a thread."""

    def __init__(self, pid: int, folder: Path, period: float = 0.02) -> None:
        self.proc, self.folder, self.period = psutil.Process(pid), folder, period
        self.peak_rss = self.peak_spool = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _spool_bytes(self) -> int:
        total = 0
        for root, _, files in os.walk(self.folder):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self.peak_spool = max(self.peak_spool, self._spool_bytes())
            time.sleep(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: bytes) -> tuple[int, str | None, float]:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Retry-After"), time.perf_counter() - t0
    except OSError:  # the server closed the connection while the body was being sent (a refusal)
        return -1, None, time.perf_counter() - t0
    finally:
        conn.close()


def run(args, clients: int, model: Path, body: bytes, cap_mib: float | None, src: str, label: str) -> dict:
    port = free_port()
    spool = Path(tempfile.mkdtemp(prefix="uhrbat-bench-spool-"))
    cmd = [sys.executable, "-m", "uhrbat.cli.main", "serve", "--model", str(model), "--port", str(port)]
    cmd += ["--served-model-name", "bench", "--budgets", "8,16", "--max-new-tokens", "4"]
    cmd += ["--max-batch", "1", "--max-request-mb", "128" if label != "baseline" else "256"]
    if cap_mib is not None:
        cmd += ["--max-inflight-mb", str(cap_mib)]
    env = dict(os.environ, PYTHONPATH=src, TMPDIR=str(spool), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(cmd)}")
            time.sleep(0.2)
        time.sleep(1)
        idle = psutil.Process(proc.pid).memory_info().rss
        sampler = Sampler(proc.pid, spool)
        results: list[tuple[int, str | None, float]] = [None] * clients  # type: ignore[list-item]

        def client(i: int) -> None:
            results[i] = post(port, body)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        sampler.stop()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    statuses = [r[0] for r in results]
    return {
        "server": label,
        "clients": clients,
        "body_mib": round(len(body) / MiB, 1),
        "inflight_cap_mib": cap_mib,
        "answered_200": statuses.count(200),
        "refused_503": statuses.count(503),
        "retry_after": sorted({r[1] for r in results if r[1]}),
        "other_status": sorted(s for s in statuses if s not in (200, 503)),
        "idle_rss_mib": round(idle / MiB),
        "peak_rss_mib": round(sampler.peak_rss / MiB),
        "peak_spool_mib": round(sampler.peak_spool / MiB),
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="6", help="concurrent clients, e.g. 1,6,12")
    ap.add_argument("--body-mb", type=float, default=127, help="body size in MiB (the default limit is 128)")
    ap.add_argument("--caps", default="512,none", help="in-flight caps to run, MiB ('none': unlimited)")
    ap.add_argument("--baseline-src", default=None, help="also run this checkout's src (no in-flight cap)")
    args = ap.parse_args()

    from uhrbat.testing import make_tiny_checkpoint

    src = str(Path(__file__).resolve().parents[1] / "src")
    model = make_tiny_checkpoint(
        Path(tempfile.mkdtemp(prefix="uhrbat-bench-")) / "tiny", seed=0, scales=[672, 1344], budgets=[8, 16]
    )
    body, side = body_of(args.body_mb)
    print(json.dumps({"image": f"{side}x{side} random PNG", "body_bytes": len(body), "cpus": psutil.cpu_count()}))
    for clients in map(int, args.clients.split(",")):
        for cap in args.caps.split(","):
            cap_mib = float(cap) if cap != "none" else clients * len(body) / MiB + 64
            print(json.dumps(run(args, clients, model, body, cap_mib, src, "this tree")), flush=True)
        if args.baseline_src:
            print(json.dumps(run(args, clients, model, body, None, args.baseline_src, "baseline")), flush=True)


if __name__ == "__main__":
    main()
