"""The lmms-eval plugin: request handling with the fake pipeline (always), and the real
lmms-eval registry + a tiny checkpoint (opt-in: `pytest -m lmms_eval` in an environment with
lmms-eval and a matching torch/torchvision)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from test_eval_support import png_bytes
from uhrbat.evaluation import lmms_plugin


def _image():
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png_bytes()))


def _plugin(monkeypatch, **kw):
    monkeypatch.setenv("UHRBAT_PIPELINE_CLASS", "test_eval_support:FakePipeline")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    m = lmms_plugin.UhrBatLmms(pretrained="tiny", device="cpu", batch_size=2, budgets="8:16", **kw)
    docs = {0: {"q": 0}, 1: {"q": 1}, 2: {"q": 2}}
    m.task_dict = {"t": {"test": docs}}
    return m


def test_generate_until_and_loglikelihood(monkeypatch):
    m = _plugin(monkeypatch)
    assert m.pipe.kwargs["budgets"] == [8, 16] and m.rank == 0 and m.world_size == 1
    reqs = [
        SimpleNamespace(
            args=(
                "<image>\nQ [[B. green]]",
                {"until": ["."], "max_new_tokens": 4},
                lambda d: [_image()],
                i,
                "t",
                "test",
            )
        )
        for i in range(3)
    ]
    assert m.generate_until(reqs) == ["B", "B", "B"]  # cut at the `until` string
    assert ("ask_batch", 2) in m.pipe.calls
    ll = m.loglikelihood(
        [
            SimpleNamespace(args=("<image>\nQ [[B]]", "B", lambda d: [_image(), _image()], 0, "t", "test")),
            SimpleNamespace(args=("Q [[B]]", lambda d: "CC", lambda d: [_image()], 1, "t", "test")),
        ]
    )
    assert ll == [(-1.0, True), (-2.0, False)]


@pytest.mark.lmms_eval
def test_real_lmms_eval_registry_with_tiny_model(tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from uhrbat.testing import make_tiny_checkpoint

    monkeypatch.delenv("UHRBAT_PIPELINE_CLASS", raising=False)
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", scales=[672, 1344], budgets=[8, 16])
    reg = ModelRegistryV2()
    reg.register_manifest(lmms_plugin.manifest())
    cls = reg.get_model_class("uhrbat")
    m = cls(pretrained=str(ckpt), device="cpu", budgets="4,8", selector="topk")
    m.task_dict = {"t": {"test": {0: {}}}}
    (text,) = m.generate_until(
        [SimpleNamespace(args=("<image>\nWhat is it?", {"max_new_tokens": 3}, lambda d: [_image()], 0, "t", "test"))]
    )
    assert isinstance(text, str)
    ((ll, greedy),) = m.loglikelihood(
        [SimpleNamespace(args=("What is it?", "A", lambda d: [_image()], 0, "t", "test"))]
    )
    assert ll <= 0.0 and isinstance(greedy, bool)
