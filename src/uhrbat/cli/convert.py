"""`uhrbat convert`: reference-format checkpoint -> this package's format."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def convert(
    src: str = typer.Argument(..., help="Reference-format checkpoint folder or hub id (LlavaQwenForCausalLM)."),
    dst: Path = typer.Argument(..., help="Output folder (safetensors + configs + processor)."),
    vision_tower: Optional[str] = typer.Option(None, "--vision-tower", help="CLIP folder if the checkpoint lacks one."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16 (default: the checkpoint's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size"),
) -> None:
    """Convert a reference checkpoint; the result loads with `from_pretrained` / `uhrbat ask --model DST`."""
    from uhrbat.modeling.loading import load

    model, processor = load(src, dtype=dtype, vision_tower=vision_tower)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    processor.save_pretrained(dst)
    typer.echo(f"wrote {dst}", err=True)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
