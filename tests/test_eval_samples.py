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


@pytest.mark.parametrize("bench", ["xlrs", "mme-realworld-rs", "rshr", "hrbench-4k", "hrbench-8k", "lrs-vqa"])
def test_eval_runs_on_every_shipped_sample(bench, tmp_path, monkeypatch, capsys):
    from uhrbat.cli.main import main

    monkeypatch.setenv("UHRBAT_PIPELINE_CLASS", "test_eval_support:FakePipeline")
    FakePipeline.instances.clear()
    folder = _generator().SAMPLES.get(bench, ("hrbench", None))[0]
    argv = ["eval", "--benchmark", bench, "--data", str(EXAMPLES / folder), "--model", "m"]
    argv += ["--out", str(tmp_path / "run"), "--no-progress"]
    if bench == "lrs-vqa":
        argv += ["--lrs-synonyms", "none"]  # WordNet is not needed to try the sample
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    samples = benchmarks.load_benchmark(bench, EXAMPLES / folder)
    assert report["n"] == len(samples) >= 3 and report["n_errors"] == 0
    assert all(s.ok and s.answer for s in samples)


def _first_eval_command() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Evaluate") :]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)
    line = next(ln for ln in block.splitlines() if ln.startswith("uhrbat eval"))
    return shlex.split(line)


def test_the_readmes_first_eval_example_uses_the_shipped_sample():
    argv = _first_eval_command()
    data = Path(argv[argv.index("--data") + 1])
    assert data.parts[:2] == ("examples", "eval") and (ROOT / data).exists()
    assert argv[argv.index("--model") + 1] == "../shared/parity/uhrbat_tiny"


@pytest.mark.slow
def test_the_readmes_first_eval_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The command exactly as in the README (real tiny checkpoint), from the repository root."""
    from uhrbat.cli.main import main

    monkeypatch.delenv("UHRBAT_PIPELINE_CLASS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    argv = _first_eval_command()[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    try:
        main([*argv, "--no-progress"])
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n"] == 4 and report["n_errors"] == 0  # the tiny random model answers (wrongly), no errors
