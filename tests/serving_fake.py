"""A deterministic stand-in for `UhrBatPipeline` in the serving tests (test-only: no product
code knows it exists).

It offers what the server needs of a pipeline (`uhrbat.serving.limits.ServablePipeline`): a real
`UhrBatConfig` as `model.config` and `resolve(**options)` through the real `uhrbat.options` (the
server's limits are computed exactly as for the real model), `processor.tokenizer` and
`chat_batch`. `chat_batch` returns `AskResult`s whose answer, kept / merged tokens and relevance
depend only on the image size, the last question and the budgets. Generation is simulated token
by token (one token per character, `step_delay` seconds each) through the same transformers hooks
the real model uses: the streamer gets the prompt first and then each step's tokens, and the
stopping criteria end rows early (per-row bool tensor). `progress=` is called at every stage
boundary (`uhrbat.progress.STAGES`, `stage_delay` seconds each), as the real pipeline calls it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

from uhrbat.io.sources import open_image
from uhrbat.results import AskResult, KeptToken

EOS = 0  # the fake tokenizer's only special token


class CharTokenizer:
    """One token per character (id = code point); id 0 is EOS."""

    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS or not skip_special_tokens)


def last_question(messages: Sequence[dict[str, Any]]) -> str:
    content = messages[-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


class FakePipeline:
    def __init__(
        self,
        scales: Sequence[int] = (672, 1344, 2688, 4032),
        budgets: Sequence[int] = (8, 16, 24, 32),
        *,
        step_delay: float = 0.0,
        stage_delay: float = 0.0,
        answer_fn: Callable[[str], str] | None = None,
        **selection: Any,
    ) -> None:
        import torch

        from uhrbat.configuration.configuration_uhrbat import UhrBatConfig

        self.scales = list(scales)
        self.default_budgets = list(budgets)
        self.step_delay = step_delay
        self.stage_delay = stage_delay
        self.answer_fn = answer_fn or self.answer_for
        self.model = SimpleNamespace(
            config=UhrBatConfig(scales=list(scales), budgets=list(budgets)),
            generation_config=SimpleNamespace(eos_token_id=EOS, pad_token_id=EOS),
            dtype=torch.float32,
        )
        self.device = torch.device("cpu")
        self.selection = dict(selection)
        self.resolve(**self.selection)  # validate, as the real pipeline does
        self.processor = SimpleNamespace(tokenizer=CharTokenizer())
        self.calls: list[dict[str, Any]] = []
        self.batches: list[int] = []  # batch size of every chat_batch call
        self.last: AskResult | None = None
        self._scenes: set[Any] = set()
        self._lock = threading.Lock()

    def resolve(self, **options: Any) -> Any:
        from uhrbat.options import SelectionOptions

        given = {k: v for k, v in {**self.selection, **options}.items() if v is not None}
        return SelectionOptions.of(**given).resolve(self.model.config)

    @staticmethod
    def answer_for(question: str) -> str:
        return f"Fake answer: {len(question.split())} words asked."

    def tokens_for(self, budgets: Sequence[int]) -> list[KeptToken]:
        """Per scale: `budget - 1` kept tokens on a diagonal, plus one merged group of 6 cells."""
        toks: list[KeptToken] = []
        for s, b in zip(self.scales, budgets):
            g = s // 336
            n_cells = g * g * 576
            side = g * 24
            for i in range(max(0, b - 1)):
                k = (i * 7919) % side
                r, c = k, (k * 3 + i) % side
                t = (r // 24) * g + (c // 24)
                toks.append(
                    KeptToken(s, t, r % 24, c % 24, 1.0 - i / max(1, b), False, i, [t * 576 + (r % 24) * 24 + (c % 24)])
                )
            if b > 0:
                members = sorted({(n_cells // 2 + j * 25) % n_cells for j in range(6)})
                p = members[0]
                toks.append(KeptToken(s, p // 576, (p % 576) // 24, p % 24, 0.01, True, b, members))
        return toks

    def relevance(self) -> dict[int, Any]:
        import torch

        rel = {}
        for s in self.scales:
            g = s // 336
            yy, xx = torch.meshgrid(torch.arange(g * 24.0), torch.arange(g * 24.0), indexing="ij")
            m = torch.exp(-((xx - g * 8) ** 2 + (yy - g * 16) ** 2) / (2 * (g * 6.0) ** 2))
            rel[s] = m.reshape(g, 24, g, 24).permute(0, 2, 1, 3).reshape(g * g, 24, 24).contiguous()
        return rel

    # ------------------------------------------------------------------ API
    def ask(self, image: Any, question: str, max_new_tokens: int = 64, **kwargs: Any) -> AskResult:
        return self.chat(
            image,
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            max_new_tokens=max_new_tokens,
            **kwargs,
        )

    def chat(self, image: Any, messages: Sequence[dict[str, Any]], **kwargs: Any) -> AskResult:
        return self.chat_batch([image], [messages], **kwargs)[0]

    def chat_batch(
        self,
        images: Sequence[Any],
        conversations: Sequence[Sequence[dict[str, Any]]],
        *,
        max_new_tokens: int = 64,
        budgets: Sequence[int] | None = None,
        return_relevance: bool = False,
        streamer: Any = None,
        stopping_criteria: Any = None,
        progress: Callable[[str, dict], None] | None = None,
        **kwargs: Any,
    ) -> list[AskResult]:
        import torch

        def stage(name: str) -> None:
            if progress is not None:
                progress(name, {})
            if self.stage_delay:
                time.sleep(self.stage_delay)

        stage("load")
        sources = [open_image(im) for im in images]
        for name in ("tiles", "encode", "score", "group", "select", "prefill"):
            stage(name)
        budgets = list(budgets) if budgets is not None else list(self.default_budgets)
        tok = self.processor.tokenizer
        answers = [tok.encode(self.answer_fn(last_question(c))) + [EOS] for c in conversations]
        prompts = [sum(len(str(m["content"])) for m in c) for c in conversations]
        with self._lock:
            self.batches.append(len(images))
            for c, src in zip(conversations, sources):
                self.calls.append(
                    {
                        "question": last_question(c),
                        "turns": len(c),
                        "budgets": budgets,
                        "max_new_tokens": max_new_tokens,
                        "size": tuple(src.size),
                        **kwargs,
                    }
                )
            caches = []
            for src in sources:
                key = (tuple(src.size), tuple(budgets))
                caches.append("hit" if key in self._scenes else "miss")
                self._scenes.add(key)
        stage("decode")
        # Simulated greedy decoding: one character per step, EOS then padding when a row ends.
        n = len(images)
        ids = torch.zeros((n, 1), dtype=torch.long)  # a one-token "prompt"
        if streamer is not None:
            streamer.put(ids)
        out: list[list[int]] = [[] for _ in range(n)]
        unfinished = torch.ones(n, dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = torch.tensor(
                [answers[i][step] if unfinished[i] and step < len(answers[i]) else EOS for i in range(n)]
            )
            for i in range(n):
                if unfinished[i]:
                    out[i].append(int(nxt[i]))
                    if nxt[i] == EOS:
                        unfinished[i] = False
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if stopping_criteria is not None:
                unfinished &= ~stopping_criteria(ids, None)
            if streamer is not None:
                streamer.put(nxt)
            if not unfinished.any():
                break
            if self.step_delay:
                time.sleep(self.step_delay)
        if streamer is not None:
            streamer.end()
        results = []
        for i, src in enumerate(sources):
            gen = [t for t in out[i] if t != EOS]
            res = AskResult(
                answer=tok.decode(gen).strip(),
                tokens=self.tokens_for(budgets),
                timings={
                    "load": 0.0,
                    "tiles": 0.0,
                    "encode": 0.0,
                    "score": 0.0,
                    "select": 0.0,
                    "prefill": 0.0,
                    "decode": 0.0,
                },
                num_visual_tokens=len(self.tokens_for(budgets)),
                image_size=tuple(src.size),
                scales=list(self.scales),
                generated_ids=gen,
                relevance=self.relevance() if return_relevance else None,
            )
            # contract-2 fields (set as attributes so this works before and after AskResult gains them)
            res.cache = caches[i]
            res.prompt_tokens = prompts[i] + sum(budgets)
            res.completion_tokens = len(gen)
            results.append(res)
        stage("done")
        self.last = results[-1]
        return results


__all__ = ["CharTokenizer", "FakePipeline"]


def demo_app(pipeline: Any = None, *, pipeline_factory: Any = None, model_name: str = "uhrbat", **page: Any) -> Any:
    """The demo app over `pipeline` with the demo's default settings (`page`: `DemoPage` options,
    `max_new_tokens` for the page's default answer length)."""
    from uhrbat.serving import ChatService
    from uhrbat.serving.demo import create_app, demo_options

    if "max_new_tokens" in page:
        page["default_max_new_tokens"] = page.pop("max_new_tokens")
    service = ChatService(pipeline, demo_options(model_name), pipeline_factory=pipeline_factory)
    return create_app(service, **page)


def route_paths(app: Any) -> set[str]:
    """Every path an app serves, included routers too (FastAPI includes them lazily)."""
    out: set[str] = set()
    for route in app.routes:
        inner = getattr(route, "original_router", None)
        out |= route_paths(inner) if inner is not None else {getattr(route, "path", None)}
    return out
