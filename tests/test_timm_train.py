"""timm backbones (`--arch timm:<name>`) through `mocoserve train` / `lincls`: every method,
split BN where the net has BatchNorm, exact resume, two gloo processes, one-line errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mocoserve.cli import app
from mocoserve.train import checkpoint
from mocoserve.train.config import ModelConfig, TrainConfig
from mocoserve.train.methods import build_method
from mocoserve.train.models import SplitBatchNorm, SplitBatchNormAct, build_backbone
from tests.test_train_cli import (
    assert_user_error,
    runner,
    sigkill_then_resume,
    train,
)

pytest.importorskip("timm")

VIT_NAME = "timm:vit_tiny_patch16_224"
VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}
VIT = [
    "--arch",
    VIT_NAME,
    "--set",
    "model.timm_kwargs={img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2}",
]
CONVNEXT = [
    "--arch",
    "timm:convnext_tiny",
    "--set",
    "model.timm_kwargs={depths: [1, 1, 1, 1], dims: [16, 32, 64, 128]}",
]
# a timm net with BatchNorm, narrowed (timm's ResNet takes its widths as arguments)
RESNET = ["--arch", "timm:resnet10t", "--set", "model.timm_kwargs={channels: [16, 32, 64, 128]}"]
COMMON = ["--image-size", "32", "--dim", "16", "--workers", "0", "-q"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("net", "method", "extra"),
    [
        (VIT, "moco-v2", []),
        (VIT, "supcon", []),
        (CONVNEXT, "moco-v1", []),
        (RESNET, "supcon-queue", ["--bn-splits", "2"]),
    ],
    ids=["vit-moco-v2", "vit-supcon", "convnext-moco-v1", "resnet10t-supcon-queue-split-bn"],
)
def test_timm_backbones_train_every_method(net, method, extra, labelled_dir, val_dir, tmp_path):
    out = tmp_path / "run"
    result = train(
        str(labelled_dir),
        "--method",
        method,
        "--epochs",
        "2",
        "-b",
        "8",
        "-K",
        "20",
        "--val",
        str(val_dir),
        "--knn-every",
        "1",
        "--out",
        str(out),
        *net,
        *COMMON,
        *extra,
    )
    assert result.exit_code == 0, result.output
    assert "done: 2 epochs, 6 steps" in result.output
    records = _records(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in epochs)  # the k-NN monitor
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["arch"] == net[1] and ckpt["train_state"]["step"] == 6
    if net is VIT:
        assert ckpt["config"]["model"]["timm_kwargs"] == VIT_KWARGS
    if method != "supcon":
        assert int(ckpt["model"]["queue_ptr"]) == (6 * 8) % 20
    # ViT and ConvNeXt normalise with LayerNorm: a method with a key encoder says so, once
    note = f"note: shuffled BN is off: {net[1]} has no BatchNorm"
    expected = net is not RESNET and method != "supcon"
    assert result.output.count(note) == int(expected), result.output


def _cfg(arch: str, **model: object) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.image_size = 32
    cfg.model = ModelConfig(arch=arch, dim=16, **model)  # type: ignore[arg-type]
    cfg.method.queue_size = 16
    return cfg


def test_shuffled_bn_follows_the_backbone_not_the_setting():
    """A ViT has no BatchNorm: shuffle_bn is off (no gather, no permutation); a BN net keeps it."""
    vit = build_method(_cfg(VIT_NAME, timm_kwargs=VIT_KWARGS))
    assert not vit.shuffle_bn and len(vit.notes) == 1
    assert vit.notes[0].startswith(f"shuffled BN is off: {VIT_NAME} has no BatchNorm")
    resnet = build_method(_cfg("timm:resnet10t", bn_splits=2))
    assert resnet.shuffle_bn and resnet.notes == []
    cfg = _cfg(VIT_NAME, timm_kwargs=VIT_KWARGS)
    cfg.method.shuffle_bn = False
    assert build_method(cfg).notes == []  # not asked for, nothing to say
    cfg.method.name, cfg.method.queue_size = "supcon", 0
    assert build_method(cfg).notes == []  # in-batch SupCon has no key encoder to shuffle


@pytest.mark.parametrize("arch", ["timm:resnet10t", "timm:efficientnet_b0"])
def test_split_bn_on_timm_bn_nets(arch):
    """Every BatchNorm2d (timm's BatchNormAct2d too) becomes split: each split normalised alone."""
    plain, _ = build_backbone(ModelConfig(arch=arch))
    torch.manual_seed(0)
    split, _ = build_backbone(ModelConfig(arch=arch, bn_splits=2))
    assert not any(
        isinstance(m, nn.BatchNorm2d) and not isinstance(m, SplitBatchNorm) for m in split.modules()
    )
    layers = [m for m in split.modules() if isinstance(m, SplitBatchNorm)]
    assert layers and all(m.num_splits == 2 for m in layers)
    assert set(plain.state_dict()) == set(split.state_dict())  # exports load it as plain BN
    bn_act = [m for m in layers if isinstance(m, SplitBatchNormAct)]
    assert bool(bn_act) == (arch == "timm:efficientnet_b0")
    layer = (bn_act or layers)[0]
    x = torch.randn(4, layer.num_features, 5, 5)
    with torch.no_grad():
        out = layer.train()(x.clone())
        # what split j sees alone: samples j, j+2 (MoCo demo's layout), plain BN of them
        ref = nn.BatchNorm2d(layer.num_features).train()
        ref.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ref.state_dict()})
        ref_act = layer.act if isinstance(layer, SplitBatchNormAct) else nn.Identity()
        for j in range(2):
            assert torch.allclose(out[j::2], ref_act(ref(x[j::2])), atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*VIT, "--bn-splits", "2"], "has none; leave --bn-splits at 1"),
        (["--arch", "timm:vit_nope_patch16_224"], "unknown timm model 'vit_nope_patch16_224'"),
        (["--arch", VIT_NAME], "takes 224x224 px images, but --image-size is 32"),
        (
            ["--arch", VIT_NAME, "--set", "model.timm_kwargs={img_size: 32, patch_sze: 4}"],
            "timm cannot build vit_tiny_patch16_224",
        ),
        (["--arch", VIT_NAME, "--set", "model.timm_kwargs={pretrained: true}"], "weights come"),
    ],
    ids=["bn-splits-on-vit", "unknown-name", "image-size", "bad-kwarg", "pretrained"],
)
def test_timm_mistakes_are_one_line_errors(args, message, labelled_dir, tmp_path):
    result = train(str(labelled_dir), "-b", "8", "--out", str(tmp_path / "r"), *COMMON, *args)
    assert_user_error(result, message)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_vit_mid_epoch_stop_and_resume_is_exact(flat_dir, tmp_path):
    args = [str(flat_dir), "--epochs", "2", "-b", "4", "-K", "10", *VIT, *COMMON]
    assert train(*args, "--out", str(tmp_path / "a")).exit_code == 0
    first = train(*args, "--out", str(tmp_path / "b"), "--max-steps", "8")
    assert first.exit_code == 0 and "stopped after 8 steps" in first.output, first.output
    ckpt = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["train_state"] == {"epoch": 1, "epoch_step": 2, "step": 8}
    assert train(*args, "--out", str(tmp_path / "b"), "--resume", "auto").exit_code == 0
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert any(k.startswith("query_encoder.backbone.blocks.1.") for k in a)  # the ViT's state
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow  # three processes start (torch + timm imports): over 20 s on two cores
def test_vit_sigkill_then_resume_auto_matches_uninterrupted_run(flat_dir, tmp_path):
    args = [str(flat_dir), "--epochs", "3", "-b", "4", "-K", "10", "--save-every", "1"]
    args += ["--seed", "7", *VIT, *COMMON]
    a, b = sigkill_then_resume(args, tmp_path)
    assert a["train_state"]["step"] == b["train_state"]["step"] == 18
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_linear_probe_on_a_timm_backbone(labelled_dir, val_dir, tmp_path):
    pre = tmp_path / "pre"
    result = train(
        str(labelled_dir), "--epochs", "1", "-b", "8", "-K", "16", "--out", str(pre), *VIT, *COMMON
    )
    assert result.exit_code == 0, result.output
    ckpt = str(pre / "checkpoints" / "last.pt")
    probe = ["lincls", str(labelled_dir), "--pretrained", ckpt, "-b", "8", "--workers", "0", "-q"]
    result = runner.invoke(
        app, [*probe, "--val", str(val_dir), "--epochs", "2", "--out", str(tmp_path / "lin")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lin" / "lincls.json").read_text())
    assert 0 <= report["val_top1"] <= report["val_top5"] <= 100 and report["epoch"] == 2
    saved = checkpoint.load(tmp_path / "lin" / "checkpoints" / "last.pt")
    assert saved["config"]["model"]["timm_kwargs"] == VIT_KWARGS  # the same backbone, rebuilt
    assert saved["model"]["fc.weight"].shape == (3, 64)  # the ViT's embed_dim
    other = "model.timm_kwargs={img_size: 32, patch_size: 4, depth: 1, embed_dim: 64, num_heads: 2}"
    wrong = runner.invoke(app, [*probe, "--set", other, "--out", str(tmp_path / "lin2")])
    assert_user_error(wrong, "network, not")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_vit_under_two_gloo_processes(labelled_dir, val_dir, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mocoserve", "train"]
    cmd += [str(labelled_dir), "--epochs", "2", "-b", "4", "-K", "20", "--val", str(val_dir)]
    cmd += ["--knn-every", "1", "--out", str(out), *VIT, *COMMON]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stderr and "global 8" in result.stderr
    assert result.stderr.count("shuffled BN is off") == 1  # rank 0 says it, once
    assert result.stdout.count("done: 2 epochs, 6 steps") == 1
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["train_state"]["step"] == 6
    assert int(ckpt["model"]["queue_ptr"]) == (6 * 8) % 20  # keys of both ranks enqueued
