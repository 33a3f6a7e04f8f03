"""`mocoserve export --weights FILE --arch ARCH`: pretrained state dicts packaged, no training."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from typer.testing import CliRunner

from mocoserve import model as packages
from mocoserve.cli import app
from mocoserve.core.decode import decode_file
from mocoserve.core.errors import UserError
from mocoserve.core.images import resize_crop
from mocoserve.export.preprocess import (
    PreprocessOptions,
    apply_options,
    from_torchvision,
    imagenet_defaults,
    torchvision_entry,
)
from tests.imagegen import class_image, make_labelled
from tests.stores import rows

runner = CliRunner()
VIT = "timm:vit_small_patch16_224"
VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}
VIT_SET = "model.timm_kwargs={img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2}"


def tiny_vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(VIT[5:], pretrained=False, **VIT_KWARGS).eval()


def export(*args: str, out: Path | None = None) -> object:
    """`mocoserve export ARGS`; a refused one gets an --out that must stay unwritten."""
    if "--out" not in args:
        args = (*args, "--out", str(out or Path(tempfile.mkdtemp()) / "never"))
    return runner.invoke(app, ["export", *args])


def one_error_line(result) -> str:
    """The single `error: ...` line a refused export prints, with nothing written."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A random torchvision ResNet-18's state dict as torchvision names its files (classifier
    kept, DDP-wrapped under "state_dict"), and its package at 32 px."""
    root = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    path = root / "resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1's file name
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    result = export(
        "--weights",
        str(path),
        "--arch",
        "resnet18",
        "--input-size",
        "32",
        "--out",
        str(root / "model"),
    )
    assert result.exit_code == 0, result.output
    return {"net": net, "path": path, "package": root / "model", "output": result.output}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny random timm ViT saved as .safetensors (with its head), and its package."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vit")
    net = tiny_vit()
    path = root / "vit.safetensors"
    save_file(net.state_dict(), str(path))
    result = export(
        "--weights", str(path), "--arch", VIT, "--set", VIT_SET, "--out", str(root / "model")
    )
    assert result.exit_code == 0, result.output
    return {"net": net, "path": path, "package": root / "model", "output": result.output}


def features(net: torch.nn.Module, x: torch.Tensor, mean, std) -> np.ndarray:
    """The PyTorch model's L2-normalised pooled features of [0, 1] images."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        if hasattr(net, "forward_head"):  # timm: pooled features, before the classifier
            out = net.forward_head(net.forward_features((x - m) / s), pre_logits=True)
        else:  # torchvision ResNet: everything but fc
            out = torch.flatten(torch.nn.Sequential(*list(net.children())[:-1])((x - m) / s), 1)
    return F.normalize(out, dim=1).numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum(1).min())


@pytest.mark.parametrize("which", ["resnet", "vit"])
def test_package_equals_the_pytorch_model(which, resnet, vit):
    world = {"resnet": resnet, "vit": vit}[which]
    manifest = packages.read_manifest(world["package"])
    pre = manifest.preprocess
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = features(world["net"], x, pre.mean, pre.std)
    for backend in ("onnx", "torchscript"):
        got = packages.load(world["package"], backend=backend).embed(x.numpy())
        assert min_cosine(got, expected) >= 0.9999, backend


def test_manifest_records_the_file_the_drop_and_where_preprocessing_came_from(resnet, vit):
    m = json.loads((resnet["package"] / "manifest.json").read_text())
    assert m["source"]["kind"] == "weights" and m["source"]["arch"] == "resnet18"
    assert m["source"]["weights"] == "resnet18-f37072fd.pth"
    assert m["source"]["weights_sha256"] == packages.sha256_file(resnet["path"])
    assert m["source"]["state_dict_key"] == "state_dict"
    assert m["source"]["dropped_keys"] == ["fc.bias", "fc.weight"]
    # the torchvision entry found by the file name: resize 256 for a 224 crop, scaled to 32 px
    assert m["source"]["preprocess_from"].startswith("torchvision ResNet18_Weights.IMAGENET1K_V1")
    assert m["preprocess"]["resize"] == 36 and m["preprocess"]["interpolation"] == "bilinear"
    assert "dropped the classifier (fc.bias, fc.weight)" in resnet["output"]
    assert "preprocess (torchvision ResNet18_Weights.IMAGENET1K_V1" in resnet["output"]
    v = json.loads((vit["package"] / "manifest.json").read_text())
    # timm's pretrained config: bicubic, mean/std 0.5, crop_pct 0.9 -> floor(32 / 0.9) = 35
    assert v["preprocess"] == {**v["preprocess"], "resize": 35, "crop": 32}
    assert v["preprocess"]["interpolation"] == "bicubic"
    assert v["preprocess"]["mean"] == [0.5, 0.5, 0.5] and v["embedding_dim"] == 64
    assert v["source"]["model_settings"] == {"model.timm_kwargs": VIT_KWARGS}
    assert v["source"]["dropped_keys"] == ["head.bias", "head.weight"]
    assert all(v["parity"][n]["min_cosine"] >= 0.9999 for n in ("onnx", "torchscript"))
    info = runner.invoke(app, ["info", str(vit["package"])])
    assert info.exit_code == 0 and "pretrained weights, timm:vit_small_patch16_224" in info.output
    assert "resize 35 (bicubic)" in info.output


def test_serving_preprocessing_is_timms_eval_transform(vit, tmp_path):
    """An image through the package's preprocessing (bicubic) = timm's own eval pipeline."""
    from timm.data import create_transform

    image = class_image(2, 5, size=90).resize((120, 90))
    encoder = packages.load(vit["package"])
    pre = encoder.manifest.preprocess
    timm_eval = create_transform(
        input_size=(3, 32, 32), interpolation="bicubic", mean=pre.mean, std=pre.std, crop_pct=0.9
    )
    with torch.no_grad():
        x = timm_eval(image).unsqueeze(0)
        net = vit["net"]
        expected = F.normalize(net.forward_head(net.forward_features(x), pre_logits=True), dim=1)
    got = encoder.embed(encoder.preprocess(image)[None])
    assert min_cosine(got, expected.numpy()) >= 0.9999
    # the file decode of embed/serve applies the same filter, and it is not bilinear's
    image.save(tmp_path / "q.png")
    decoded = decode_file(str(tmp_path / "q.png"), 35, 32, interpolation="bicubic").pixels
    assert np.array_equal(decoded, np.asarray(resize_crop(image, 35, 32, "bicubic")))
    assert not np.array_equal(decoded, np.asarray(resize_crop(image, 35, 32)))


def test_keys_or_shapes_that_do_not_fit_are_one_line(resnet, vit, tmp_path):
    state = resnet["net"].state_dict()
    cut = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    cut["extra.weight"] = torch.zeros(3)
    torch.save(cut, tmp_path / "cut.pt")
    line = one_error_line(
        export(
            "--weights",
            str(tmp_path / "cut.pt"),
            "--arch",
            "resnet18",
            "--out",
            str(tmp_path / "m"),
        )
    )
    assert "cut.pt does not fit resnet18:" in line and "keys missing (layer4.0.conv1.weight" in line
    assert "1 unexpected keys (extra.weight)" in line
    # the right keys at the wrong sizes: a ViT file read as a wider ViT
    line = one_error_line(
        export("--weights", str(vit["path"]), "--arch", VIT, "--out", str(tmp_path / "m"))
    )
    assert "of another shape (cls_token: file 1x1x64, model 1x1x384" in line
    assert "check model.timm_kwargs" in line
    # resnet34's file for resnet18: blocks that resnet18 does not have
    line = one_error_line(
        export("--weights", str(resnet["path"]), "--arch", "resnet34", "--out", str(tmp_path / "m"))
    )
    assert "keys missing (layer1.2." in line
    assert not (tmp_path / "m").exists()


def test_files_that_are_not_state_dicts_are_one_line(resnet, tmp_path):
    torch.save(resnet["net"], tmp_path / "module.pth")  # a pickled module, not its state dict
    line = one_error_line(export("--weights", str(tmp_path / "module.pth"), "--arch", "resnet18"))
    assert "save the model's state_dict()" in line
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 40)
    line = one_error_line(
        export("--weights", str(tmp_path / "bad.safetensors"), "--arch", "resnet18")
    )
    assert "not a readable safetensors file" in line
    line = one_error_line(export("--weights", str(tmp_path / "none.pt"), "--arch", "resnet18"))
    assert "weights file not found" in line
    assert "needs --arch" in one_error_line(export("--weights", str(resnet["path"])))
    assert "for --weights" in one_error_line(export(str(resnet["path"]), "--arch", "resnet18"))
    line = one_error_line(
        export("--weights", str(resnet["path"]), "--arch", "resnet18", "--set", "optim.lr=1")
    )
    assert "does not apply to --weights" in line


def test_torchvision_metadata_options_and_defaults():
    entry = torchvision_entry("resnet50", Path("resnet50-11ad3fa6.pth"), "0" * 64, None)
    chosen = from_torchvision(entry)
    assert (chosen.input_size, chosen.resize, chosen.interpolation) == (224, 232, "bilinear")
    assert chosen.origin == "torchvision ResNet50_Weights.IMAGENET1K_V2"
    # by the sha256 prefix torchvision puts in its file names, whatever the file is called now
    renamed = torchvision_entry("resnet50", Path("mine.pth"), "0676ba61" + "0" * 56, None)
    assert renamed.name == "IMAGENET1K_V1"
    named = torchvision_entry("resnet50", Path("x.pth"), "", "ResNet50_Weights.IMAGENET1K_V2")
    assert named is entry
    assert torchvision_entry("resnet50", Path("x.pth"), "f" * 64, None) is None
    with pytest.raises(UserError, match="is not one of resnet18's weights"):
        torchvision_entry("resnet18", Path("x.pth"), "", "ResNet50_Weights.IMAGENET1K_V2")
    # explicit options win; a new size keeps the crop fraction
    mine = apply_options(chosen, PreprocessOptions(input_size=112, interpolation="bicubic"))
    assert (mine.input_size, mine.resize, mine.interpolation) == (112, 116, "bicubic")
    assert mine.origin.endswith("--input-size given; --interpolation given")
    assert (imagenet_defaults().input_size, imagenet_defaults().resize) == (224, 256)
    with pytest.raises(UserError, match="--interpolation bilinear or bicubic"):
        apply_options(chosen, PreprocessOptions(interpolation="lanczos"))
    with pytest.raises(UserError, match="at least the input size"):
        apply_options(chosen, PreprocessOptions(resize=100))


def test_weights_name_option_and_explicit_preprocessing(resnet, tmp_path):
    out = tmp_path / "m"
    result = export(
        "--weights",
        str(resnet["path"]),
        "--arch",
        "resnet18",
        "--input-size",
        "32",
        "--resize",
        "40",
        "--mean",
        "0.5,0.5,0.5",
        "--std",
        "0.25,0.25,0.25",
        "--interpolation",
        "bicubic",
        "--format",
        "onnx",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    pre = packages.read_manifest(out).preprocess
    assert (pre.resize, pre.interpolation, pre.mean, pre.std) == (
        40,
        "bicubic",
        [0.5, 0.5, 0.5],
        [0.25, 0.25, 0.25],
    )
    assert "resize 40 bicubic, centre crop 32, mean 0.5,0.5,0.5, std 0.25,0.25,0.25" in (
        result.output
    )
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = packages.load(out).embed(x.numpy())
    assert min_cosine(got, features(resnet["net"], x, pre.mean, pre.std)) >= 0.9999
    line = one_error_line(
        export(
            "--weights",
            str(resnet["path"]),
            "--arch",
            "resnet18",
            "--weights-name",
            "ResNet50_Weights.IMAGENET1K_V2",
        )
    )
    assert "is not one of resnet18's weights" in line
    assert "three numbers" in one_error_line(
        export("--weights", str(resnet["path"]), "--arch", "resnet18", "--mean", "0.5")
    )


def test_embed_search_knn_on_a_weights_package(vit, tmp_path):
    images = make_labelled(tmp_path / "images", classes=3, per_class=4)
    index = tmp_path / "out.faiss"
    pkg = str(vit["package"])
    made = runner.invoke(
        app,
        [
            "embed",
            str(images),
            "--index",
            str(index),
            "--model",
            pkg,
            "--labels-from-folders",
            "--quiet",
            "--workers",
            "0",
        ],
    )
    assert made.exit_code == 0, made.output
    # the stored vectors are the package's on its own (bicubic) preprocessing
    encoder = packages.load(vit["package"])
    stored = rows(index)
    for path in list(stored)[:3]:
        with Image.open(path) as img:
            expected = encoder.embed(encoder.preprocess(img.convert("RGB"))[None])[0]
        assert float(np.dot(stored[path][3], expected)) >= 0.9999
    query = images / "class_1" / "img_002.jpg"
    found = runner.invoke(app, ["search", str(index), str(query), "-k", "3", "--json"])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)[0]["results"][0]["path"] == str(query)
    out = tmp_path / "report"
    report = runner.invoke(
        app,
        [
            "knn",
            "--model",
            pkg,
            "--train",
            str(images),
            "--val",
            str(images),
            "--out",
            str(out),
            "--workers",
            "0",
        ],
    )
    assert report.exit_code == 0, report.output
    assert json.loads((out / "report.json").read_text())["counts"]["train"] == 12


def test_serve_embeds_with_a_weights_package(vit, tmp_path):
    import httpx

    from tests.test_service import Server

    images = make_labelled(tmp_path / "images", classes=2, per_class=3)
    index = tmp_path / "out.faiss"
    made = runner.invoke(
        app,
        [
            "embed",
            str(images),
            "--index",
            str(index),
            "--model",
            str(vit["package"]),
            "--quiet",
            "--workers",
            "0",
        ],
    )
    assert made.exit_code == 0, made.output
    server = Server("--index", str(index), "--max-delay-ms", "5")
    try:
        server.wait_ready()
        path = images / "class_0" / "img_002.jpg"
        files = [("images", (path.name, path.read_bytes()))]
        response = httpx.post(f"{server.url}/v1/embed", files=files, timeout=60)
        assert response.status_code == 200, response.text
        served = np.asarray(response.json()["embeddings"][0], dtype=np.float32)
    finally:
        server.stop()
    encoder = packages.load(vit["package"])
    with Image.open(path) as img:
        expected = encoder.embed(encoder.preprocess(img.convert("RGB"))[None])[0]
    assert float(np.dot(served, expected)) >= 0.9999
    assert "Traceback" not in server.err, server.err
