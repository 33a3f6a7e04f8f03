"""`mocoserve train` / `lincls` end to end on tiny folders: resume, pre-emption, torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.train import checkpoint

runner = CliRunner()
TINY = ["--arch", "resnet18", "--image-size", "32", "--dim", "16", "--workers", "0", "-q"]


def train(*args: str):
    result = runner.invoke(app, ["train", *args])
    return result


def assert_user_error(result, message: str, code: int = 2):
    """Exactly one line, `error: ...` holding the message, and the exit code (as README says)."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], result.output


def state_of(path: Path) -> dict:
    return checkpoint.load(path)["model"]


@pytest.mark.parametrize("method", ["moco-v1", "moco-v2", "supcon", "supcon-queue"])
def test_each_method_end_to_end(method, labelled_dir, val_dir, tmp_path):
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
        "--bn-splits",
        "2",
        "--val",
        str(val_dir),
        "--knn-every",
        "1",
        "--out",
        str(out),
        *TINY,
    )
    assert result.exit_code == 0, result.output
    assert "done: 2 epochs, 6 steps" in result.output
    assert (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert steps and all(r["images_per_s"] > 0 and r["lr"] > 0 for r in steps[:-1])
    epochs = [r for r in records if "train_loss" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["knn_top1"] <= 100 for r in epochs)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["method"] == method and ckpt["train_state"]["epoch"] == 2
    assert ckpt["train_state"]["step"] == 6
    assert {"model", "optimizer", "scaler", "scheduler", "rng", "config"} <= set(ckpt)
    assert (out / "checkpoints" / "epoch_0002.pt").is_file()
    if method != "supcon":
        assert ckpt["model"]["queue"].shape == (20, 16)
        assert int(ckpt["model"]["queue_ptr"]) == (6 * 8) % 20


def test_gpu_augment_trains_and_resumes_exactly(flat_dir, tmp_path):
    """--gpu-augment on the CPU: same code path as on a GPU; still deterministic on resume."""
    args = [str(flat_dir), "--epochs", "2", "-b", "4", "-K", "10", "--gpu-augment", *TINY]
    assert train(*args, "--out", str(tmp_path / "a")).exit_code == 0
    assert train(*args, "--out", str(tmp_path / "b"), "--max-steps", "7").exit_code == 0
    assert train(*args, "--out", str(tmp_path / "b"), "--resume", "auto").exit_code == 0
    a = state_of(tmp_path / "a" / "checkpoints" / "last.pt")
    b = state_of(tmp_path / "b" / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "gpu_augment: true" in (tmp_path / "a" / "config.yaml").read_text()


def test_unlabelled_folder_trains_moco(flat_dir, val_dir, tmp_path):
    result = train(
        str(flat_dir),
        "--epochs",
        "1",
        "-b",
        "8",
        "-K",
        "16",
        "--val",
        str(val_dir),
        "--out",
        str(tmp_path / "r"),
        *TINY,
    )
    assert result.exit_code == 0, result.output
    assert "knn_top1" in (tmp_path / "r" / "metrics.jsonl").read_text()  # leave-one-out on val


def test_linear_probe_keeps_backbone_and_reports(labelled_dir, val_dir, tmp_path):
    pre = tmp_path / "pre"
    assert (
        train(
            str(labelled_dir), "--epochs", "1", "-b", "8", "-K", "16", "--out", str(pre), *TINY
        ).exit_code
        == 0
    )
    result = runner.invoke(
        app,
        [
            "lincls",
            str(labelled_dir),
            "--pretrained",
            str(pre / "checkpoints" / "last.pt"),
            "--val",
            str(val_dir),
            "--epochs",
            "2",
            "-b",
            "8",
            "--workers",
            "0",
            "-q",
            "--out",
            str(tmp_path / "lin"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lin" / "lincls.json").read_text())
    assert 0 <= report["val_top1"] <= report["val_top5"] <= 100 and report["epoch"] == 2
    saved = checkpoint.load(tmp_path / "lin" / "checkpoints" / "last.pt")
    lin, base = saved["model"], state_of(pre / "checkpoints" / "last.pt")
    for key, value in base.items():  # the fit ran the sanity check too; check it here again
        if key.startswith("query_encoder."):
            assert torch.equal(lin[key], value), key
    assert not any(k.startswith("key_encoder.") or k == "queue" for k in lin)
    # the fc trained: away from its init (normal std 0.01, zero bias)
    assert lin["fc.bias"].abs().sum() > 0 and lin["fc.weight"].shape == (3, 512)
    # the MoCo protocol: lr 30 per 256, no weight decay, steps at 60/80, the linear recipe
    cfg = saved["config"]
    assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == (30.0, 0.0)
    assert (cfg["optim"]["schedule"], cfg["optim"]["milestones"]) == ("step", [60, 80])
    assert cfg["data"]["augmentation"] == "linear" and cfg["model"]["bn_splits"] == 1


def test_linear_probe_fails_when_its_backbone_moves(labelled_dir, tmp_path, monkeypatch):
    """The protocol's check: a probe whose BN statistics drift (train mode) fails the run."""
    from mocoserve.core.errors import RunError
    from mocoserve.train.configure import build_config
    from mocoserve.train.methods import LinearProbe
    from mocoserve.train.trainer import Trainer

    pre = tmp_path / "pre"
    args = [str(labelled_dir), "--epochs", "1", "-b", "8", "-K", "16", "--out", str(pre), *TINY]
    assert train(*args).exit_code == 0
    monkeypatch.setattr(LinearProbe, "train", lambda self, mode=True: nn.Module.train(self, mode))
    cfg = build_config(
        "linear",
        overrides={
            "data.root": str(labelled_dir),
            "data.workers": 0,
            "method.pretrained": str(pre / "checkpoints" / "last.pt"),
            "optim.epochs": 1,
            "optim.batch_size": 8,
            "run.out": str(tmp_path / "lin"),
            "run.progress": False,
        },
    )
    LinearProbe.adopt_config(cfg, {})
    trainer = Trainer(cfg)
    try:
        with pytest.raises(RunError, match="changed the frozen backbone"):
            trainer.fit()
    finally:
        trainer.close()
    assert not (tmp_path / "lin" / "lincls.json").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, labelled_dir, flat_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "o")
    assert_user_error(train(str(tmp_path / "nope"), "--out", out, *TINY), "image folder not found")
    assert_user_error(train(str(empty), "--out", out, *TINY), "no images in")
    assert_user_error(
        train(str(flat_dir), "--method", "supcon", "-b", "8", "--out", out, *TINY),
        "supcon needs labels",
    )
    assert_user_error(
        train(str(labelled_dir), "-b", "64", "--out", out, *TINY), "larger than the dataset"
    )
    assert_user_error(
        train(str(labelled_dir), "--method", "byol", "--out", out, *TINY), "unknown method"
    )
    assert_user_error(
        train(str(labelled_dir), "--arch", "vgg11", "--out", out, "-b", "8"), "unknown --arch"
    )
    not_ckpt = tmp_path / "weights.pt"
    torch.save({"hello": torch.zeros(1)}, not_ckpt)
    assert_user_error(
        train(str(labelled_dir), "--resume", str(not_ckpt), "--out", out, *TINY),
        "is not a mocoserve checkpoint",
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip")
    assert_user_error(
        runner.invoke(
            app, ["lincls", str(labelled_dir), "--pretrained", str(garbage), "--out", out]
        ),
        "is not a mocoserve checkpoint (not a torch.save file)",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_a_gpu_is_a_user_error(labelled_dir, tmp_path):
    result = train(str(labelled_dir), "--device", "cuda", "-b", "8", "--out", str(tmp_path), *TINY)
    assert_user_error(result, "no CUDA GPU is available")


def test_resume_with_another_method_or_arch_is_refused(labelled_dir, tmp_path):
    out = str(tmp_path / "r")
    assert (
        train(
            str(labelled_dir), "--epochs", "1", "-b", "8", "-K", "16", "--out", out, *TINY
        ).exit_code
        == 0
    )
    assert_user_error(
        train(
            str(labelled_dir),
            "--method",
            "supcon",
            "--resume",
            "auto",
            "-b",
            "8",
            "--out",
            out,
            *TINY,
        ),
        "was trained with method.name='moco-v2', not 'supcon'",
    )
    assert_user_error(
        train(str(labelled_dir), "--resume", "auto", "--out", out, *TINY[2:], "--arch", "resnet34"),
        "was trained with model.arch='resnet18'",
    )
    # more epochs on resume is allowed; the rest of the config comes from the checkpoint
    result = train(str(labelled_dir), "--resume", "auto", "--epochs", "2", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert checkpoint.load(Path(out) / "checkpoints" / "last.pt")["train_state"]["epoch"] == 2


def test_yaml_config_is_read_and_saved(labelled_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: {name: moco-v1, queue_size: 12}\noptim: {epochs: 1, batch_size: 8}\n")
    out = tmp_path / "r"
    result = train(str(labelled_dir), "--config", str(cfg), "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    saved = (out / "config.yaml").read_text()
    assert "name: moco-v1" in saved and "queue_size: 12" in saved
    cfg.write_text("optim: [1, 2]\n")
    assert_user_error(
        train(str(labelled_dir), "--config", str(cfg), "--out", str(out), *TINY),
        "section 'optim' must be a mapping",
    )


def test_mid_epoch_stop_and_resume_is_exact(flat_dir, tmp_path):
    """--max-steps stops inside an epoch; resuming continues with the same batches and RNG."""
    args = [str(flat_dir), "--epochs", "2", "-b", "4", "-K", "10", "--bn-splits", "2", *TINY]
    assert train(*args, "--out", str(tmp_path / "a")).exit_code == 0
    first = train(*args, "--out", str(tmp_path / "b"), "--max-steps", "8")
    assert first.exit_code == 0 and "stopped after 8 steps" in first.output, first.output
    ckpt = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert ckpt["train_state"] == {"epoch": 1, "epoch_step": 2, "step": 8}  # 6 steps per epoch
    assert train(*args, "--out", str(tmp_path / "b"), "--resume", "auto").exit_code == 0
    a = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 12
    a, b = a["model"], b["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mocoserve", "train", *args]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def sigkill_then_resume(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """Train `args` uninterrupted, and again SIGKILLed after epoch 1 then `--resume auto`
    (3 epochs, saved each); the two last.pt checkpoints, loaded."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    clean = subprocess.run(
        _cli(*args, "--out", str(tmp_path / "clean")), env=env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    killed_out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*args, "--out", str(killed_out)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(killed_out / "checkpoints" / "epoch_0001.pt", proc)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_out / "checkpoints" / "epoch_0003.pt").exists()
    resumed = subprocess.run(
        _cli(*args, "--out", str(killed_out), "--resume", "auto"),
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    return (
        checkpoint.load(tmp_path / "clean" / "checkpoints" / "last.pt"),
        checkpoint.load(killed_out / "checkpoints" / "last.pt"),
    )


def test_sigkill_then_resume_auto_matches_uninterrupted_run(flat_dir, tmp_path):
    args = [
        str(flat_dir),
        "--epochs",
        "3",
        "-b",
        "4",
        "-K",
        "10",
        "--bn-splits",
        "2",
        "--save-every",
        "1",
        "--seed",
        "7",
        *TINY[:-3],
        "--workers",
        "2",
        "-q",
    ]
    a, b = sigkill_then_resume(args, tmp_path)
    assert a["train_state"]["step"] == b["train_state"]["step"] == 18
    for key in a["model"]:  # weights, BN statistics, key encoder, queue and its pointer
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_sigterm_saves_a_checkpoint_and_exits_zero(flat_dir, tmp_path):
    out = tmp_path / "r"
    args = [str(flat_dir), "--epochs", "50", "-b", "4", "-K", "10", "--out", str(out), *TINY]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in err and "Traceback" not in err
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    step = ckpt["train_state"]["step"]
    assert 0 < step < 50 * 6
    resumed = subprocess.run(
        _cli(*args, "--resume", "auto", "--max-steps", str(step + 1)),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(out / "checkpoints" / "last.pt")["train_state"]["step"] == step + 1


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
# moco-v2 covers the queue and shuffled BN of v1; supcon-queue the gradient gather of supcon
@pytest.mark.parametrize("method", ["moco-v2", "supcon-queue"])
def test_torchrun_two_gloo_processes(method, labelled_dir, val_dir, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mocoserve",
        "train",
        str(labelled_dir),
        "--method",
        method,
        "--epochs",
        "2",
        "-b",
        "4",
        "-K",
        "20",
        "--val",
        str(val_dir),
        "--knn-every",
        "1",
        "--out",
        str(out),
        *TINY,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stderr and "global 8" in result.stderr
    assert result.stdout.count("done: 2 epochs, 6 steps") == 1  # printed by rank 0 only
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["train_state"]["step"] == 6
    if method != "supcon":
        assert int(ckpt["model"]["queue_ptr"]) == (6 * 8) % 20  # keys of both ranks enqueued


def test_checkpoint_rng_state_restores_from_a_loaded_file(tmp_path):
    """What resume does: load (CPU, memory-mapped) and put every RNG back where it was."""
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    checkpoint.save_atomic(
        {"format": checkpoint.FORMAT, "version": 1, "rng": checkpoint.rng_state()},
        tmp_path / "c.pt",
    )
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2]
