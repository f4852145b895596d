"""`uhrbat demo` is registered and wires the model, budgets and server options."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")


def test_demo_command_wiring(monkeypatch) -> None:
    import uhrbat.pipeline
    import uhrbat.serving.http_server as serving_server
    from serving_fake import FakePipeline, route_paths
    from uhrbat.cli.main import app

    loaded, served = {}, {}

    def fake_from_pretrained(model, device="cpu", dtype=None, **kw):
        loaded.update(model=model, device=device, dtype=dtype, **{k: v for k, v in kw.items() if v is not None})
        return FakePipeline()

    monkeypatch.setattr(uhrbat.pipeline.UhrBatPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(
        serving_server, "serve", lambda app, options, host, port: served.update(app=app, host=host, port=port)
    )
    r = CliRunner().invoke(
        app, ["demo", "--model", "some/ckpt", "--budgets", "1,2,3,4", "--port", "8123", "--clusters", "5"]
    )
    assert r.exit_code == 0, r.output
    assert loaded == {
        "model": "some/ckpt",
        "device": "cpu",
        "dtype": None,
        "budgets": [1, 2, 3, 4],
        "kmeans_clusters": 5,
    }
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    routes = route_paths(served["app"])
    assert {"/", "/api/ask", "/api/result/{key}/overlay.png", "/v1/chat/completions", "/health"} <= routes


def test_demo_help_lists_options() -> None:
    from uhrbat.cli.main import app

    r = CliRunner().invoke(app, ["demo", "--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--budgets", "--clusters", "--iters", "--selector", "--host", "--port", "--max-pixels"):
        assert opt in r.output
