"""Fold a checkpoint's query encoder into a model package: ONNX, TorchScript and a manifest.

The exported function takes float32 NCHW RGB in [0, 1] at the package's size and returns
L2-normalised embeddings; mean/std normalisation and BatchNorm are folded into the graph.
Both artefacts are checked against the PyTorch module before the package is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
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
from mocoserve.train.models import Encoder

PARITY_BATCH_SIZES = (1, 2, 7, 64)
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 4096
MIN_OPSET, MAX_OPSET = 18, 23  # the dynamo exporter's range
MIN_COSINE = 0.9999
MIN_COSINE_FP16 = 0.999
FORMATS = ("onnx", "torchscript")


class ExportError(Exception):
    """The exported artefacts do not reproduce the PyTorch module (exit code 1)."""


class EmbeddingModel(nn.Module):
    """[0, 1] RGB N x 3 x S x S -> N x D L2-normalised embeddings, preprocessing inside."""

    def __init__(self, encoder: Encoder, output: str, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.backbone = encoder.backbone
        self.head = encoder.head if output == "head" else nn.Identity()
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


def embedding_model(ckpt: dict[str, Any], output: str) -> tuple[EmbeddingModel, TrainConfig]:
    """The checkpoint's query encoder as an eval-mode EmbeddingModel (plain BatchNorm)."""
    cfg = TrainConfig.from_dict(ckpt["config"])
    if not get_spec(cfg.method.name).cls.trains_encoder:
        raise UserError(
            f"this is a {cfg.method.name} checkpoint, not a pretraining one; export the "
            "pretraining checkpoint"
        )
    cfg.model.bn_splits = 1  # SplitBatchNorm is BatchNorm2d in eval mode, with the same keys
    encoder = Encoder(cfg.model)
    encoder.load_state_dict(checkpoint.query_encoder_state(ckpt))
    model = EmbeddingModel(encoder, output, list(cfg.data.mean), list(cfg.data.std))
    return model.eval(), cfg


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Conv+BN pairs folded into the convolutions (torch.fx), for eval-mode inference."""
    from torch.fx.experimental.optimization import fuse

    return fuse(model)


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
        worst_diff = max(worst_diff, float(np.abs(got - expected).max()))
        cos = (got * expected).sum(1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12
        )
        worst_cos = min(worst_cos, float(cos.min()))
    return {"max_abs_diff": worst_diff, "min_cosine": worst_cos}


def _export_onnx(model: nn.Module, path: Path, size: int, opset: int, spec: str) -> None:
    """ONNX with a dynamic batch axis; the manifest's spec rides along in metadata_props."""
    import onnx

    example = (torch.rand(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
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
    with torch.no_grad(), quiet_torchscript():
        traced = torch.jit.freeze(torch.jit.trace(model, example).eval())
    traced.save(str(path), _extra_files={SPEC_KEY: spec})


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
    ckpt_path, out = Path(ckpt_path), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --out takes a package folder")
    if out.exists() and not (out / MANIFEST_FILE).is_file() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a model package; choose another --out")
    ckpt = checkpoint.load(ckpt_path)
    reference, cfg = embedding_model(ckpt, output)
    size = input_size or cfg.data.image_size
    # the eval transform at the package's size: a trained eval_resize holds for its own size only
    eval_data = dataclasses.replace(
        cfg.data,
        image_size=size,
        eval_resize=cfg.data.eval_resize if size == cfg.data.image_size else None,
    )
    with torch.no_grad():
        dim = int(reference(torch.rand(1, 3, size, size)).shape[1])
    position = ckpt["train_state"]
    manifest = Manifest(
        embedding_dim=dim,
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
    spec = json.dumps(manifest.spec(), sort_keys=True)
    folded = fold_batchnorm(reference)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, public_mode(directory=True))  # mkdtemp's 0o700 would become the package's
    try:
        files = manifest.files
        parity: dict[str, Any] = {"batch_sizes": list(PARITY_BATCH_SIZES)}
        if "onnx" in formats:
            import onnxruntime as ort

            path = staging / ONNX_FILE
            _export_onnx(folded, path, size, opset, spec)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            parity["onnx"] = _parity(lambda x: session.run(None, {"images": x})[0], reference, size)
            files[path.name] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "opset": opset,
            }
        if fp16:
            import onnxruntime as ort

            path = staging / ONNX_FP16_FILE
            _export_onnx(HalfPrecision(folded).eval(), path, size, opset, spec)
            session16 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            parity["onnx_fp16"] = _parity(
                lambda x: session16.run(None, {"images": x})[0], reference, size
            )
            files[path.name] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "opset": opset,
                "precision": "fp16",
            }
        if "torchscript" in formats:
            path = staging / TORCHSCRIPT_FILE
            _export_torchscript(folded, path, size, spec)
            with quiet_torchscript():
                scripted = torch.jit.load(str(path))

            def run_ts(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return scripted(torch.from_numpy(x)).numpy()

            parity["torchscript"] = _parity(run_ts, reference, size)
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
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
