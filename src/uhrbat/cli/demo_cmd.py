"""`uhrbat demo`: serve the local web demo (upload, question, budgets -> answer + overlay)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from uhrbat.errors import UhrBatError


def demo(
    model: str = typer.Option("RL-MIND/UHR-BAT", "--model", "-m", help="Checkpoint folder or hub id."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: checkpoint's)."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Default budgets per scale, e.g. 80,320,600,2000."),
    selector: Optional[str] = typer.Option(None, "--selector", help="kmeans | segments | topk."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (loopback by default)."),
    port: int = typer.Option(7860, "--port"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Default answer length limit on the page."),
    max_upload_mb: float = typer.Option(1024, "--max-upload-mb", help="Refuse bigger uploads."),
    max_pixels: int = typer.Option(1_500_000_000, "--max-pixels", help="Pixel limit per image (0 = none)."),
    overlay_side: int = typer.Option(1200, "--overlay-side", help="Long side of the overlay's image view (px)."),
) -> None:
    """Serve a local web page to upload an image, ask a question and see the answer with the overlay."""
    try:
        from uhrbat.serving.demo import create_app, parse_budget_field, serve
    except ImportError as e:  # fastapi / uvicorn / python-multipart missing
        raise UhrBatError(f"the demo needs fastapi, uvicorn and python-multipart ({e}); "
                          "pip install fastapi uvicorn python-multipart") from e
    from uhrbat.pipeline import UhrBatPipeline

    selection: dict[str, Any] = {}
    budget_list = parse_budget_field(budgets)
    if budget_list is not None:
        selection["budgets"] = budget_list
    if selector is not None:
        selection["selector"] = selector
    typer.echo(f"loading {model} on {device} ...", err=True)
    pipe = UhrBatPipeline.from_pretrained(model, device=device, dtype=dtype, **selection)
    app = create_app(pipe, model_name=model, default_budgets=budget_list, max_new_tokens=max_new_tokens,
                     max_upload_mb=max_upload_mb, max_pixels=max_pixels, overlay_max_side=overlay_side)
    typer.echo(f"UHR-BAT demo on http://{host}:{port}/  (Ctrl+C to stop)", err=True)
    serve(app, host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
