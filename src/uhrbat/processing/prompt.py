"""ChatML prompt building (the `qwen_1_5` conversation template of the reference)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uhrbat.errors import PromptError

IMAGE_MARKER = "<image>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def validate_question(question: str) -> str:
    """The question text after the checks every entry point applies (CLI, chat, API, demo,
    server, batch): an empty or whitespace-only question (markers aside) raises `PromptError`, and
    so does an `<image>` marker anywhere in it - leading or not, with the same message: the image
    is given separately and the prompt builder places its one marker itself (the reference
    silently dropped leading markers; a marker is never dropped or moved here)."""
    if not isinstance(question, str):
        raise PromptError(f"the question must be text, got {type(question).__name__}")
    if not question.replace(IMAGE_MARKER, "").strip():
        raise PromptError('the question is empty; ask something about the image, e.g. "How many ships are there?"')
    if IMAGE_MARKER in question:
        raise PromptError(
            f"the question contains an extra {IMAGE_MARKER!r} marker; the image is given separately, "
            f"remove {IMAGE_MARKER!r} from the question"
        )
    return question.lstrip()


def user_text(question: str) -> str:
    """`"<image>\\n" + question` (after `validate_question`)."""
    return f"{IMAGE_MARKER}\n{validate_question(question)}"


def render_content(content: str | Sequence[dict[str, Any]]) -> str:
    """HF-style message content (str or list of {"type": "image"|"text"}) -> text with markers."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for item in content:
        kind = item.get("type")
        if kind == "image":
            parts.append(IMAGE_MARKER + "\n")
        elif kind == "text":
            parts.append(item.get("text", ""))
        else:
            raise PromptError(f"unsupported message content type {kind!r}")
    return "".join(parts)


def chatml(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, system: str = DEFAULT_SYSTEM) -> str:
    """Render messages in ChatML with the default system prompt, like Qwen2's template."""
    out: list[str] = []
    if not messages or messages[0].get("role") != "system":
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        out.append(f"<|im_start|>{m['role']}\n{render_content(m['content'])}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def question_prompt(question: str, system: str = DEFAULT_SYSTEM) -> str:
    """The full inference prompt for one question about one image."""
    return chatml([{"role": "user", "content": user_text(question)}], system=system)


def count_markers(text: str) -> int:
    return text.count(IMAGE_MARKER)
