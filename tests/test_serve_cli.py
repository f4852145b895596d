"""`uhrbat serve` wires the shared options, the engine and the server settings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")


def test_serve_command_wiring(monkeypatch, tmp_path) -> None:
    import uhrbat.pipeline
    import uhrbat.serving.http_server as serving_server
    from serving_fake import FakePipeline, route_paths
    from uhrbat.cli.main import app

    loaded, served = {}, {}

    def fake_from_pretrained(model, **kw):
        loaded.update(model=model, **{k: v for k, v in kw.items() if v is not None})
        selection = ("budgets", "selector", "kmeans_clusters", "kmeans_iters", "seed", "kmeans_mode")
        return FakePipeline(**{k: kw[k] for k in selection if kw.get(k) is not None})

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
    # the start-up banner says what will run, checkpoint defaults filled in, and every limit
    banner = r.output
    assert "model loaded in" in banner and "some/ckpt on cpu (float32), scales 672,1344,2688,4032" in banner
    assert "selection: budgets 1,2,3,4, selector kmeans (clusters the scale's budget, <= 3 iterations, seed 0" in banner
    work = sum(b * (s // 336) ** 2 * 576 * 3 for b, s in zip((1, 2, 3, 4), (672, 1344, 2688, 4032)))
    assert f"K-Means work {work:,} per request" in banner
    assert "requests: body <= 1 MiB (--max-request-mb), <= 512 MiB in flight, image <= 256,000,000 pixels" in banner
    assert "deadline 120 s" in banner and "connections: <= 128, request head within 10 s" in banner
    routes = route_paths(served["app"])
    assert {"/v1/models", "/v1/chat/completions", "/health", "/metrics"} <= routes


def test_serve_refuses_a_kmeans_work_limit_below_its_own_defaults(monkeypatch, capsys) -> None:
    import uhrbat.pipeline
    import uhrbat.serving.http_server as serving_server
    from serving_fake import FakePipeline
    from uhrbat.cli.main import main

    monkeypatch.setattr(uhrbat.pipeline.UhrBatPipeline, "from_pretrained", staticmethod(lambda *a, **k: FakePipeline()))
    monkeypatch.setattr(serving_server, "serve", lambda *a, **k: pytest.fail("must not serve"))
    with pytest.raises(SystemExit) as e:
        main(["serve", "--max-kmeans-work", "1000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --max-kmeans-work 1,000 is below the work of the server's own" in err


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
