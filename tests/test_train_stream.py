"""`mocoserve train` from pipe: shards (train/stream.py): counted once, dealt to ranks and
workers, shuffled by (seed, epoch), exact mid-epoch resume by replay, failing and stalling
streams, and core.streams' pipe reader."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.core import tars
from mocoserve.core.streams import StreamError, open_stream
from mocoserve.train import checkpoint
from mocoserve.train.data import make_loader
from mocoserve.train.stream import (
    COUNTS_FILE,
    StreamDataset,
    StreamPlan,
    _turns,
    count_streams,
)
from tests.test_train_cli import TINY, assert_user_error, sigkill_then_resume
from tests.test_train_shards import models_equal, write_shards

runner = CliRunner()


def train(*args: str):
    return runner.invoke(app, ["train", *args])


def piped(shards: Path, n: int) -> str:
    """A pipe: brace pattern that streams shards 0..n-1 through cat."""
    return f"pipe:cat {shards}/shard-{{000000..{n - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def shards5(flat_dir, tmp_path_factory) -> Path:
    """24 images in shards of 5 (the last holds 4): uneven shares for 2 workers."""
    return write_shards(flat_dir, tmp_path_factory.mktemp("s5") / "shards", shard_size=5)


@pytest.fixture(scope="module")
def labelled4(labelled_dir, tmp_path_factory) -> Path:
    return write_shards(labelled_dir, tmp_path_factory.mktemp("l4") / "shards", shard_size=4)


# core.streams
def test_pipe_stream_reads_and_fails_by_name(shards5):
    tar = shards5 / "shard-000000.tar"
    with open_stream(f"pipe:cat {tar}") as s:
        assert s.read(1 << 20) + s.read(1 << 20) == tar.read_bytes()[: 1 << 21]
    got = [m.member for m, _ in tars.stream_samples(f"pipe:cat {tar}")]
    assert got == [m.member for m, _ in tars.stream_samples(str(tar))] and len(got) == 5
    # a command that fails after writing the whole tar fails the shard, with its stderr
    with pytest.raises(StreamError, match=r"^the command failed \(status 3\): broken$"):
        list(tars.stream_samples(f"pipe:cat {tar}; echo broken >&2; exit 3"))


def test_pipe_stream_stall_is_stopped_promptly(shards5):
    tar = shards5 / "shard-000000.tar"
    began = time.monotonic()
    with pytest.raises(StreamError, match="no data for 1 s"):
        list(tars.stream_samples(f"pipe:cat {tar}; sleep 60", stall_s=1.0))
    assert time.monotonic() - began < 10
    # a slow but steady stream is no stall; a reader that does not ask is not one either
    with open_stream(f"pipe:sleep 0.5; cat {tar}", stall_s=2.0) as s:
        time.sleep(2.5)
        assert s.read(512)


# the plan
def test_turns_follow_the_dataloader_rule():
    assert _turns([3, 2], 5).tolist() == [0, 1, 0, 1, 0]
    assert _turns([1, 3, 2], 5).tolist() == [0, 1, 2, 1, 2]
    assert _turns([2, 2], 3).tolist() == [0, 1, 0]


def test_plan_deals_shards_and_whole_batches():
    counts = np.asarray([5, 5, 5, 5, 4])
    plan = StreamPlan(counts, batch_size=4, seed=0, workers=2, buffer=8)
    assert plan.slot_shards == [[0, 2, 4], [1, 3]]
    assert plan.batches_per_epoch == 14 // 4 + 10 // 4 == 5
    assert plan.turns.tolist() == [0, 1, 0, 1, 0]
    # more workers than shards: as many streams as shards
    assert StreamPlan(counts, 4, 0, workers=8, buffer=8).workers == 5
    assert StreamPlan(counts, 4, 0, workers=0, buffer=8).loader_workers == 0
    with pytest.raises(Exception, match="too few samples for one batch"):
        StreamPlan(np.asarray([3, 3]), 4, 0, workers=2, buffer=8)


def _ids(batch) -> list[str]:
    """A batch's images named by their pixels' hash (the transform keeps them as arrays)."""
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in batch[0]]


def _loader(index, plan, workers: int):
    dataset = StreamDataset(index, plan, lambda im: torch.from_numpy(np.array(im)), 30.0)
    return make_loader(dataset, None, plan.batch_size, workers, False, True, False)


def test_epoch_is_a_reshuffled_permutation_and_resumes_at_any_batch(shards5, flat_dir):
    """Each epoch trains every sample once (counts that divide), in a new order per epoch;
    with 2 workers of uneven shares, a restart at every batch k gives batches k.. exactly."""
    shards = [f"pipe:cat {shards5}/shard-{i:06d}.tar" for i in range(5)]
    index = count_streams("s", shards, None, 30.0)
    assert index.counts.tolist() == [5, 5, 5, 5, 4] and not index.labelled
    plan = StreamPlan(index.counts, batch_size=2, seed=4, workers=2, buffer=3)
    # 14 and 10 samples: 7 + 5 batches of 2, all 24 samples each epoch
    epochs = []
    for epoch in (0, 1):
        plan.set_epoch(epoch)
        epochs.append([_ids(b) for b in _loader(index, plan, 2)])
    flat = [sorted(i for batch in e for i in batch) for e in epochs]
    assert len(epochs[0]) == 12 and flat[0] == flat[1] and len(set(flat[0])) == 24
    assert epochs[0] != epochs[1]
    for k in (1, 4, 9, 10, 11):
        plan.set_epoch(1, k)
        assert [_ids(b) for b in _loader(index, plan, 2)] == epochs[1][k:], k
    # in the main process (workers 0): one stream, its own order, resumable too
    solo = StreamPlan(index.counts, batch_size=2, seed=4, workers=0, buffer=3)
    solo.set_epoch(0)
    whole = [_ids(b) for b in _loader(index, solo, 0)]
    solo.set_epoch(0, 5)
    assert [_ids(b) for b in _loader(index, solo, 0)] == whole[5:]


# the CLI
ARGS = ["--epochs", "2", "-b", "4", "-K", "10", "--bn-splits", "2", "--seed", "5"]


def test_pipe_run_is_reproducible_and_resumes_exactly(shards5, tmp_path):
    """Two runs: the same weights; --max-steps mid-epoch then --resume auto (counts read
    back from the run folder, not counted again) equals the uninterrupted run."""
    src = piped(shards5, 5)
    work = [*TINY[:-3], "--workers", "2", "-q"]
    a = train(src, *ARGS, *work, "--out", str(tmp_path / "a"))
    assert a.exit_code == 0, a.output
    assert "counting the samples of 5 streamed shard(s)" in a.output and "5 steps/epoch" in a.output
    counts = json.loads((tmp_path / "a" / COUNTS_FILE).read_text())
    assert counts["counts"] == [5, 5, 5, 5, 4]
    first = train(src, *ARGS, *work, "--out", str(tmp_path / "b"), "--max-steps", "7")
    assert first.exit_code == 0 and "stopped after 7 steps" in first.output, first.output
    again = train(src, *ARGS, *work, "--out", str(tmp_path / "b"), "--resume", "auto")
    assert again.exit_code == 0, again.output
    assert "shard counts from" in again.output and "counting" not in again.output
    models_equal(tmp_path / "a", tmp_path / "b")
    # another layout on resume (1 stream, 6 batches an epoch -> 2 streams, 5) goes on, noted
    third = train(src, *ARGS, *TINY, "--out", str(tmp_path / "c"), "--max-steps", "3")
    assert third.exit_code == 0 and "6 steps/epoch" in third.output, third.output
    fourth = train(src, *ARGS, *work, "--out", str(tmp_path / "c"), "--resume", "auto")
    assert fourth.exit_code == 0, fourth.output
    assert "streamed layout changed" in fourth.output and "after 12 of its samples" in fourth.output


def test_supcon_from_pipe_with_cls_labels(labelled4, tmp_path):
    out = tmp_path / "sc"
    result = train(piped(labelled4, 6), "--method", "supcon", *ARGS, *TINY, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "in 3 classes" in result.output
    header = checkpoint.load(out / "checkpoints" / "last.pt")["classes"]
    assert header == ["class_0", "class_1", "class_2"]


def test_counts_from_a_shard_list_skip_the_counting_pass(labelled4, tmp_path):
    """data.shard_counts (the shards.json `mocoserve shards` wrote): no counting pass, the
    same counts and classes, so the same weights as a counted run; a list that does not
    name a shard, or claims another count, is refused by name."""
    listed = labelled4 / tars.SHARD_LIST
    args = [piped(labelled4, 6), "--method", "supcon", *ARGS, *TINY]
    counted = train(*args, "--out", str(tmp_path / "a"))
    assert counted.exit_code == 0 and "counting the samples" in counted.output, counted.output
    given = train(*args, "--out", str(tmp_path / "b"), "--set", f"data.shard_counts={listed}")
    assert given.exit_code == 0, given.output
    assert "(not counted)" in given.output and "counting" not in given.output
    assert "in 3 classes" in given.output
    models_equal(tmp_path / "a", tmp_path / "b")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"shardlist": [{"url": "elsewhere.tar", "nsamples": 4}]}))
    stray = train(*args, "--out", str(tmp_path / "c"), "--set", f"data.shard_counts={other}")
    assert_stops(stray, "names no shard it lists of")
    wrong = json.loads(listed.read_text())
    wrong["shardlist"][0]["nsamples"] = 3  # the stream holds 4
    bad = tmp_path / "wrong.json"
    bad.write_text(json.dumps(wrong))
    short = train(*args, "--out", str(tmp_path / "d"), "--set", f"data.shard_counts={bad}")
    assert_stops(short, "shard-000000.tar now streams more than 3 samples; the run counted 3")


@pytest.mark.slow  # two runs and a retry (about 25 s)
def test_a_failing_stream_is_read_again_and_the_run_is_unchanged(shards5, tmp_path):
    """A command that breaks once mid-shard: read again from where it broke, same weights."""
    src = piped(shards5, 5)
    clean = train(src, *ARGS, *TINY, "--out", str(tmp_path / "clean"))
    assert clean.exit_code == 0, clean.output
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    shard2 = shards5 / "shard-000002.tar"
    head = shard2.stat().st_size // 2
    # fails the first time it is run during training (the count pass reads it whole)
    cmd = (
        f"pipe:if [ -e {flaky}/counted ] && [ ! -e {flaky}/broke ]; then touch {flaky}/broke; "
        f"head -c {head} {shard2}; exit 1; else touch {flaky}/counted; cat {shard2}; fi"
    )
    shards = [f"cat {shards5}/shard-{i:06d}.tar" for i in range(5)]
    shards[2] = cmd.removeprefix("pipe:")
    spec = "pipe:{" + ",".join(shards) + "}"  # braceexpand: one pipe: command per shard
    assert tars.expand([spec])[2] == cmd
    result = train(spec, *ARGS, *TINY, "--out", str(tmp_path / "f"))
    assert result.exit_code == 0, result.output
    assert "reading it again from sample" in result.output and (flaky / "broke").exists()
    models_equal(tmp_path / "clean", tmp_path / "f")


def assert_stops(result, message: str) -> None:
    """Exit 2, no traceback, one error line last (after the run's notes and any warnings)."""
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert sum(ln.startswith("error: ") for ln in lines) == 1, result.output


def test_bad_streams_end_in_one_line(shards5, tmp_path):
    tar = shards5 / "shard-000000.tar"
    stalled = train(
        "pipe:sleep 60",
        *ARGS,
        *TINY,
        "--out",
        str(tmp_path / "a"),
        "--set",
        "data.stream_timeout=0.5",
    )
    assert_stops(stalled, "pipe:sleep 60: no data for 0.5 s; the command was stopped (3 tries")
    failing = train(f"pipe:cat {tar}; exit 4", *ARGS, *TINY, "--out", str(tmp_path / "b"))
    assert_stops(failing, "exit 4: the command failed (status 4)")
    val = train(
        piped(shards5, 5), *ARGS, *TINY, "--out", str(tmp_path / "c"), "--val", str(shards5)
    )
    assert_user_error(val, "--val: the k-NN monitor")
    damaged = tmp_path / "d"
    damaged.mkdir()
    (damaged / COUNTS_FILE).write_text("{not json")
    result = train(piped(shards5, 5), *ARGS, *TINY, "--out", str(damaged))
    assert_user_error(result, COUNTS_FILE)


def test_a_shard_that_changes_under_the_run_is_named(shards5, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shards5, copy)
    src = piped(copy, 5)
    first = train(src, *ARGS, *TINY, "--out", str(tmp_path / "r"), "--max-steps", "2")
    assert first.exit_code == 0, first.output
    shutil.copy(copy / "shard-000004.tar", copy / "shard-000001.tar")  # 4 samples, not 5
    again = train(src, *ARGS, *TINY, "--out", str(tmp_path / "r"), "--resume", "auto")
    assert_stops(again, "shard-000001.tar now streams 4 samples; the run counted 5")


def test_an_undecodable_member_is_replaced_by_the_next(flat_dir, tmp_path):
    shards = write_shards(flat_dir, tmp_path / "shards", shard_size=6)
    tar = shards / "shard-000001.tar"
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else b"") for m in t.getmembers()]
    with tarfile.open(tar, "w") as t:
        for i, (m, data) in enumerate(members):
            if i == 0:
                data = b"not an image at all"
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    result = train(piped(shards, 4), *ARGS, *TINY, "--out", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert "warning: skipping unreadable image" in result.output
    assert checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")["train_state"]["step"] == 12


@pytest.mark.slow  # three fresh processes (as the folder's and shards' SIGKILL tests)
def test_sigkill_on_pipe_shards_then_resume_auto_matches(shards5, tmp_path):
    args = [piped(shards5, 5), "--epochs", "3", "-b", "4", "-K", "10", "--bn-splits", "2"]
    args += ["--save-every", "1", "--seed", "7", *TINY[:-3], "--workers", "2", "-q"]
    sigkill_then_resume(args, tmp_path)
    models_equal(tmp_path / "clean", tmp_path / "killed")


@pytest.mark.slow  # two processes start torch and gloo
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_gloo_processes_on_pipe_shards(shards5, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mocoserve", "train"]
    cmd += [piped(shards5, 5), "--epochs", "1", "-b", "4", "-K", "20", "--out", str(out)]
    cmd += [*TINY[:-3], "--workers", "1", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 0: shards 0, 2, 4 (14 samples, 3 batches); rank 1: 1, 3 (10, 2): 2 steps for both
    assert "2 process(es) on cpu" in result.stderr and "2 steps/epoch" in result.stderr
    assert result.stderr.count("counting the samples") == 1  # rank 0 counts, rank 1 is told
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["train_state"]["step"] == 2
    assert int(ckpt["model"]["queue_ptr"]) == (2 * 8) % 20
