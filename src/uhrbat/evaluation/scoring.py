"""Shared scoring machinery: join predictions to samples, judge each row with a benchmark's
official rule, aggregate, and add the optional "robust" and choice-by-logits views.

Every benchmark module (`xlrs`, `mme_realworld`, `rshr`, `hrbench`, `lrs_vqa`) provides::

    extract(output, sample) -> parsed          # the official extraction, quirks included
    correct(parsed, sample) -> bool            # the official comparison
    aggregate(rows) -> (headline, metrics, per_category)
    META: dict                                 # rule descriptions and source files

and `score(samples, predictions) -> Report`, which calls `score_benchmark` here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from uhrbat.evaluation.records import Prediction, Sample
from uhrbat.evaluation.report import Report

__all__ = [
    "Judged",
    "judge_rows",
    "score_benchmark",
    "robust_letters",
    "gt_letters",
    "normalise_predictions",
    "check_not_all_errors",
    "problem_lines",
]


@dataclass
class Judged:
    sample: Sample
    output: str | None
    parsed: Any
    correct: bool
    error: str | None = None


def normalise_predictions(predictions: Mapping[str, Any]) -> dict[str, Prediction]:
    out: dict[str, Prediction] = {}
    for k, v in predictions.items():
        if isinstance(v, Prediction):
            out[str(k)] = v
        elif v is None or isinstance(v, str):
            out[str(k)] = Prediction(id=str(k), output=v, error=None if v is not None else "no output")
        elif isinstance(v, dict):
            out[str(k)] = Prediction.from_row({"id": k, **v})
        else:
            out[str(k)] = Prediction(id=str(k), output=str(v))
    return out


def judge_rows(module: ModuleType, samples: list[Sample], preds: dict[str, Prediction]) -> list[Judged]:
    rows: list[Judged] = []
    for s in samples:
        if s.error:
            rows.append(Judged(s, None, None, False, s.error))
            continue
        p = preds.get(s.id)
        if p is None:
            rows.append(Judged(s, None, None, False, "no prediction for this id"))
            continue
        if p.error or p.output is None:
            rows.append(Judged(s, p.output, None, False, p.error or "no output"))
            continue
        parsed = module.extract(p.output, s)
        rows.append(Judged(s, p.output, parsed, bool(module.correct(parsed, s))))
    return rows


# ---------------------------------------------------------------------------------------------
# "robust" extraction (ours; reported beside the official numbers, never instead of them)
# ---------------------------------------------------------------------------------------------

_PREFIX = re.compile(
    r"^(?:the\s+)?(?:best\s+|correct\s+|final\s+)?(?:answer|option|choice)(?:\(s\)|s)?\s*(?:is|are|:)?(?:\(are\))?\s*[:：]?\s*",
    re.IGNORECASE,
)
_ALL_LETTERS = re.compile(r"^[\(\[]?([A-Z])[\)\]]?((?:\s*(?:,|;|/|&|\band\b|\s)\s*[\(\[]?[A-Z][\)\]]?)*)[\s.]*$")
_LEADING = re.compile(r"^[\(\[]([A-Z])[\)\]]|^([A-Z])(?=[.:,;)\]]|$)")
_ANSWER_IS = re.compile(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])")


def robust_letters(output: str | None, valid: str = "ABCDE") -> frozenset[str] | None:
    """A stricter extraction: letters only where the answer *is* a letter.

    1. After an optional "The answer is" / "Answer:" prefix, an output made only of option
       letters ("B", "(B).", "A, C", "A and C", "AC") gives those letters.
    2. Else an output *starting* with a marked letter ("B. Building", "(B) x", "B: x") gives it.
    3. Else the last "answer is X" / "answer: X" / "option X" inside the text gives X.
    4. Else nothing (unparsed, scored wrong). Letters outside the sample's options never count.
    """
    if output is None:
        return None
    s = output.strip().replace("**", "").strip()
    s = _PREFIX.sub("", s, count=1).strip()
    letters: set[str] | None = None
    m = _ALL_LETTERS.match(s)
    if m:
        letters = set(re.findall(r"[A-Z]", m.group(0)))
    elif re.fullmatch(r"[A-Z]{2,6}\.?", s) and len(set(s.rstrip("."))) == len(s.rstrip(".")):
        letters = set(s.rstrip("."))
    else:
        m2 = _LEADING.match(s)
        if m2:
            letters = {m2.group(1) or m2.group(2)}
        else:
            hits = _ANSWER_IS.findall(output)
            if hits:
                letters = {hits[-1].upper()}
    if not letters or not letters <= set(valid):
        return None
    return frozenset(letters)


def gt_letters(sample: Sample, valid: str) -> frozenset[str]:
    return frozenset(ch for ch in (sample.answer or "").upper() if ch in valid)


def _valid_letters(sample: Sample) -> str:
    return "".join(sample.options) if sample.options else "ABCDE"


def score_benchmark(
    module: ModuleType,
    benchmark: str,
    samples: list[Sample],
    predictions: Mapping[str, Any],
    extra_meta: dict[str, Any] | None = None,
) -> Report:
    preds = normalise_predictions(predictions)
    rows = judge_rows(module, samples, preds)
    headline, metrics, per_category = module.aggregate(rows)
    known = {s.id for s in samples}
    unmatched = sorted(k for k in preds if k not in known)
    n_errors = sum(1 for r in rows if r.error)
    meta: dict[str, Any] = dict(getattr(module, "META", {}))
    missing_ids = [r.sample.id for r in rows if r.error == "no prediction for this id"]
    meta["n_missing_predictions"] = len(missing_ids)
    if missing_ids:
        meta["missing_prediction_ids"] = missing_ids[:50]
    meta["n_unmatched_predictions"] = len(unmatched)
    if unmatched:
        meta["unmatched_prediction_ids"] = unmatched[:50]
    errs = [f"{r.sample.id}: {r.error}" for r in rows if r.error and r.error != "no prediction for this id"]
    if errs:
        meta["errors"] = errs[:50] + ([f"... {len(errs) - 50} more"] if len(errs) > 50 else [])

    # Optional views, computed with the same aggregation over a different notion of "correct".
    if getattr(module, "SUPPORTS_ROBUST", False):
        rrows = []
        n_unparsed = 0
        for r in rows:
            ok = False
            if not r.error:
                valid = _valid_letters(r.sample)
                got = robust_letters(r.output, valid)
                n_unparsed += got is None
                ok = got is not None and got == gt_letters(r.sample, valid)
            rrows.append(Judged(r.sample, r.output, None, ok, r.error))
        rh, _, _ = module.aggregate(rrows)
        for k, v in rh.items():
            metrics[f"robust/{k}"] = v
        metrics["robust/n_unparsed"] = n_unparsed
    if any(p.logit_choice for p in preds.values()) and getattr(module, "SUPPORTS_LOGITS", False):
        lrows = []
        for r in rows:
            p = preds.get(r.sample.id)
            ok = False
            if not r.error and p is not None and p.logit_choice:
                ok = frozenset(p.logit_choice.upper()) == gt_letters(r.sample, _valid_letters(r.sample))
            lrows.append(Judged(r.sample, r.output, None, ok, r.error))
        lh, _, _ = module.aggregate(lrows)
        for k, v in lh.items():
            metrics[f"logits/{k}"] = v
        meta["choice_by_logits"] = (
            "option with the highest first-token log-probability of its letter after the prompt; "
            "no parsing; one letter per question (multi-answer questions can only be right if the "
            "ground truth is a single letter)"
        )
    if extra_meta:
        meta.update(extra_meta)
    return Report(
        benchmark=benchmark,
        n=len(rows),
        n_errors=n_errors,
        headline=headline,
        metrics=metrics,
        per_category=per_category,
        per_sample={r.sample.id: bool(r.correct) for r in rows},
        meta=meta,
    )


def _ids(ids: list[str], total: int) -> str:
    shown = ids[:10]
    rest = total - len(shown)
    return ", ".join(shown) + (f" ... and {rest} more" if rest > 0 else "")


def problem_lines(report: Report) -> list[str]:
    """What went wrong, for the text report: missing / unmatched ids and prediction-file notes."""
    meta = report.meta
    lines = []
    if meta.get("n_missing_predictions"):
        lines.append(
            f"missing predictions ({meta['n_missing_predictions']}, scored wrong): "
            f"{_ids(meta.get('missing_prediction_ids', []), meta['n_missing_predictions'])}"
        )
    if meta.get("n_unmatched_predictions"):
        lines.append(
            f"predictions for ids not in the data ({meta['n_unmatched_predictions']}, ignored): "
            f"{_ids(meta.get('unmatched_prediction_ids', []), meta['n_unmatched_predictions'])}"
        )
    for note in meta.get("prediction_file_notes", []) or []:
        lines.append(f"predictions file: {note}")
    return lines


def check_not_all_errors(report: Report, where: str) -> None:
    """Fail loudly (one line) when not a single question could be scored — e.g. the wrong
    --benchmark for the data, or predictions whose ids match nothing."""
    if report.n == 0 or report.n_errors < report.n:
        return
    from uhrbat.errors import BenchmarkDataError

    first = (report.meta.get("errors") or ["no prediction for any id"])[0]
    raise BenchmarkDataError(
        f"all {report.n} questions of {report.benchmark} are errors (first: {first}); check that --benchmark matches "
        f"--data and that the prediction ids are the data's ids ({where})"
    )
