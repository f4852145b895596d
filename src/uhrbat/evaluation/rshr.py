"""RSHR-Bench (hub name XHRBench) multiple-choice scoring.

**No official RSHR scorer exists** (the RSHR repository ships a README only; open-ended and
caption tasks are LLM-judged in the paper). We use the letter-set rule of the UHR-BAT
reference evaluator, `with_k-means/longva/scripts/eval_xlrs_multiscale_to_json.py`
(`_clean_generated_text`, `_extract_choice_set`, the `correct` field), quirks included:

* special tokens (`<|...|>`, `<image>`, `</s>`, ...) are removed and whitespace collapsed;
* the prediction is the sorted set of **every** A–D character of the upper-cased output, so
  "The answer is (B)" -> {A, B} (the "A" of "ANSWER") and "b" -> {B};
* the ground truth goes through the same extraction; correct iff both sets are equal;
* a ground truth with no A–D letter has no `correct` field in the reference: we count the
  row as an error (wrong) instead of the reference's `eval_category_accuracy.py`, which
  counted such rows as correct.

(The method notes mention A–F; the evaluator as published at commits 9b2be41 and e59acfd
uses A–D, which we follow.)

Groups: perception / reasoning come from an explicit group field when the row has one, else
from the category (its "Group/Category" prefix or the RSHR leaderboard abbreviations).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping

from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark

NAME = "rshr"
SUPPORTS_ROBUST = True
SUPPORTS_LOGITS = True

LETTERS = "ABCD"
_SPECIAL = re.compile(r"<\|[^>]+?\|>(?: ?assistant)?|<image>|</?s>|<pad>|<eos>|<unk>", re.IGNORECASE)

# Column abbreviations of the RSHR MCQ leaderboard (Yunkaidang/RSHR assets/image_203.png).
PERCEPTION = {"col", "color", "colour", "shp", "shape", "det", "detection", "oc", "rel", "relation", "ogd", "rg",
              "regional grounding", "ocn", "rcn", "orientation", "counting", "object counting", "regional counting",
              "object classification", "object category"}
REASONING = {"ad", "anomaly detection", "fp", "mrjc", "mrjcs", "osj", "mad", "mtfp", "mosj"}

META = {
    "scorer": "no official RSHR scorer exists; UHR-BAT reference evaluator rule "
              "(with_k-means/longva/scripts/eval_xlrs_multiscale_to_json.py: _extract_choice_set / correct)",
    "extraction": "remove special tokens; sorted set of every A-D character of the upper-cased output",
    "comparison": "predicted letter set == ground-truth letter set (same extraction applied to the answer)",
    "micro": "correct / all multiple-choice questions",
    "macro": "mean of the per-category accuracies",
    "groups": "perception_* / reasoning_* restrict micro and macro to that group; rows whose group cannot be "
              "determined are listed under 'unassigned'",
}


def _clean(text: str) -> str:
    cleaned = _SPECIAL.sub(" ", text)
    cleaned = re.sub(r"[ \t\r\f\v]+", " ", cleaned)
    cleaned = re.sub(r"\n{2,}", "\n", cleaned)
    return cleaned.strip()


def letter_set(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    return "".join(sorted({ch for ch in _clean(text).upper() if ch in LETTERS}))


def extract(output: Any, sample: Sample | None = None) -> str:
    return letter_set(output)


def correct(parsed: str, sample: Sample) -> bool:
    gt = letter_set(sample.answer or "")
    return bool(gt) and parsed == gt


def group_of(sample: Sample) -> str:
    for key in ("group", "task_type", "dimension", "l1-category", "l1_category", "capability", "task", "type"):
        v = str(sample.extra.get(key, "")).lower()
        if "percep" in v:
            return "perception"
        if "reason" in v:
            return "reasoning"
    cat = (sample.category or "").strip()
    head = cat.split("/")[0].strip().lower()
    if "percep" in head:
        return "perception"
    if "reason" in head:
        return "reasoning"
    c = cat.lower()
    tail = c.split("/")[-1].strip()
    m = re.match(r"^([a-z]+)\b", tail)
    abbrev = m.group(1) if m else tail
    for name in (tail, abbrev):
        if name in PERCEPTION:
            return "perception"
        if name in REASONING:
            return "reasoning"
    return "unassigned"


def aggregate(rows: list[Judged]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    per_cat = category_table(((r.sample.category or "(no category)"), r.correct) for r in rows)
    n = len(rows)
    accs = [v["accuracy"] for v in per_cat.values()]
    metrics: dict[str, Any] = {
        "micro": pct(sum(r.correct for r in rows), n),
        "macro": sum(accs) / len(accs) if accs else 0.0,
    }
    for g in ("perception", "reasoning", "unassigned"):
        sub = [r for r in rows if group_of(r.sample) == g]
        if not sub:
            continue
        cats = category_table(((r.sample.category or "(no category)"), r.correct) for r in sub)
        metrics[f"{g}_micro"] = pct(sum(r.correct for r in sub), len(sub))
        metrics[f"{g}_macro"] = sum(v["accuracy"] for v in cats.values()) / len(cats)
        metrics[f"{g}_n"] = len(sub)
    return {"micro": metrics["micro"], "macro": metrics["macro"]}, metrics, per_cat


def score(samples: list[Sample], predictions: Mapping[str, Any]) -> Report:
    checked = []
    for s in samples:
        if s.ok and not letter_set(s.answer or ""):
            s = s.model_copy(update={"error": f"row {s.row}: ground truth {s.answer!r} has no option letter "
                                              "(open-ended rows are not scored; RSHR judges them with an LLM)"})
        checked.append(s)
    return score_benchmark(sys.modules[__name__], NAME, checked, predictions)
