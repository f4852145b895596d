"""lmms-eval model plugin: `lmms-eval --model uhrbat --model_args pretrained=PATH,...`.

lmms-eval (>= the `registry_v2` model registry) discovers models through the
`lmms_eval.models` entry-point group; the package declares::

    [project.entry-points."lmms_eval.models"]
    uhrbat = "uhrbat.evaluation.lmms_plugin:manifest"

`model_args`: `pretrained`, `device` (default `auto`: cuda:LOCAL_RANK or cpu), `dtype`,
`batch_size`, `budgets` ("80:320:600:2000"), `selector`, `clusters`, `iters`, `seed`,
`max_new_tokens` (default when the task sets none).

* `generate_until` sends the task's text (leading `<image>` markers removed) and its image to
  `UhrBatPipeline.ask_batch`, greedy unless the task asks for sampling, and cuts the answer
  at the task's `until` strings.
* `loglikelihood` uses `UhrBatPipeline.loglikelihood`, which selects visual tokens from the
  prompt alone: the continuation never leaks into token selection (the reference adapter's
  bug), the log-likelihood is a sum over continuation tokens and the greedy check is aligned
  to the continuation.

Images: one per request; several are pasted side by side (the pipeline takes one image per
question), as `uhrbat eval` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from PIL import Image

try:  # keep the module importable (and unit-testable) without lmms-eval installed
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # pragma: no cover - depends on the environment
    _LmmsBase = object

__all__ = ["UhrBatLmms", "manifest", "MODEL_ID"]

MODEL_ID = "uhrbat"
_LEADING_IMAGES = re.compile(r"^(?:\s*<image>\s*)+", re.IGNORECASE)


def manifest():
    """Entry point payload for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.UhrBatLmms")


def _ints(value: Any) -> list[int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(v) for v in re.split(r"[,:;|\s]+", str(value).strip("\"' ")) if v]


def _as_image(visuals: Sequence[Any]) -> Image.Image | str:
    flat: list[Any] = []
    for v in visuals:
        if isinstance(v, (list, tuple)):
            flat.extend(v)
        elif v is not None:
            flat.append(v)
    if not flat:
        raise ValueError("uhrbat needs an image for every request")
    if len(flat) == 1 and isinstance(flat[0], (str, os.PathLike)):
        return str(flat[0])
    images = []
    for v in flat:
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, (str, os.PathLike)):
            with Image.open(v) as im:
                images.append(im.convert("RGB"))
        else:
            raise TypeError(f"uhrbat takes image visuals only, got {type(v).__name__}")
    if len(images) == 1:
        return images[0]
    canvas = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def _question(context: str) -> str:
    return _LEADING_IMAGES.sub("", context or "", count=1).lstrip("\n")


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


class UhrBatLmms(_LmmsBase):  # type: ignore[misc, valid-type]
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str | None = None,
        batch_size: int | str = 1,
        budgets: Any = None,
        selector: str | None = None,
        clusters: int | str | None = None,
        iters: int | str | None = None,
        seed: int | str | None = None,
        max_new_tokens: int | str = 512,
        **kwargs: Any,
    ) -> None:
        if _LmmsBase is not object:
            super().__init__()
        from uhrbat.evaluation.runner import dist_info
        from uhrbat.factory import load_pipeline, pick_device

        self._rank, self._world_size, local = dist_info()
        self.batch_size_per_gpu = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self.pipe = load_pipeline(
            str(pretrained),
            device=pick_device(device, local),
            dtype=dtype,
            budgets=_ints(budgets),
            selector=selector,
            kmeans_clusters=int(clusters) if clusters not in (None, "") else None,
            kmeans_iters=int(iters) if iters not in (None, "") else None,
            seed=int(seed) if seed not in (None, "") else None,
        )
        self.task_dict: dict = getattr(self, "task_dict", {})

    # lmms-eval reads these
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _doc(self, task: str, split: str, doc_id: Any) -> Any:
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests: list[Any]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            images, questions, kwargs_list = [], [], []
            for req in chunk:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args[:6]
                images.append(_as_image(doc_to_visual(self._doc(task, split, doc_id))))
                questions.append(_question(context))
                kwargs_list.append(dict(gen_kwargs or {}))
            gk = kwargs_list[0]
            until = gk.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            gen: dict[str, Any] = {}
            temperature = float(gk.get("temperature") or 0.0)
            if gk.get("do_sample") or temperature > 0:
                gen.update(do_sample=True, temperature=temperature)
                if gk.get("top_p") is not None:
                    gen["top_p"] = float(gk["top_p"])
            max_new = int(gk.get("max_new_tokens") or self.default_max_new_tokens)
            results = self.pipe.ask_batch(images, questions, max_new_tokens=max_new, **gen)
            out.extend(_cut(r.answer, until) for r in results)
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        res: list[tuple[float, bool]] = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args[:6]
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            image = _as_image(doc_to_visual(doc))
            ll, greedy = self.pipe.loglikelihood(image, _question(context), str(continuation))
            res.append((float(ll), bool(greedy)))
        return res

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("uhrbat does not support multi-round generation")
