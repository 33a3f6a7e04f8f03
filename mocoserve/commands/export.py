"""`mocoserve export` (imports export lazily) and `mocoserve info` (serving path only)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mocoserve.commands.options import EXPORT_MODULES, guarded, needs
from mocoserve.core.errors import UserError

app = typer.Typer()

ModelArg = Annotated[Path, typer.Argument(help="Model package folder (made by export).")]


@app.command()
def export(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="Training checkpoint (.pt); or give --weights.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Package folder to write.")] = Path(
        "model"
    ),
    output: Annotated[
        str, typer.Option("--output", help="backbone (pre-projection) or head features.")
    ] = "backbone",
    input_size: Annotated[
        int | None,
        typer.Option(
            "--input-size", help="Input px (default: the training size, or the weights')."
        ),
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 18,
    formats: Annotated[
        str, typer.Option("--format", help="Comma-separated: onnx,torchscript.")
    ] = "onnx,torchscript",
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Also write encoder.fp16.onnx (for GPU serving).")
    ] = False,
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights",
            help="A pretrained state dict (.pth, .pt, .safetensors) to package instead of a "
            "checkpoint; needs --arch.",
        ),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="With --weights: a torchvision ResNet or timm:<name>."),
    ] = None,
    weights_name: Annotated[
        str | None,
        typer.Option(
            "--weights-name",
            help="With --weights: the torchvision entry it is, e.g. ResNet50_Weights.IMAGENET1K_V2 "
            "(else found from the file's name or hash).",
        ),
    ] = None,
    resize: Annotated[
        int | None, typer.Option("--resize", help="With --weights: shorter side before the crop.")
    ] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="With --weights: R,G,B.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="With --weights: R,G,B.")] = None,
    interpolation: Annotated[
        str | None,
        typer.Option("--interpolation", help="With --weights: bilinear or bicubic resize."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="With --weights: model.timm_kwargs={...} or model.small_stem=true (repeatable).",
        ),
    ] = None,
) -> None:
    """Fold a checkpoint's query encoder, or a pretrained weights file, into a verified package."""

    def work() -> None:
        needs("train", *EXPORT_MODULES, command="export")
        from mocoserve.export.package import ExportError, export_checkpoint

        format_list = tuple(f.strip() for f in formats.split(",") if f.strip())
        weights_only = {
            "--arch": arch,
            "--weights-name": weights_name,
            "--resize": resize,
            "--mean": mean,
            "--std": std,
            "--interpolation": interpolation,
            "--set": overrides,
        }
        try:
            if weights is None:
                if checkpoint is None:
                    raise UserError("export takes a checkpoint, or --weights FILE --arch ARCH")
                given = next((k for k, v in weights_only.items() if v), None)
                if given:
                    raise UserError(f"{given} is for --weights; a checkpoint knows its own")
                result = export_checkpoint(
                    checkpoint, out, output, input_size, opset, format_list, fp16
                )
            else:
                result = _export_weights(
                    weights,
                    checkpoint,
                    out,
                    output,
                    arch,
                    weights_name,
                    opset,
                    format_list,
                    fp16,
                    input_size,
                    resize,
                    mean,
                    std,
                    interpolation,
                    overrides or [],
                )
        except ExportError as e:
            print(f"error: {e}; package not written", file=sys.stderr)
            raise typer.Exit(1) from None
        for note in result.notes:
            print(note)
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


def _export_weights(
    weights: Path,
    checkpoint: Path | None,
    out: Path,
    output: str,
    arch: str | None,
    weights_name: str | None,
    opset: int,
    formats: tuple[str, ...],
    fp16: bool,
    input_size: int | None,
    resize: int | None,
    mean: str | None,
    std: str | None,
    interpolation: str | None,
    overrides: list[str],
) -> Any:
    """`export --weights`: the options checked and turned into export_weights' arguments."""
    from mocoserve.export.preprocess import PreprocessOptions, parse_triple
    from mocoserve.export.weights import export_weights
    from mocoserve.train.config import parse_set

    if checkpoint is not None:
        raise UserError("give a checkpoint or --weights, not both")
    if arch is None:
        raise UserError(
            "--weights needs --arch (a torchvision ResNet, e.g. resnet50, or timm:<name>)"
        )
    if output != "backbone":
        raise UserError("a weights file has no projection head: --output backbone only")
    options = PreprocessOptions(
        input_size=input_size,
        resize=resize,
        interpolation=interpolation,
        mean=parse_triple(mean, "--mean"),
        std=parse_triple(std, "--std"),
    )
    return export_weights(
        weights, arch, out, parse_set(overrides), options, weights_name, opset, formats, fp16
    )


@app.command()
def info(model: ModelArg) -> None:
    """Print a model package's manifest as a table, with each file's checksum verified."""

    def work() -> None:
        from mocoserve.model import file_status, read_manifest

        manifest = read_manifest(model)
        console = Console(soft_wrap=True)
        table = Table(title=str(model), show_header=False)
        pre = manifest.preprocess
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
            ("source", manifest.source_line()),
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
