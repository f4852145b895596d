"""Benchmark: start-up time of the `uhrbat` command (help, `--version`, a usage error).

Runs the console script's entry point, read from the checkout's pyproject.toml (what
`pip install` generates: `sys.exit(main())`), in a fresh interpreter per run, with that
checkout's `src/` first on `PYTHONPATH`. One warm-up run per case (warm disk cache), then the
median of `--repeats` runs of wall time, process start to exit. `--repo DIR` times another
checkout, e.g. the main branch for a before/after on the same machine.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --repo ../main --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

CASES = [
    ["--help"],
    ["ask", "--help"],
    ["--version"],
    ["ask", "image.png", "question", "--selector", "nosuch"],  # a usage error (exit 2)
]


def run_once(code: str, args: list[str], env: dict[str, str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True)
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to time")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    repo = args.repo.resolve()
    entry = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]["uhrbat"]
    module, func = entry.split(":")
    code = f"import sys; from {module} import {func} as main; sys.argv[0] = 'uhrbat'; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")])}
    load = os.getloadavg()
    print(f"checkout {repo} (entry point {entry}); python {sys.version.split()[0]}; load {load[0]:.2f}")
    print(f"{'command':<52} {'median s':>8} {'min s':>6} {'max s':>6} {'exit':>4}")
    for case in CASES:
        run_once(code, case, env)  # warm-up
        results = [run_once(code, case, env) for _ in range(args.repeats)]
        times = [t for t, _ in results]
        label = "uhrbat " + " ".join(case)
        print(f"{label:<52} {statistics.median(times):>8.2f} {min(times):>6.2f} {max(times):>6.2f} {results[-1][1]:>4}")


if __name__ == "__main__":
    main()
