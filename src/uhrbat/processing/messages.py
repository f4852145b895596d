"""OpenAI-style messages about one image -> the ChatML prompt (`UhrBatPipeline.chat`, the server,
the demo): validated here once, with one-line errors that say how to fix the conversation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from uhrbat.errors import PromptError
from uhrbat.processing.prompt import IMAGE_MARKER, chatml, validate_question

__all__ = ["chat_prompt"]

_ROLES = ("system", "user", "assistant")
_IMAGE_PARTS = ("image", "image_url", "input_image")  # the image itself is passed separately


def chat_prompt(messages: Sequence[dict[str, Any]]) -> str:
    """OpenAI-style messages about one image -> the ChatML prompt (earlier turns included).

    Content is a string or a list of parts `{"type": "text", "text": ...}` and exactly one image
    part (`{"type": "image"}`; `image_url` / `input_image` parts count as the image too, the image
    itself is passed separately). The last message must be the user's question.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    rendered: list[dict[str, Any]] = []
    n_images = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise PromptError(f"message {i}: role must be system, user or assistant, got {role!r}")
        if role == "system" and i != 0:
            raise PromptError(f"message {i}: a system message may only come first")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise PromptError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        out: list[dict[str, Any]] = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE_PARTS:
                if role != "user":
                    raise PromptError(f"message {i}: only a user message may hold the image")
                n_images += 1
                out.append({"type": "image"})
            elif kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise PromptError(f"message {i}: a text part needs a 'text' string")
                if IMAGE_MARKER in text:
                    raise PromptError(
                        f"message {i}: the text contains {IMAGE_MARKER!r}; pass the image as an image part "
                        f"and remove {IMAGE_MARKER!r} from the text"
                    )
                out.append({"type": "text", "text": text})
            else:
                raise PromptError(f"message {i}: unsupported content part {kind!r}; use 'text' and one 'image' part")
        rendered.append({"role": role, "content": out})
    if n_images != 1:
        raise PromptError(
            f"a conversation needs exactly one image part, found {n_images}; "
            "add {'type': 'image'} to the first user message"
        )
    last = rendered[-1]
    if last["role"] != "user":
        raise PromptError(f"the last message must be the user's question, got a {last['role']!r} message")
    validate_question("".join(p.get("text", "") for p in last["content"]))  # empty / whitespace-only
    return chatml(rendered)
