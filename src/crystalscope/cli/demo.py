"""`crystalscope demo`: every stage on a small synthetic set."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from crystalscope.cli.app import app
from crystalscope.console import out

if TYPE_CHECKING:
    pass

@app.command(epilog="Example: crystalscope demo crystalscope-demo/")
def demo(
    folder: Annotated[Path | None, typer.Argument(
        help="New folder for everything the demo writes (default: a temporary folder).")]
    = None,
    per_class: Annotated[int, typer.Option(help="Synthetic crops per class.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Every stage on a small synthetic set: synth … train, evaluate, export, predict, index."""
    from crystalscope.demo import run_demo

    folder = folder or Path(tempfile.mkdtemp(prefix="crystalscope-demo-"))
    written = run_demo(folder, per_class=per_class, seed=seed, say=out.print)
    out.print("[bold]demo done[/bold]; it wrote:")
    for name, path in written.items():
        out.print(f"  {name}: {path}")
