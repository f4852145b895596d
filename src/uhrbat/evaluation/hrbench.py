"""HR-Bench 4K / 8K scoring: the rule path of lmms-eval `lmms_eval/tasks/hrbench/hrbench_evals.py`
(`HRBenchEval.can_infer`) and the aggregation of `lmms_eval/tasks/hrbench/utils.py`.

Decisions reproduced, quirks included:

* The output is stripped, then `can_infer_option`: "Failed to obtain answer via API" -> no
  answer; a refusal phrase -> "Z"; the characters `.()[],:;!*#{}` become spaces and the text
  is split on whitespace; if exactly one option letter appears as a whole token, it is the
  answer; if none does and "Z" is a token -> "Z". (The VERBOSE-only rejection is off, as by
  default.) Lower-case letters are not tokens of the upper-case option letters.
* Else `can_infer_text`: the options whose lower-cased text is a substring of the
  lower-cased output; exactly one -> that letter.
* Else lmms-eval asks an OpenAI model. **We never call an external judge**: such rows are
  scored wrong and counted in `metrics["judge_needed"]`.
* Correct iff `answer.lower() == prediction.lower()`.
* Each metric (overall = lmms-eval "average", fsp = "single", fcp = "cross") is the mean over
  `cycle_category` groups of the per-group accuracy.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Mapping

from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark

NAME = "hrbench"
SUPPORTS_ROBUST = True
SUPPORTS_LOGITS = True

_REJECT = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SPLIT_CHARS = ".()[],:;!*#{}"
FSP_NAMES = {"single", "fsp"}
FCP_NAMES = {"cross", "fcp"}

META = {
    "scorer": "lmms-eval tasks/hrbench/hrbench_evals.py (HRBenchEval.can_infer rule path) + tasks/hrbench/utils.py "
              "(hrbench_aggregate_results)",
    "extraction": "exactly one option letter as a whole token (after replacing .()[],:;!*#{} by spaces), else exactly "
                  "one option text contained in the output; refusals -> Z",
    "judge": "rows the official code would send to an external LLM judge are scored wrong (never judged); "
             "their number is metrics['judge_needed']",
    "comparison": "answer.lower() == prediction.lower()",
    "overall": "mean over cycle_category of the per-cycle accuracy (all questions)",
    "fsp": "same, over category 'single' (FSP) questions",
    "fcp": "same, over category 'cross' (FCP) questions",
}


def _can_infer_option(answer: str, choices: dict[str, str]) -> str | None:
    if "Failed to obtain answer via API" in answer:
        return None
    for err in _REJECT:
        if err in answer:
            return "Z"
    mod = answer
    for c in _SPLIT_CHARS:
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    count = sum(1 for c in choices if c in splits)
    if count == 1:
        for ch in choices:
            if ch in splits:
                return ch
    elif count == 0 and sum(1 for c in ("Z", "") if c in splits) == 1:
        return "Z"
    return None


def _can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    answer = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else None


def extract(output: Any, sample: Sample) -> str | None:
    """Letter, "Z", or None when the official code would need its LLM judge."""
    pred = str(output).strip()
    choices = copy.copy(sample.options)
    return _can_infer_option(pred, choices) or _can_infer_text(pred, choices)


def correct(parsed: str | None, sample: Sample) -> bool:
    return parsed is not None and (sample.answer or "").lower() == parsed.lower()


def _kind(sample: Sample) -> str:
    c = (sample.category or "").strip().lower()
    return "fsp" if c in FSP_NAMES else "fcp" if c in FCP_NAMES else "other"


def _cycle_mean(rows: list[Judged]) -> float | None:
    if not rows:
        return None
    groups = category_table((str(r.sample.extra.get("cycle_category", "")), r.correct) for r in rows)
    return sum(v["accuracy"] for v in groups.values()) / len(groups)


def aggregate(rows: list[Judged]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    overall = _cycle_mean(rows)
    fsp = _cycle_mean([r for r in rows if _kind(r.sample) == "fsp"])
    fcp = _cycle_mean([r for r in rows if _kind(r.sample) == "fcp"])
    metrics: dict[str, Any] = {
        "overall": overall if overall is not None else 0.0,
        "fsp": fsp,
        "fcp": fcp,
        "plain_accuracy": pct(sum(r.correct for r in rows), len(rows)),
        "judge_needed": sum(1 for r in rows if not r.error and r.parsed is None and r.output is not None),
        "n_pred_Z": sum(1 for r in rows if r.parsed == "Z"),
    }
    per_cat = category_table(((r.sample.category or "(no category)"), r.correct) for r in rows)
    for k, v in category_table((f"cycle/{r.sample.extra.get('cycle_category', '')}", r.correct) for r in rows).items():
        per_cat[k] = v
    return {"overall": metrics["overall"], "fsp": fsp, "fcp": fcp}, metrics, per_cat


def score(samples: list[Sample], predictions: Mapping[str, Any], benchmark: str = "hrbench") -> Report:
    return score_benchmark(sys.modules[__name__], benchmark, samples, predictions)
