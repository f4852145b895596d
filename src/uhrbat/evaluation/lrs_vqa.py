"""LRS-VQA scoring, reproducing VisionXLab/LRS-VQA `Script/evaluation_LRSVQA.py` (commit d8d28bf)
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
from typing import Any, Mapping

from uhrbat.evaluation import wordnet
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.report import Report, category_table, pct
from uhrbat.evaluation.scoring import Judged, score_benchmark

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


def score(samples: list[Sample], predictions: Mapping[str, Any]) -> Report:
    wn = wordnet.get_wordnet()
    extra = {"wordnet": wn.source if wn is not None else
             "NOT AVAILABLE: synonym rule disabled, exact match only (a lower bound). Install `nltk` and Debian's "
             "`wordnet-base`, or point UHRBAT_WORDNET_DIR at WordNet 3.0 dict files."}
    others = sorted({subset_of(s) for s in samples} - set(SUBSETS))
    if others:
        extra["note_subsets"] = f"question ids with unknown subset prefixes: {others[:10]} (scored, not in the headline)"
    rep = score_benchmark(sys.modules[__name__], NAME, samples, predictions, extra_meta=extra)
    if wn is None:
        import warnings

        warnings.warn("WordNet not found: LRS-VQA synonym rule disabled (exact match only)", RuntimeWarning, stacklevel=2)
    return rep
