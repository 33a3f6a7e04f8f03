"""MoCo v3 (`--method moco-v3`): the loss against the paper's pseudocode, the momentum schedule,
keys gathered over two gloo processes, the registry's ViT/ResNet recipes, the asymmetric
augmentation, frozen patch projection, LARS, and exact resume after SIGKILL."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from mocoserve.core.errors import UserError
from mocoserve.train import checkpoint
from mocoserve.train.augment import RECIPES, MultiView, PILGaussianBlur, train_views
from mocoserve.train.config import DataConfig
from mocoserve.train.data import ImageDataset, scan_folder
from mocoserve.train.losses import moco_v3_loss, moco_v3_symmetric_loss
from mocoserve.train.methods import METHODS, MoCoV3, build_method
from mocoserve.train.methods.mocov3 import momentum_at
from mocoserve.train.trainer import Trainer, prepare_config
from tests.test_train_cli import assert_user_error, sigkill_then_resume, train

pytest.importorskip("timm")

VIT_NAME = "timm:vit_small_patch16_224"
VIT_SET = "model.timm_kwargs={img_size: 32, patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2}"
TINY_HEADS = ["--set", "model.hidden_dim=32", "--dim", "16"]
VIT = ["--method", "moco-v3", "--arch", VIT_NAME, "--set", VIT_SET, *TINY_HEADS]
COMMON = ["--image-size", "32", "--workers", "0", "-q"]


# --- the loss: the paper's Algorithm 1, written out by hand ---


def _ctr_reference(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """Alg. 1's ctr(q, k): -log softmax of q_i.k_i/tau over all k_j, averaged, times 2 tau."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        scores = [float(q[i] @ k[j]) / tau for j in range(n)]
        top = max(scores)
        log_denominator = top + math.log(sum(math.exp(s - top) for s in scores))
        total += log_denominator - scores[i]
    return torch.tensor(2 * tau * total / n, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_loss_matches_the_papers_pseudocode(n, tau):
    g = torch.Generator().manual_seed(n * 10 + int(tau * 10))
    q1, q2, k1, k2 = (
        F.normalize(torch.randn(n, 6, generator=g, dtype=torch.float64), dim=1) for _ in range(4)
    )
    torch.testing.assert_close(moco_v3_loss(q1, k2, tau), _ctr_reference(q1, k2, tau))
    symmetric = moco_v3_symmetric_loss(q1, q2, k1, k2, tau)
    expected = _ctr_reference(q1, k2, tau) + _ctr_reference(q2, k1, tau)
    torch.testing.assert_close(symmetric, expected)


def test_momentum_rises_on_a_cosine_from_m0_to_one():
    total, m0 = 1000, 0.99
    ms = [momentum_at(s, total, m0) for s in range(total + 1)]
    assert ms[0] == pytest.approx(m0) and ms[-1] == pytest.approx(1.0)
    assert ms[total // 2] == pytest.approx((1 + m0) / 2)
    assert all(b >= a for a, b in itertools.pairwise(ms))
    assert momentum_at(2 * total, total, m0) == pytest.approx(1.0)  # past the end: stays at 1


# --- keys gathered from every rank: two gloo processes equal one on the global batch ---


def test_symmetric_loss_over_two_gloo_processes_equals_one_process():
    from tests.mocov3_gloo import run_two_processes

    run_two_processes()


# --- the registry: one entry, the paper's recipe chosen by the backbone ---


def _prepare(tmp_path: Path, **overrides):
    base = {"data.root": str(tmp_path), "run.out": str(tmp_path / "out")}
    cfg, _ = prepare_config("moco-v3", None, None, {**base, **overrides}, None)
    return cfg


def test_vit_and_resnet_recipes_come_from_the_registry_and_explicit_options_win(tmp_path):
    assert METHODS["moco-v3"].cls is MoCoV3 and not MoCoV3.has_queue
    vit = _prepare(tmp_path, **{"model.arch": VIT_NAME})
    assert (vit.optim.optimizer, vit.optim.lr, vit.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
    assert (vit.method.temperature, vit.optim.warmup_epochs, vit.optim.epochs) == (0.2, 40, 300)
    assert (vit.model.proj_layers, vit.model.pred_last_bn, vit.data.min_crop_scale) == (
        3,
        True,
        0.08,
    )
    assert (vit.model.dim, vit.model.hidden_dim, vit.method.momentum) == (256, 4096, 0.99)
    assert vit.data.augmentation == "moco-v3" and vit.method.freeze_patch_embed
    resnet = _prepare(tmp_path, **{"model.arch": "resnet50"})
    assert (resnet.optim.optimizer, resnet.optim.lr, resnet.optim.weight_decay) == (
        "lars",
        0.6,
        1e-6,
    )
    assert (resnet.method.temperature, resnet.model.proj_layers, resnet.model.pred_last_bn) == (
        1.0,
        2,
        False,
    )
    mine = _prepare(
        tmp_path,
        **{"model.arch": VIT_NAME, "method.temperature": 0.5, "optim.optimizer": "lars"},
    )
    assert (mine.method.temperature, mine.optim.optimizer, mine.optim.lr) == (0.5, "lars", 1.5e-4)
    with pytest.raises(UserError, match="freeze_patch_embed freezes a ViT's patch projection"):
        _prepare(tmp_path, **{"model.arch": "resnet18", "method.freeze_patch_embed": True})


def test_heads_follow_the_reference_builder():
    cfg = _prepare(
        Path("/nonexistent"),
        **{
            "model.arch": VIT_NAME,
            "model.timm_kwargs": {
                "img_size": 32,
                "patch_size": 4,
                "depth": 2,
                "embed_dim": 64,
                "num_heads": 2,
            },
            "model.hidden_dim": 32,
            "model.dim": 16,
            "data.image_size": 32,
        },
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    projector = method.query_encoder.head.projector
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 16)]
    assert all(m.bias is None for m in linears)
    assert isinstance(projector[-1], nn.BatchNorm1d) and not projector[-1].affine
    predictor = method.query_encoder.head.predictor
    assert sum(isinstance(m, nn.Linear) for m in predictor) == 2
    assert isinstance(predictor[-1], nn.BatchNorm1d)  # the ViT predictor's last BN
    assert not hasattr(method.key_encoder.head, "predictor")  # momentum: no predictor
    q_state = method.query_encoder.state_dict()
    for key, value in method.key_encoder.state_dict().items():
        name = key.replace("head.", "head.projector.", 1) if key.startswith("head.") else key
        assert torch.equal(value, q_state[name]), key
    assert all(not p.requires_grad for p in method.key_encoder.parameters())
    embed = method.query_encoder.backbone.patch_embed
    assert all(not p.requires_grad for p in embed.parameters())
    bound = math.sqrt(6 / (3 * 4 * 4 + 64))  # vits.py's xavier-uniform bound
    assert embed.proj.weight.abs().max() <= bound and torch.equal(embed.proj.bias, torch.zeros(64))
    # export and the probe rebuild the same network from the config alone
    rebuilt = MoCoV3.build_encoder(cfg)
    rebuilt.load_state_dict(method.query_encoder.state_dict())


# --- the asymmetric recipe: per-view blur and solarisation, seeded per sample ---


def _flat(transform: v2.Compose) -> list:
    out = []
    for t in transform.transforms:
        out.append(t)
        if isinstance(t, v2.RandomApply):
            out.extend((t.p, inner) for inner in t.transforms)
    return out


def test_asymmetric_recipe_draws_blur_and_solarisation_per_view(flat_dir):
    r = RECIPES["moco-v3"]
    assert (r.view(0).blur_p, r.view(0).solarize_p) == (1.0, 0.0)
    assert (r.view(1).blur_p, r.view(1).solarize_p) == (0.1, 0.2)
    cfg = DataConfig(image_size=32, augmentation="moco-v3", min_crop_scale=0.08)
    first, second = train_views(cfg)
    one, two = _flat(first), _flat(second)
    assert any(isinstance(t, PILGaussianBlur) for t in one)  # p = 1: always, not RandomApply
    assert not any(isinstance(t, v2.RandomSolarize) for t in one)
    assert any(
        isinstance(t, tuple) and t[0] == 0.1 and isinstance(t[1], PILGaussianBlur) for t in two
    )
    solarize = [t for t in two if isinstance(t, v2.RandomSolarize)]
    assert len(solarize) == 1 and solarize[0].p == 0.2 and solarize[0].threshold == 128
    for view in (one, two):
        jitter = [t for t in view if isinstance(t, tuple) and isinstance(t[1], v2.ColorJitter)]
        assert len(jitter) == 1 and jitter[0][0] == 0.8
        cj = jitter[0][1]
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
            (0.6, 1.4),
            (0.6, 1.4),
            (0.8, 1.2),
            (-0.1, 0.1),
        )
        gray = [t for t in view if isinstance(t, v2.RandomGrayscale)]
        assert len(gray) == 1 and gray[0].p == 0.2
        assert view[0].scale == (0.08, 1.0)
    # both views drawn under the sample's (seed, epoch, index): the same twice, and different
    index = scan_folder(flat_dir)
    ds = ImageDataset(index.files, index.labels, MultiView(train_views(cfg), 2), seed=3)
    a, b = ds[(2, 0)][0], ds[(2, 0)][0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])
    # the solarisation rate of view 2 (only the solariser: the draw the recipe adds)
    solarizer = solarize[0]
    torch.manual_seed(0)
    image = torch.full((3, 4, 4), 200, dtype=torch.uint8)
    hits = sum(int(solarizer(image)[0, 0, 0] != 200) for _ in range(2000)) / 2000
    assert hits == pytest.approx(0.2, abs=0.03)


def test_gpu_augment_refuses_the_asymmetric_recipe_in_one_line(flat_dir, tmp_path):
    result = train(str(flat_dir), *VIT, *COMMON, "--gpu-augment", "--out", str(tmp_path / "r"))
    assert_user_error(result, "--gpu-augment does not run the moco-v3 recipe")


# --- end to end through the CLI ---


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def test_tiny_vit_trains_with_a_falling_loss_and_a_frozen_patch_projection(flat_dir, tmp_path):
    out = tmp_path / "run"
    args = [str(flat_dir), *VIT, *COMMON, "-b", "8", "--epochs", "6", "--lr", "0.05"]
    result = train(*args, "--set", "optim.warmup_epochs=0", "--out", str(out))
    assert result.exit_code == 0, result.output
    losses = _losses(out)
    assert len(losses) == 6 and max(losses[-2:]) < losses[0], losses  # epoch means
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["optimizer"]["param_groups"][0]["weight_decay"] == 0.1  # AdamW's, wd 0.1
    model = ckpt["model"]
    # the frozen projection: as initialised (same seed), in the query and momentum encoders
    cfg, _ = prepare_config(None, None, str(out / "config.yaml"), {}, None)
    torch.manual_seed(cfg.run.seed)
    fresh = build_method(cfg)
    for encoder in ("query_encoder", "key_encoder"):
        for name in ("weight", "bias"):
            key = f"{encoder}.backbone.patch_embed.proj.{name}"
            assert torch.equal(model[key], fresh.state_dict()[key]), key
    moved = "query_encoder.backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(model[moved], fresh.state_dict()[moved])
    # what export rebuilds: the method's encoder takes the checkpoint's query encoder
    encoder = MoCoV3.build_encoder(cfg)
    encoder.load_state_dict(checkpoint.query_encoder_state(ckpt))


def test_resnet18_small_stem_uses_lars_without_adapting_biases_and_norms(flat_dir, tmp_path):
    from timm.optim import Lars

    overrides = {
        "data.root": str(flat_dir),
        "data.image_size": 32,
        "data.workers": 0,
        "model.arch": "resnet18",
        "model.small_stem": True,
        "model.dim": 16,
        "model.hidden_dim": 32,
        "optim.batch_size": 4,
        "optim.epochs": 1,
        "run.out": str(tmp_path / "r"),
        "run.progress": False,
        "run.max_steps": 2,
    }
    cfg, _ = prepare_config("moco-v3", None, None, overrides, None)
    assert (cfg.optim.optimizer, cfg.method.temperature, cfg.model.proj_layers) == ("lars", 1.0, 2)
    trainer = Trainer(cfg)
    try:
        opt = trainer.optimizer
        assert isinstance(opt, Lars)
        weights, others = opt.param_groups
        assert all(p.ndim > 1 for p in weights["params"]) and weights["always_adapt"]
        assert weights["weight_decay"] == 1e-6
        assert all(p.ndim <= 1 for p in others["params"]) and others["weight_decay"] == 0.0
        assert not others["always_adapt"]
        trainable = [p for p in trainer.method.parameters() if p.requires_grad]
        assert len(weights["params"]) + len(others["params"]) == len(trainable)
        result = trainer.fit()
    finally:
        trainer.close()
    assert result.stopped == "max_steps" and result.step == 2
    assert trainer.method.momentum == pytest.approx(momentum_at(1, 6, 0.99))


@pytest.mark.slow  # three runs in fresh processes (a SIGKILL needs one)
def test_sigkill_then_resume_auto_matches_uninterrupted_run(flat_dir, tmp_path):
    args = [str(flat_dir), *VIT, *COMMON, "--epochs", "3", "-b", "4", "--save-every", "1"]
    args += ["--seed", "7"]
    a, b = sigkill_then_resume(args, tmp_path)
    assert a["train_state"]["step"] == b["train_state"]["step"] == 18
    assert any(k.startswith("key_encoder.head.") for k in a["model"])
    for key in a["model"]:  # both encoders, the MLPs' BN statistics
        assert torch.equal(a["model"][key], b["model"][key]), key
    for state_a, state_b in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):  # AdamW's moments
        for name in state_a:
            assert torch.equal(torch.as_tensor(state_a[name]), torch.as_tensor(state_b[name]))


def test_linear_probe_and_export_rebuild_the_moco_v3_network(labelled_dir, tmp_path):
    """lincls and export load a moco-v3 checkpoint into its encoder (projector + predictor)."""
    pre = tmp_path / "pre"
    tiny = ["--arch", "resnet18", "--set", "model.small_stem=true", *TINY_HEADS, *COMMON]
    args = ["--method", "moco-v3", "-b", "4", "--epochs", "1", "--max-steps", "1", *tiny]
    assert train(str(labelled_dir), *args, "--out", str(pre)).exit_code == 0
    probe = train(
        str(labelled_dir),
        "--method",
        "linear",
        "--pretrained",
        str(pre / "checkpoints" / "last.pt"),
        "-b",
        "4",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--workers",
        "0",
        "-q",
        "--out",
        str(tmp_path / "lin"),
    )
    assert probe.exit_code == 0, probe.output
    lin = checkpoint.load(tmp_path / "lin" / "checkpoints" / "last.pt")["model"]
    base = checkpoint.load(pre / "checkpoints" / "last.pt")["model"]
    heads = [k for k in base if k.startswith("query_encoder.head.predictor.")]
    assert heads and all(torch.equal(lin[k], base[k]) for k in heads)
    from typer.testing import CliRunner

    from mocoserve import model as model_package
    from mocoserve.cli import app

    pkg = tmp_path / "pkg"
    ckpt = str(pre / "checkpoints" / "last.pt")
    done = CliRunner().invoke(app, ["export", ckpt, "--output", "head", "--out", str(pkg)])
    assert done.exit_code == 0, done.output
    loaded = model_package.load(pkg)
    assert loaded.manifest.embedding_dim == 16  # the predictor's output, the paper's q
