"""`mocoserve demo`: the whole pipeline on scikit-learn's digits, on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mocoserve.commands.options import (
    EXPORT_MODULES,
    TRAIN_MODULES,
    OutOpt,
    SeedOpt,
    check_loading,
    guarded,
    needs,
    workers_opt,
)

app = typer.Typer()


def invoked_as() -> str:
    """How this mocoserve was started, so printed hints run as they are (.venv/bin/mocoserve)."""
    first = Path(sys.argv[0])
    if first.name == "__main__.py":
        return f"{os.path.relpath(sys.executable)} -m mocoserve"
    if first.name == "mocoserve" and first.is_file():
        relative = os.path.relpath(first)
        return relative if os.sep in relative else "mocoserve"
    return "mocoserve"


@app.command()
def demo(
    out: OutOpt = Path("demo-output"),
    epochs: Annotated[
        int, typer.Option("--epochs", help="MoCo v2 epochs (about 12 s each on 2 cores).")
    ] = 20,
    seed: SeedOpt = None,
    workers: workers_opt("2") = None,
) -> None:
    """Train, export, embed and report on scikit-learn's digits: trained vs random weights."""
    from mocoserve.demo import run_demo

    def work():
        needs("train", *dict.fromkeys(TRAIN_MODULES + EXPORT_MODULES), command="demo")  # + export
        check_loading(None, workers)  # before the digits are written
        return run_demo(out, epochs, seed or 0, 2 if workers is None else workers)

    result = guarded(work)
    table = Table(title="k-NN top-1 on the digits val split (weighted k-NN, k=200, T=0.1)")
    table.add_column("network")
    table.add_column("top-1 %", justify="right")
    table.add_row("ResNet-18, random weights", f"{result.random_top1:.1f}")
    table.add_row(f"ResNet-18, MoCo v2 ({epochs} epochs)", f"{result.trained_top1:.1f}")
    console = Console(soft_wrap=True)
    console.print(table)
    console.print(f"images:      {result.train_dir}  {result.val_dir}")
    console.print(f"run:         {result.out / 'run'} (metrics.jsonl, tb/, config.yaml)")
    console.print(f"checkpoint:  {result.checkpoint}")
    console.print(f"model:       {result.model} (ONNX + TorchScript, manifest.json)")
    console.print(f"index:       {result.index} (+ .db catalog)")
    console.print(
        f"report:      {result.report}/report.md (random weights: {result.random_report})"
    )
    me = invoked_as()
    console.print(f"search:      {me} search {result.index} {result.val_dir}/3/*.png -k 5")
    console.print(f"app:         {me} app --index {result.index}  (http://127.0.0.1:7860)")
    console.print(f"took {result.minutes:.1f} min")
    if result.trained_top1 <= result.random_top1:
        console.print("[yellow]training did not beat random weights; try more --epochs[/yellow]")
