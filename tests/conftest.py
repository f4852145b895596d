"""Shared test fixtures: paths to ../shared and a session-wide tiny checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PARITY = SHARED / "parity"
ASSETS = SHARED / "assets"

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint in this package's format with a two-scale pyramid (672/1344,
    20 tiles) so that model tests stay fast; built once per session."""
    from uhrbat.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0, scales=[672, 1344], budgets=[8, 16])


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint: Path):
    from uhrbat.pipeline import UhrBatPipeline

    return UhrBatPipeline.from_pretrained(tiny_checkpoint, budgets=[8, 16], kmeans_clusters=8, kmeans_iters=5)


# Which parity regime ran (tests/test_parity.py fills it), printed at the end of every run.
PARITY_REPORT: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if PARITY_REPORT:
        terminalreporter.write_sep("-", "parity regime (tests/test_parity.py)")
        for key, line in PARITY_REPORT.items():
            terminalreporter.write_line(f"{key}: {line}")
