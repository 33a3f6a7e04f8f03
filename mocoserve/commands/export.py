"""`mocoserve export` (imports export lazily) and `mocoserve info` (serving path only)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mocoserve.commands.options import EXPORT_MODULES, guarded, needs

app = typer.Typer()

ModelArg = Annotated[Path, typer.Argument(help="Model package folder (made by export).")]


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Package folder to write.")] = Path(
        "model"
    ),
    output: Annotated[
        str, typer.Option("--output", help="backbone (pre-projection) or head features.")
    ] = "backbone",
    input_size: Annotated[
        int | None, typer.Option("--input-size", help="Input px (default: the training size).")
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 18,
    formats: Annotated[
        str, typer.Option("--format", help="Comma-separated: onnx,torchscript.")
    ] = "onnx,torchscript",
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Also write encoder.fp16.onnx (for GPU serving).")
    ] = False,
) -> None:
    """Fold a checkpoint's query encoder into a verified ONNX + TorchScript model package."""

    def work() -> None:
        needs("train", *EXPORT_MODULES, command="export")
        from mocoserve.export.package import ExportError, export_checkpoint

        try:
            result = export_checkpoint(
                checkpoint,
                out,
                output,
                input_size,
                opset,
                tuple(f.strip() for f in formats.split(",") if f.strip()),
                fp16,
            )
        except ExportError as e:
            print(f"error: {e}; package not written", file=sys.stderr)
            raise typer.Exit(1) from None
        parity = result.manifest.parity
        for name in ("onnx", "torchscript", "onnx_fp16"):
            if name in parity:
                p = parity[name]
                print(
                    f"{name}: max |diff| {p['max_abs_diff']:.2e}, min cosine {p['min_cosine']:.7f} "
                    f"(batches {', '.join(map(str, parity['batch_sizes']))})"
                )
        print(f"wrote {result.out} ({result.manifest.embedding_dim}-d {output} embeddings)")

    guarded(work)


@app.command()
def info(model: ModelArg) -> None:
    """Print a model package's manifest as a table, with each file's checksum verified."""

    def work() -> None:
        from mocoserve.model import file_status, read_manifest

        manifest = read_manifest(model)
        console = Console(soft_wrap=True)
        table = Table(title=str(model), show_header=False)
        source, pre = manifest.source, manifest.preprocess
        rows = [
            ("format version", manifest.format_version),
            (
                "embedding",
                f"{manifest.embedding_dim}-d {manifest.output} features"
                + (", L2-normalised" if manifest.normalized else ""),
            ),
            ("input", f"{manifest.input_size} px, {pre.input}"),
            (
                "preprocess",
                f"resize {pre.resize} ({pre.interpolation}), "
                f"centre crop {pre.crop}; mean/std folded into the graph",
            ),
            (
                "source",
                f"{source.get('method')} {source.get('arch')}, {source.get('epochs')} epochs "
                f"({source.get('checkpoint')}, sha256 {source.get('checkpoint_sha256', '')[:12]}…)",
            ),
        ]
        problems = 0
        for name, entry in manifest.files.items():
            extra = f", opset {entry['opset']}" if "opset" in entry else ""
            status = file_status(model, manifest, name)
            problems += status != "ok"
            rows.append((name, f"{entry.get('bytes', 0) / 1e6:.1f} MB{extra}, {status}"))
        for name, p in manifest.parity.items():
            if isinstance(p, dict):
                rows.append(
                    (
                        f"parity {name}",
                        f"max |diff| {p['max_abs_diff']:.2e}, min cosine {p['min_cosine']:.7f}",
                    )
                )
        rows.append(("created by", manifest.created_by or "?"))
        for key, value in rows:
            table.add_row(key, escape(str(value)))
        console.print(table)
        if problems:
            print(f"error: {problems} file(s) of {model} failed their check", file=sys.stderr)
            raise typer.Exit(1)

    guarded(work)
