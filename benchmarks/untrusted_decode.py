"""Time and peak memory of `open_image(..., trust="untrusted")` + the 672..4032 pyramid on
files that used to cost gigabytes or hang (issue 8): a valid 20,000^2 PNG (grey and RGB), an
elongated 1 x 100,000 PNG, a pad-heavy 100 x 16,000 PNG and a lying 1 x 2^31 header.

Each file is opened in a fresh fork of a worker that has already imported the reader (see
tests/untrusted_corpus.py), so `peak MB` is what that one file cost above the worker.

    python benchmarks/untrusted_decode.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from untrusted_corpus import png_bytes, run_worker

CASES = {
    "z20000_grey.png": lambda: png_bytes(20000, 20000, color=0),
    "z20000_rgb.png": lambda: png_bytes(20000, 20000, color=2),
    "tall_1x100000.png": lambda: png_bytes(1, 100_000),
    "thin_100x16000.png": lambda: png_bytes(100, 16_000),
    "claim_1x2147483647.png": lambda: png_bytes(1, 2_147_483_647, rows=1),
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for name, make in CASES.items():
            p = Path(tmp) / name
            p.write_bytes(make())
            items.append((p, "untrusted"))
        t = time.perf_counter()
        results = run_worker(items, timeout=300, side=(672, 1344, 2688, 4032))
        print(f"{'file':26} {'bytes':>9} {'status':7} {'seconds':>8} {'peak MB':>8}  message")
        for (p, _), r in zip(items, results):
            print(
                f"{p.name:26} {p.stat().st_size:9,d} {r['status']:7} {r['seconds']:8.2f} {r['peak_mb']:8.0f}  "
                f"{r['message'][:70]}"
            )
        print(f"total {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
