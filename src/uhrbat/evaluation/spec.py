"""`BenchmarkSpec`: everything `uhrbat eval` / `uhrbat score` know about one benchmark.

Each benchmark module in `uhrbat.evaluation.benchmarks` defines `SPECS` (one spec per
benchmark name it serves) next to its row normaliser, prompts and scoring rule; the registry
(`uhrbat.evaluation.benchmarks`) discovers them. See the README "Add a benchmark".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uhrbat.evaluation.records import LoadContext, Sample
    from uhrbat.evaluation.report import Report

__all__ = ["BenchmarkSpec", "Prompt"]

#: (build the user text for a sample, describe the template in words for the report)
Prompt = tuple[Callable[["Sample"], str], str]


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark.

    name: canonical CLI name; aliases: other accepted spellings (lower case).
    normalise(row, idx, ctx) -> Sample fields (or None to skip the row); raise
        `records.RowError` (`ImageRowError` for its image) for a malformed row (it becomes an
        error sample).
    id_keys: row fields holding the question id, first present wins.
    prompts: {"official": Prompt, "reference": Prompt}.
    scorer: the module with `extract`, `correct`, `aggregate`, `META` (see `scoring`).
    score(samples, predictions, **options) -> Report.
    score_options: names of the keyword options `score` accepts (e.g. "lrs_synonyms"); the
        benchmark module owns them (the runner passes them through by name).
    check_options(**options): validates scoring options before any model runs (optional).
    keep_row(row) -> False drops a row before normalising (subset filters), also for
        LLaVA-conversation rows; no_rows_hint: the message when nothing is left.
    pick_files(files, folder): chooses among the data files found in a folder (optional).
    """

    name: str
    normalise: Callable[[dict[str, Any], int, LoadContext], dict[str, Any] | None]
    id_keys: tuple[str, ...]
    prompts: Mapping[str, Prompt]
    scorer: ModuleType
    score: Callable[..., Report]
    max_new_tokens: int
    max_new_tokens_source: str
    multiple_choice: bool
    aliases: tuple[str, ...] = ()
    score_options: tuple[str, ...] = ()
    check_options: Callable[..., None] | None = None
    keep_row: Callable[[dict[str, Any]], bool] | None = None
    no_rows_hint: str | None = None
    pick_files: Callable[[list[Path], Path], list[Path]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
