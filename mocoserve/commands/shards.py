"""`mocoserve shards`: an image folder written as WebDataset tar shards (serving path only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mocoserve.commands.options import QuietOpt, guarded
from mocoserve.core.files import shown

app = typer.Typer()


@app.command()
def shards(
    images: Annotated[Path, typer.Argument(help="Image folder (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards (made).")],
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Images per shard (the last may hold fewer).")
    ] = 10000,
    labels_from_folders: Annotated[
        bool,
        typer.Option(
            "--labels-from-folders",
            help="Label = top-level folder under IMAGES: a cls member (class index) and the "
            "class name in the json member; shards.json lists the classes.",
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace another shard set in --out (its files only)."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Write an image folder as tar shards (shard-000000.tar, ...): the original bytes, a cls
    and a json member per image, an index beside each shard and shards.json.

    Embed or train from them: mocoserve embed 'OUT/shard-{000000..000009}.tar' --index ...
    """

    def work() -> None:
        from mocoserve.core.shardwriter import write_shards

        console = Console(stderr=True, quiet=quiet, soft_wrap=True)
        progress = Progress(
            TextColumn("[bold]shards"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
        )
        task: dict = {}

        def on_start(total: int) -> None:
            task["id"] = progress.add_task("shards", total=total)
            progress.start()

        try:
            done = write_shards(
                images,
                out,
                shard_size=shard_size,
                labels_from_folders=labels_from_folders,
                overwrite=overwrite,
                on_start=on_start,
                on_progress=lambda n: progress.advance(task["id"], n),
            )
        finally:
            progress.stop()
        say = Console(soft_wrap=True)
        for path, reason in done.skipped[:20]:
            say.print(f"[yellow]skipped[/] {escape(shown(path))}: {escape(shown(reason))}")
        if len(done.skipped) > 20:
            say.print(f"... and {len(done.skipped) - 20} more")
        what = "already holds this folder's set: nothing written" if done.up_to_date else "wrote"
        classes = f", {len(done.classes)} classes" if done.classes else ""
        say.print(
            f"{escape(shown(done.out))}: {what} {len(done.shards)} shards, {done.samples} "
            f"images{classes}; skipped {len(done.skipped)} (unreadable or not images)"
        )

    guarded(work)
