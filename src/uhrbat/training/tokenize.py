"""Tokenisation and labels for supervised fine-tuning (ChatML through the processor's template).

`encode_conversation` renders a conversation with `processor.apply_chat_template`, tokenises it
in pieces split at turn boundaries (so the prompt up to the first assistant header is tokenised
exactly like the inference prompt `processor.build_prompt(question)`), expands the single `<image>`
marker to the placeholder run the model fills with visual tokens, and builds the labels:

* `labels="assistant"` (default): only assistant tokens are supervised: each answer and its
  closing `<|im_end|>`; everything else, placeholders included, is -100.
* `labels="reference"`: the reference's LLaVA-NeXT masks (§5.4): additionally every
  `<|im_start|>`, `<|im_end|>` and the newline after each turn, and the newline of the assistant
  header.

Layout after the image: one `\\n` (the inference layout) or, with `layout="reference"`, the
reference's two (its training tokenised `[image] "\\n"` then `"\\n" + question`, §9.5).

`query_index` is the position of the last token of the prompt up to the first assistant header:
the relevance query of the scoring pass, so answer tokens never influence which visual tokens are
kept. `query="reference"` reproduces the reference's leak instead (the last token of the sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from uhrbat.errors import ContextOverflowError, PromptError
from uhrbat.processing.prompt import IMAGE_MARKER

IGNORE_INDEX = -100
LAYOUTS = ("inference", "reference")
LABEL_MODES = ("assistant", "reference")
QUERY_MODES = ("prompt", "reference")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    query_index: int
    image_start: int
    num_visual: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TokenizeOptions:
    """How conversations become ids/labels. `compat="reference"` sets all three to the reference's."""

    layout: str = "inference"
    labels: str = "assistant"
    query: str = "prompt"

    @classmethod
    def from_compat(cls, compat: str | None = None, **overrides: Any) -> TokenizeOptions:
        base = cls("reference", "reference", "reference") if compat == "reference" else cls()
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        base.check()
        return base

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise PromptError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.labels not in LABEL_MODES:
            raise PromptError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")
        if self.query not in QUERY_MODES:
            raise PromptError(f"query must be one of {QUERY_MODES}, got {self.query!r}")


def normalise_image_turn(content: str) -> str:
    """Move the `<image>` marker to the front: `"<image>\\n" + text` (LLaVA's preprocessing)."""
    if IMAGE_MARKER not in content:
        return content
    rest = content.replace(IMAGE_MARKER, "").strip()
    return f"{IMAGE_MARKER}\n{rest}"


def _segments(processor: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """Split the rendered conversation into (kind, text) pieces.

    kinds: "text" (never supervised), "header" (assistant header), "answer" (assistant content
    + end-of-turn token) and "tail" (what follows the end-of-turn token, a newline in ChatML).
    """
    render = processor.apply_chat_template
    pieces: list[tuple[str, str]] = []
    prev = ""
    for k, m in enumerate(messages):
        full = render(list(messages[: k + 1]), add_generation_prompt=False)
        if not full.startswith(prev):
            raise PromptError("the chat template is not prefix-consistent; cannot locate the assistant turns")
        seg = full[len(prev) :]
        if m["role"] == "assistant":
            head = render(list(messages[:k]), add_generation_prompt=True)
            if not head.startswith(prev) or not full.startswith(head):
                raise PromptError("the chat template's generation prompt does not prefix the assistant turn")
            header = head[len(prev) :]
            body = seg[len(header) :]
            content_at = body.find(m["content"])
            if content_at != 0:
                raise PromptError("the chat template altered the assistant content; cannot build labels")
            # The answer runs through the end-of-turn marker; what follows it (ChatML: "\n") is the tail.
            tail_len = len(body) - len(body.rstrip("\n"))
            pieces += [
                ("header", header),
                ("answer", body[: len(body) - tail_len]),
                ("tail", body[len(body) - tail_len :]),
            ]
        else:
            pieces.append(("text", seg))
        prev = full
    return pieces


def encode_conversation(
    processor: Any,
    messages: Sequence[dict[str, str]],
    num_visual: int,
    max_length: int | None = None,
    options: TokenizeOptions | None = None,
) -> Encoded:
    """Conversation (one `<image>` in the first user turn) -> ids, labels and relevance query index.

    Raises `PromptError` for malformed conversations and `ContextOverflowError` if the sample
    (visual tokens included) is longer than `max_length`; a sample is never truncated.
    """
    opts = options or TokenizeOptions()
    opts.check()
    tok = processor.tokenizer
    image_id = int(processor.image_token_id)
    msgs = [dict(m) for m in messages]
    if not any(m["role"] == "assistant" for m in msgs):
        raise PromptError("the conversation has no assistant turn to supervise")
    n_markers = sum(m["content"].count(IMAGE_MARKER) for m in msgs)
    if n_markers != 1:
        raise PromptError(f"a training sample needs exactly one {IMAGE_MARKER} marker, found {n_markers}")
    for m in msgs:
        if m["role"] == "user":
            m["content"] = normalise_image_turn(m["content"])

    special = {
        i
        for i in (tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>"))
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id
    }
    nl = tok("\n", add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    labels: list[int] = []
    query_index = -1
    buffer = ""

    def emit(text: str, supervised: bool) -> None:
        if not text:
            return
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE_INDEX] * len(piece))

    for kind, text in _segments(processor, msgs):
        if kind in ("text", "header"):
            buffer += text
            if kind == "header" and query_index < 0:
                emit(buffer, False)
                buffer = ""
                query_index = len(ids) - 1
            continue
        emit(buffer, False)
        buffer = ""
        emit(text, kind == "answer" or (kind == "tail" and opts.labels == "reference"))
    emit(buffer, False)

    where = [i for i, t in enumerate(ids) if t == image_id]
    if len(where) != 1:
        raise PromptError(f"expected one {IMAGE_MARKER} token after tokenisation, found {len(where)}")
    pos = where[0]
    extra = list(nl) if opts.layout == "reference" else []
    run = [image_id] * num_visual + extra
    ids = ids[:pos] + run + ids[pos + 1 :]
    labels = labels[:pos] + [IGNORE_INDEX] * len(run) + labels[pos + 1 :]
    if query_index > pos:
        query_index += len(run) - 1

    if opts.labels == "reference":
        # LLaVA-NeXT's preprocess_qwen: every <|im_start|> / <|im_end|>, the newline after each
        # <|im_end|>, and the newline ending each assistant header are supervised as well.
        im_start = tok.convert_tokens_to_ids("<|im_start|>")
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        for i, t in enumerate(ids):
            if t in special:
                labels[i] = t
            if t == im_end and i + 1 < len(ids) and ids[i + 1] in nl:
                labels[i + 1] = ids[i + 1]
            if t == im_start:
                j = next((k for k in range(i + 1, len(ids)) if ids[k] in nl), None)
                if j is not None and tok.decode(ids[i + 1 : j]).strip() == "assistant":
                    labels[j] = ids[j]
    if opts.query == "reference":
        query_index = len(ids) - 1
    if not any(lab != IGNORE_INDEX for lab in labels):
        raise PromptError("no supervised tokens")
    if query_index <= pos + len(run) - 1:
        raise PromptError("the relevance query must come after the image")
    if max_length is not None and len(ids) > max_length:
        raise ContextOverflowError(
            f"sample is {len(ids)} tokens ({num_visual} visual + {len(ids) - num_visual} text) "
            f"> max_length {max_length}"
        )
    return Encoded(ids, labels, query_index, pos, num_visual)
