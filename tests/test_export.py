"""`mocoserve export`, model packages and their loader, on tiny checkpoints."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from mocoserve import model as model_package
from mocoserve.cli import app
from mocoserve.core.errors import UserError
from mocoserve.export import package
from mocoserve.export.package import embedding_model, export_checkpoint
from mocoserve.train import checkpoint
from mocoserve.train.augment import eval_transform
from mocoserve.train.config import TrainConfig
from mocoserve.train.models import Encoder
from tests.models import make_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def moco_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg")
    ckpt = make_checkpoint(root / "moco.pt")
    return ckpt, export_checkpoint(ckpt, root / "model").out


@pytest.mark.parametrize("method", ["moco-v1", "supcon", "supcon-queue"])
@pytest.mark.parametrize("output", ["backbone", "head"])
def test_every_method_exports_with_parity(method, output, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt", method, bn_splits=2, small_stem=True)
    manifest = export_checkpoint(ckpt, tmp_path / "m", output=output).manifest.to_dict()
    assert manifest["embedding_dim"] == (512 if output == "backbone" else 16)
    assert manifest["source"]["method"] == method and manifest["output"] == output
    # independently of the exporter's own figures: the query encoder, rebuilt from the
    # checkpoint here (plain BN, eval mode), against each file of the package
    saved = checkpoint.load(ckpt)
    cfg = TrainConfig.from_dict(saved["config"])
    cfg.model.bn_splits = 1
    encoder = Encoder(cfg.model).eval()
    encoder.load_state_dict(checkpoint.query_encoder_state(saved))
    images = torch.rand(9, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        x = (images - mean) / std
        raw = encoder(x) if output == "head" else encoder.features(x)
        expected = F.normalize(raw, dim=1).numpy()
    for backend in ("onnx", "torchscript"):
        got = model_package.load(tmp_path / "m", backend=backend).embed(images.numpy())
        assert np.abs(got - expected).max() < 1e-4, backend
        assert ((got * expected).sum(1) >= 0.9999).all(), backend


def test_manifest_fields(moco_package):
    ckpt, pkg = moco_package
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["normalized"] is True
    assert manifest["input_size"] == 32 and manifest["preprocess"]["crop"] == 32
    assert manifest["parity"]["batch_sizes"] == [1, 2, 7, 64]
    assert manifest["files"]["encoder.onnx"]["opset"] == 18
    assert manifest["source"]["checkpoint_sha256"] == model_package.sha256_file(ckpt)
    for name, entry in manifest["files"].items():
        assert model_package.sha256_file(pkg / name) == entry["sha256"]
    assert sorted(p.name for p in pkg.iterdir()) == ["encoder.onnx", "encoder.pt", "manifest.json"]
    import onnx

    graph = onnx.load(str(pkg / "encoder.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # BN folded into the convolutions
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis


def test_same_embedding_from_onnx_torchscript_and_pytorch(moco_package, tmp_path):
    ckpt, pkg = moco_package
    image_path = tmp_path / "x.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image_path)
    image = Image.open(image_path).convert("RGB")
    # PyTorch: the training-time eval transform and the unexported encoder
    ref_model, cfg = embedding_model(checkpoint.load(ckpt), "backbone")
    encoder_input = eval_transform(cfg.data)(image).unsqueeze(0)
    with torch.no_grad():
        expected = F.normalize(ref_model.backbone(encoder_input), dim=1).numpy()
    for backend in ("onnx", "torchscript"):
        enc = model_package.load(pkg, backend=backend, device="cpu")
        got = enc.embed(enc.preprocess(image)[None])
        assert got.shape == (1, 512)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert enc.device == "cpu"


def test_tampered_or_foreign_packages_are_refused(moco_package, tmp_path):
    _, pkg = moco_package
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in pkg.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = bytearray((bad / "encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its sha256"):
        model_package.load(bad, backend="onnx")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 1 and "sha256 MISMATCH" in result.output
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="version 99 package"):
        model_package.load(bad)
    with pytest.raises(UserError, match="not a model package"):
        model_package.load(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a model package" in result.output


def test_cuda_where_none_is_active_is_an_error(moco_package):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, pkg = moco_package
    with pytest.raises(UserError, match="cuda"):
        model_package.load(pkg, backend="onnx", device="cuda")


def test_export_of_a_non_checkpoint_is_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    result = runner.invoke(app, ["export", str(notes), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert "is not a mocoserve checkpoint" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()


def test_failed_parity_writes_no_package(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    monkeypatch.setattr(package, "MIN_COSINE", 1.5)  # no export can reach it
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    assert "does not match PyTorch" in result.output and "package not written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no package, no temp dir


def test_cli_train_export_info(labelled_dir, tmp_path):
    run = tmp_path / "run"
    assert (
        runner.invoke(
            app,
            [
                "train",
                str(labelled_dir),
                "--epochs",
                "1",
                "-b",
                "8",
                "-K",
                "16",
                "--arch",
                "resnet18",
                "--image-size",
                "32",
                "--workers",
                "0",
                "-q",
                "--out",
                str(run),
            ],
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "export",
            str(run / "checkpoints" / "last.pt"),
            "--out",
            str(tmp_path / "model"),
            "--format",
            "onnx",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "onnx: max |diff|" in result.output and "torchscript" not in result.output
    info = runner.invoke(app, ["info", str(tmp_path / "model")])
    assert info.exit_code == 0 and "MB, opset 18, ok" in info.output
    assert "moco-v2 resnet18" in info.output


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_bottleneck_backbone_families_export(arch, tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt", arch=arch)
    manifest = export_checkpoint(ckpt, tmp_path / "m").manifest.to_dict()
    assert manifest["embedding_dim"] == 2048
    assert all(manifest["parity"][n]["min_cosine"] >= 0.9999 for n in ("onnx", "torchscript"))


def test_fp16_variant_has_its_own_parity_and_loads(tmp_path, moco_package):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    result = runner.invoke(
        app, ["export", str(ckpt), "--out", str(tmp_path / "m"), "--fp16", "--format", "onnx"]
    )
    assert result.exit_code == 0, result.output
    assert "onnx_fp16: max |diff|" in result.output
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["files"]["encoder.fp16.onnx"]["precision"] == "fp16"
    assert manifest["parity"]["onnx_fp16"]["min_cosine"] >= 0.999
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    full = model_package.load(tmp_path / "m").embed(x)
    half = model_package.load(tmp_path / "m", fp16=True).embed(x)
    assert half.dtype == np.float32 and ((full * half).sum(1) > 0.999).all()
    with pytest.raises(UserError, match="ONNX variant"):
        model_package.load(tmp_path / "m", fp16=True, backend="torchscript")
    with pytest.raises(UserError, match="no fp16 variant"):
        model_package.load(moco_package[1], fp16=True)
