"""What one request may cost the server, defined once: the settings (`ServeOptions`), the model
facts the limits are computed from (`ModelFacts`), the per-request deadline (`Deadline`), the
K-Means work estimate and the counter of request bytes in flight (`InFlight`).

Every limit names the flag that sets it in its error message, so a refused client (or the
operator reading the log) knows what to change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from uhrbat.errors import BudgetError, UhrBatError

MiB = 1024 * 1024

#: Largest request body by default. With every image spooled to disk as it arrives, the body cap
#: no longer bounds memory (the in-flight cap and the decoded-image slots do); it bounds how much
#: one client may make the server receive, store and hash. 128 MiB of JSON carries a 96 MB image:
#: a ~6,000 x 6,000 aerial PNG (the NEON PNGs in ../shared/assets are 2.7 bytes/px), a
#: ~15,000 x 15,000 JPEG (q90, ~0.4 bytes/px) or a tiled, compressed GeoTIFF/COG of that size.
#: Bigger scenes: `file://` URLs under `--allowed-local-media-path`, or raise `--max-request-mb`.
DEFAULT_MAX_REQUEST_MB = 128
#: Request bytes being received or answered at once (all requests together): beyond it new
#: bodies get 503 + Retry-After before they are read. Four maximum-size bodies by default.
DEFAULT_MAX_INFLIGHT_MB = 4 * DEFAULT_MAX_REQUEST_MB
#: The server's pixel limit for untrusted images: 16,000 x 16,000, the largest image the reader
#: decodes in full and resamples exactly like the reference (`uhrbat.io.EXACT_MAX_PIXELS` is the
#: same side, for the padded square). Far below the library's 1.5 GP default, because decoding
#: costs ~15-25 ns per pixel (README "Untrusted input"): 256 MP is a few seconds of one decode
#: slot, 1.5 GP would be half a minute.
SERVER_MAX_PIXELS = 16_000 * 16_000
#: JSON text of a request besides its spooled images (messages, options): a conversation that
#: fits the model's context is a few hundred KB; anything bigger is refused with a 413.
MAX_JSON_TEXT_BYTES = 16 * MiB
#: The largest budget a request may give for one scale. Any budget at or above a scale's token
#: count keeps every token of that scale, so this bound refuses nothing meaningful; it keeps
#: `2**63` from overflowing a tensor deep inside the model (issue 18, item 7).
MAX_BUDGET = 2**31 - 1


class RequestTimeout(UhrBatError):
    """A request ran past the server's `--request-timeout` (answered 504)."""


class RequestCancelled(Exception):
    """The client went away before its answer was ready (internal; never sent to a client)."""


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServeOptions:
    """Every `uhrbat serve` / `uhrbat demo` setting (the CLI flags), with the server defaults.

    `flags` maps a field to the flag that sets it, for error messages (the demo calls its body
    limit `--max-upload-mb`)."""

    model_name: str = "uhrbat"
    api_keys: tuple[str, ...] = ()  # empty: no authentication (loopback only, see `serve`)
    allowed_local_media_path: str | None = None
    # engine
    max_batch: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.02
    decode_workers: int = 2  # threads that read and decode images ahead of the model
    # request size and traffic
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * MiB
    max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_MB * MiB
    # per-request work
    max_new_tokens: int = 512  # default and upper limit of max_tokens / max_completion_tokens
    max_kmeans_clusters: int = 3000
    max_kmeans_iters: int = 100
    max_kmeans_work: int | None = None  # None: what the model's own default settings cost (see `kmeans_work`)
    max_pixels: int | None = SERVER_MAX_PIXELS  # None: the reader's default; 0: no limit
    request_timeout_s: float | None = 120.0  # None or 0: no deadline
    # connections (uvicorn)
    max_connections: int = 128
    header_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    retry_after_s: int = 2
    flags: Mapping[str, str] = field(
        default_factory=lambda: {
            "max_request_bytes": "--max-request-mb",
            "max_inflight_bytes": "--max-inflight-mb",
            "max_new_tokens": "--max-new-tokens",
            "max_kmeans_clusters": "--max-clusters",
            "max_kmeans_iters": "--max-iters",
            "max_kmeans_work": "--max-kmeans-work",
            "request_timeout_s": "--request-timeout",
            "read_timeout_s": "--read-timeout",
            "max_pixels": "--max-pixels",
        }
    )

    def flag(self, name: str) -> str:
        return self.flags.get(name, "--" + name.replace("_", "-"))

    def read_options(self) -> dict[str, Any]:
        """Keyword arguments for the untrusted reader."""
        return {} if self.max_pixels is None else {"max_pixels": self.max_pixels or None}

    def with_flags(self, **flags: str) -> ServeOptions:
        return replace(self, flags={**self.flags, **flags})

    def describe(self, kmeans_work: int | None = None) -> list[str]:
        """The limits, one line each, as the start-up banner shows them (`kmeans_work`: the
        K-Means work limit in force, when `max_kmeans_work` is left to the model's defaults)."""
        px = "reader default" if self.max_pixels is None else (f"{self.max_pixels:,}" if self.max_pixels else "none")
        timeout = f"{self.request_timeout_s:g} s" if self.request_timeout_s else "none"
        work = self.max_kmeans_work if self.max_kmeans_work is not None else kmeans_work
        work = "what the model's defaults cost" if work is None else f"{work:,}"
        return [
            f"requests: body <= {self.max_request_bytes / MiB:g} MiB ({self.flag('max_request_bytes')}), "
            f"<= {self.max_inflight_bytes / MiB:g} MiB in flight, image <= {px} pixels, "
            f"deadline {timeout}, max_tokens <= {self.max_new_tokens}",
            f"K-Means a client may ask for: clusters <= {self.max_kmeans_clusters}, "
            f"iterations <= {self.max_kmeans_iters}, work <= {work}",
            f"engine: batches of <= {self.max_batch}, queue <= {self.max_queue}, "
            f"{self.decode_workers} image-decoding threads",
            f"connections: <= {self.max_connections}, request head within {self.header_timeout_s:g} s, "
            f"body idle <= {self.read_timeout_s:g} s, keep-alive {self.keep_alive_s:g} s",
        ]


# ----------------------------------------------------------------------------- model facts
class ServablePipeline(Protocol):
    """What the server needs of a pipeline (`uhrbat.UhrBatPipeline` provides it).

    `model.config` (a `UhrBatConfig`: scales, token counts), `model.generation_config.eos_token_id`
    (when a row has ended), `processor.tokenizer` (decodes streamed token ids), `resolve(**options)`
    (the selection a call would run with: the pipeline's defaults and the checkpoint's filled in, a
    `uhrbat.options.ResolvedSelection`) and `chat_batch(images, conversations, ..., progress=...)`
    (`progress(stage, info)` at every stage boundary, `uhrbat.progress`)."""

    model: Any
    processor: Any

    def resolve(self, **options: Any) -> Any: ...

    def chat_batch(self, images: Sequence[Any], conversations: Sequence[Any], **kwargs: Any) -> list[Any]: ...


@dataclass(frozen=True)
class ModelFacts:
    """The facts about a served model that requests are checked against."""

    config: Any
    resolve: Callable[..., Any]  # `ServablePipeline.resolve`

    @classmethod
    def of(cls, pipeline: ServablePipeline) -> ModelFacts:
        return cls(pipeline.model.config, pipeline.resolve)

    @property
    def scales(self) -> list[int]:
        return list(self.config.scales)

    @property
    def default_budgets(self) -> list[int]:
        return list(self.resolve().budgets)

    def kmeans_work(self, selection: Mapping[str, Any], *, model_defaults: bool = False) -> int:
        """K-Means work of `selection` (defaults filled in): sum over scales of clusters x tokens
        x iterations, K as the selection runs it (`ResolvedSelection.clusters`, clamped to the
        scale's tokens). The image does not matter: every scale's token count is fixed by the
        pyramid (gated encoding can only lower it). 0 when the selector is not K-Means.
        `model_defaults`: fill in the checkpoint's values, not the pipeline's own defaults."""
        from uhrbat.options import SelectionOptions

        opts = SelectionOptions.of(**selection).resolve(self.config) if model_defaults else self.resolve(**selection)
        if opts.selector != "kmeans":
            return 0
        work = 0
        for scale, budget in zip(self.config.scales, opts.budgets):
            n = self.config.num_tokens(scale)
            work += min(max(1, opts.clusters(budget)), n) * n * opts.kmeans_iters
        return work

    def default_kmeans_work(self) -> int:
        """The work no request may exceed unless `--max-kmeans-work` says otherwise: that of the
        model config's own K-Means settings at its default budgets, or of the server's own
        defaults (`uhrbat serve --kmeans-clusters ...`) when those are heavier."""
        model_own = self.kmeans_work({"selector": "kmeans"}, model_defaults=True)
        return max(model_own, self.kmeans_work({"selector": "kmeans"}))


def check_budget_values(budgets: Sequence[int]) -> list[int]:
    """Parsed budgets, or a `BudgetError` for one above `MAX_BUDGET` (see there)."""
    for v in budgets:
        if v > MAX_BUDGET:
            raise BudgetError(
                f"budget {v} is larger than the largest accepted ({MAX_BUDGET}); any budget at or above "
                "a scale's token count keeps every token of that scale"
            )
    return list(budgets)


# ----------------------------------------------------------------------------- deadline
@dataclass(frozen=True)
class Deadline:
    """When a request must be done (monotonic clock); `seconds` None means never."""

    seconds: float | None
    at: float

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        seconds = seconds or None
        return cls(seconds, float("inf") if seconds is None else time.monotonic() + seconds)

    def left(self) -> float | None:
        return None if self.seconds is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def error(self, stage: str) -> RequestTimeout:
        return RequestTimeout(
            f"the request did not finish within the server's limit of {self.seconds:g} s (it was at stage "
            f"{stage!r}); ask for less work (smaller budgets, kmeans_clusters, max_tokens) or raise "
            "uhrbat serve --request-timeout"
        )

    def check(self, stage: str) -> None:
        if self.expired():
            raise self.error(stage)


# ----------------------------------------------------------------------------- bytes in flight
class InFlight:
    """Request-body bytes being received or answered, all requests together, capped: a request
    reserves its body size before it is read (`try_reserve`) and releases it when answered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def try_reserve(self, n: int) -> bool:
        with self._lock:
            if n > 0 and self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


__all__ = [
    "DEFAULT_MAX_INFLIGHT_MB",
    "DEFAULT_MAX_REQUEST_MB",
    "MAX_BUDGET",
    "MAX_JSON_TEXT_BYTES",
    "SERVER_MAX_PIXELS",
    "Deadline",
    "InFlight",
    "MiB",
    "ModelFacts",
    "RequestCancelled",
    "RequestTimeout",
    "ServablePipeline",
    "ServeOptions",
    "check_budget_values",
]
