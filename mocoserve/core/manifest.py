"""The model-package format: its file names, its version and the `Manifest` that describes it.

`mocoserve.export` writes a package through `Manifest.write`; `mocoserve.model.load` reads it
through `Manifest.read`. Both sides use this one definition, so they cannot drift apart.
An index records its model by `model_fingerprint` (`ModelFacts`: what an index needs of it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mocoserve.core.errors import UserError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "encoder.onnx"
ONNX_FP16_FILE = "encoder.fp16.onnx"
TORCHSCRIPT_FILE = "encoder.pt"
BACKEND_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
PACKAGE_FILES = (MANIFEST_FILE, ONNX_FILE, ONNX_FP16_FILE, TORCHSCRIPT_FILE)
INPUT_DESCRIPTION = "float32 NCHW RGB in [0, 1]"
_PREPROCESS_EXTRAS = ("interpolation", "mean", "std", "folded", "input")
# The resize filters serving applies (Pillow's, as torchvision's and timm's eval transforms on
# PIL images): a package recording another is refused rather than served with the wrong one.
INTERPOLATIONS = ("bilinear", "bicubic")
MAX_RESIZE = 8192  # px of the shorter side serving resizes every image to (2x the largest input)
SPEC_KEY = "mocoserve.spec"  # ONNX metadata_props key / TorchScript extra file of the spec


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of a package's manifest.json (which lists every file's sha256)."""
    return sha256_file(Path(model_dir) / MANIFEST_FILE)


@dataclass(frozen=True)
class ModelFacts:
    """What an index records of its model: the fingerprint, the embedding size, the folder."""

    sha256: str
    dim: int
    path: str | None = None  # resolved; None for vectors that no package made (tests, tools)

    @classmethod
    def of_package(cls, folder: str | os.PathLike) -> ModelFacts:
        """The facts of a package folder (its manifest read and checked)."""
        folder = Path(folder)
        manifest = Manifest.read(folder)
        return cls(model_fingerprint(folder), manifest.embedding_dim, str(folder.resolve()))


@dataclass
class Preprocess:
    """What a loader does before the graph: resize the shorter side, centre-crop, scale to [0, 1].

    mean/std are recorded for reference; they are inside the graph (`folded`).
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    folded: bool = True
    input: str = INPUT_DESCRIPTION


@dataclass
class Manifest:
    """manifest.json of a model package (see docs/architecture.md for every field)."""

    embedding_dim: int
    input_size: int
    preprocess: Preprocess
    output: str  # backbone | head
    files: dict[str, dict[str, Any]]  # name -> sha256, bytes (+ opset, precision)
    parity: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    normalized: bool = True
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        first = ("format_version", "embedding_dim", "input_size", "preprocess", "output")
        return {**{k: d[k] for k in first}, **{k: v for k, v in d.items() if k not in first}}

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json") -> Manifest:
        """Check every field's type and range; a bad manifest is a UserError naming the field."""
        if not isinstance(d, dict):
            raise UserError(f"{where} is not a JSON object")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise UserError(f"{where} has no format_version")
        if version > FORMAT_VERSION:
            raise UserError(
                f"{where} is from a version {version} package; this mocoserve reads up to "
                f"{FORMAT_VERSION} (upgrade mocoserve)"
            )
        pre = d.get("preprocess")
        if not isinstance(pre, dict):
            raise UserError(f"{where}: preprocess must be an object")
        for key in ("source", "parity"):
            if not isinstance(d.get(key) or {}, dict):
                raise UserError(f"{where}: {key} must be an object")
        for name, p in (d.get("parity") or {}).items():
            numbers = isinstance(p, dict) and all(
                isinstance(p.get(k), int | float) and not isinstance(p.get(k), bool)
                for k in ("max_abs_diff", "min_cosine")
            )
            if isinstance(p, dict) and not numbers:
                raise UserError(f"{where}: parity.{name} must hold max_abs_diff and min_cosine")
        try:
            manifest = cls(
                embedding_dim=_positive_int(d, "embedding_dim", where),
                input_size=_positive_int(d, "input_size", where),
                preprocess=Preprocess(
                    resize=_positive_int(pre, "resize", where, "preprocess."),
                    crop=_positive_int(pre, "crop", where, "preprocess."),
                    **{
                        k: pre[k]
                        for k in ("interpolation", "mean", "std", "folded", "input")
                        if k in pre
                    },
                ),
                output=str(d.get("output", "backbone")),
                files=_files(d.get("files"), where),
                parity=d.get("parity") or {},
                source=d.get("source") or {},
                normalized=bool(d.get("normalized", True)),
                created_by=str(d.get("created_by", "")),
                format_version=version,
            )
        except TypeError as e:
            raise UserError(f"{where}: unexpected field ({e})") from None
        if manifest.preprocess.crop != manifest.input_size:
            raise UserError(
                f"{where}: preprocess.crop ({manifest.preprocess.crop}) differs from input_size "
                f"({manifest.input_size})"
            )
        if manifest.preprocess.resize < manifest.input_size:
            raise UserError(f"{where}: preprocess.resize is smaller than input_size")
        if manifest.preprocess.resize > MAX_RESIZE:
            raise UserError(f"{where}: preprocess.resize is over {MAX_RESIZE} px")
        if manifest.preprocess.interpolation not in INTERPOLATIONS:
            raise UserError(
                f"{where}: preprocess.interpolation {manifest.preprocess.interpolation!r} is not "
                f"one this mocoserve applies ({', '.join(INTERPOLATIONS)}); upgrade mocoserve"
            )
        return manifest

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Manifest:
        """The manifest of a package folder, with a clear error for anything that is not one."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not folder.is_dir() or not path.is_file():
            raise UserError(
                f"{folder} is not a model package (no {MANIFEST_FILE}); make one with export"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))

    def source_line(self) -> str:
        """Where the model came from, in one line: a training checkpoint or a weights file.

        `source.kind` is "weights" for `export --weights`; manifests from before it have no
        kind and are checkpoints.
        """
        s = self.source
        if s.get("kind") == "weights":
            return (
                f"pretrained weights, {s.get('arch')} ({s.get('weights')}, sha256 "
                f"{str(s.get('weights_sha256', ''))[:12]}…)"
            )
        return (
            f"{s.get('method')} {s.get('arch')}, {s.get('epochs')} epochs "
            f"({s.get('checkpoint')}, sha256 {str(s.get('checkpoint_sha256', ''))[:12]}…)"
        )

    def spec(self) -> dict[str, Any]:
        """What the model files are: export bakes this into each, the loader compares."""
        pre = self.preprocess
        return {
            "embedding_dim": self.embedding_dim,
            "input_size": self.input_size,
            "resize": pre.resize,
            "crop": pre.crop,
            "interpolation": pre.interpolation,
            "output": self.output,
            "normalized": self.normalized,
        }

    def check_spec(self, embedded: str | None, where: str) -> None:
        """The spec baked into a model file must be the manifest's (else it was edited).

        Files from before specs were baked in carry none; their shapes are checked instead.
        """
        if embedded is None:
            return
        try:
            baked = json.loads(embedded)
        except json.JSONDecodeError:
            raise UserError(f"{where} carries an unreadable mocoserve spec") from None
        for key, value in self.spec().items():
            if baked.get(key) != value:
                raise UserError(
                    f"manifest.json does not describe {where}: {key} is {value!r} in the "
                    f"manifest but {baked.get(key)!r} in the model (an edited manifest, or "
                    "one from another package); export the package again"
                )

    def check_shapes(self, input_shape: list[Any], output_shape: list[Any], where: str) -> None:
        """The model's declared N x 3 x S x S input and N x D output must match the manifest."""
        s, d = self.input_size, self.embedding_dim
        if [int(x) if isinstance(x, int) else None for x in input_shape[1:]] != [3, s, s]:
            raise UserError(
                f"manifest.json says input_size {s}, but {where} takes "
                f"{input_shape[1:]}; export the package again"
            )
        if len(output_shape) == 2 and isinstance(output_shape[1], int) and output_shape[1] != d:
            raise UserError(
                f"manifest.json says embedding_dim {d}, but {where} makes {output_shape[1]}-d "
                "embeddings; export the package again"
            )

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _positive_int(d: dict[str, Any], key: str, where: str, prefix: str = "") -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{where}: {prefix}{key} must be a positive integer, got {value!r}")
    return value


def _files(value: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
        for k, v in value.items()
    ):
        raise UserError(f"{where}: files must map each file name to its sha256")
    unknown = sorted(set(value) - set(PACKAGE_FILES))
    if unknown:  # never a path: a manifest must not point a loader outside its folder
        raise UserError(f"{where}: unknown file {unknown[0]!r} in files")
    return value
