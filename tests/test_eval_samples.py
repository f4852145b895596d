"""The shipped eval samples (issue 23.6): one tiny sample per benchmark format under
`examples/eval`, exactly what `examples/make_eval_samples.py` writes, each one run by `uhrbat
eval`, and the README's first eval example running on them as written."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_eval_support import FakePipeline
from uhrbat.evaluation import benchmarks

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "eval"
README = ROOT / "README.md"


def _generator():
    spec = importlib.util.spec_from_file_location("make_eval_samples", ROOT / "examples" / "make_eval_samples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _content(path: Path):
    """What a sample file holds: pixels for images, rows for Parquet, bytes otherwise (encoders'
    byte output may differ between library versions; the content must not)."""
    if path.suffix in (".png", ".tif"):
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).tolist()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return path.read_bytes()


def test_the_committed_samples_are_what_the_generator_writes(tmp_path):
    pytest.importorskip("pyarrow")
    _generator().main(tmp_path)
    committed = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if p.is_file())
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert committed == generated
    for rel in committed:
        assert _content(EXAMPLES / rel) == _content(tmp_path / rel), rel
    assert sum((EXAMPLES / r).stat().st_size for r in committed) < 64_000  # the repo stays small


def test_every_benchmark_has_a_sample():
    samples = _generator().SAMPLES
    covered = set(samples) | {"hrbench-8k"}  # same TSV format as hrbench-4k
    assert covered == set(benchmarks.names())


def _readme_sample_commands() -> list[list[str]]:
    """The `uhrbat eval` lines of the README's first eval example (the shipped samples)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Evaluate") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    return [shlex.split(ln) for ln in block.splitlines() if ln.startswith("uhrbat eval")]


def _bench(argv: list[str]) -> str:
    return argv[argv.index("--benchmark") + 1]


SAMPLE_COMMANDS = {_bench(argv): argv for argv in _readme_sample_commands()}


def test_the_readmes_first_eval_example_covers_every_format_with_its_sample():
    """Issue 23.6: one line per benchmark, each on its shipped sample, with the tiny checkpoint."""
    assert set(SAMPLE_COMMANDS) == set(benchmarks.names())
    for bench, argv in SAMPLE_COMMANDS.items():
        data = Path(argv[argv.index("--data") + 1])
        assert data.parts[:2] == ("examples", "eval") and (ROOT / data).exists(), bench
        assert argv[argv.index("--model") + 1] == "../shared/parity/uhrbat_tiny", bench
    assert len({a[a.index("--out") + 1] for a in SAMPLE_COMMANDS.values()}) == len(SAMPLE_COMMANDS)


def _run_readme_line(bench: str, tmp_path: Path, monkeypatch, capsys) -> dict:
    """Run the README's line for `bench` from the repository root as written (--out moved)."""
    from uhrbat.cli.main import main

    monkeypatch.chdir(ROOT)
    argv = list(SAMPLE_COMMANDS[bench][1:])
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    try:
        main([*argv, "--no-progress"])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return json.loads((tmp_path / "run" / "report.json").read_text())


@pytest.mark.parametrize("bench", sorted(SAMPLE_COMMANDS))
def test_eval_runs_on_every_shipped_sample(bench, tmp_path, monkeypatch, capsys):
    """Every README line (a stand-in model): every row of every sample loads, is asked and scored."""
    monkeypatch.setenv("UHRBAT_PIPELINE_CLASS", "test_eval_support:FakePipeline")
    FakePipeline.instances.clear()
    report = _run_readme_line(bench, tmp_path, monkeypatch, capsys)
    data = ROOT / SAMPLE_COMMANDS[bench][SAMPLE_COMMANDS[bench].index("--data") + 1]
    samples = benchmarks.load_benchmark(bench, data)
    assert report["n"] == len(samples) >= 3 and report["n_errors"] == 0
    assert all(s.ok and s.answer for s in samples)


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(SAMPLE_COMMANDS))
def test_the_readmes_first_eval_example_runs_as_written(bench, tmp_path, monkeypatch, capsys):
    """The README's lines exactly as written (real tiny checkpoint), from the repository root."""
    monkeypatch.delenv("UHRBAT_PIPELINE_CLASS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = _run_readme_line(bench, tmp_path, monkeypatch, capsys)
    assert report["n"] >= 3 and report["n_errors"] == 0  # the tiny random model answers (wrongly), no errors
