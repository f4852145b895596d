"""`uhrbat serve` wires the shared options, the engine and the server settings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")


def test_serve_command_wiring(monkeypatch, tmp_path) -> None:
    import uhrbat.pipeline
    import uhrbat.serving.server as serving_server
    from serving_fake import FakePipeline, route_paths
    from uhrbat.cli.main import app

    loaded, served = {}, {}

    def fake_from_pretrained(model, **kw):
        loaded.update(model=model, **{k: v for k, v in kw.items() if v is not None})
        return FakePipeline()

    def fake_serve(app, options, host, port):
        served.update(app=app, options=options, host=host, port=port)

    monkeypatch.setattr(uhrbat.pipeline.UhrBatPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    monkeypatch.setattr(serving_server, "serve", fake_serve)
    monkeypatch.setenv("UHRBAT_API_KEY", "from-env")
    r = CliRunner().invoke(
        app,
        [
            "serve",
            "--model",
            "some/ckpt",
            "--budgets",
            "1,2,3,4",
            "--iters",
            "3",
            "--port",
            "8123",
            "--max-batch",
            "2",
            "--max-queue",
            "5",
            "--max-request-mb",
            "1",
            "--allowed-local-media-path",
            str(tmp_path),
            "--served-model-name",
            "geo",
        ],
    )
    assert r.exit_code == 0, r.output
    assert loaded["model"] == "some/ckpt" and loaded["budgets"] == [1, 2, 3, 4] and loaded["kmeans_iters"] == 3
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    options = served["options"]
    assert options.api_keys == ("from-env",) and options.model_name == "geo"
    assert options.max_request_bytes == 1024 * 1024 and options.allowed_local_media_path == str(tmp_path)
    assert options.max_batch == 2 and options.max_queue == 5
    routes = route_paths(served["app"])
    assert {"/v1/models", "/v1/chat/completions", "/health", "/metrics"} <= routes


def test_serve_rejects_bad_options_before_loading(monkeypatch) -> None:
    import uhrbat.pipeline
    from uhrbat.cli.main import app

    monkeypatch.setattr(
        uhrbat.pipeline.UhrBatPipeline,
        "from_pretrained",
        staticmethod(lambda *a, **k: pytest.fail("the model must not load")),
    )
    for args, needle in (
        (["--budgets", "1,x"], "--budgets"),
        (["--max-batch", "0"], "--max-batch"),
        (["--allowed-local-media-path", "/no/such/dir"], "--allowed-local-media-path"),
    ):
        r = CliRunner().invoke(app, ["serve", *args])
        assert r.exit_code == 2 and needle in r.output, r.output
