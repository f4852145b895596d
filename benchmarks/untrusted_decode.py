"""Time and peak memory of `open_image(..., trust="untrusted")` + the 672..4032 pyramid on
files that used to cost gigabytes or hang (issues 8 and 18): a valid 20,000^2 PNG (grey and
RGB), elongated 1 x 100,000 and 100,000 x 1 PNGs, a pad-heavy 100 x 16,000 PNG and a lying
1 x 2^31 header, against a normal 4,000 x 3,000 photo-sized PNG (the elongated ones should cost
about what it costs).

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


def _normal_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:3000, 0:4000]
    rgb = np.stack([x * 255 // 4000, y * 255 // 3000, (x + y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


CASES = {
    "normal_4000x3000.png": _normal_png,
    "z20000_grey.png": lambda: png_bytes(20000, 20000, color=0),
    "z20000_rgb.png": lambda: png_bytes(20000, 20000, color=2),
    "tall_1x100000.png": lambda: png_bytes(1, 100_000),
    "wide_100000x1.png": lambda: png_bytes(100_000, 1),
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
