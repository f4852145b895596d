"""XLRS-Bench(-lite): rows, official prompt and scoring.

Scoring reproduces lmms-eval `lmms_eval/tasks/xlrs/mcq_utils.py`
(`extract_characters_regex`, `xlrs_aggregate_results`, `xlrs_aggregate_results_macro_score`);
VLMEvalKit `XLRSBench.extract_characters_regex` is the same function.

Decisions reproduced, quirks included:

* Extraction: strip the stock prefixes by plain substring replacement. The prefix list is
  missing two commas in the original, so "The best option isThe correct option is" and
  "Best answer:Best option:" are single (never occurring) strings: "The correct option is" and
  "Best answer:" are *not* stripped.
* If no *upper-case* A–E occurs at all -> "" (so "b" alone is unparsed).
* Else letters in parentheses "(x)" (either case); else the "word-boundary" pattern, whose
  groups are all optional so it matches **every** a–e/A–E character anywhere; the third
  fallback is therefore never reached. Upper-cased, de-duplicated.
  => "B. Building" -> {B, D} (the "d" of Building) and is wrong for GT "B".
* Correct iff `set(parsed) == set(answer)`, comparing characters of the raw ground-truth string.
* micro = correct / all questions. macro = mean over the 13 official L3 tasks of their
  accuracy, where a task with no questions counts as 0 (the task table is pre-filled).

The field publishes XLRS-Bench both ways and the two are not comparable, so the headline names
them by who publishes them: `weighted_avg` (= micro: the sub-task accuracies weighted by their
question counts; UHR-BAT's "44.0 weighted average") and `subtask_mean` (= macro: the unweighted
mean of the 13 sub-tasks; what GeoLLaVA-8K and DualComp publish).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from uhrbat.evaluation.loaders import (
    LoadContext,
    RowError,
    answer_text,
    first_of,
    missing,
    parse_options,
    row_images,
    text_field,
)
from uhrbat.evaluation.prompts import REFERENCE_XHR_DESCRIPTION, reference_xhr
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark
from uhrbat.evaluation.spec import BenchmarkSpec

NAME = "xlrs"
SUPPORTS_ROBUST = True
SUPPORTS_LOGITS = True

TASK_PAIRS = (
    "Complex reasoning/Anomaly Detection and Interpretation",
    "Complex reasoning/Environmental condition reasoning",
    "Complex reasoning/Route planning",
    "Counting/Counting with changing detection",
    "Counting/Counting with complex reasoning",
    "Counting/Overall counting",
    "Counting/Regional counting",
    "Land use classification/Overall Land use classification",
    "Land use classification/Regional Land use classification",
    "Object properties/Object classification",
    "Object properties/Object color",
    "Object properties/Object motion state",
    "Object spatial relationship/Object spatial relationship",
)

_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",  # sic: missing comma in the original
    "Best answer:Best option:",  # sic
)

HEADLINE = {
    "weighted_avg": "accuracy over all questions = the sub-task accuracies weighted by question count "
    "(lmms-eval xlrs_micro_score); the 'weighted average' UHR-BAT publishes (44.0)",
    "subtask_mean": "unweighted mean of the 13 official L3 sub-task accuracies, a sub-task without questions "
    "counting 0 (lmms-eval xlrs_macro_score); what GeoLLaVA-8K (51.5) and DualComp (53.1) publish",
}

META = {
    "headline": HEADLINE,
    "comparability": "weighted_avg and subtask_mean are different averages of the same answers; compare a "
    "number only with a number of the same kind",
    "scorer": "lmms-eval tasks/xlrs/mcq_utils.py (extract_characters_regex, xlrs_aggregate_results[_macro_score])",
    "extraction": "strip stock prefixes; '' if no upper-case A-E; letters in '(x)', "
    "else every a-e/A-E character; upper-cased set",
    "comparison": "set(parsed letters) == set(characters of the ground-truth string)",
    "micro": "correct / all questions (the README's full-bench 'Avg' and UHR-BAT's 'weighted average')",
    "macro": "mean of the 13 official L3-task accuracies; a task without questions counts as 0 (lmms-eval)",
    "macro_present": "mean over the L3 tasks present in the data (VLMEvalKit-style; equals macro on the full lite set)",
}

# ---------------------------------------------------------------------------------------------
# rows (hub parquet / jsonl): `index`, `question`, `multi-choice options`, `answer` (one or
# several letters), `category` ("L2/L3"), `l2-category`, `image` (list of images)
# ---------------------------------------------------------------------------------------------


def normalise(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    options, lines = parse_options(first_of(row, "multi-choice options", "options"))
    if not options:
        raise RowError("missing multi-choice options")
    return dict(
        images=row_images(first_of(row, "image", "images", "image_path"), ctx),
        question=text_field(row.get("question"), "question"),
        options=options,
        option_lines=lines,
        answer=answer_text(row.get("answer")) if not missing(row.get("answer")) else None,
        category=None if missing(row.get("category")) else str(row["category"]).strip(),
        subcategory=None if missing(row.get("l2-category")) else str(row["l2-category"]).strip(),
        source_format="xlrs",
    )


# ---------------------------------------------------------------------------------------------
# prompt: lmms_eval/tasks/xlrs/mcq_utils.py (xlrs_doc_to_text). The multi-answer suffix really
# has no space before "The answer(s)"; reproduced as published.
# ---------------------------------------------------------------------------------------------

XLRS_MULTI_ANSWER_TASK = "Land use classification/Overall Land use classification"
_XLRS_SINGLE = (
    "\nSelect the best answer for the multiple-choice question based on the image. Only respond with the letter "
    "corresponding to the correct answer (A, B, C, D).\nThe answer is:"
)
_XLRS_MULTI = (
    "\nSelect the best answer(s) for the multiple-choice question based on the image. There may be more than one "
    "correct option. Only respond with the letter(s) corresponding to the correct answer(s) (A, B, C, D), with "
    "multiple choices separated by spaces.The answer(s) is(are):"
)


def official_prompt(sample: Sample) -> str:
    if sample.source_format == "llava":
        return sample.question
    post = _XLRS_MULTI if (sample.category or "") == XLRS_MULTI_ANSWER_TASK else _XLRS_SINGLE
    # question + "" (pre_prompt) + options block + post prompt, with no separator after the question.
    return sample.question + "The choices are listed below:\n" + "\n".join(sample.option_lines) + "\n" + post


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def extract(output: Any, sample: Sample | None = None) -> str:
    if isinstance(output, dict):
        output = ""
    s = str(output).strip()
    for p in _PREFIXES:
        s = s.replace(p, "")
    if not re.search("[ABCDE]", s):
        return ""
    matches = re.findall(r"\(([a-eA-E])\)", s)
    if not matches:
        matches = re.findall(r"(?:^|\s)?([a-eA-E])(?:$|[\s,.])?", s)
    if not matches:
        matches = re.findall(r"[a-eA-E]", s)
    if not matches:
        return ""
    return "".join(sorted({m.upper() for m in matches}))


def correct(parsed: str, sample: Sample) -> bool:
    return set(parsed) == set(sample.answer or "")


def _task(sample: Sample) -> str:
    cat = sample.category or ""
    parts = cat.split("/")
    return "/".join(parts[:2]) if len(parts) >= 2 else (cat or "(no category)")


def aggregate(rows: list[Judged]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    per_task = category_table((_task(r.sample), r.correct) for r in rows)
    n = len(rows)
    n_ok = sum(r.correct for r in rows)
    macro_vals = [per_task[t]["accuracy"] if t in per_task else 0.0 for t in TASK_PAIRS]
    present = [v["accuracy"] for v in per_task.values()]
    metrics: dict[str, Any] = {
        "micro": pct(n_ok, n),
        "macro": sum(macro_vals) / len(macro_vals),
        "macro_present": sum(present) / len(present) if present else 0.0,
        "n_official_tasks_present": sum(1 for t in TASK_PAIRS if t in per_task),
        "n_unknown_task_questions": sum(v["n"] for k, v in per_task.items() if k not in TASK_PAIRS),
    }
    l2 = category_table((_task(r.sample).split("/")[0], r.correct) for r in rows)
    for k, v in l2.items():
        metrics[f"L2/{k}"] = v["accuracy"]
    return {"weighted_avg": metrics["micro"], "subtask_mean": metrics["macro"]}, metrics, per_task


def score(samples: list[Sample], predictions: Mapping[str, Any]) -> Report:
    rep = score_benchmark(sys.modules[__name__], NAME, samples, predictions)
    odd = [s.id for s in samples if s.ok and s.answer and not re.fullmatch(r"[A-E]+", s.answer)]
    if odd:
        rep.meta["note_answers"] = (
            f"{len(odd)} ground-truth answers contain characters other than A-E "
            f"(e.g. {odd[:3]}); the official character-set comparison can never match them"
        )
    unknown = rep.metrics.get("n_unknown_task_questions", 0)
    if unknown:
        rep.meta["note_tasks"] = (
            f"{unknown} questions have a category outside the 13 official L3 tasks; they count in micro "
            "but not in macro (lmms-eval would refuse them)"
        )
    return rep


SPECS = (
    BenchmarkSpec(
        name=NAME,
        aliases=("xlrs-lite", "xlrs-bench"),
        normalise=normalise,
        id_keys=("index", "id", "question_id"),
        prompts={
            "official": (
                official_prompt,
                "lmms-eval tasks/xlrs/mcq_utils.py xlrs_doc_to_text: question + 'The choices are "
                "listed below:' + options as distributed + single/multi-answer instruction ending "
                "'The answer is:'",
            ),
            "reference": (reference_xhr, REFERENCE_XHR_DESCRIPTION),
        },
        scorer=sys.modules[__name__],
        score=score,
        max_new_tokens=64,
        max_new_tokens_source="lmms-eval tasks/xlrs/XLRS-lite.yaml",
        multiple_choice=True,
    ),
)
