"""The Trainer's parts in-process: Trainer, Checkpointer, MetricsLog, registry, recipes, config."""

import ast
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mocoserve.core.errors import RunError, UserError
from mocoserve.train import checkpoint
from mocoserve.train.augment import (
    GRAY,
    HUE,
    RECIPES,
    SIGMA,
    GeometricView,
    color_augment_batch,
    draw_view_params,
)
from mocoserve.train.checkpoint import Checkpointer
from mocoserve.train.config import DataConfig, TrainConfig, parse_set
from mocoserve.train.configure import build_config, method_defaults
from mocoserve.train.data import EpochSampler
from mocoserve.train.methods import METHODS, LinearProbe, MoCo, SupCon, SupConQueue, get_spec
from mocoserve.train.metrics import MetricsLog
from mocoserve.train.trainer import Trainer, TrainState

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_overrides(root: Path, out: Path, **more) -> dict:
    return {
        "data.root": str(root),
        "data.image_size": 32,
        "data.workers": 0,
        "model.arch": "resnet18",
        "model.dim": 8,
        "method.queue_size": 16,
        "optim.batch_size": 4,
        "optim.epochs": 2,
        "run.out": str(out),
        "run.progress": False,
        "run.log_every": 2,
        **more,
    }


# --- the registry: one place that knows each method ---


def test_registry_declares_each_method():
    assert set(METHODS) == {"moco-v1", "moco-v2", "moco-v3", "supcon", "supcon-queue", "linear"}
    assert METHODS["moco-v1"].cls is MoCo and METHODS["supcon-queue"].cls is SupConQueue
    assert [n for n, s in METHODS.items() if s.cls.needs_labels] == [
        "supcon",
        "supcon-queue",
        "linear",
    ]
    assert [n for n, s in METHODS.items() if s.cls.has_queue] == [
        "moco-v1",
        "moco-v2",
        "supcon-queue",
    ]
    assert LinearProbe.num_views == 1 and SupCon.num_views == 2
    assert not LinearProbe.trains_encoder and LinearProbe.report_file == "lincls.json"
    assert MoCo.compile_targets == ("query_encoder", "key_encoder")
    for name, spec in METHODS.items():
        cfg = method_defaults(name)
        assert cfg.method.name == name and cfg.data.augmentation == spec.augmentation
        assert spec.augmentation in RECIPES
    with pytest.raises(UserError, match="unknown method 'byol'"):
        get_spec("byol")


def test_queue_methods_refuse_an_empty_queue_and_the_probe_needs_a_checkpoint():
    with pytest.raises(UserError, match="moco-v1 needs a queue"):
        build_config("moco-v1", overrides={"method.queue_size": 0})
    assert build_config("supcon", overrides={"method.queue_size": 0}).method.queue_size == 0
    with pytest.raises(UserError, match="needs --pretrained"):
        build_config("linear")


METHOD_NAMES = set(METHODS)


def _compares_method_name(node: ast.AST) -> bool:
    """`x == "supcon"`, `x in ("moco-v1", ...)`: a method name used as a comparison operand."""
    if not isinstance(node, ast.Compare):
        return False
    if isinstance(node.left, ast.Attribute) and node.left.attr == "head":
        return False  # model.head == "linear": a head type that shares a method's name
    for operand in [node.left, *node.comparators]:
        values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
        if any(isinstance(v, ast.Constant) and v.value in METHOD_NAMES for v in values):
            return True
    return False


def test_no_method_name_comparisons_outside_the_registry():
    found = []
    for folder in ("mocoserve", "train", "export", "app"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if _compares_method_name(node):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


# --- augmentation recipes: one definition for the CPU transform and the GPU draw ---


@pytest.mark.parametrize("name", ["moco-v1", "moco-v2", "supcon"])
def test_gpu_parameters_follow_the_recipe(name):
    r = RECIPES[name]
    torch.manual_seed(0)
    params = torch.stack([draw_view_params(r) for _ in range(2000)])
    b, h = r.jitter[0], r.jitter[3]
    jittered = params[:, 0] != 1.0
    assert params[jittered, 0].min() >= 1 - b and params[jittered, 0].max() <= 1 + b
    assert params[:, HUE].abs().max() <= h and params[:, HUE].abs().max() > 0.8 * h
    assert jittered.float().mean() == pytest.approx(r.jitter_p, abs=0.04)
    assert params[:, GRAY].mean() == pytest.approx(r.grayscale_p, abs=0.04)
    blurred = (params[:, SIGMA] > 0).float().mean()
    assert blurred == pytest.approx(r.blur_p, abs=0.04)
    if r.blur_p:
        lo, hi = r.blur_sigma
        sigmas = params[params[:, SIGMA] > 0, SIGMA]
        assert sigmas.min() >= lo and sigmas.max() <= hi
    no_blur = torch.stack([draw_view_params(r, blur=False) for _ in range(200)])
    assert (no_blur[:, SIGMA] == 0).all()


def test_gpu_path_keeps_moco_v1s_grayscale_before_jitter():
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, 10, 10), generator=g, dtype=torch.uint8)
    params = torch.tensor([[1.2, 0.8, 1.3, 0.3, 1.0, 0.0]] * 3)  # gray, then a hue turn
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ours = color_augment_batch(images, params, mean, std, RECIPES["moco-v1"])
    for i in range(3):
        x = TF.rgb_to_grayscale(images[i].float() / 255, num_output_channels=3)
        x = TF.adjust_hue(
            TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 1.2), 0.8), 1.3), 0.3
        )
        torch.testing.assert_close(
            ours[i], TF.normalize(x, list(mean), list(std)), atol=1e-4, rtol=1e-4
        )
    # the moco-v2 order (jitter, then gray) gives another image for the same parameters
    v2_order = color_augment_batch(images, params, mean, std, RECIPES["moco-v2"])
    assert not torch.allclose(ours, v2_order)


def test_the_linear_recipe_has_nothing_for_the_gpu():
    with pytest.raises(ValueError, match="nothing to run on the GPU"):
        GeometricView(DataConfig(augmentation="linear"))


# --- the typed config ---


def test_yaml_values_of_the_wrong_type_are_refused(tmp_path):
    f = tmp_path / "c.yaml"
    for text, message in [
        ("optim: {epochs: 2.7}", "optim.epochs must be an integer, got 2.7"),
        ("data: {workers: true}", "data.workers must be an integer or null, got True"),
        ("optim: {lr: fast}", "optim.lr must be a number, got 'fast'"),
        ("optim: {milestones: [30, 6.5]}", "optim.milestones must be an integer"),
        ("data: {mean: [0.5, 0.5]}", "data.mean must be a list of 3 numbers"),
        ("run: {device: tpu}", "run.device must be one of auto, cpu, cuda, got 'tpu'"),
        ("model: {small_stem: 1}", "model.small_stem must be true or false, got 1"),
        ("data: {root: 123}", "data.root must be text, got 123"),
    ]:
        f.write_text(text + "\n")
        with pytest.raises(UserError) as error:
            build_config(None, None, f, {})
        assert message in str(error.value) and "\n" not in str(error.value)
    f.write_text("optim: {lr: 1, milestones: [3, 6]}\ndata: {mean: [0.5, 0.5, 0.5]}\n")
    cfg = build_config(None, None, f, {})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.milestones == [3, 6] and cfg.data.mean == (0.5, 0.5, 0.5)


def test_set_reaches_every_field_with_its_type():
    got = parse_set(
        [
            "optim.warmup_epochs=3",
            "data.mean=[0.5, 0.4, 0.3]",
            "optim.milestones=[30,60]",
            "data.val=null",
            "run.out=1234",
            "method.pretrained=runs/x.pt",
            "data.eval_resize=40",
            "run.precision=fp16",
            "data.blur=false",
            "method.temperature=0.5",
        ]
    )
    assert got == {
        "optim.warmup_epochs": 3,
        "data.mean": (0.5, 0.4, 0.3),
        "optim.milestones": [30, 60],
        "data.val": None,
        "run.out": "1234",
        "method.pretrained": "runs/x.pt",
        "data.eval_resize": 40,
        "run.precision": "fp16",
        "data.blur": False,
        "method.temperature": 0.5,
    }
    for bad, message in [
        ("optim.epochs=2.5", "--set optim.epochs must be an integer"),
        ("optim.epochz=2", "unknown --set key 'optim.epochz'"),
        ("nonsense", "--set takes section.field=value"),
        ("run.device=tpu", "must be one of auto, cpu, cuda"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_set([bad])


def test_default_workers_follow_the_machine(monkeypatch):
    cfg = DataConfig()
    cores = len(os.sched_getaffinity(0))
    assert cfg.resolved_workers() == max(1, min(8, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))
    assert cfg.resolved_workers() == 1
    assert DataConfig(workers=0).resolved_workers() == 0


# --- MetricsLog ---


def test_metrics_log_averages_every_scalar_and_stops_on_nan(tmp_path):
    log = MetricsLog(tmp_path, log_every=2, images_per_step=8, device=CPU)
    assert not log.should_log(1, False) and log.should_log(2, False) and log.should_log(3, True)
    log.update({"loss": torch.tensor(2.0), "contrast_top1": torch.tensor(10.0)})
    log.update({"loss": torch.tensor(4.0), "contrast_top1": torch.tensor(30.0)})
    record = log.log(epoch=1, step=2, lr=0.1)
    assert record["loss"] == 3.0 and record["contrast_top1"] == 20.0 and record["lr"] == 0.1
    assert record["images_per_s"] > 0
    log.update({"loss": torch.tensor(6.0), "contrast_top1": torch.tensor(50.0)})
    assert log.log(epoch=1, step=3, lr=0.1)["loss"] == 6.0  # the window restarted
    assert log.end_epoch() == {"train_loss": 4.0, "train_contrast_top1": 30.0}
    log.update({"loss": torch.tensor(float("nan"))})
    with pytest.raises(RunError, match="loss is nan at step 4"):
        log.log(epoch=2, step=4, lr=0.1)
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 3]
    assert list(tmp_path.glob("tb/events.*"))


# --- Checkpointer ---


class Counter:
    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = int(state["value"])


def test_checkpointer_saves_restores_and_keeps_epochs(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = TrainState(epoch=2, epoch_step=0, step=10)
    cfg = TrainConfig()
    head = checkpoint.header("moco-v2", cfg, ["a", "b"])
    prepared = []
    saver = Checkpointer(
        tmp_path / "ck",
        head,
        {"model": model, "optimizer": opt, "train_state": state, "extra": Counter(7)},
        save_every=2,
        prepare=lambda: prepared.append(1),
    )
    assert saver.keeps(2, final=False) and not saver.keeps(3, False) and saver.keeps(3, True)
    kept = saver.save({"train_loss": 1.5}, keep_epoch=2)
    assert kept == tmp_path / "ck" / "epoch_0002.pt" and prepared == [1]
    assert os.stat(kept).st_ino == os.stat(saver.last).st_ino  # a hard link, not a copy
    expected_rng = torch.rand(3)  # what the next draw is once the saved RNG is back

    fresh = nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_state, extra = TrainState(), Counter()
    loader = Checkpointer(
        tmp_path / "ck",
        head,
        {"model": fresh, "optimizer": fresh_opt, "train_state": fresh_state, "extra": extra},
    )
    ckpt = loader.restore(saver.last)
    assert ckpt["classes"] == ["a", "b"] and ckpt["metrics"] == {"train_loss": 1.5}
    assert fresh_state == state and extra.value == 7
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["momentum_buffer"] is not None
    loader.resume_rng()
    torch.testing.assert_close(torch.rand(3), expected_rng)
    # a component the file lacks (not an optional one) is a clear error
    with pytest.raises(UserError, match="has no scaler state"):
        Checkpointer(tmp_path / "ck", head, {"scaler": Counter()}).restore(saver.last)


def test_checkpointer_saves_by_the_clock_only_at_log_steps(tmp_path, monkeypatch):
    saver = Checkpointer(tmp_path, {}, {}, save_minutes=1.0)
    assert not saver.should_save(True, CPU)
    saver.last_save -= 61
    assert not saver.should_save(False, CPU) and saver.should_save(True, CPU)
    reader = Checkpointer(tmp_path, {}, {}, save_minutes=1.0, writer=False)
    reader.last_save -= 61
    assert not reader.should_save(True, CPU)  # only the writing rank's clock counts
    assert reader.save() is None


def test_a_version_1_checkpoint_loads_and_a_newer_one_is_named(tmp_path):
    old = {
        "format": checkpoint.FORMAT,
        "version": 1,
        "config": TrainConfig().to_dict(),
        "epoch": 3,
        "epoch_step": 2,
        "step": 20,
        "model": {},
    }
    torch.save(old, tmp_path / "v1.pt")
    assert checkpoint.load(tmp_path / "v1.pt")["train_state"] == {
        "epoch": 3,
        "epoch_step": 2,
        "step": 20,
    }
    torch.save({**old, "version": 9}, tmp_path / "v9.pt")
    with pytest.raises(UserError, match="checkpoint version 9; this mocoserve reads up to 2"):
        checkpoint.load(tmp_path / "v9.pt")


def test_sampler_maps_a_saved_position_to_another_layout():
    saved = EpochSampler(n=100, batch_size=8, seed=1)
    resumed = EpochSampler(n=100, batch_size=8, seed=1)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.resume_position(5) == (5, None)
    wider = EpochSampler(n=100, batch_size=12, seed=1)
    wider.load_state_dict(saved.state_dict())
    skip, note = wider.resume_position(5)  # 40 samples done, batches of 12 now
    assert skip == 3 and "global batch changed (8 -> 12)" in note
    other = EpochSampler(n=120, batch_size=8, seed=1)
    other.load_state_dict(saved.state_dict())
    assert "reordered" in other.resume_position(5)[1]


# --- the Trainer, in-process ---


def test_trainer_steps_logs_contrastive_accuracy_and_saves(flat_dir, tmp_path):
    cfg = build_config("moco-v2", overrides=tiny_overrides(flat_dir, tmp_path / "run"))
    trainer = Trainer(cfg)
    try:
        assert trainer.steps_per_epoch == 6 and trainer.global_batch == 4
        batch = next(iter(trainer.loader))
        before = trainer.method.query_encoder.head[0].weight.detach().clone()
        out = trainer.train_step(batch)
        assert set(out) == {"loss", "contrast_top1", "contrast_top5"}
        assert trainer.state == TrainState(epoch=0, epoch_step=1, step=1)
        assert 0 <= out["contrast_top1"] <= out["contrast_top5"] <= 100
        assert not torch.equal(before, trainer.method.query_encoder.head[0].weight)
        assert int(trainer.method.queue_ptr) == 4
    finally:
        trainer.close()

    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    assert result.stopped is None and (result.epoch, result.step) == (2, 12)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all("contrast_top1" in r and "contrast_top5" in r for r in steps)
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2] and "train_contrast_top1" in epochs[0]
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert saved["version"] == 2 and saved["train_state"] == {
        "epoch": 2,
        "epoch_step": 0,
        "step": 12,
    }
    assert saved["sampler"] == {"seed": 0, "n": 24, "global_batch": 4}
    assert math.isfinite(saved["metrics"]["train_loss"])


def test_trainer_resumes_mid_epoch_in_process_to_the_same_weights(flat_dir, tmp_path):
    def run(out: Path, resume: Path | None = None, **more) -> TrainState:
        cfg = build_config("moco-v2", overrides=tiny_overrides(flat_dir, out, **more))
        trainer = Trainer(cfg, resume)
        try:
            trainer.fit()
            return trainer.state
        finally:
            trainer.close()

    run(tmp_path / "a")
    assert run(tmp_path / "b", **{"run.max_steps": 4}) == TrainState(0, 4, 4)
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    assert run(tmp_path / "b", last) == TrainState(2, 0, 12)
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(last)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_method_that_needs_labels_is_refused_on_a_flat_folder(flat_dir, tmp_path):
    cfg = build_config("supcon", overrides=tiny_overrides(flat_dir, tmp_path / "r"))
    with pytest.raises(UserError, match="supcon needs labels"):
        Trainer(cfg)
