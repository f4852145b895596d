"""`uhrbat convert`: reference-format checkpoint -> this package's format."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from uhrbat.cli import options as opt


def convert(
    src: str = typer.Argument(..., help="Reference-format checkpoint folder or hub id (LlavaQwenForCausalLM)."),
    dst: Path = typer.Argument(..., help="Output folder (safetensors + configs + processor)."),
    vision_tower: opt.VisionTower = None,
    dtype: opt.Dtype = None,
    max_shard_size: str = typer.Option("5GB", "--max-shard-size"),
) -> None:
    """Convert a reference checkpoint; the result loads with `from_pretrained` / `uhrbat ask --model DST`."""
    from uhrbat.modeling.loading import load

    model, processor = load(src, dtype=dtype, vision_tower=vision_tower)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    processor.save_pretrained(dst)
    follow_umask(dst.glob("*.safetensors"))
    typer.echo(f"wrote {dst}", err=True)


def follow_umask(paths) -> None:
    """Give files the permissions of any new file (0666 minus the umask): safetensors writes its
    files 0600, which other users of a shared checkpoint folder could not read."""
    mask = os.umask(0o022)  # read by setting; restored at once (the CLI is single-threaded here)
    os.umask(mask)
    for p in paths:
        os.chmod(p, 0o666 & ~mask)


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
