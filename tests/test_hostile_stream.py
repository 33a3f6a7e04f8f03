"""Hostile input for training from pipe: shards (train/stream.py, core.streams): a damaged
stream-counts.json, an empty pipe: command, a shard that fails while others stall, and a
signal during the counting pass; each ends in one error line with no command left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from mocoserve.core import streams
from mocoserve.core.streams import StreamError, open_stream
from mocoserve.train.stream import COUNTS_FILE
from tests import test_train_stream
from tests.test_train_cli import TINY, assert_user_error
from tests.test_train_stream import piped, train

shards5 = test_train_stream.shards5  # the fixture: 24 images in shards of 5

ARGS = ["--epochs", "1", "-b", "4", "-K", "10", "--bn-splits", "2", "--seed", "5", *TINY]


def running(marker: str) -> list[str]:
    """The pipe: commands whose command line holds `marker` (not the trainer's processes,
    whose arguments hold it too; full lines: ps cuts them to the terminal's width else)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [
        line
        for line in ps.splitlines()
        if marker in line and "ps -ww" not in line and "mocoserve" not in line
    ]


def gone(marker: str, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while running(marker) and time.monotonic() < end:
        time.sleep(0.1)
    return not running(marker)


@pytest.fixture(scope="module")
def counted(shards5, tmp_path_factory) -> dict:
    """A real run's stream-counts.json."""
    out = tmp_path_factory.mktemp("counted")
    result = train(piped(shards5, 5), *ARGS, "--out", str(out), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    return json.loads((out / COUNTS_FILE).read_text())


@pytest.mark.parametrize(
    "field, value",
    [
        ("counts", ["5", "5", "5", "5", "4"]),  # strings numpy would take
        ("counts", [5.7, 5, 5, 5, 4]),  # floats numpy would truncate
        ("counts", [True, 5, 5, 5, 4]),  # a bool numpy would take as 1
        ("counts", [10**30, 5, 5, 5, 4]),  # was an OverflowError traceback
        ("unlabelled", "x"),  # was a ValueError traceback
        ("unlabelled", None),  # deleted: was a KeyError traceback
        ("classes", "abc"),  # was read as classes a, b, c
    ],
)
def test_a_hand_edited_counts_file_is_one_line(shards5, counted, tmp_path, field, value):
    data = dict(counted)
    if value is None:
        del data[field]
    else:
        data[field] = value
    (tmp_path / COUNTS_FILE).write_text(json.dumps(data))
    result = train(piped(shards5, 5), *ARGS, "--out", str(tmp_path))
    assert_user_error(result, f"{COUNTS_FILE} is damaged")


def test_a_counts_file_without_root_is_still_read(shards5, counted, tmp_path):
    data = {k: v for k, v in counted.items() if k != "root"}
    (tmp_path / COUNTS_FILE).write_text(json.dumps(data))
    result = train(piped(shards5, 5), *ARGS, "--out", str(tmp_path), "--max-steps", "1")
    assert result.exit_code == 0 and "shard counts from" in result.output, result.output


@pytest.mark.parametrize("spec", ["pipe:", "pipe:{cat /dev/null, }"])
def test_an_empty_pipe_command_is_one_line_at_once(spec, tmp_path):
    began = time.monotonic()
    result = train(spec, *ARGS, "--out", str(tmp_path / "r"))
    assert_user_error(result, "with no command after pipe:")
    assert "pipe:: pipe:" not in result.output and time.monotonic() - began < 3  # no retries
    with pytest.raises(StreamError, match=r"^no command after pipe:$"):  # the caller names it
        open_stream("pipe:  ")


def test_a_failing_shard_stops_the_counting_pass_and_its_other_commands(shards5, tmp_path):
    """The error came only after every other shard was counted (pool.map's with-block waited
    for all of them); now the others' commands are stopped at once."""
    marker = f"h2mark{uuid.uuid4().hex[:8]}"
    slow = f"sh -c 'sleep 60' {marker}; cat {shards5}/shard-000000.tar"
    began = time.monotonic()
    result = train(f"pipe:{{exit 3,{slow},{slow}}}", *ARGS, "--out", str(tmp_path / "r"))
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error: "), result.output
    assert "the command failed (status 3)" in lines[-1] and "checkpoint" not in lines[-1]
    assert "while counting the shards" in lines[-1]
    assert time.monotonic() - began < 20  # 3 tries (1 + 2 s apart), not the others' 60 s
    assert gone(marker), running(marker)


def test_stop_all_ends_a_waiting_read():
    marker = f"h2mark{uuid.uuid4().hex[:8]}"
    with open_stream(f"pipe:sh -c 'sleep 60' {marker}", stall_s=60) as s:
        assert running(marker)
        streams.stop_all()
        began = time.monotonic()
        with pytest.raises(StreamError, match="status -9"):
            s.read(512)
        assert time.monotonic() - began < 5
    assert gone(marker)


@pytest.mark.slow  # a fresh process starts torch (about 5 s)
def test_sigterm_during_the_counting_pass_stops_it_at_once(shards5, tmp_path):
    """SIGTERM was only noted during the count (hours for a big set): the pass ran on, then
    training started. Now: one error line, soon, and no command left running."""
    marker = f"h2mark{uuid.uuid4().hex[:8]}"
    src = f"pipe:sh -c 'sleep 60' {marker}; cat {shards5}/shard-{{000000..000004}}.tar"
    cmd = [sys.executable, "-m", "mocoserve", "train", src, *ARGS, "--out", str(tmp_path / "r")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy()
    )
    end = time.monotonic() + 60
    while not running(marker) and time.monotonic() < end:
        time.sleep(0.2)
    assert running(marker)
    proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - began < 10, out
    lines = out.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert lines[-1].startswith("error: stopped by SIGTERM while counting"), out
    assert gone(marker), running(marker)
    assert not (tmp_path / "r" / COUNTS_FILE).exists()


@pytest.mark.parametrize(
    "how",
    ["sigkill", pytest.param("sigterm", marks=pytest.mark.slow)],  # sigterm: a save, 15 s
)
def test_no_command_outlives_a_killed_or_stopped_run(shards5, tmp_path, how):
    """Data workers blocked in reads of slow commands: SIGKILL of the trainer (the workers'
    watch thread sees them re-parented, stops their commands and ends them) or SIGTERM (a
    save at the next step, then the workers' exit finaliser) leaves no pipe: command
    running."""
    marker = f"h2mark{uuid.uuid4().hex[:8]}"
    # each command hands over its tar, then keeps its stream open (the reader waits for EOF)
    hold = 60 if how == "sigkill" else 2  # a save waits for the batch being read
    src = f"pipe:cat {shards5}/shard-{{000000..000004}}.tar; sleep {hold}; : {marker}"
    listed = shards5 / "shards.json"
    cmd = [sys.executable, "-m", "mocoserve", "train", src, "--epochs", "1", "-b", "4"]
    cmd += ["-K", "10", "--out", str(tmp_path / "r"), *TINY[:-3], "--workers", "2", "-q"]
    cmd += ["--set", f"data.shard_counts={listed}", "--set", "data.stream_timeout=120"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 60
        while len(running(marker)) < 2 and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.2)
        assert len(running(marker)) >= 2, proc.stdout.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
        assert gone(marker, within=10), running(marker)
        if how == "sigterm":
            assert "received SIGTERM: saved" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
