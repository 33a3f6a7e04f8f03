"""`mocoserve embed` and `mocoserve search`: the index from the command line (no training code)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mocoserve.commands.options import (
    BatchSizeOpt,
    DeviceOpt,
    IndexArg,
    KOpt,
    ModelOpt,
    QuietOpt,
    WorkersOpt,
    guarded,
)
from mocoserve.core.errors import UserError
from mocoserve.core.files import shown

app = typer.Typer()


@app.command()
def embed(
    images: Annotated[list[Path], typer.Argument(help="Image folders (searched recursively).")],
    index: Annotated[Path, typer.Option("--index", "-i", help="Index file to create or update.")],
    model: ModelOpt = None,
    batch_size: BatchSizeOpt = None,
    workers: WorkersOpt = None,
    index_type: Annotated[
        str | None,
        typer.Option(
            "--index-type",
            help="auto | flat | ivf | hnsw | a FAISS factory string (default: auto for a new "
            "index, else the type it has).",
        ),
    ] = None,
    labels_from_folders: Annotated[
        bool | None,
        typer.Option(
            "--labels-from-folders/--no-labels",
            help="Label = top-level folder under IMAGES (the index remembers it: later runs "
            "keep labelling); --no-labels drops the labels. Default: as the index was made.",
        ),
    ] = None,
    device: DeviceOpt = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any file could not be embedded.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Embed image folders into a FAISS index + SQLite sidecar; reruns do only what changed."""

    def work() -> int:
        from mocoserve.embed import embed_folders

        if model is None and not Path(f"{index}.db").is_file():
            raise UserError("a new index needs --model (the package folder made by export)")
        console = Console(stderr=True, quiet=quiet, soft_wrap=True)
        progress = Progress(
            TextColumn("[bold]embed"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        )
        task = {}

        def on_start(todo: int, provider: str) -> None:
            console.print(f"model {model or '(from the index)'} on {provider}; {todo} to embed")
            task["id"] = progress.add_task("embed", total=todo, rate="")
            progress.start()

        def on_progress(n: int) -> None:
            progress.advance(task["id"], n)
            speed = progress.tasks[0].speed
            progress.update(task["id"], rate=f"{speed:,.1f} img/s" if speed else "")

        try:
            summary = embed_folders(
                images,
                model,
                index,
                batch_size=batch_size or 64,
                workers=workers,
                index_type=index_type,
                labels_from_folders=labels_from_folders,
                device=device or "auto",
                on_start=on_start,
                on_progress=on_progress,
            )
        except KeyboardInterrupt:
            progress.stop()
            print(
                f"interrupted: what was embedded is kept in {index}.db; "
                "run the same command again to finish",
                file=sys.stderr,
            )
            return 130
        finally:
            progress.stop()
        out = Console(soft_wrap=True)
        for path, error in summary.failures[:20]:
            out.print(f"[yellow]failed[/] {escape(shown(path))}: {escape(error)}", soft_wrap=True)
        if len(summary.failures) > 20:
            out.print(f"... and {len(summary.failures) - 20} more (table failures in {index}.db)")
        tuning = (
            f", nprobe {summary.nprobe} (recall@10 {summary.recall_at_10:.3f})"
            if summary.nprobe
            else ""
        )
        out.print(
            f"embedded {summary.embedded}, skipped {summary.skipped} (unchanged), "
            f"failed {summary.failed}, removed {summary.removed} "
            f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s)"
        )
        out.print(
            f"{index}: {summary.total} images, {summary.labelled} labelled, "
            f"{summary.factory}{tuning}"
        )
        return 1 if strict and summary.failures else 0

    code = guarded(work)
    if code:
        raise typer.Exit(code)


@app.command()
def search(
    index: IndexArg,
    queries: Annotated[list[Path], typer.Argument(help="Query image files.")],
    k: KOpt = 10,
    model: ModelOpt = None,
    label: Annotated[
        str | None, typer.Option("--label", help="Only return items with this label.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout, for scripts.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Print the indexed images nearest to each query image, with cosine scores."""

    def work() -> None:
        import mocoserve.index

        idx = mocoserve.index.open(index, model=model, device=device or "auto", readonly=True)
        for q in queries:
            if not q.is_file():
                raise UserError(f"{q} is not a file")
        if label is not None:
            labels = idx.sidecar.labels()
            if not labels:
                raise UserError(f"{index} has no labels; embed with --labels-from-folders")
            if label not in labels:
                shown_labels = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")
                raise UserError(f"label {label!r} is not in {index} (it has {shown_labels})")
        results = idx.search_images(queries, k, label)
        if as_json:
            payload = [
                {
                    "query": str(q),
                    "in_index": any(h.is_query for h in hits),
                    "results": [{"rank": r, **h.to_dict()} for r, h in enumerate(hits, 1)],
                }
                for q, hits in zip(queries, results, strict=True)
            ]
            json.dump(payload, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return
        console = Console(soft_wrap=True)
        for q, hits in zip(queries, results, strict=True):
            inside = " (in the index)" if any(h.is_query for h in hits) else ""
            table = Table(title=f"{escape(shown(q))}{inside}", title_justify="left")
            for column in ("rank", "score", "label", "path"):
                table.add_column(column, justify="right" if column in ("rank", "score") else "left")
            for r, h in enumerate(hits, 1):
                mark = "  ◀ the query" if h.is_query else ""
                table.add_row(
                    str(r),
                    f"{h.score:.4f}",
                    h.label or "",
                    escape(shown(os.path.relpath(h.path))) + mark,
                )
            console.print(table)

    guarded(work)
