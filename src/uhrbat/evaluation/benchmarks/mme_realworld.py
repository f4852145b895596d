"""MME-RealWorld, remote-sensing subset: rows, official prompt and scoring.

Scoring reproduces `evaluation/eval_your_results.py` of
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
from collections.abc import Mapping
from typing import Any

from uhrbat.evaluation.loaders import (
    LoadContext,
    first_of,
    missing,
    parse_options,
    row_images,
    text_field,
)
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark
from uhrbat.evaluation.spec import BenchmarkSpec

NAME = "mme-realworld-rs"
SUPPORTS_ROBUST = True
SUPPORTS_LOGITS = True

_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",  # sic
    "Best answer:Best option:",  # sic
)
_DEFAULT_CHOICES = ("(A)", "(B)", "(C)", "(D)", "(E)")  # lmms-eval default `choices`

META = {
    "scorer": "MME-RealWorld evaluation/eval_your_results.py "
    "(extract_characters_regex + per-Task/Subtask/Category accuracy)",
    "subset": "rows with Subtask == 'Remote Sensing' (lmms-eval variant: last part of `category`)",
    "extraction": "strip stock prefixes; '' if >10 words and no upper-case A-E; first upper-case A-E anywhere; "
    "else choice[1] of the first answer choice containing the lower-cased output ('' -> 'A')",
    "comparison": "Ground truth == extracted letter (exact)",
    "avg": "correct / all remote-sensing questions",
    "avg_c": "unweighted mean of the per-category accuracies (categories lower-cased, '*attribute*' folded)",
}

# ---------------------------------------------------------------------------------------------
# rows: the official JSON (`Question_id`, `Image`, `Text`, `Answer choices`, `Ground truth`,
# `Task`, `Subtask`, `Category`; also the Lite file) and the lmms-eval variant (`index`,
# `question`, `multi-choice options`, `answer`, `category`, `l2-category`, base64 `bytes`),
# filtered to the remote-sensing subtask (`keep_row`)
# ---------------------------------------------------------------------------------------------


def is_remote_sensing(row: dict[str, Any]) -> bool | None:
    sub = first_of(row, "Subtask", "subtask")
    if sub is not None:
        return str(sub).strip().lower().replace("_", " ") == "remote sensing"
    cat = first_of(row, "category")
    if cat is not None:
        parts = [p.strip().lower().replace("_", " ") for p in str(cat).split("/")]
        return "remote sensing" in parts
    return None  # no subtask information: keep (the reference evaluator does the same)


def normalise(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any] | None:
    if "Text" in row or "Question_id" in row or "Answer choices" in row:  # official JSON / Lite
        options, lines = parse_options(row.get("Answer choices"))
        task = first_of(row, "Task")
        return dict(
            images=row_images(first_of(row, "Image", "image"), ctx),
            question=text_field(row.get("Text"), "Text"),
            options=options,
            option_lines=lines,
            answer=None if missing(row.get("Ground truth")) else text_field(row.get("Ground truth"), "Ground truth"),
            category=None if missing(row.get("Category")) else str(row["Category"]),
            subcategory=None if missing(row.get("Subtask")) else str(row["Subtask"]),
            source_format="mme-realworld",
            extra={"task": str(task) if task is not None else None},
        )
    # lmms-eval variant (lmms_eval/tasks/mme_realworld/utils.py): Task from `category`,
    # Subtask = last part of `category`, Category = `l2-category`.
    options, lines = parse_options(first_of(row, "multi-choice options", "options"))
    cat = str(first_of(row, "category") or "")
    return dict(
        images=row_images(first_of(row, "bytes", "image", "images"), ctx),
        question=text_field(row.get("question"), "question"),
        options=options,
        option_lines=lines,
        answer=None if missing(row.get("answer")) else text_field(row.get("answer"), "answer"),
        category=None if missing(row.get("l2-category")) else str(row["l2-category"]),
        subcategory=cat.split("/")[-1] if cat else None,
        source_format="mme-realworld-lmms-eval",
        extra={"task": "Perception" if "perception" in cat.lower() else "Reasoning"},
    )


def keep_row(row: dict[str, Any]) -> bool:
    return is_remote_sensing(row) is not False


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------

# MME-RealWorld evaluation/model_vqa_mme_real_world.py (default --test-prompt).
_MME_TEST_PROMPT = (
    "Select the best answer to the above multiple-choice question based on the image. "
    "Respond with only the letter (A, B, C, D, or E) of the correct option."
)
# UHR-BAT reference evaluator, scripts/eval_mme_remote_sensing_multiscale.py (`_format_question`).
_REF_MME_SUFFIX = "Please reply with the letter of the correct option (e.g., A/B/C/D/E)."
_REF_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])\)?[).:\s-]*", re.IGNORECASE)


def _ref_strip_option_prefix(text: str) -> str:
    # Reproduces the reference regex, which also eats a leading capital of an unprefixed
    # option ("Apple" -> "pple"); MME options are always prefixed "(A) ..." so it is harmless there.
    m = _REF_OPTION_PREFIX.match(text)
    return text[m.end() :].strip() if m else text.strip()


def official_prompt(sample: Sample) -> str:
    if sample.source_format == "llava":
        return sample.question
    choices = "".join(f"{c}\n" for c in sample.option_lines)
    return f"{sample.question} The choices are listed below: \n{choices}{_MME_TEST_PROMPT}\nThe best answer is:"


def reference_prompt(sample: Sample) -> str:
    if sample.source_format == "llava":
        return sample.question
    text = sample.question.strip()
    lines = [text] if text else ["Answer the question based on the image."]
    if sample.option_lines:
        lines.append("Options:")
        for letter, opt in zip("ABCDE", sample.option_lines):
            lines.append(f"{letter}. {_ref_strip_option_prefix(opt)}")
        lines.append(_REF_MME_SUFFIX)
    else:
        lines.append("Please reply concisely.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


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
        choices = sample.option_lines if sample is not None and sample.option_lines else list(_DEFAULT_CHOICES)
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


SPECS = (
    BenchmarkSpec(
        name=NAME,
        aliases=("mme-rs", "mme-realworld"),
        normalise=normalise,
        id_keys=("Question_id", "index", "id", "question_id"),
        prompts={
            "official": (
                official_prompt,
                "MME-RealWorld evaluation/model_vqa_mme_real_world.py: Text + ' The choices are "
                "listed below: ' + choices + default --test-prompt + '\\nThe best answer is:'",
            ),
            "reference": (
                reference_prompt,
                "UHR-BAT reference eval_mme_remote_sensing_multiscale.py _format_question: Text, "
                "'Options:', 'A. opt' lines, 'Please reply with the letter of the correct option "
                "(e.g., A/B/C/D/E).'",
            ),
        },
        scorer=sys.modules[__name__],
        score=score,
        max_new_tokens=64,
        max_new_tokens_source="MME-RealWorld evaluation/model_vqa_mme_real_world.py --max_new_tokens default",
        multiple_choice=True,
        keep_row=keep_row,
        no_rows_hint="no Remote Sensing rows (MME-RealWorld is filtered to Subtask == 'Remote Sensing')",
    ),
)
