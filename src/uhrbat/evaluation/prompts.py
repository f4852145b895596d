"""Question prompts: each benchmark's official prompt by default, the reference evaluator's
prompts under the name "reference".

Each benchmark module defines its own templates (`BenchmarkSpec.prompts`); this module holds
the dispatch (given a spec; it never looks benchmarks up by name, so benchmark modules can
import it) and the one template several benchmarks share (the UHR-BAT reference evaluator's
XHRBench prompt). The text returned is the *user text only*; the pipeline adds the ChatML
wrapper and the `<image>` marker. Each template is described in words (`describe()`), which
goes into the report so a reader knows exactly what the model was asked.
"""

from __future__ import annotations

from uhrbat.errors import BenchmarkDataError
from uhrbat.evaluation.records import Sample
from uhrbat.evaluation.spec import BenchmarkSpec, Prompt

__all__ = ["PROMPT_STYLES", "build_prompt", "describe", "reference_xhr", "REFERENCE_XHR_DESCRIPTION", "REF_XHR_SUFFIX"]

PROMPT_STYLES = ("official", "reference")

# UHR-BAT reference evaluator, scripts/eval_xlrs_multiscale_to_json.py (`extract_question_and_gt`).
REF_XHR_SUFFIX = "Select the best answer based on the image. Answer with the option letter only."
_REF_MULTI_MARKER = "Select the best answer based on the image."
_REF_MULTI_HINT = " You should choose multiple answers."

REFERENCE_XHR_DESCRIPTION = (
    "UHR-BAT reference eval_xlrs_multiscale_to_json.py: conversation text, or question + 'A. opt' lines + 'Select the "
    "best answer based on the image. Answer with the option letter only.' (+ ' You should choose multiple answers.' "
    "when the ground truth has several letters)"
)


def _letters_in(text: str) -> set[str]:
    return {ch for ch in text.upper() if ch in "ABCD"}


def reference_xhr(sample: Sample) -> str:
    """The reference evaluator's XHRBench prompt (used by --prompt reference for XLRS, RSHR, HR-Bench)."""
    if sample.source_format == "llava":
        q = sample.question
    else:
        q = sample.question.strip()
        if sample.options:
            opts = "\n".join(f"{k}. {v.strip()}" for k, v in sample.options.items())
            q = f"{q}\n{opts}\n{REF_XHR_SUFFIX}"
    # The reference leaks the ground truth's cardinality into the prompt (method spec §6.2);
    # reproduced only under --prompt reference.
    if (
        len(_letters_in(sample.answer or "")) > 1
        and _REF_MULTI_MARKER in q
        and "You should choose multiple answers" not in q
    ):
        q = q.replace(_REF_MULTI_MARKER, _REF_MULTI_MARKER + _REF_MULTI_HINT)
    return q


def _template(spec: BenchmarkSpec, style: str) -> Prompt:
    if style not in PROMPT_STYLES:
        raise BenchmarkDataError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}")
    if style not in spec.prompts:
        raise BenchmarkDataError(f"no {style} prompt for benchmark {spec.name!r}")
    return spec.prompts[style]


def build_prompt(spec: BenchmarkSpec, sample: Sample, style: str = "official") -> str:
    """The user text for `sample` under the chosen prompt style of benchmark `spec`."""
    fn, _ = _template(spec, style)
    return fn(sample)


def describe(spec: BenchmarkSpec, style: str = "official") -> str:
    """The prompt template of `spec` under `style`, in words (it goes into the report)."""
    return _template(spec, style)[1]
