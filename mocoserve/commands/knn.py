"""`mocoserve knn`: k-NN accuracy reports (serving path: onnxruntime, faiss, numpy, PIL)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mocoserve.commands.options import (
    BatchSizeOpt,
    DeviceOpt,
    ModelOpt,
    WorkersOpt,
    check_loading,
    guarded,
)
from mocoserve.core.files import shown

app = typer.Typer()


@app.command()
def knn(
    model: ModelOpt = None,
    train: Annotated[
        Path | None, typer.Option("--train", help="Labelled folder (class/image): the memory.")
    ] = None,
    val: Annotated[
        Path | None, typer.Option("--val", help="Labelled folder (class/image) to classify.")
    ] = None,
    train_index: Annotated[
        Path | None,
        typer.Option("--train-index", help="Reuse an index made by embed --labels-from-folders."),
    ] = None,
    k: Annotated[
        int | None, typer.Option("--k", "-k", help="Neighbours.", show_default="the preset's")
    ] = None,
    temperature: Annotated[  # -T as in train (and in the papers' exp(sim / T))
        float | None,
        typer.Option("--temperature", "-T", help="T in exp(sim / T).", show_default="the preset's"),
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--preset", help="dino (k=20, T=0.07, also k=10/100/200) | moco (k=200, T=0.1)."
        ),
    ] = "dino",
    loo: Annotated[
        bool,
        typer.Option("--loo", help="Leave-one-out on --train (each image's own match excluded)."),
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("report"),
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    batch_size: BatchSizeOpt = None,
) -> None:
    """Weighted k-NN accuracy of a model package: report.json, report.md and two PNGs."""

    def work() -> None:
        from mocoserve.report import run_knn

        check_loading(batch_size, workers)
        report = run_knn(
            model,
            train,
            val,
            out,
            train_index,
            k,
            temperature,
            preset,
            loo,
            device or "auto",
            workers,
            64 if batch_size is None else batch_size,
        )
        for note in report.figures["notes"]:
            print(f"note: {shown(note)}")
        print_summary(report.figures)
        console = Console(soft_wrap=True)
        for name, path in report.files.items():
            console.print(f"{name:>10}: {escape(shown(path))}")

    guarded(work)


def print_summary(f: dict) -> None:
    """The terminal table: accuracy for each k, then the weakest classes."""
    c = f["counts"]
    title = (
        f"k-NN (T={f['temperature']}) on {c['val']} images, {c['classes']} classes; "
        f"train {c['train']}"
    )
    console = Console(soft_wrap=True)
    console.print(title)
    table = Table()
    table.add_column("k", justify="right")
    table.add_column("top-1 %", justify="right")
    table.add_column("top-5 %", justify="right")
    for kk, v in f["by_k"].items():
        style = "bold" if int(kk) == f["k"] else None
        table.add_row(kk, f"{v['top1']:.2f}", f"{v['top5']:.2f}", style=style)
    console.print(table)
    weakest = sorted(f["per_class"], key=lambda p: p["top1"])[:5]
    if weakest and weakest[0]["top1"] < 100:
        console.print(
            "weakest classes: "
            + ", ".join(
                f"{escape(shown(p['class']))} {p['top1']:.1f}%" for p in weakest if p["top1"] < 100
            )
        )
