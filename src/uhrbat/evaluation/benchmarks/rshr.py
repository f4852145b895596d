"""RSHR-Bench (hub name XHRBench): rows, prompt and multiple-choice scoring.

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
from collections.abc import Mapping
from typing import Any

from uhrbat.evaluation.loaders import (
    LoadContext,
    answer_text,
    first_of,
    missing,
    parse_options,
    row_images,
    text_field,
)
from uhrbat.evaluation.prompts import REF_XHR_SUFFIX, reference_xhr
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark
from uhrbat.evaluation.spec import BenchmarkSpec

NAME = "rshr"
SUPPORTS_ROBUST = True
SUPPORTS_LOGITS = True

LETTERS = "ABCD"
_SPECIAL = re.compile(r"<\|[^>]+?\|>(?: ?assistant)?|<image>|</?s>|<pad>|<eos>|<unk>", re.IGNORECASE)

# Column abbreviations of the RSHR MCQ leaderboard (Yunkaidang/RSHR assets/image_203.png).
PERCEPTION = {
    "col",
    "color",
    "colour",
    "shp",
    "shape",
    "det",
    "detection",
    "oc",
    "rel",
    "relation",
    "ogd",
    "rg",
    "regional grounding",
    "ocn",
    "rcn",
    "orientation",
    "counting",
    "object counting",
    "regional counting",
    "object classification",
    "object category",
}
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

# ---------------------------------------------------------------------------------------------
# rows: `dataset.json` (`id`, `images`, `question`, `options` list or dict, `answer`, `category`)
# and the hub parquet with embedded images
# ---------------------------------------------------------------------------------------------


_RSHR_GROUP_KEYS = ("group", "task_type", "dimension", "l1-category", "l1_category", "task", "type", "capability")


def normalise(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    options, lines = parse_options(first_of(row, "options", "multi-choice options", "choices"))
    extra = {k: str(row[k]) for k in _RSHR_GROUP_KEYS if k in row and not missing(row[k])}
    ans = row.get("answer")
    return dict(
        images=row_images(first_of(row, "images", "image", "image_path"), ctx),
        question=text_field(row.get("question"), "question"),
        options=options,
        option_lines=lines,
        answer=None if missing(ans) or (isinstance(ans, (list, tuple)) and not ans) else answer_text(ans),
        category=None if missing(row.get("category")) else str(row["category"]).strip(),
        subcategory=None if missing(row.get("l2-category")) else str(row["l2-category"]),
        source_format="rshr",
        extra=extra,
    )


# ---------------------------------------------------------------------------------------------
# prompt: no official RSHR prompt is published; we use the reference evaluator's XHRBench
# prompt *without* its ground-truth-derived "choose multiple answers" hint.
# ---------------------------------------------------------------------------------------------


def official_prompt(sample: Sample) -> str:
    if sample.source_format == "llava" or not sample.options:
        return sample.question
    opts = "\n".join(f"{k}. {v.strip()}" for k, v in sample.options.items())
    return f"{sample.question.strip()}\n{opts}\n{REF_XHR_SUFFIX}"


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


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
            s = s.model_copy(
                update={
                    "error": f"row {s.row}: ground truth {s.answer!r} has no option letter "
                    "(open-ended rows are not scored; RSHR judges them with an LLM)"
                }
            )
        checked.append(s)
    return score_benchmark(sys.modules[__name__], NAME, checked, predictions)


SPECS = (
    BenchmarkSpec(
        name=NAME,
        aliases=("xhrbench", "rshr-bench"),
        normalise=normalise,
        id_keys=("id", "index", "question_id"),
        prompts={
            "official": (
                official_prompt,
                "no official RSHR prompt exists: reference XHRBench prompt (question + 'A. opt' "
                "lines + 'Select the best answer based on the image. Answer with the option letter "
                "only.') without the ground-truth-derived multi-answer hint",
            ),
            "reference": (
                reference_xhr,
                "UHR-BAT reference eval_xlrs_multiscale_to_json.py XHRBench prompt, including the "
                "ground-truth-derived ' You should choose multiple answers.' hint",
            ),
        },
        scorer=sys.modules[__name__],
        score=score,
        max_new_tokens=512,
        max_new_tokens_source="UHR-BAT reference eval_xlrs_multiscale_to_json.py --max_new_tokens default",
        multiple_choice=True,
    ),
)
