"""Question prompts: each benchmark's official prompt by default, the reference evaluator's
prompts under the name "reference".

The text returned is the *user text only*; the pipeline adds the ChatML wrapper and the
`<image>` marker. Each template is described in words by `describe()`, which goes into the
report so a reader knows exactly what the model was asked.
"""

from __future__ import annotations

import re

from uhrbat.errors import BenchmarkDataError
from uhrbat.evaluation.records import Sample

__all__ = ["PROMPT_STYLES", "build_prompt", "describe", "XLRS_MULTI_ANSWER_TASK"]

PROMPT_STYLES = ("official", "reference")

XLRS_MULTI_ANSWER_TASK = "Land use classification/Overall Land use classification"

# lmms_eval/tasks/xlrs/mcq_utils.py (xlrs_doc_to_text). The multi-answer suffix really has no
# space before "The answer(s)"; reproduced as published.
_XLRS_SINGLE = (
    "\nSelect the best answer for the multiple-choice question based on the image. Only respond with the letter "
    "corresponding to the correct answer (A, B, C, D).\nThe answer is:"
)
_XLRS_MULTI = (
    "\nSelect the best answer(s) for the multiple-choice question based on the image. There may be more than one "
    "correct option. Only respond with the letter(s) corresponding to the correct answer(s) (A, B, C, D), with "
    "multiple choices separated by spaces.The answer(s) is(are):"
)

# MME-RealWorld evaluation/model_vqa_mme_real_world.py (default --test-prompt).
_MME_TEST_PROMPT = (
    "Select the best answer to the above multiple-choice question based on the image. "
    "Respond with only the letter (A, B, C, D, or E) of the correct option."
)

# UHR-BAT reference evaluator, scripts/eval_xlrs_multiscale_to_json.py (`extract_question_and_gt`).
_REF_XHR_SUFFIX = "Select the best answer based on the image. Answer with the option letter only."
_REF_MULTI_MARKER = "Select the best answer based on the image."
_REF_MULTI_HINT = " You should choose multiple answers."
# UHR-BAT reference evaluator, scripts/eval_mme_remote_sensing_multiscale.py (`_format_question`).
_REF_MME_SUFFIX = "Please reply with the letter of the correct option (e.g., A/B/C/D/E)."
_REF_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])\)?[).:\s-]*", re.IGNORECASE)


def _ref_strip_option_prefix(text: str) -> str:
    # Reproduces the reference regex, which also eats a leading capital of an unprefixed
    # option ("Apple" -> "pple"); MME options are always prefixed "(A) ..." so it is harmless there.
    m = _REF_OPTION_PREFIX.match(text)
    return text[m.end():].strip() if m else text.strip()


def _letters_in(text: str) -> set[str]:
    return {ch for ch in text.upper() if ch in "ABCD"}


def _reference_xhr(sample: Sample) -> str:
    if sample.source_format == "llava":
        q = sample.question
    else:
        q = sample.question.strip()
        if sample.options:
            opts = "\n".join(f"{k}. {v.strip()}" for k, v in sample.options.items())
            q = f"{q}\n{opts}\n{_REF_XHR_SUFFIX}"
    # The reference leaks the ground truth's cardinality into the prompt (method spec §6.2);
    # reproduced only under --prompt reference.
    if len(_letters_in(sample.answer or "")) > 1 and _REF_MULTI_MARKER in q and "You should choose multiple answers" not in q:
        q = q.replace(_REF_MULTI_MARKER, _REF_MULTI_MARKER + _REF_MULTI_HINT)
    return q


def _official_xlrs(sample: Sample) -> str:
    if sample.source_format == "llava":
        return sample.question
    post = _XLRS_MULTI if (sample.category or "") == XLRS_MULTI_ANSWER_TASK else _XLRS_SINGLE
    # question + "" (pre_prompt) + options block + post prompt, with no separator after the question.
    return sample.question + "The choices are listed below:\n" + "\n".join(sample.option_lines) + "\n" + post


def _official_mme(sample: Sample) -> str:
    if sample.source_format == "llava":
        return sample.question
    choices = "".join(f"{c}\n" for c in sample.option_lines)
    return f"{sample.question} The choices are listed below: \n{choices}{_MME_TEST_PROMPT}\nThe best answer is:"


def _reference_mme(sample: Sample) -> str:
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


def _official_rshr(sample: Sample) -> str:
    # No official RSHR prompt is published; we use the reference evaluator's XHRBench prompt
    # *without* its ground-truth-derived "choose multiple answers" hint.
    if sample.source_format == "llava" or not sample.options:
        return sample.question
    opts = "\n".join(f"{k}. {v.strip()}" for k, v in sample.options.items())
    return f"{sample.question.strip()}\n{opts}\n{_REF_XHR_SUFFIX}"


def _official_hrbench(sample: Sample) -> str:
    # lmms_eval/tasks/hrbench/utils.py (hrbench_doc_to_text).
    if sample.source_format == "llava":
        return sample.question
    opts = "".join(f"{k}. {v}\n" for k, v in sample.options.items())
    return f"{sample.question.strip()}\n{opts}Answer the option letter directly."


def _official_lrs(sample: Sample) -> str:
    # Script/llava_eval_LRSVQA.py sends `text` unchanged (it already ends with
    # "Answer the question using a single word or phrase.").
    return sample.question


_TEMPLATES = {
    ("xlrs", "official"): (_official_xlrs, "lmms-eval tasks/xlrs/mcq_utils.py xlrs_doc_to_text: question + 'The choices are listed below:' + options as distributed + single/multi-answer instruction ending 'The answer is:'"),
    ("xlrs", "reference"): (_reference_xhr, "UHR-BAT reference eval_xlrs_multiscale_to_json.py: conversation text, or question + 'A. opt' lines + 'Select the best answer based on the image. Answer with the option letter only.' (+ ' You should choose multiple answers.' when the ground truth has several letters)"),
    ("mme-realworld-rs", "official"): (_official_mme, "MME-RealWorld evaluation/model_vqa_mme_real_world.py: Text + ' The choices are listed below: ' + choices + default --test-prompt + '\\nThe best answer is:'"),
    ("mme-realworld-rs", "reference"): (_reference_mme, "UHR-BAT reference eval_mme_remote_sensing_multiscale.py _format_question: Text, 'Options:', 'A. opt' lines, 'Please reply with the letter of the correct option (e.g., A/B/C/D/E).'"),
    ("rshr", "official"): (_official_rshr, "no official RSHR prompt exists: reference XHRBench prompt (question + 'A. opt' lines + 'Select the best answer based on the image. Answer with the option letter only.') without the ground-truth-derived multi-answer hint"),
    ("rshr", "reference"): (_reference_xhr, "UHR-BAT reference eval_xlrs_multiscale_to_json.py XHRBench prompt, including the ground-truth-derived ' You should choose multiple answers.' hint"),
    ("hrbench", "official"): (_official_hrbench, "lmms-eval tasks/hrbench/utils.py hrbench_doc_to_text: question + 'A. opt' lines + 'Answer the option letter directly.'"),
    ("hrbench", "reference"): (_reference_xhr, "UHR-BAT reference eval_xlrs_multiscale_to_json.py: conversation text, or question + 'A. opt' lines + 'Select the best answer based on the image. Answer with the option letter only.' (+ multi-answer hint)"),
    ("lrs-vqa", "official"): (_official_lrs, "LRS-VQA Script/llava_eval_LRSVQA.py: the `text` field unchanged"),
    ("lrs-vqa", "reference"): (_official_lrs, "the UHR-BAT reference has no LRS-VQA evaluator; same as official (`text` unchanged)"),
}


def _family(benchmark: str) -> str:
    return "hrbench" if benchmark.startswith("hrbench") else benchmark


def _template(benchmark: str, style: str):
    if style not in PROMPT_STYLES:
        raise BenchmarkDataError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    key = (_family(benchmark), style)
    if key not in _TEMPLATES:
        raise BenchmarkDataError(f"no {style} prompt for benchmark {benchmark!r}")
    return _TEMPLATES[key]


def build_prompt(benchmark: str, sample: Sample, style: str = "official") -> str:
    """The user text for `sample` under the chosen prompt style."""
    fn, _ = _template(benchmark, style)
    return fn(sample)


def describe(benchmark: str, style: str = "official") -> str:
    return _template(benchmark, style)[1]
