"""Structured fuzz of the untrusted reader (issue 18): 1,200 generated hostile files (seed 18;
TIFF / GeoTIFF tag fuzz, PNG header and chunk fuzz, JPEG marker and size fuzz, byte mutants of
real GeoTIFFs; `tests/untrusted_corpus.py`), each opened in a forked child with a 20 s limit:
`open_image(path, trust="untrusted")`, the 336-px square and the georeference outputs as strict
JSON. Prints, per family, how many opened, failed with a typed error, or did anything else
(a generic exception, a crash, a hang), and the worst time and peak memory.

    python benchmarks/untrusted_fuzz.py [--n 1200] [--seed 18]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from untrusted_corpus import make_fuzz_cases, run_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=18)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uhrbat-fuzz-") as tmp:
        t = time.perf_counter()
        cases = make_fuzz_cases(Path(tmp), seed=args.seed, n=args.n)
        t_gen = time.perf_counter() - t
        results = run_worker([(p, "untrusted") for p, _ in cases], timeout=20.0)
        t_run = time.perf_counter() - t - t_gen
    families = sorted({f for _, f in cases})
    print(f"{'family':9} {'cases':>6} {'ok':>6} {'typed error':>12} {'other':>6} {'max s':>7} {'max peak MB':>12}")
    for f in families + ["all"]:
        rs = [r for (_, fam), r in zip(cases, results) if f in ("all", fam)]
        other = sum(r["status"] not in ("ok", "error") for r in rs)
        print(
            f"{f:9} {len(rs):6d} {sum(r['status'] == 'ok' for r in rs):6d} "
            f"{sum(r['status'] == 'error' for r in rs):12d} {other:6d} {max(r['seconds'] for r in rs):7.2f} "
            f"{max(r['peak_mb'] for r in rs):12.0f}"
        )
    print(f"generated in {t_gen:.1f} s, run in {t_run:.1f} s")
    for r in results:
        if r["status"] not in ("ok", "error"):
            print(f"  {r['status']}: {r['path']}: {r['message'][:200]}")
    if any(r["status"] not in ("ok", "error") for r in results) or len(results) != len(cases):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
