"""HR-Bench 4K / 8K: rows, official prompt and scoring.

Scoring follows the rule path of lmms-eval `lmms_eval/tasks/hrbench/hrbench_evals.py`
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
import re
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from uhrbat.errors import BenchmarkDataError
from uhrbat.evaluation.loaders import (
    LoadContext,
    RowError,
    first_of,
    missing,
    row_images,
    text_field,
)
from uhrbat.evaluation.prompts import REFERENCE_XHR_DESCRIPTION, reference_xhr
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark
from uhrbat.evaluation.spec import BenchmarkSpec

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

# ---------------------------------------------------------------------------------------------
# rows: parquet / TSV (`index`, `question`, `A`..`D`, `answer`, `category`, `cycle_category`,
# base64 `image`)
# ---------------------------------------------------------------------------------------------


def normalise(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    # lmms_eval/tasks/hrbench/utils.py: options are every single upper-case letter column that
    # is present and not NaN (an empty TSV cell is NaN under pandas).
    options = {c: str(row[c]).strip() for c in string.ascii_uppercase if c in row and not missing(row[c])}
    if not options:
        raise RowError("no option columns (A, B, ...)")
    extra = {}
    if not missing(row.get("cycle_category")):
        extra["cycle_category"] = str(row["cycle_category"])
    return dict(
        images=row_images(first_of(row, "image", "images", "image_path"), ctx),
        question=text_field(row.get("question"), "question"),
        options=options,
        option_lines=[f"{k}. {v}" for k, v in options.items()],
        answer=None if missing(row.get("answer")) else text_field(row.get("answer"), "answer").strip(),
        category=None if missing(row.get("category")) else str(row["category"]).strip(),
        source_format="hrbench",
        extra=extra,
    )


def _shards_for(split: str):
    """The hub folder holds both splits (hrbench_4k-*.parquet, hrbench_8k-*.parquet): keep ours."""

    def pick(shards: list[Path], folder: Path) -> list[Path]:
        tagged = [p for p in shards if re.search(r"(4k|8k)", p.name, re.IGNORECASE)]
        if not tagged:
            return shards
        mine = [p for p in tagged if split in p.name.lower()]
        if not mine:
            raise BenchmarkDataError(f"no {split.upper()} parquet shard in {folder}")
        return mine

    return pick


# ---------------------------------------------------------------------------------------------
# prompt: lmms_eval/tasks/hrbench/utils.py (hrbench_doc_to_text)
# ---------------------------------------------------------------------------------------------


def official_prompt(sample: Sample) -> str:
    if sample.source_format == "llava":
        return sample.question
    opts = "".join(f"{k}. {v}\n" for k, v in sample.options.items())
    return f"{sample.question.strip()}\n{opts}Answer the option letter directly."


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


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


def _spec(split: str) -> BenchmarkSpec:
    name = f"hrbench-{split}"
    return BenchmarkSpec(
        name=name,
        aliases=(f"hrbench{split}",),
        normalise=normalise,
        id_keys=("index", "id"),
        prompts={
            "official": (
                official_prompt,
                "lmms-eval tasks/hrbench/utils.py hrbench_doc_to_text: question + 'A. opt' lines "
                "+ 'Answer the option letter directly.'",
            ),
            "reference": (reference_xhr, REFERENCE_XHR_DESCRIPTION),
        },
        scorer=sys.modules[__name__],
        score=lambda samples, predictions: score(samples, predictions, benchmark=name),
        max_new_tokens=128,
        max_new_tokens_source="not set by lmms-eval tasks/hrbench; our choice",
        multiple_choice=True,
        pick_files=_shards_for(split),
    )


SPECS = (_spec("4k"), _spec("8k"))
