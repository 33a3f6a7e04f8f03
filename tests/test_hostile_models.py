"""Hostile input to the model features (issue 21): weights files, timm_kwargs, preprocessing
options. Each is refused in one `error: ...` line, never run, never a traceback."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.core.errors import UserError
from mocoserve.export.package import embedding_dim
from mocoserve.export.preprocess import PreprocessOptions, apply_options, imagenet_defaults
from mocoserve.train.config import TrainConfig, apply_overrides, parse_set
from mocoserve.train.models import build_backbone

pytest.importorskip("timm")

runner = CliRunner()
VIT = "timm:vit_small_patch16_224"
VIT_KWARGS = "{img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2"


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def export(tmp_path: Path, *args: str) -> str:
    line = one_error_line(runner.invoke(app, ["export", *args, "--out", str(tmp_path / "m")]))
    assert not (tmp_path / "m").exists()
    return line


class _Touch:
    """A pickle that would create a file when unpickled with weights_only=False."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickles_are_refused_unrun_naming_the_global(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": _Touch(marker)}, tmp_path / "evil.pth")
    with open(tmp_path / "plain.pth", "wb") as f:  # a plain pickle: protocol 4, a torch warning
        pickle.dump(_Touch(marker), f, protocol=4)
    for name in ("evil.pth", "plain.pth"):
        line = export(tmp_path, "--weights", str(tmp_path / name), "--arch", "resnet18")
        reason = "unsupported GLOBAL posix.system" if name == "evil.pth" else "Unsupported operand"
        assert reason in line, line
        assert "weights_only` set to `False`" not in line  # torch's advice is not ours to give
    assert not marker.exists()


def test_a_folder_as_weights_is_named_as_a_folder(tmp_path):
    line = export(tmp_path, "--weights", str(tmp_path), "--arch", "resnet18")
    assert "is a folder" in line


def test_resize_is_bounded_like_the_input_size(tmp_path):
    with pytest.raises(UserError, match="--resize must be at most"):
        apply_options(imagenet_defaults(), PreprocessOptions(input_size=32, resize=100_000))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pth")
    line = export(
        tmp_path, "--weights", str(tmp_path / "w.pth"), "--arch", "resnet18", "--resize", "100000"
    )
    assert "--resize must be at most 8192 px, got 100000" in line


def test_a_model_that_does_not_pool_is_refused_before_export():
    class Tokens(torch.nn.Module):  # N x tokens x D, as a timm ViT with global_pool=''
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)

    with pytest.raises(UserError, match="gives 1x1024x3 outputs, not one N x D embedding"):
        embedding_dim(Tokens(), 32)


def _backbone(kwargs: str) -> None:
    cfg = TrainConfig()
    settings = parse_set([f"model.timm_kwargs={kwargs}"])
    apply_overrides(cfg, {"model.arch": VIT, **settings}, source="--set")
    build_backbone(cfg.model)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (", checkpoint_path: /etc/passwd}", "cannot set 'checkpoint_path'"),
        (", pretrained_cfg: vit_small_patch16_224.augreg_in21k}", "cannot set 'pretrained_cfg'"),
        (", cache_dir: /tmp}", "cannot set 'cache_dir'"),
        (", features_only: true}", "cannot set 'features_only'"),
        (", global_pool: ''}", "global_pool must pool"),
        (", patch_size: 0}", "timm cannot build"),
        (", drop_path_rate: 5}", "drop_path_rate must be from 0 to below 1, got 5"),
    ],
    ids=[
        "checkpoint-path",
        "pretrained-cfg",
        "cache-dir",
        "features-only",
        "no-pool",
        "patch-0",
        "drop-path-5",
    ],
)
def test_timm_kwargs_that_load_elsewhere_or_do_not_pool_are_one_line(extra, message, tmp_path):
    kwargs = VIT_KWARGS + extra
    if "patch_size: 0" in extra:
        kwargs = kwargs.replace("patch_size: 4, ", "")
    with pytest.raises(UserError, match=message):
        _backbone(kwargs)
    line = export(
        tmp_path,
        "--weights",
        str(tmp_path / "unread.pth"),
        "--arch",
        VIT,
        "--set",
        f"model.timm_kwargs={kwargs}",
    )
    assert message in line


def _train(tmp_path: Path, *args: str):
    from tests.imagegen import make_flat

    flat = make_flat(tmp_path / "flat", n=8, size=32)
    common = ["--image-size", "32", "--workers", "0", "--epochs", "1", "--out", str(tmp_path / "r")]
    vit = ["--method", "moco-v3", "--arch", VIT, "--set", f"model.timm_kwargs={VIT_KWARGS}}}"]
    tiny = ["--set", "model.hidden_dim=32", "--dim", "16"]
    return runner.invoke(app, ["train", str(flat), *common, *vit, *tiny, *args])


def test_moco_v3_on_one_image_per_process_is_one_line(tmp_path):
    line = one_error_line(_train(tmp_path, "-b", "1"))
    assert "moco-v3 needs --batch-size of at least 2 per process" in line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_moco_v3_says_a_queue_size_does_nothing(tmp_path):
    result = _train(tmp_path, "-b", "4", "--queue-size", "5")
    assert result.exit_code == 0, result.output
    assert "note: moco-v3 keeps no queue of keys: --queue-size 5 does nothing here" in result.output


@pytest.mark.parametrize("width", ["0", "-5"])
def test_a_hidden_width_below_one_is_one_line(width, tmp_path):
    line = one_error_line(_train(tmp_path, "-b", "4", "--set", f"model.hidden_dim={width}"))
    assert (
        f"model.hidden_dim must be at least 1 (or unset: the backbone's width), got {width}" in line
    )


def test_a_manifest_whose_resize_would_blow_up_every_image_is_refused_by_name():
    from mocoserve.core.manifest import Manifest, Preprocess

    good = Manifest(
        embedding_dim=8,
        input_size=32,
        preprocess=Preprocess(resize=36, crop=32),
        output="backbone",
        files={},
    ).to_dict()
    Manifest.from_dict(good)
    good["preprocess"]["resize"] = 10**9
    with pytest.raises(UserError, match=r"manifest\.json: preprocess\.resize is over 8192 px"):
        Manifest.from_dict(good)
    cfg = TrainConfig()
    apply_overrides(cfg, {"data.eval_resize": 100_000}, source="--set")
    from mocoserve.train.config import check_settings

    with pytest.raises(UserError, match=r"data\.eval_resize must be at most 8192 px"):
        check_settings(cfg)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"source": "x"}, "source must be an object"),
        ({"parity": [1]}, "parity must be an object"),
        ({"parity": {"onnx": {"max_abs_diff": "a"}}}, "parity.onnx must hold max_abs_diff"),
    ],
    ids=["source-text", "parity-list", "parity-not-numbers"],
)
def test_a_damaged_manifest_source_or_parity_is_refused_by_name(patch, message):
    from mocoserve.core.manifest import Manifest, Preprocess

    d = Manifest(
        embedding_dim=8,
        input_size=32,
        preprocess=Preprocess(resize=36, crop=32),
        output="backbone",
        files={},
        parity={"batch_sizes": [1, 2], "onnx": {"max_abs_diff": 1e-7, "min_cosine": 1.0}},
    ).to_dict()
    Manifest.from_dict(d)
    with pytest.raises(UserError, match=message):
        Manifest.from_dict({**d, **patch})


def test_nan_weights_are_refused_and_the_parity_gate_does_not_pass_nan(tmp_path):
    from mocoserve.export.package import ExportError, _parity

    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    line = export(tmp_path, "--weights", str(tmp_path / "nan.pth"), "--arch", "resnet18")
    assert "tensor 'layer1.0.conv1.weight' holds NaN or inf" in line

    class Nan(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 4), float("nan"))

    with pytest.raises(UserError, match="own outputs hold NaN"):
        _parity(lambda x: Nan()(torch.from_numpy(x)).numpy(), Nan(), 16)
    ok = torch.nn.Flatten()
    with pytest.raises(ExportError, match="exported file's outputs hold NaN"):
        _parity(lambda x: Nan()(torch.from_numpy(x)).numpy()[:, :1].repeat(768, 1), ok, 16)
