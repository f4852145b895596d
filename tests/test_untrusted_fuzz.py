"""Seeded fuzz of the image reader with hostile files, at both trust levels (issue 8).

Every file either opens (and yields a square) or raises `ImageLoadError` with one line; none
crashes, blocks (each runs in a forked child with a time limit) or costs more than
`PEAK_MB_BOUND` MB above the process it runs in; no file makes a network request (a loopback
HTTP server counts them) and every file that references another file or URL is refused at the
untrusted level.
"""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from typing import ClassVar

import pytest

from untrusted_corpus import make_corpus, run_worker

#: Peak memory (VmHWM above the forked child's starting RSS) allowed per file, for open +
#: square(336). The largest cost is a lying PNG header above 256 MP, which allocates the
#: reduced copy the 4032-px level needs (~(2 x 4032)^2 RGB) before the stream fails.
PEAK_MB_BOUND = 400
#: Per-file wall-clock limit (the child is killed past it and the file counts as blocking).
TIMEOUT_S = 20.0


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Counting.hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def loopback_server():
    _Counting.hits = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", _Counting.hits
    finally:
        srv.shutdown()
        srv.server_close()


def test_hostile_files_work_or_fail_cleanly(tmp_path, loopback_server) -> None:
    url, hits = loopback_server
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:top secret\n" * 64)
    items = make_corpus(tmp_path / "corpus", seed=8, url=url, secret=secret)
    jobs = [(p, t) for p, trusts in items for t in trusts]
    assert len(jobs) >= 300
    results = run_worker(jobs, timeout=TIMEOUT_S)
    assert len(results) == len(jobs)
    by = Counter((r["trust"], r["status"]) for r in results)
    bad = [r for r in results if r["status"] not in ("ok", "error")]
    assert not bad, f"crashes / hangs: {bad[:5]}"
    multi = [r for r in results if r["status"] == "error" and ("\n" in r["message"] or not r["message"].strip())]
    assert not multi, multi[:3]
    heavy = [r for r in results if r["peak_mb"] > PEAK_MB_BOUND]
    assert not heavy, f"over {PEAK_MB_BOUND} MB: {[(r['path'], r['trust'], round(r['peak_mb'])) for r in heavy]}"
    assert hits == [], f"the reader made HTTP requests: {hits}"
    for r in results:
        name = r["path"].rsplit("/", 1)[-1]
        if name == "png_then_vrt.png":  # a valid PNG with inert trailing bytes: opening it is fine
            continue
        if r["trust"] == "untrusted" and (
            "vrt" in name or name.endswith((".gif", ".bmp", ".webp", ".xml")) or r["path"].startswith("/vsi")
        ):
            assert r["status"] == "error", (name, r)
        if name.startswith(("fifo", "link_to_fifo", "dir", "zero")) or r["path"] == "/dev/zero":
            assert r["status"] == "error", (name, r)
    assert "top secret" not in " ".join(r["message"] for r in results)
    # The valid bases open at both levels (the fuzz is not passing by refusing everything).
    for name in ("rgb.png", "rgba.png", "base.jpg", "prog.jpg", "plain.tif", "elong_1x100000.png"):
        for trust in ("local", "untrusted"):
            r = next(r for r in results if r["path"].endswith("/" + name) and r["trust"] == trust)
            assert r["status"] == "ok", r
    assert by[("untrusted", "ok")] > 20 and by[("untrusted", "error")] > 100
    print(
        f"\nfuzz: {dict(by)}; max peak {max(r['peak_mb'] for r in results):.0f} MB; "
        f"max time {max(r['seconds'] for r in results):.2f} s"
    )


# ----------------------------------------------------------------------------- structured fuzz (issue 18)
FUZZ_SEED = 18
FUZZ_CASES = 1200


def _check_fuzz(results: list[dict], cases: list) -> None:
    from collections import Counter

    bad = [r for r in results if r["status"] not in ("ok", "error")]
    assert not bad, (
        f"generic exceptions / crashes / hangs: {[(r['path'], r['status'], r['message'][:200]) for r in bad[:5]]}"
    )
    multi = [r for r in results if r["status"] == "error" and ("\n" in r["message"] or not r["message"].strip())]
    assert not multi, multi[:3]
    heavy = [r for r in results if r["peak_mb"] > PEAK_MB_BOUND]
    assert not heavy, [(r["path"], round(r["peak_mb"])) for r in heavy]
    by = Counter((family, r["status"]) for (_, family), r in zip(cases, results))
    for family in {f for _, f in cases}:  # each family both opens and fails: the generator is not trivial
        assert by[(family, "ok")] > 0 and by[(family, "error")] > 0, dict(by)
    print(f"\nfuzz {len(results)}: {dict(by)}; max peak {max(r['peak_mb'] for r in results):.0f} MB")


def test_structured_fuzz_sample(tmp_path) -> None:
    """A deterministic sample (every 6th of the 1,200 cases) in the default run: each file opens
    (square + georeference outputs as strict JSON) or raises a typed one-line error."""
    from untrusted_corpus import make_fuzz_cases

    cases = make_fuzz_cases(tmp_path / "fuzz", seed=FUZZ_SEED, n=FUZZ_CASES)[::6]
    results = run_worker([(p, "untrusted") for p, _ in cases], timeout=TIMEOUT_S)
    assert len(results) == len(cases) == 200
    _check_fuzz(results, cases)


@pytest.mark.slow
def test_structured_fuzz_full(tmp_path) -> None:
    """All 1,200 generated cases (benchmarks/untrusted_fuzz.py prints the same run as a table)."""
    from untrusted_corpus import make_fuzz_cases

    cases = make_fuzz_cases(tmp_path / "fuzz", seed=FUZZ_SEED, n=FUZZ_CASES)
    results = run_worker([(p, "untrusted") for p, _ in cases], timeout=TIMEOUT_S)
    assert len(results) == len(cases) == FUZZ_CASES
    _check_fuzz(results, cases)
