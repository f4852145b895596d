"""The OpenAI chat-completions wire format, as pydantic models, and the error type that renders
as OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.

Only what UHR-BAT can honour is accepted: unknown request fields are a 400 (a typo in
`extra_body` must not be ignored silently), and standard fields the server cannot honour
(`n > 1`, `logprobs`, `tools`, penalties other than 0) are a 400 naming the field.
UHR-BAT's own options arrive through the OpenAI client's `extra_body`, which the client merges
into the top level of the JSON body: the selection options of `uhrbat.options` (`budgets`,
`selector`, `kmeans_clusters`, `kmeans_iters`, `kmeans_mode`, `encode`, `gate_margin`, and `seed`,
which is also a standard field), `repetition_penalty` and `return_tokens`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An HTTP error rendered in OpenAI's schema (see `body`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: ValidationError | Any) -> APIError:
    """A pydantic / FastAPI validation error -> one 400 line naming the first bad field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return bad_request(str(exc))
    # A value that matches no member of a union (`content: str | list[part]`) fails once per
    # member; the deepest failure is the specific one (`content.0.text: Field required`), and
    # failures at the same depth are the alternatives (`content: a valid string or a valid list`).
    depth = max(len(e.get("loc", ())) for e in errors)
    deepest = [e for e in errors if len(e.get("loc", ())) == depth]
    err = deepest[0]
    loc = _field_path(err.get("loc", ()))
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        msg = "unknown field; the server does not support it (check the spelling of extra_body keys)"
    else:
        msgs = [e.get("msg", "invalid value") for e in deepest if _field_path(e.get("loc", ())) == loc]
        msg = " or ".join(dict.fromkeys(msgs[:1] + [m.removeprefix("Input should be ") for m in msgs[1:]]))
    others = {tuple(_field_path(e.get("loc", ()))) for e in errors}
    others = {o for o in others if tuple(loc[: len(o)]) != o}  # not this field or a union around it
    more = f" (and {len(others)} more problem{'s' if len(others) > 1 else ''})" if others else ""
    return bad_request(f"{param or 'request'}: {msg}{more}", param=param)


def _field_path(loc: Any) -> list[str]:
    """A pydantic error location without the union-member tags it inserts (`str`,
    `list[...]`, `TextPart`, a tagged union's tag repeated before its field)."""
    out: list[str] = []
    for p in loc:
        if p in ("body", "query", "path"):
            continue
        if isinstance(p, str) and ("[" in p or p[:1].isupper() or p in ("str", "int", "float", "bool")):
            continue
        if out and isinstance(p, str) and p == out[-1]:
            continue
        out.append(str(p))
    return out


# ----------------------------------------------------------------------------- request
class _Strict(BaseModel):
    # strict: a wrong JSON type is a 400, never coerced ("yes" -> True, true -> 1, "7" -> 7)
    # allow_inf_nan: `1e999` parses to inf; no option of ours means anything at infinity
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions` body (standard fields + UHR-BAT extensions)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI documents (and torch accepts)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    # UHR-BAT extensions (extra_body)
    budgets: list[Any] | str | None = None  # checked by the one budget parser (parse_budgets)
    selector: str | None = None  # a registered selector (`uhrbat.selectors`), checked by the service
    kmeans_clusters: int | None = Field(None, ge=0)
    kmeans_iters: int | None = Field(None, ge=0)
    kmeans_mode: Literal["fast", "exact"] | None = None
    encode: Literal["full", "gated"] | None = None
    gate_margin: float | None = Field(None, gt=0)
    repetition_penalty: float | None = Field(None, gt=0)
    return_tokens: bool = False

    def check_supported(self) -> None:
        """Standard fields the server accepts syntactically but cannot honour -> 400."""
        if self.n not in (None, 1):
            raise bad_request("n > 1 is not supported; send one request per answer", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported; use extra_body={{'repetition_penalty': 1.1}}", name)
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise bad_request("tools / function calling are not supported", "tools")
        if self.response_format not in (None, {"type": "text"}):
            raise bad_request("response_format other than text is not supported", "response_format")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise bad_request("stop takes up to 4 non-empty strings", "stop")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


# ----------------------------------------------------------------------------- response
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    """Non-streamed answer; `uhrbat` is the extension field (cache, timings, kept tokens)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    uhrbat: dict[str, Any] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    uhrbat: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "uhrbat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


__all__ = [
    "APIError",
    "AssistantMessage",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Choice",
    "ChunkChoice",
    "Delta",
    "ImagePart",
    "Message",
    "ModelCard",
    "ModelList",
    "TextPart",
    "Usage",
    "bad_request",
    "validation_error",
]
