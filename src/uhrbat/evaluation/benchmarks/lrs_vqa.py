"""LRS-VQA: rows, prompt and scoring.

Scoring reproduces VisionXLab/LRS-VQA `Script/evaluation_LRSVQA.py` (commit d8d28bf)
with the output handling of `Script/llava_eval_LRSVQA.py`.

Decisions reproduced, quirks included:

* The answer is the decoded output `.strip()`-ed (generation script), then lower-cased (scorer).
* The ground truth is only lower-cased (not stripped).
* Correct iff equal, or WordNet synonyms: some synset pair with path_similarity > 0.8, i.e. a
  shared synset of the *whole strings* (multi-word answers rarely have synsets; punctuation
  such as "yes." defeats both rules).
* Subset = question id up to the first "_" (FAIR / GLH-Bridge / STAR). Per subset:
  OA = correct / total, AA = mean of the per-category accuracies (sorted categories).
* Headline: each subset's OA and their mean (over the subsets present).
* Difference: the official script silently drops rows without ground truth or category; we
  keep them as error rows (scored wrong) so nothing disappears, and report how many.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from uhrbat.errors import ConfigError
from uhrbat.evaluation import wordnet
from uhrbat.evaluation.loaders import (
    LoadContext,
    RowError,
    first_of,
    missing,
    row_images,
    text_field,
)
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark
from uhrbat.evaluation.spec import BenchmarkSpec

NAME = "lrs-vqa"
SUPPORTS_ROBUST = False
SUPPORTS_LOGITS = False
SUBSETS = ("FAIR", "GLH-Bridge", "STAR")

META = {
    "scorer": "LRS-VQA Script/evaluation_LRSVQA.py (evaluate_dataset / are_synonyms), outputs stripped as in "
    "Script/llava_eval_LRSVQA.py",
    "comparison": "output.strip().lower() == ground_truth.lower(), or a shared WordNet 3.0 synset "
    "(== some path_similarity > 0.8)",
    "subsets": "question_id prefix before the first '_' (FAIR, GLH-Bridge, STAR)",
    "headline": "overall accuracy (OA) per subset and their mean; AA = mean per-category accuracy, in metrics",
}

# ---------------------------------------------------------------------------------------------
# rows: JSONL (`question_id`, `image`, `category`, `text`, `ground_truth`)
# ---------------------------------------------------------------------------------------------


def normalise(row: dict[str, Any], idx: int, ctx: LoadContext) -> dict[str, Any]:
    gt = row.get("ground_truth")
    if missing(row.get("category")):
        raise RowError("missing category (the official LRS-VQA scorer drops such rows)")
    return dict(
        images=row_images(first_of(row, "image", "images"), ctx),
        question=text_field(row.get("text"), "text"),
        # Not stripped: Script/evaluation_LRSVQA.py only lower-cases the ground truth.
        answer=None if missing(gt) else (gt if isinstance(gt, str) else text_field(gt, "ground_truth")),
        category=str(row["category"]),
        source_format="lrs-vqa",
        extra={k: row[k] for k in ("image_size", "size_bin") if k in row and not missing(row[k])},
    )


def official_prompt(sample: Sample) -> str:
    # Script/llava_eval_LRSVQA.py sends `text` unchanged (it already ends with
    # "Answer the question using a single word or phrase.").
    return sample.question


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


def extract(output: Any, sample: Sample | None = None) -> str:
    return str(output).strip().lower()


def correct(parsed: str, sample: Sample) -> bool:
    gt = (sample.answer or "").lower()
    if not gt:
        return False
    if gt == parsed:
        return True
    return wordnet.are_synonyms(gt, parsed)


def subset_of(sample: Sample) -> str:
    return sample.id.split("_")[0]


def aggregate(rows: list[Judged]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    metrics: dict[str, Any] = {}
    headline: dict[str, Any] = {}
    subsets: dict[str, list[Judged]] = {}
    for r in rows:
        subsets.setdefault(subset_of(r.sample), []).append(r)
    oas = []
    for name in sorted(subsets, key=lambda x: (x not in SUBSETS, SUBSETS.index(x) if x in SUBSETS else 0, x)):
        sub = subsets[name]
        oa = pct(sum(r.correct for r in sub), len(sub))
        cats = category_table((r.sample.category or "(no category)", r.correct) for r in sub)
        aa = sum(v["accuracy"] for v in cats.values()) / len(cats) if cats else 0.0
        metrics[f"{name}/OA"] = oa
        metrics[f"{name}/AA"] = aa
        metrics[f"{name}/n"] = len(sub)
        oas.append(oa)
        if name in SUBSETS:
            headline[name] = oa
    for name in SUBSETS:
        headline.setdefault(name, None)
    present = [headline[s] for s in SUBSETS if headline[s] is not None]
    headline["mean"] = sum(present) / len(present) if present else None
    metrics["overall_OA"] = pct(sum(r.correct for r in rows), len(rows))
    per_cat = category_table((f"{subset_of(r.sample)}/{r.sample.category or '(no category)'}", r.correct) for r in rows)
    return headline, metrics, per_cat


SYNONYM_MODES = ("wordnet", "none")
NO_WORDNET = (
    "LRS-VQA scoring needs WordNet 3.0 for its official synonym rule (without it the same answers score "
    "far lower, e.g. 26.0 instead of 55.8): pip install nltk and apt-get install wordnet-base (or set "
    "UHRBAT_WORDNET_DIR to WordNet 3.0 dict files), or pass --lrs-synonyms none for exact-match-only scoring"
)


def check_options(lrs_synonyms: str = "wordnet") -> None:
    """Refuse before any model runs: an unknown mode, or the synonym rule without WordNet."""
    if lrs_synonyms not in SYNONYM_MODES:
        raise ConfigError(f"--lrs-synonyms must be one of {', '.join(SYNONYM_MODES)}, got {lrs_synonyms!r}")
    if lrs_synonyms == "wordnet" and wordnet.get_wordnet() is None:
        raise ConfigError(NO_WORDNET)


def correct_exact(parsed: str, sample: Sample) -> bool:
    gt = (sample.answer or "").lower()
    return bool(gt) and gt == parsed


class _ExactOnly:
    """This module's rules with the synonym rule off (`--lrs-synonyms none`)."""

    NAME, SUPPORTS_ROBUST, SUPPORTS_LOGITS = NAME, False, False
    META = {
        **META,
        "comparison": "output.strip().lower() == ground_truth.lower() (exact match only: --lrs-synonyms none)",
    }
    extract = staticmethod(extract)
    correct = staticmethod(correct_exact)
    aggregate = staticmethod(aggregate)


def score(samples: list[Sample], predictions: Mapping[str, Any], lrs_synonyms: str = "wordnet") -> Report:
    """Official LRS-VQA scores; `lrs_synonyms="none"` asks for exact-match-only scoring by name.

    Raises ConfigError when the synonym rule is asked for (the default) and WordNet is missing,
    instead of silently scoring a lower bound.
    """
    check_options(lrs_synonyms)
    if lrs_synonyms == "wordnet":
        rules: Any = sys.modules[__name__]
        extra = {"wordnet": wordnet.get_wordnet().source}  # type: ignore[union-attr]
    else:
        rules = _ExactOnly
        extra = {"wordnet": "not used (--lrs-synonyms none): exact match only, a lower bound of the official score"}
    others = sorted({subset_of(s) for s in samples} - set(SUBSETS))
    if others:
        extra["note_subsets"] = (
            f"question ids with unknown subset prefixes: {others[:10]} (scored, not in the headline)"
        )
    return score_benchmark(rules, NAME, samples, predictions, extra_meta=extra)


SPECS = (
    BenchmarkSpec(
        name=NAME,
        aliases=("lrsvqa",),
        normalise=normalise,
        id_keys=("question_id", "id"),
        prompts={
            "official": (official_prompt, "LRS-VQA Script/llava_eval_LRSVQA.py: the `text` field unchanged"),
            "reference": (
                official_prompt,
                "the UHR-BAT reference has no LRS-VQA evaluator; same as official (`text` unchanged)",
            ),
        },
        scorer=sys.modules[__name__],
        score=score,
        max_new_tokens=128,
        max_new_tokens_source="LRS-VQA Script/llava_eval_LRSVQA.py --max_new_tokens default",
        multiple_choice=False,
        score_options=("lrs_synonyms",),
        check_options=check_options,
    ),
)
