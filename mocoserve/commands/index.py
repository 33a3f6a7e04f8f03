"""`mocoserve embed` and `mocoserve search`: the index from the command line (no training code)."""

from __future__ import annotations

import json
import os
import sys
import time
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
    PARQUET_MODULES,
    BatchSizeOpt,
    DeviceOpt,
    IndexArg,
    KOpt,
    ModelOpt,
    QuietOpt,
    WorkersOpt,
    check_loading,
    guarded,
    needs,
)
from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text, shown
from mocoserve.core.streams import STALL_SECONDS

app = typer.Typer()

MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-index-memory",
        help="RAM the index may take, e.g. 256M or 4G: auto then picks the most exact index "
        "that fits (Flat, IVF-Flat, IVF-SQ8, OPQ + IVF-PQ re-ranked from the store). "
        "Remembered by the index.",
        show_default="no limit, or as the index has it",
    ),
]
RecallOpt = Annotated[
    float | None,
    typer.Option(
        "--recall-target",
        help="recall@10 (against exact search) that search settings are tuned to. Remembered.",
        show_default="0.95, or as the index has it",
    ),
]
OnDiskOpt = Annotated[
    bool | None,
    typer.Option(
        "--on-disk/--in-memory",
        help="Keep the IVF inverted lists in a file beside the index, memory-mapped to "
        "search (an index larger than RAM). Remembered.",
        show_default="in-memory, or as the index has it",
    ),
]


@app.command()
def embed(
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image folders (searched recursively), or tar shards: files, brace patterns "
            "('shards/shard-{000000..000127}.tar'), a folder of shards or its shards.json, "
            "pipe: commands ('pipe:aws s3 cp s3://bucket/shard-000001.tar -').",
            show_default=False,
        ),
    ],
    index: Annotated[Path, typer.Option("--index", "-i", help="Index file to create or update.")],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Model package folder (made by export); needed for a new index.",
            show_default="the index's model",
        ),
    ] = None,
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
    max_index_memory: MemoryOpt = None,
    recall_target: RecallOpt = None,
    on_disk: OnDiskOpt = None,
    labels_from_folders: Annotated[
        bool | None,
        typer.Option(
            "--labels-from-folders/--no-labels",
            help="Label = top-level folder under IMAGES (the index remembers it: later runs "
            "keep labelling); --no-labels drops the labels. Default: as the index was made.",
        ),
    ] = None,
    label_key: Annotated[
        str | None,
        typer.Option(
            "--label-key",
            help="Tar shards: the json member's field holding the label (img2dataset's "
            "metadata). Default: the json's label, else the cls member.",
        ),
    ] = None,
    stream_timeout: Annotated[
        float,
        typer.Option(
            "--stream-timeout",
            help="pipe: shards: seconds a read may wait for the command's bytes before it is "
            "stopped and the shard recorded as failed.",
        ),
    ] = STALL_SECONDS,
    device: DeviceOpt = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 if any file could not be embedded.")
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="I/N: write shard I of N only, then stop (a SLURM array task); the last "
            "shard to finish builds the index (or: mocoserve index build).",
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            "--shards",
            help="Shards of a new index (default: one per process of the run); fixed once made.",
        ),
    ] = None,
    store_dtype: Annotated[
        str | None,
        typer.Option(
            "--store-dtype",
            help="float32 | float16 vectors on disk (new index).",
            show_default="float32",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Embed image folders or tar shards into a FAISS index and its store; reruns do only
    what changed (a tar shard of the same size and mtime is skipped).

    One process, `torchrun --nproc_per_node N -m mocoserve embed ...` (each rank its shards,
    rank 0 builds), or `--shard I/N` per task of a SLURM array.
    """

    def work() -> int:
        from mocoserve.ingest.embed import embed_folders, parse_shard

        check_loading(batch_size, workers)

        rank = int(os.environ.get("RANK", "0"))
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        which = parse_shard(shard) if shard is not None else None
        console = Console(stderr=True, quiet=quiet, soft_wrap=True)
        bar = not (quiet or distributed)  # under torchrun: a line per rank now and then
        progress = Progress(
            TextColumn("[bold]embed"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            disable=not bar,
        )
        task: dict = {"done": 0, "last": 0.0}
        who = f"rank {rank}: " if distributed else (f"shard {shard}: " if shard else "")

        def on_start(todo: int, provider: str) -> None:
            console.print(
                f"{who}model {escape(shown(model)) if model else '(from the index)'} on "
                f"{provider}; {todo} to embed"
            )
            task.update(id=progress.add_task("embed", total=todo, rate=""), todo=todo)
            task["t0"] = time.monotonic()
            if bar:
                progress.start()

        def on_progress(n: int) -> None:
            task["done"] += n
            if bar:
                progress.advance(task["id"], n)
                speed = progress.tasks[0].speed
                progress.update(task["id"], rate=f"{speed:,.1f} img/s" if speed else "")
            elif not quiet and time.monotonic() - task["last"] > 10:
                task["last"] = time.monotonic()
                rate = task["done"] / max(time.monotonic() - task["t0"], 1e-9)
                console.print(f"{who}{task['done']}/{task['todo']} ({rate:,.1f} img/s)")

        try:
            summary = embed_folders(
                images,
                model,
                index,
                batch_size=64 if batch_size is None else batch_size,
                workers=workers,
                index_type=index_type,
                max_index_memory=max_index_memory,
                recall_target=recall_target,
                on_disk=on_disk,
                labels_from_folders=labels_from_folders,
                device=device or "auto",
                on_start=on_start,
                on_progress=on_progress,
                shard=which,
                shards=shards,
                store_dtype=store_dtype,
                label_key=label_key,
                stream_timeout=stream_timeout,
            )
        except KeyboardInterrupt:
            progress.stop()
            print(
                f"interrupted: what was embedded is kept in {index}'s store; "
                "run the same command again to finish",
                file=sys.stderr,
            )
            return 130
        finally:
            progress.stop()
        if rank != 0:
            return 0
        print_summary(index, summary, distributed or len(summary.shards) > 1)
        return 1 if strict and summary.failures else 0

    code = guarded(work)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank, done: see exit_worker
        from mocoserve.core.processes import exit_worker

        exit_worker(code or 0)
    if code:
        raise typer.Exit(code)


def _display_path(path: str) -> str:
    """A file's path relative to here; a tar item's key as it is (tar:<shard>//<member>)."""
    from mocoserve.core.tars import split_item_key

    return path if split_item_key(path) is not None else os.path.relpath(path)


def print_summary(index: Path, summary, per_shard: bool) -> None:
    """The run's result: failures, counts, per-shard and per-rank figures, the index."""
    out = Console(soft_wrap=True)
    for path, error in summary.failures[:20]:
        out.print(f"[yellow]failed[/] {escape(shown(path))}: {escape(shown(error))}")
    if len(summary.failures) > 20:
        out.print(f"... and {len(summary.failures) - 20} more (in the shards' failures tables)")
    for note in summary.notes:
        out.print(f"note: {escape(shown(note))}")
    if per_shard:
        table = Table("shard", "rank", "embedded", "skipped", "failed", "removed")
        for s in summary.shards:
            row = (s.shard, s.rank, s.embedded, s.skipped, s.failed, s.removed)
            table.add_row(*map(str, row))
        out.print(table)
        if len(summary.rates) > 1:
            rates = ", ".join(f"rank {r} {v:,.1f}" for r, v in sorted(summary.rates.items()))
            out.print(f"images/s per rank: {rates}")
    out.print(
        f"embedded {summary.embedded}, skipped {summary.skipped} (unchanged), "
        f"failed {summary.failed}, removed {summary.removed} "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s)"
    )
    if summary.relabelled or summary.unlabelled:  # unchanged files, so not embedded again
        why = "a label is the top-level folder under each folder given"
        if summary.unlabelled:
            why += "; to keep them, embed the folder above"
        out.print(
            f"labels: {summary.relabelled} relabelled, {summary.unlabelled} unlabelled ({why})"
        )
    if summary.stages and summary.embedded + summary.failed:
        s = summary.stages
        out.print(
            f"time in stages: decode wait {s['decode_wait']:.1f} s, model {s['embed']:.1f} s, "
            f"commit {s['commit']:.1f} s"
        )
    built = "" if summary.built or not per_shard else " (index not built by this run)"
    out.print(
        f"{escape(shown(index))}: {summary.total} images, {summary.labelled} labelled, "
        f"{summary.index_line or summary.factory}{built}"
    )


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
        import mocoserve.index.reader

        idx = mocoserve.index.reader.open(
            index, model=model, device=device or "auto", readonly=True
        )
        for q in queries:
            if not q.is_file():
                raise UserError(f"{q} is not a file")
        if len(idx) == 0:  # not the command's fault: a note (on stderr, for --json) and exit 0
            print(
                f"note: {index} holds no images; add some with mocoserve embed FOLDER --index "
                f"{index}",
                file=sys.stderr,
            )
            if as_json:
                empty = [{"query": str(q), "in_index": False, "results": []} for q in queries]
                json.dump(empty, sys.stdout, indent=2)
                sys.stdout.write("\n")
            return
        if label is not None:
            labels = idx.labels()
            if not labels:
                raise UserError(f"{index} has no labels; embed with --labels-from-folders")
            if label not in labels:
                shown_labels = ", ".join(labels[:10]) + (" ..." if len(labels) > 10 else "")
                raise UserError(f"label {label!r} is not in {index} (it has {shown_labels})")
        results = idx.search_images(queries, k, label)
        if as_json:
            payload = [
                {
                    "query": path_text(q),
                    "in_index": any(h.is_query for h in hits),
                    "results": [  # names as the service gives them (bytes not UTF-8: \xNN)
                        {"rank": r, **h.to_dict(), "path": path_text(h.path)}
                        for r, h in enumerate(hits, 1)
                    ],
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
                    escape(shown(h.label or "")),
                    escape(shown(_display_path(h.path))) + mark,
                )
            console.print(table)

    guarded(work)


index_app = typer.Typer(
    name="index",
    help="Build, check, migrate and export an index (made by embed).",
    no_args_is_help=True,
)


@index_app.command("build")
def build(
    index: IndexArg,
    index_type: Annotated[
        str | None,
        typer.Option("--index-type", help="auto | flat | ivf | hnsw | a FAISS factory string."),
    ] = None,
    max_index_memory: MemoryOpt = None,
    recall_target: RecallOpt = None,
    on_disk: OnDiskOpt = None,
) -> None:
    """Build the FAISS file from every shard (after --shard tasks), atomically.

    The options change (and are remembered as) what the index is built as; without them,
    the index is built as it was.
    """

    def work() -> None:
        from mocoserve.ann.planner import IndexChoice, parse_size
        from mocoserve.index.catalog import catalog_damage
        from mocoserve.index.dbfile import format_version
        from mocoserve.index.files import IndexFiles
        from mocoserve.index.formats import migrate
        from mocoserve.index.writer import IndexWriter, shards_done

        if format_version(IndexFiles(index).catalog) is None:
            damage = catalog_damage(index)
            raise UserError(
                damage or f"{index} is not an index (no {index}.db); make one with embed"
            )
        budget = parse_size(max_index_memory) if max_index_memory is not None else None
        choice = IndexChoice(index_type, budget, recall_target, on_disk)
        with IndexWriter(index) as writer:
            if format_version(IndexFiles(index).catalog) == 1:
                print(f"moved {migrate(index)} items to the sharded layout (no re-embedding)")
            done, _ = shards_done(index)
            if not done:
                print("note: some shards have not completed a pass; built from what they hold")
            writer.choose(choice)
            built = writer.build(verify=True)  # by hand: every vector read against its checksum
            for note in writer.notes:
                print(f"note: {note}")
        print(f"{index}: {built.items} images, {built.summary} (version {built.version})")

    guarded(work)


@index_app.command("info")
def info_command(
    index: IndexArg,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout, for scripts.")] = False,
    device: DeviceOpt = None,
) -> None:
    """What an index is: type, vectors, bytes in RAM and on disk, recall and settings as
    tuned, where it searches (GPUs)."""

    def work() -> None:
        import mocoserve.index.reader
        from mocoserve.ann.planner import show_size
        from mocoserve.index.store import ShardedStore

        idx = mocoserve.index.reader.open(index, device=device or "auto", readonly=True)
        try:
            if isinstance(idx.store, ShardedStore):
                idx.store.verify()  # what it reports is what the files hold, or it says not
            facts = {k: v for k, v in idx.info().items() if k != "labels"}
            facts["labels"] = len(idx.labels())
        finally:
            idx.close()
        if as_json:
            json.dump(facts, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return

        def size(key: str) -> str:
            return show_size(facts[key]) if facts.get(key) is not None else "-"

        where = f"{facts['gpus']} GPU(s), {facts['gpu_layout']}" if facts["gpus"] else "the CPU"
        tuned = "-"
        if facts.get("recall_at_10") is not None:
            tuned = f"{facts['recall_at_10']:.4f} (target {facts.get('recall_target') or '-'})"
        rows = [
            ("index", facts["index"]),
            ("type", facts["factory"] + (f"  ({facts['plan']})" if facts.get("plan") else "")),
            ("vectors", f"{facts['items']:,} x {facts['dim']}"),
            ("in RAM", size("ram_bytes")),
            ("on disk (lists)", size("disk_bytes") if facts["on_disk"] else "-"),
            ("memory budget", size("max_index_memory")),
            ("recall@10", tuned),
            ("nprobe", str(facts.get("nprobe") or "-")),
            ("efSearch", str(facts.get("ef_search") or "-")),
            ("re-rank", f"x{facts['k_factor']}" if facts["k_factor"] > 1 else "-"),
            ("queries/s", f"{facts['qps']:,.0f} (CPU)" if facts.get("qps") else "-"),
            ("search on", where),
            ("labels", str(facts["labels"])),
            ("shards", str(facts["shards"])),
        ]
        console = Console(soft_wrap=True)
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            console.print(f"{key:<{width}}  {escape(shown(str(value)))}")

    guarded(work)


@index_app.command("check")
def check_command(index: IndexArg) -> None:
    """Read every file of an index and list every problem found; change nothing.

    Exit 0: no problem; 1: problems (one line each, naming the file); 2: not an index.
    """

    def work() -> int:
        from mocoserve.index.check import check_index

        report = check_index(index)
        console = Console(soft_wrap=True)
        for problem in report.problems:
            console.print(f"[red]problem[/]: {escape(problem)}")
        for note in report.notes:
            console.print(f"note: {escape(note)}")
        checked = (
            f"{report.items:,} items in {report.shards} shard(s); vector rows checked: "
            f"{report.by_checksum:,} by checksum, {report.by_norm:,} by norm only"
        )
        if report.problems:
            console.print(f"{index}: {len(report.problems)} problem(s); {checked}")
            return 1
        console.print(f"{index}: no problems; {checked}")
        return 0

    code = guarded(work)
    if code:
        raise typer.Exit(code)


@index_app.command("migrate")
def migrate_command(index: IndexArg) -> None:
    """Move a format-1 index (vectors inside SQLite) to the sharded layout, keeping its ids."""

    def work() -> None:
        from mocoserve.index.catalog import FORMAT_VERSION
        from mocoserve.index.dbfile import format_version
        from mocoserve.index.files import IndexFiles
        from mocoserve.index.formats import migrate
        from mocoserve.index.writer import IndexWriter

        version = format_version(IndexFiles(index).catalog)
        if version is None:
            raise UserError(f"{index} is not an index (no {index}.db); make one with embed")
        if version == FORMAT_VERSION:
            print(f"{index} is already format {FORMAT_VERSION}; nothing to do")
            return
        with IndexWriter(index):
            moved = migrate(index)
        print(f"{index}: moved {moved} items to format {FORMAT_VERSION} (no re-embedding)")

    guarded(work)


@index_app.command("export")
def export_command(
    index: IndexArg,
    to: Annotated[Path, typer.Option("--to", help="A new folder for img_emb/ and metadata/.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="npy (img_emb/*.npy + metadata/*.parquet) | parquet (one file)."
        ),
    ] = "npy",
) -> None:
    """Write embeddings and metadata as autofaiss and clip-retrieval read them."""

    def work() -> None:
        needs("parquet", *PARQUET_MODULES, command="index export")
        from mocoserve.index.export import export_index
        from mocoserve.index.files import IndexFiles

        if not IndexFiles(index).catalog.is_file():
            raise UserError(f"{index} is not an index (no {index}.db); make one with embed")
        done = export_index(index, to, fmt)
        print(f"{to}: {done['items']} embeddings ({done['dim']}-d) in {done['files']} file(s)")

    guarded(work)
