"""A deterministic stand-in for `UhrBatPipeline` (tests, UI work without a model).

`FakePipeline().ask(image, question, ...)` returns an `AskResult` whose answer, kept / merged
tokens and relevance depend only on the image size, the question and the budgets.
"""

from __future__ import annotations

from typing import Any, Sequence

from uhrbat.io.images import open_image
from uhrbat.results import AskResult, KeptToken


class FakePipeline:
    def __init__(self, scales: Sequence[int] = (672, 1344, 2688, 4032),
                 budgets: Sequence[int] = (8, 16, 24, 32)) -> None:
        self.scales = list(scales)
        self.default_budgets = list(budgets)
        self.calls: list[dict[str, Any]] = []
        self.last: AskResult | None = None

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
                toks.append(KeptToken(s, t, r % 24, c % 24, 1.0 - i / max(1, b), False, i,
                                      [t * 576 + (r % 24) * 24 + (c % 24)]))
            if b > 0:
                members = sorted({(n_cells // 2 + j * 25) % n_cells for j in range(6)})
                p = members[0]
                toks.append(KeptToken(s, p // 576, (p % 576) // 24, p % 24, 0.01, True, b, members))
        return toks

    def ask(self, image: Any, question: str, max_new_tokens: int = 64, budgets: Sequence[int] | None = None,
            return_relevance: bool = False, **kwargs: Any) -> AskResult:
        import torch

        src = open_image(image)
        budgets = list(budgets) if budgets is not None else list(self.default_budgets)
        self.calls.append({"question": question, "budgets": budgets, "max_new_tokens": max_new_tokens,
                           "size": tuple(src.size), **kwargs})
        toks = self.tokens_for(budgets)
        rel = None
        if return_relevance:
            rel = {}
            for s in self.scales:
                g = s // 336
                yy, xx = torch.meshgrid(torch.arange(g * 24.0), torch.arange(g * 24.0), indexing="ij")
                m = torch.exp(-((xx - g * 8) ** 2 + (yy - g * 16) ** 2) / (2 * (g * 6.0) ** 2))
                rel[s] = m.reshape(g, 24, g, 24).permute(0, 2, 1, 3).reshape(g * g, 24, 24).contiguous()
        self.last = AskResult(
            answer=self.answer_for(question), tokens=toks,
            timings={"load": 0.0, "tiles": 0.0, "encode": 0.0, "score": 0.0, "select": 0.0, "prefill": 0.0,
                     "decode": 0.0},
            num_visual_tokens=len(toks), image_size=tuple(src.size), scales=list(self.scales),
            generated_ids=[], relevance=rel,
        )
        return self.last


__all__ = ["FakePipeline"]
