"""The score report: one JSON object and a Markdown rendering.

JSON schema (what `uhrbat score --json` prints and `report.json` holds)::

    {"benchmark": str, "n": int, "n_errors": int,
     "headline": {name: percent},            # the numbers people quote
     "metrics": {name: number},              # every other number (percent for accuracies)
     "per_category": {name: {"n": int, "correct": int, "accuracy": percent}},
     "per_sample": {id: true|false},
     "meta": {...}}                          # how the numbers were made (rules, prompt, notes)

Accuracies are percentages in 0..100 and are never rounded in JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uhrbat.runfiles import atomic_write

__all__ = ["Report", "pct", "category_table", "write_report"]


def pct(correct: float, total: float) -> float:
    """Accuracy in percent; 0.0 for an empty group (as the official scorers do)."""
    return 100.0 * correct / total if total else 0.0


def category_table(items: Iterable[tuple[str, bool]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, ok in items:
        d = out.setdefault(key, {"n": 0, "correct": 0})
        d["n"] += 1
        d["correct"] += int(bool(ok))
    for d in out.values():
        d["accuracy"] = pct(d["correct"], d["n"])
    return dict(sorted(out.items()))


@dataclass
class Report:
    benchmark: str
    n: int
    n_errors: int
    headline: dict[str, float | None]
    metrics: dict[str, Any] = field(default_factory=dict)
    per_category: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_sample: dict[str, bool] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "n": self.n,
            "n_errors": self.n_errors,
            "headline": dict(self.headline),
            "metrics": dict(self.metrics),
            "per_category": {k: dict(v) for k, v in self.per_category.items()},
            "per_sample": dict(self.per_sample),
            "meta": dict(self.meta),
        }

    def headline_notes(self) -> dict[str, str]:
        """What each headline number is, when the benchmark says (`meta["headline"]`: {key: text})."""
        notes = self.meta.get("headline")
        if not isinstance(notes, dict):
            return {}
        return {k: str(notes[k]) for k in self.headline if k in notes}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def to_markdown(self) -> str:
        lines = [f"# {self.benchmark} — evaluation report", ""]
        lines.append(f"Samples: **{self.n}** · errors (scored wrong): **{self.n_errors}**")
        lines.append("")
        if self.headline:
            keys = list(self.headline)
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "|".join("---:" for _ in keys) + "|")
            lines.append("| " + " | ".join(_fmt(self.headline[k]) for k in keys) + " |")
            lines.append("")
            for k, text in self.headline_notes().items():
                lines.append(f"- **{k}**: {text}")
            if self.headline_notes():
                lines.append("")
        if self.per_category:
            lines += ["## Per category", "", "| category | n | correct | accuracy (%) |", "|---|---:|---:|---:|"]
            for k, v in self.per_category.items():
                lines.append(
                    f"| {_md_escape(k)} | {v.get('n', 0)} | {v.get('correct', 0)} | {_fmt(v.get('accuracy'))} |"
                )
            lines.append("")
        scalar = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float)) or v is None}
        if scalar:
            lines += ["## All metrics", "", "| metric | value |", "|---|---:|"]
            for k, v in scalar.items():
                lines.append(f"| {_md_escape(k)} | {_fmt(v)} |")
            lines.append("")
        if self.meta:
            lines += ["## How these numbers were made", ""]
            for k, v in self.meta.items():
                if k == "headline" and self.headline_notes():
                    continue  # shown under the headline table
                if isinstance(v, list):
                    lines.append(f"- **{k}**:")
                    lines += [f"  - {x}" for x in v]
                elif isinstance(v, dict):
                    lines.append(f"- **{k}**: `{json.dumps(v, ensure_ascii=False)}`")
                else:
                    lines.append(f"- **{k}**: {v}")
            lines.append("")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def write_report(report: Report, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out_dir)
    j, m = out / "report.json", out / "report.md"
    atomic_write(j, report.to_json() + "\n")
    atomic_write(m, report.to_markdown())
    return j, m
