"""`benchmarks/gpu.py --smoke` runs end to end on the CPU (tiny dimensions), so the GPU benchmark
script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_benchmark_smoke_mode(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = data["runs"]
    # 2 scenes x 2 settings x (cold, cached follow-up, batch of 4)
    assert len(runs) == 12
    assert {(r["run"], r["batch"]) for r in runs} == {("cold", 1), ("cached follow-up", 1), ("cold", 4)}
    for r in runs:
        assert r["stages"] is not None, r.get("note")  # the scene cache exists in this build
        assert all(v >= 0 for v in r["stages"].values()) and r["total"] > 0
        if r["run"] == "cached follow-up":
            assert r["cache"] == "hit" and r["stages"]["encode"] == 0.0
    km = data["kmeans"]
    assert [r["k"] for r in km] == [12, 16] and all(r["same_first_labels"] for r in km)
    table = proc.stdout
    assert "| scene | setting | run | batch |" in table and "| K-Means at |" in table
