"""Loading a model package: verified files, the manifest's preprocessing, ORT or TorchScript.

Serving path: no import of `train` or `export`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mocoserve.core.errors import UserError
from mocoserve.core.images import resize_crop
from mocoserve.core.manifest import (
    BACKEND_FILES,
    ONNX_FP16_FILE,
    SPEC_KEY,
    Manifest,
    sha256_file,
)
from mocoserve.core.torchscript import quiet_torchscript

__all__ = ["Manifest", "PackageEncoder", "file_status", "load", "read_manifest", "sha256_file"]


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a model package, with a clear error for anything that is not one."""
    return Manifest.read(path)


def file_status(folder: str | Path, manifest: Manifest, name: str) -> str:
    """One file of a package checked: 'ok', or what is wrong (missing, sha256, the manifest).

    A file whose sha256 matches is also checked against the manifest's description of it
    (the spec baked in at export, and its input/output shapes): an edited manifest shows.
    """
    path = Path(folder) / name
    if not path.is_file():
        return "MISSING"
    if sha256_file(path) != manifest.files[name].get("sha256"):
        return "sha256 MISMATCH (changed or damaged)"
    try:
        if name.endswith(".onnx"):
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            check_onnx(manifest, session, name)
        elif importlib.util.find_spec("torch") is None:  # the base install: ONNX Runtime only
            return "ok (sha256; not loaded: TorchScript needs the [train] extra)"
        else:
            _load_torchscript(Path(folder), manifest, path, "cpu")
    except UserError as e:
        return f"MISMATCH: {e}"
    return "ok"


def _verify(folder: Path, manifest: Manifest, name: str) -> Path:
    entry = manifest.files.get(name)
    path = folder / name
    if entry is None or not path.is_file():
        raise UserError(f"{folder} has no {name}")
    if sha256_file(path) != entry.get("sha256"):
        raise UserError(f"{path} does not match its sha256 in manifest.json (changed or damaged)")
    return path


@dataclass
class PackageEncoder:
    """A loaded model package: `preprocess` one image, `embed` a batch."""

    path: Path
    manifest: Manifest
    backend: str
    device: str
    provider: str
    _run: Any = field(repr=False, default=None)

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def input_size(self) -> int:
        return self.manifest.input_size

    @property
    def resize(self) -> int:
        return self.manifest.preprocess.resize

    @property
    def interpolation(self) -> str:
        """The resize filter the package's weights expect (bilinear or bicubic)."""
        return self.manifest.preprocess.interpolation

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> 3 x S x S float32 in [0, 1]: resize shorter side, centre crop."""
        crop = self.manifest.preprocess.crop
        pixels = resize_crop(image, self.resize, crop, self.interpolation)
        return to_input(np.asarray(pixels)[None])[0]

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S float32 in [0, 1] -> N x D L2-normalised float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(
                f"expected N x 3 x {self.input_size} x {self.input_size}, got {batch.shape}"
            )
        return np.asarray(self._run(batch), dtype=np.float32)


def to_input(pixels: np.ndarray) -> np.ndarray:
    """N x S x S x 3 uint8 -> N x 3 x S x S float32 in [0, 1], the packages' input."""
    batch = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    np.multiply(pixels.transpose(0, 3, 1, 2), np.float32(1 / 255.0), out=batch)
    return batch


def load(
    path: str | Path,
    backend: str = "auto",
    device: str = "auto",
    fp16: bool = False,
    device_id: int = 0,
) -> PackageEncoder:
    """Load a model package; `device="cuda"` where no GPU provider is active is an error.

    `fp16` picks the package's encoder.fp16.onnx (made by `export --fp16`, for GPUs);
    `device_id` the GPU (a torchrun process passes its LOCAL_RANK).
    """
    folder = Path(path)
    manifest = Manifest.read(folder)
    if backend not in ("auto", "onnx", "torchscript"):
        raise UserError(f"backend must be auto, onnx or torchscript, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
    if backend == "auto":
        backend = next((b for b, f in BACKEND_FILES.items() if f in manifest.files), "")
        if not backend:
            raise UserError(f"{folder} lists neither encoder.onnx nor encoder.pt")
    if fp16 and backend != "onnx":
        raise UserError("fp16 is an ONNX variant; use backend onnx (or auto)")
    name = ONNX_FP16_FILE if fp16 else BACKEND_FILES[backend]
    if fp16 and name not in manifest.files:
        raise UserError(f"{folder} has no fp16 variant; export it with --fp16")
    file = _verify(folder, manifest, name)
    if backend == "onnx":
        return _load_onnx(folder, manifest, file, device, device_id)
    return _load_torchscript(folder, manifest, file, device, device_id)


def _cuda_driver_present() -> bool:
    """Whether an NVIDIA driver is installed (onnxruntime-gpu lists CUDA even where none is)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def check_onnx(manifest: Manifest, session: Any, name: str) -> None:
    """The ONNX model's baked-in spec and its declared shapes against the manifest."""
    embedded = session.get_modelmeta().custom_metadata_map.get(SPEC_KEY)
    manifest.check_spec(embedded, name)
    manifest.check_shapes(session.get_inputs()[0].shape, session.get_outputs()[0].shape, name)


def _load_onnx(
    folder: Path, manifest: Manifest, file: Path, device: str, device_id: int = 0
) -> PackageEncoder:
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    gpu = "CUDAExecutionProvider" in available and _cuda_driver_present()
    if device in ("auto", "cuda") and gpu:
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))  # type: ignore[arg-type]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a missing GPU is reported by us, not as a warning wall
    # Idle ORT threads would otherwise spin between batches, starving the decoder processes.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(file), options, providers=providers)
    check_onnx(manifest, session, file.name)
    active = session.get_providers()[0]
    if device == "cuda" and active != "CUDAExecutionProvider":
        raise UserError("device cuda was asked for, but ONNX Runtime's CUDA provider is not active")
    input_name = session.get_inputs()[0].name
    return PackageEncoder(
        folder,
        manifest,
        "onnx",
        "cuda" if active == "CUDAExecutionProvider" else "cpu",
        active,
        lambda x: session.run(None, {input_name: x})[0],
    )


def _load_torchscript(
    folder: Path, manifest: Manifest, file: Path, device: str, device_id: int = 0
) -> PackageEncoder:
    if importlib.util.find_spec("torch") is None:
        raise UserError(
            f"{file.name} is TorchScript: loading it needs the [train] extra: "
            "pip install 'mocoserve[train]' (or use the package's encoder.onnx)"
        )
    import torch

    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA GPU is available")
    dev = torch.device("cuda", device_id) if use_cuda else torch.device("cpu")
    extra = {SPEC_KEY: ""}
    with quiet_torchscript():
        module = torch.jit.load(str(file), map_location=dev, _extra_files=extra).eval()
    if extra[SPEC_KEY]:
        manifest.check_spec(extra[SPEC_KEY], file.name)
    else:  # a package from before specs were baked in: one image through it tells the shapes
        s = manifest.input_size
        try:
            with torch.no_grad():
                dims = list(module(torch.zeros(1, 3, s, s, device=dev)).shape)
        except RuntimeError:
            raise UserError(
                f"{file.name} does not take {s} x {s} images, as manifest.json says"
            ) from None
        manifest.check_shapes([1, 3, s, s], dims, file.name)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    return PackageEncoder(folder, manifest, "torchscript", dev.type, f"torch {dev.type}", run)
