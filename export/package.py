"""Fold a checkpoint's query encoder into a model package: ONNX, TorchScript and a manifest.

The exported function takes float32 NCHW RGB in [0, 1] at the package's size and returns
L2-normalised embeddings; mean/std normalisation and BatchNorm are folded into the graph.
Both artefacts are checked against the PyTorch module before the package is written.
`write_package` is the shared half: `export_checkpoint` here and `export.weights` (a
pretrained state-dict file) each build the reference module and the manifest, then call it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mocoserve import __version__
from mocoserve.core.errors import UserError
from mocoserve.core.files import fsync_dir, fsync_file, public_mode
from mocoserve.core.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    ONNX_FP16_FILE,
    PACKAGE_FILES,
    SPEC_KEY,
    TORCHSCRIPT_FILE,
    Manifest,
    Preprocess,
    sha256_file,
)
from mocoserve.core.torchscript import quiet_torchscript
from mocoserve.train import checkpoint
from mocoserve.train.config import TrainConfig
from mocoserve.train.methods import get_spec
from mocoserve.train.models import has_batchnorm

PARITY_BATCH_SIZES = (1, 2, 7, 64)
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 4096
MIN_OPSET, MAX_OPSET = 18, 23  # the dynamo exporter's range
MIN_COSINE = 0.9999
MIN_COSINE_FP16 = 0.999
FORMATS = ("onnx", "torchscript")
FORMAT_NAMES = {"onnx": "ONNX", "torchscript": "TorchScript", "onnx_fp16": "fp16 ONNX"}


class ExportError(Exception):
    """The exported artefacts do not reproduce the PyTorch module (exit code 1)."""


class EmbeddingModel(nn.Module):
    """[0, 1] RGB N x 3 x S x S -> N x D L2-normalised embeddings, preprocessing inside."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module | None, mean: list[float], std: list[float]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        return F.normalize(self.head(self.backbone(x)), dim=1)


class HalfPrecision(nn.Module):
    """The same function with fp16 weights and arithmetic; float32 in and out (for GPUs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half().eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.half()).float()


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # one line each, for the CLI to print


def embedding_model(ckpt: dict[str, Any], output: str) -> tuple[EmbeddingModel, TrainConfig]:
    """The checkpoint's query encoder as an eval-mode EmbeddingModel (plain BatchNorm)."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    method = get_spec(cfg.method.name).cls
    if not method.trains_encoder:
        raise UserError(
            f"this is a {cfg.method.name} checkpoint, not a pretraining one; export the "
            "pretraining checkpoint"
        )
    cfg.model.bn_splits = 1  # SplitBatchNorm is BatchNorm2d in eval mode, with the same keys
    encoder = method.build_encoder(cfg)  # the method's own network (moco-v3: its two MLPs)
    encoder.load_state_dict(checkpoint.query_encoder_state(ckpt))
    head = encoder.head if output == "head" else None
    model = EmbeddingModel(encoder.backbone, head, list(cfg.data.mean), list(cfg.data.std))
    return model.eval(), cfg


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv+BN pairs folded into the convolutions (torch.fx), for eval-mode inference.

    A net without BatchNorm (a ViT, a ConvNeXt) has nothing to fold and is returned as it
    is; so is one torch.fx cannot trace: the unfused module computes the same function.
    """
    from torch.fx.experimental.optimization import fuse

    if not has_batchnorm(model):
        return model
    try:
        return fuse(model)
    except Exception:  # fx tracing fails on data-dependent Python control flow
        return model


def _why(error: BaseException) -> str:
    """The first line of an exporter's innermost error, without colour codes, kept short."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def _parity(run: Any, reference: nn.Module, size: int, seed: int = 0) -> dict[str, float]:
    """Max abs difference and min cosine between `run` and `reference` on random images."""
    g = torch.Generator().manual_seed(seed)
    worst_diff, worst_cos = 0.0, 1.0
    for n in PARITY_BATCH_SIZES:
        images = torch.rand(n, 3, size, size, generator=g)
        with torch.no_grad():
            expected = reference(images).numpy()
        got = np.asarray(run(images.numpy()), dtype=np.float32)
        if got.shape != expected.shape:
            raise ExportError(f"output shape {got.shape} at batch {n}, expected {expected.shape}")
        if not np.isfinite(expected).all():  # max()/min() below would pass NaN by
            raise UserError("the model's own outputs hold NaN or inf: its weights are damaged")
        if not np.isfinite(got).all():
            raise ExportError(f"the exported file's outputs hold NaN or inf at batch {n}")
        worst_diff = max(worst_diff, float(np.abs(got - expected).max()))
        cos = (got * expected).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12
        )
        worst_cos = min(worst_cos, float(cos.min()))
    return {"max_abs_diff": worst_diff, "min_cosine": worst_cos}


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """torch.export logs, and prints to stderr, a failed capture's whole graph; the ExportError
    says why in one line instead."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export_onnx(model: nn.Module, path: Path, size: int, opset: int, spec: str) -> None:
    """ONNX with a dynamic batch axis; the manifest's spec rides along in metadata_props."""
    import onnx

    example = (torch.rand(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_exporter_logs():
        program = torch.onnx.export(
            model,
            example,
            input_names=["images"],
            output_names=["embeddings"],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes={"images": {0: batch}},
            verbose=False,
        )
    program.save(str(path))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, spec
    onnx.save(proto, str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _export_torchscript(model: nn.Module, path: Path, size: int, spec: str) -> None:
    """Traced and frozen TorchScript; the manifest's spec rides along as an extra file."""
    example = torch.rand(2, 3, size, size)
    with torch.no_grad(), quiet_torchscript(), warnings.catch_warnings():
        # timm's shape asserts trace as constants; the parity check runs other batch sizes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.freeze(torch.jit.trace(model, example).eval())
    traced.save(str(path), _extra_files={SPEC_KEY: spec})


def check_options(
    output: str, formats: tuple[str, ...], fp16: bool, input_size: int | None, opset: int
) -> None:
    """The export options every source shares, each refused with one line."""
    if output not in ("backbone", "head"):
        raise UserError(f"--output must be backbone or head, got {output!r}")
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise UserError(f"--format takes {', '.join(FORMATS)}; got {', '.join(formats)}")
    if fp16 and "onnx" not in formats:
        raise UserError("--fp16 makes an fp16 ONNX file; keep onnx in --format")
    if input_size is not None and not MIN_INPUT_SIZE <= input_size <= MAX_INPUT_SIZE:
        raise UserError(
            f"--input-size must be from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} px, got {input_size}"
        )
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be from {MIN_OPSET} to {MAX_OPSET}, got {opset}")


def check_out(out: Path) -> None:
    """`out` must be a new folder, a package, or an empty folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --out takes a package folder")
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a model package; choose another --out")


def embedding_dim(model: nn.Module, size: int) -> int:
    """The width of the model's output at `size` px, with a clear error where it cannot run."""
    try:
        with torch.no_grad():
            out = model(torch.rand(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"the model does not take {size} x {size} images: {_why(e)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        is_tensor = isinstance(out, torch.Tensor)
        shape = "x".join(map(str, out.shape)) if is_tensor else type(out).__name__
        raise UserError(f"the model gives {shape} outputs, not one N x D embedding per image")
    return int(out.shape[1])


def export_checkpoint(
    ckpt_path: str | Path,
    out: str | Path,
    output: str = "backbone",
    input_size: int | None = None,
    opset: int = 18,
    formats: tuple[str, ...] = FORMATS,
    fp16: bool = False,
) -> ExportResult:
    """Write a verified model package for the checkpoint's query encoder to `out`, atomically."""
    check_options(output, formats, fp16, input_size, opset)
    ckpt_path, out = Path(ckpt_path), Path(out)
    check_out(out)
    ckpt = checkpoint.load(ckpt_path)
    reference, cfg = embedding_model(ckpt, output)
    size = input_size or cfg.data.image_size
    # the eval transform at the package's size: a trained eval_resize holds for its own size only
    eval_data = dataclasses.replace(
        cfg.data,
        image_size=size,
        eval_resize=cfg.data.eval_resize if size == cfg.data.image_size else None,
    )
    position = ckpt["train_state"]
    manifest = Manifest(
        embedding_dim=embedding_dim(reference, size),
        input_size=size,
        preprocess=Preprocess(
            resize=eval_data.resolved_eval_resize(),
            crop=size,
            mean=list(cfg.data.mean),
            std=list(cfg.data.std),
        ),
        output=output,
        files={},
        source={
            "kind": "checkpoint",
            "method": cfg.method.name,
            "arch": cfg.model.arch,
            "epochs": int(position["epoch"]),
            "step": int(position["step"]),
            "checkpoint": ckpt_path.name,
            "checkpoint_sha256": sha256_file(ckpt_path),
            "config": cfg.to_dict(),
        },
        created_by=f"mocoserve {__version__}",
    )
    return write_package(reference, manifest, out, formats, opset, fp16, cfg.model.arch)


def _export_file(
    kind: str, model: nn.Module, path: Path, size: int, opset: int, spec: str, label: str, hint: str
) -> None:
    """One artefact written; an exporter's failure is an ExportError naming the format and why."""
    try:
        if kind == "torchscript":
            _export_torchscript(model, path, size, spec)
        else:
            _export_onnx(model, path, size, opset, spec)
    except Exception as e:
        raise ExportError(
            f"{label} cannot be exported to {FORMAT_NAMES[kind]} ({_why(e)}){hint}"
        ) from e


def _format_hint(kind: str, formats: tuple[str, ...]) -> str:
    """How to write the package without the format that failed, where there is a way."""
    if kind == "onnx_fp16":
        return "; leave out --fp16 to write the float32 files"
    others = [f for f in formats if f != kind]
    return (
        f"; --format {others[0]} writes the {FORMAT_NAMES[others[0]]} file alone" if others else ""
    )


def write_package(
    reference: nn.Module,
    manifest: Manifest,
    out: Path,
    formats: tuple[str, ...],
    opset: int,
    fp16: bool,
    label: str,
) -> ExportResult:
    """Export `reference` in each format, gate each on parity, and install the package at `out`.

    `manifest` is filled in with the files and the parity; `label` (the arch) names the model
    in errors. Nothing is left behind when a format fails or misses its parity bar.
    """
    size = manifest.input_size
    spec = json.dumps(manifest.spec(), sort_keys=True)
    folded = fold_batchnorm(reference)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, public_mode(directory=True))  # mkdtemp's 0o700 would become the package's
    try:
        files = manifest.files
        parity: dict[str, Any] = {"batch_sizes": list(PARITY_BATCH_SIZES)}
        variants = [(k, ONNX_FILE if k == "onnx" else TORCHSCRIPT_FILE) for k in formats]
        variants.sort(key=lambda v: FORMATS.index(v[0]))
        if fp16:
            variants.insert(1, ("onnx_fp16", ONNX_FP16_FILE))
        for kind, name in variants:
            path = staging / name
            model = HalfPrecision(folded).eval() if kind == "onnx_fp16" else folded
            _export_file(kind, model, path, size, opset, spec, label, _format_hint(kind, formats))
            parity[kind] = _parity(_runner(kind, path), reference, size)
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            if kind != "torchscript":
                files[name]["opset"] = opset
            if kind == "onnx_fp16":
                files[name]["precision"] = "fp16"
        bars = {"onnx": MIN_COSINE, "torchscript": MIN_COSINE, "onnx_fp16": MIN_COSINE_FP16}
        for name, bar in bars.items():
            if name in parity and not parity[name]["min_cosine"] >= bar:
                raise ExportError(
                    f"{name} export does not match PyTorch: min cosine "
                    f"{parity[name]['min_cosine']:.6f} < {bar}"
                )
        manifest.parity = parity
        manifest.write(staging)
        _install(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, manifest)


def _runner(kind: str, path: Path) -> Any:
    """numpy in, numpy out through the written file (ONNX Runtime, or TorchScript)."""
    if kind == "torchscript":
        with quiet_torchscript():
            scripted = torch.jit.load(str(path))

        def run_ts(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return scripted(torch.from_numpy(x)).numpy()

        return run_ts
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def _install(staging: Path, out: Path) -> None:
    """Move the finished package into place without touching anything else in `out`.

    A new folder, or one that holds only a package, is swapped whole (an atomic rename). A
    folder that also holds the user's files gets only the package's own files replaced:
    encoders first, the manifest last, then stale encoders removed; a crash in between
    leaves the old package or one whose sha256s do not match (the loader refuses it), never
    a mix it accepts, and never a lost file of the user's.
    """
    for f in staging.iterdir():
        fsync_file(f)
    if not out.exists():
        os.replace(staging, out)
        fsync_dir(out.parent)
        return
    if all(p.name in PACKAGE_FILES for p in out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / "package")
        os.replace(staging, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    written = {f.name for f in staging.iterdir()}
    for name in sorted(written - {MANIFEST_FILE}) + [MANIFEST_FILE]:
        os.replace(staging / name, out / name)
    for name in set(PACKAGE_FILES) - written:
        (out / name).unlink(missing_ok=True)
    fsync_dir(out)
    staging.rmdir()
