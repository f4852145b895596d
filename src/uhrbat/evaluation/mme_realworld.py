"""MME-RealWorld, remote-sensing subset: reproduces `evaluation/eval_your_results.py` of
yfzhang114/MME-RealWorld (the lmms-eval `tasks/mme_realworld/utils.py` copy is the same rule).

Decisions reproduced, quirks included:

* Extraction (`extract_characters_regex(s, choices)`): strip the stock prefixes by substring
  replacement; two list entries lack a comma, so "The correct option is" and "Best answer:"
  are never stripped. If the text has more than 10 words and no upper-case A–E -> "".
  Otherwise the **first upper-case A–E anywhere** is the answer ("Based on ..." -> "B").
  With no upper-case A–E, the first choice string that *contains* the lower-cased output
  gives `choice[1]`; an empty output is contained in every choice, so "" -> "A".
* Correct iff `ground_truth == extracted` (exact string).
* Categories are lower-cased; any category containing "attribute" becomes "<first part>/attribute".
* avg = correct / all RS questions (leaderboard "Avg", weighted). avg_c = unweighted mean of
  the per-category accuracies (leaderboard "Avg-C" restricted to the RS subset).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping

from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark

NAME = "mme-realworld-rs"
SUPPORTS_ROBUST = True
SUPPORTS_LOGITS = True

_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",  # sic
    "Best answer:" "Best option:",  # sic
)
_DEFAULT_CHOICES = ("(A)", "(B)", "(C)", "(D)", "(E)")  # lmms-eval default `choices`

META = {
    "scorer": "MME-RealWorld evaluation/eval_your_results.py (extract_characters_regex + per-Task/Subtask/Category accuracy)",
    "subset": "rows with Subtask == 'Remote Sensing' (lmms-eval variant: last part of `category`)",
    "extraction": "strip stock prefixes; '' if >10 words and no upper-case A-E; first upper-case A-E anywhere; "
                  "else choice[1] of the first answer choice containing the lower-cased output ('' -> 'A')",
    "comparison": "Ground truth == extracted letter (exact)",
    "avg": "correct / all remote-sensing questions",
    "avg_c": "unweighted mean of the per-category accuracies (categories lower-cased, '*attribute*' folded)",
}


def extract(output: Any, sample: Sample | None = None) -> str:
    if isinstance(output, dict):
        output = ""
    s = str(output).strip()
    for p in _PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search("[ABCDE]", s):
        return ""
    m = re.search(r"[ABCDE]", s)
    if m is None:
        choices = (sample.option_lines if sample is not None and sample.option_lines else list(_DEFAULT_CHOICES))
        for choice in choices:
            if s.lower() in choice.lower():
                return choice[1] if len(choice) > 1 else ""
        return ""
    return m[0]


def correct(parsed: str, sample: Sample) -> bool:
    return (sample.answer or "") == parsed


def category_of(sample: Sample) -> str:
    task = str(sample.extra.get("task") or "Perception")
    cat = (sample.category or "unknown").lower()
    if "attribute" in cat:
        cat = cat.split("/")[0] + "/attribute"
    return f"{task}/{cat}"


def aggregate(rows: list[Judged]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    per_cat = category_table((category_of(r.sample), r.correct) for r in rows)
    n = len(rows)
    n_ok = sum(r.correct for r in rows)
    accs = [v["accuracy"] for v in per_cat.values()]
    metrics: dict[str, Any] = {
        "avg": pct(n_ok, n),
        "avg_c": sum(accs) / len(accs) if accs else 0.0,
        "n_categories": len(per_cat),
        "n_pred_E": sum(1 for r in rows if r.parsed == "E"),
    }
    for task, v in category_table((str(r.sample.extra.get("task") or "Perception"), r.correct) for r in rows).items():
        metrics[f"task/{task}"] = v["accuracy"]
    return {"avg": metrics["avg"], "avg_c": metrics["avg_c"]}, metrics, per_cat


def score(samples: list[Sample], predictions: Mapping[str, Any]) -> Report:
    return score_benchmark(sys.modules[__name__], NAME, samples, predictions)
