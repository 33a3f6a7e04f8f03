"""Hostile-input findings, one test each: what a careless or hostile user did, and what we promise.

Every command here runs as a user runs it (a subprocess in its own session), and each test
checks the three promises: one `error:` line (never a traceback), the documented exit code,
and no process left behind; and that no data was lost.
"""

import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mocoserve.core.errors import UserError
from mocoserve.core.manifest import Manifest
from mocoserve.model import load
from mocoserve.train import checkpoint
from tests.imagegen import class_image, make_flat, make_labelled
from tests.models import make_checkpoint
from tests.procs import default_sigint
from tests.stores import committed

TINY = ["--arch", "resnet18", "--image-size", "32", "--dim", "8", "-b", "4", "-K", "8", "-q"]


def session_processes(sid: int) -> list[int]:
    """Pids of the processes still in session `sid` (from /proc)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def run(args: list[str], timeout: float = 240, limit_file_bytes: int | None = None, **kw):
    """`python -m mocoserve ARGS` in a session of its own; fails if it hangs or leaves a process."""

    def limits() -> None:
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    proc = subprocess.Popen(
        [sys.executable, "-m", "mocoserve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=limits,
        **kw,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mocoserve {' '.join(args[:2])} hung:\n{err[-2000:]}")
    deadline = time.monotonic() + 10
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"processes left behind: {left}\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_one_error(result: subprocess.CompletedProcess, code: int, words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    lines = error_lines(result.stderr + result.stdout)
    assert len(lines) == 1 and words in lines[0], result.stderr[-3000:]
    return lines[0]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# --- training ---


def test_08_a_folder_of_only_corrupt_images_exits_with_one_line(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for i in range(40):
        (folder / f"img_{i:02d}.jpg").write_text(f"not a jpeg {i}")
    result = run(["train", str(folder), *TINY, "--workers", "2", "--out", str(tmp_path / "r")])
    assert_one_error(result, 2, "no image could be decoded in 32 tries in a row")
    assert "warning" not in result.stderr


def test_09_a_full_disk_during_a_checkpoint_save(flat_dir, tmp_path):
    out = tmp_path / "run"
    first = run(["train", str(flat_dir), *TINY, "--epochs", "1", "--out", str(out)])
    assert first.returncode == 0, first.stderr
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    # a file-size limit stands in for a full disk: writes past 8 MB fail (EFBIG)
    again = run(
        ["train", str(flat_dir), *TINY, "--epochs", "2", "--workers", "2", "--resume", "auto"]
        + ["--out", str(out)],
        limit_file_bytes=8 << 20,
    )
    line = assert_one_error(again, 1, "cannot write the checkpoint: File too large")
    assert "the previous one is kept" in line and str(last) in line
    assert last.read_bytes() == before  # the previous last.pt, whole
    assert checkpoint.load(last)["train_state"]["epoch"] == 1
    assert not list(last.parent.glob(".*tmp"))  # no half-written temp file left


def _train_until_running(flat_dir: Path, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mocoserve", "train", str(flat_dir), *TINY, "--epochs", "50"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
    wait_for(out / "metrics.jsonl", proc)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["Ctrl-C", "SIGUSR1"])
def test_06_ctrl_c_and_sigusr1_save_a_checkpoint_and_say_how_to_resume(flat_dir, tmp_path, sig):
    out = tmp_path / "run"
    proc = _train_until_running(flat_dir, out, [])  # default --workers: what the machine has
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    name = signal.Signals(sig).name
    assert f"received {name}: saved {out / 'checkpoints' / 'last.pt'}" in err
    assert "resume with --resume auto" in err and "Traceback" not in err
    assert 0 < checkpoint.load(out / "checkpoints" / "last.pt")["train_state"]["step"] < 300
    assert not session_processes(proc.pid)
    # torch's "DataLoader will create N worker processes ... suggested max" is not printed:
    # the default worker count is what the machine has
    assert "suggested max number of worker" not in err


def test_06_a_second_ctrl_c_stops_at_once():
    from mocoserve.train.trainer import PreemptionFlag

    # the suite may run with SIGINT ignored (a background job): set what this test relies on
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with PreemptionFlag() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            assert flag.raised == "SIGINT"  # the first: save, then stop
            with pytest.raises(KeyboardInterrupt):  # the second: at once
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        signal.signal(signal.SIGINT, before)
    # an ignored Ctrl-C (a background job, nohup) stays ignored, as Unix programs do
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with PreemptionFlag():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_07_files_follow_the_umask(flat_dir, tmp_path, model_dir):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        result = run(["train", str(flat_dir), *TINY, "--epochs", "1", "--out", str(out)])
        assert result.returncode == 0, result.stderr
        pkg = tmp_path / "pkg"
        exported = run(["export", str(out / "checkpoints" / "last.pt"), "--out", str(pkg)])
        assert exported.returncode == 0, exported.stderr
        index = tmp_path / "i.faiss"
        embedded = run(["embed", str(flat_dir), "--index", str(index), "--model", str(pkg)])
        assert embedded.returncode == 0, embedded.stderr
    finally:
        os.umask(old)
    mode = lambda p: oct(p.stat().st_mode & 0o777)  # noqa: E731
    for f in [*(out / "checkpoints").iterdir(), *pkg.iterdir(), index, Path(f"{index}.db")]:
        assert mode(f) == "0o644", (f, mode(f))
    assert mode(pkg) == "0o755" and mode(out / "checkpoints") == "0o755"


def test_resume_from_a_text_file_or_a_pickle_says_not_a_checkpoint(flat_dir, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("just some notes\n")
    result = run(["train", str(flat_dir), *TINY, "--resume", str(text), "--out", str(tmp_path)])
    assert_one_error(result, 2, f"{text} is not a mocoserve checkpoint (not a torch.save file)")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "x": Payload()}, evil, pickle_module=pickle)
    result = run(["train", str(flat_dir), *TINY, "--resume", str(evil), "--out", str(tmp_path)])
    line = assert_one_error(result, 2, f"{evil} is not a mocoserve checkpoint")
    assert "weights_only" not in result.stderr and "pickled objects" in line
    assert not (tmp_path / "pwned").exists()


def test_yaml_of_the_wrong_types_is_refused_in_one_line(flat_dir, tmp_path):
    config = tmp_path / "c.yaml"
    for text, words in [
        ("optim: {epochs: 2.7}\n", "optim.epochs must be an integer, got 2.7"),
        ("data: {workers: true}\n", "data.workers must be an integer or null, got True"),
    ]:
        config.write_text(text)
        result = run(["train", str(flat_dir), "--config", str(config), "--out", str(tmp_path)])
        assert_one_error(result, 2, words)


def test_flat_folder_run_writes_nothing_for_a_refused_config(tmp_path):
    folder = make_flat(tmp_path / "f", n=8)
    out = tmp_path / "never"
    result = run(["train", str(folder), *TINY, "--set", "optim.epochs=two", "--out", str(out)])
    assert_one_error(result, 2, "--set optim.epochs must be an integer")
    assert not out.exists()


# --- embed, search and export ---


def test_04_a_rerun_keeps_the_labels_and_dropping_them_is_explicit(tmp_path, model_dir):
    folder = make_labelled(tmp_path / "train", classes=3, per_class=4)
    index = tmp_path / "l.faiss"
    first = run(["embed", str(folder), "--index", str(index), "--model", str(model_dir)]
                + ["--labels-from-folders", "--quiet"])  # fmt: skip
    assert first.returncode == 0 and "12 images, 12 labelled" in first.stdout, first.stdout
    class_image(1, 77).save(folder / "class_1" / "new.png")
    again = run(["embed", str(folder), "--index", str(index), "--quiet"])  # the README's rerun
    assert again.returncode == 0 and "13 images, 13 labelled" in again.stdout, again.stdout
    knn = run(["knn", "--train-index", str(index), "--loo", "--out", str(tmp_path / "r")])
    assert knn.returncode == 0, knn.stderr
    dropped = run(["embed", str(folder), "--index", str(index), "--no-labels", "--quiet"])
    assert dropped.returncode == 0 and "13 images, 0 labelled" in dropped.stdout
    rerun = run(["embed", str(folder), "--index", str(index), "--quiet"])
    assert "13 images, 0 labelled" in rerun.stdout  # and the index remembers that too


@pytest.mark.slow  # five exports in fresh processes
def test_05_re_export_keeps_the_users_other_files(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    pkg = tmp_path / "model"
    assert run(["export", str(ckpt), "--out", str(pkg)]).returncode == 0
    (pkg / "NOTES.txt").write_text("how we trained this\n")
    (pkg / "eval").mkdir()
    (pkg / "eval" / "report.md").write_text("# numbers\n")
    again = run(["export", str(ckpt), "--out", str(pkg), "--format", "onnx"])
    assert again.returncode == 0, again.stderr
    assert (pkg / "NOTES.txt").read_text() == "how we trained this\n"
    assert (pkg / "eval" / "report.md").read_text() == "# numbers\n"
    assert not (pkg / "encoder.pt").exists()  # the old package's file the new one lacks
    assert set(Manifest.read(pkg).files) == {"encoder.onnx"}
    assert load(pkg).embedding_dim == 512
    # a package folder holding nothing else is swapped whole, as before
    clean = tmp_path / "clean"
    assert run(["export", str(ckpt), "--out", str(clean), "--format", "onnx"]).returncode == 0
    assert run(["export", str(ckpt), "--out", str(clean)]).returncode == 0
    assert sorted(p.name for p in clean.iterdir()) == [
        "encoder.onnx",
        "encoder.pt",
        "manifest.json",
    ]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "holiday.jpg").write_bytes(b"precious")
    refused = run(["export", str(ckpt), "--out", str(stray)])
    assert_one_error(refused, 2, "exists and is not a model package")
    assert (stray / "holiday.jpg").read_bytes() == b"precious"


def test_10_a_file_name_that_is_not_utf8_is_stored_faithfully(tmp_path, model_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        class_image(i, i).save(folder / f"ok_{i}.png")
    odd = os.fsencode(folder) + b"/bad\xffname.png"
    class_image(0, 9).save(odd.decode("utf-8", "surrogateescape"))
    index = tmp_path / "out.faiss"
    args = ["embed", str(folder), "--index", str(index), "--model", str(model_dir), "--quiet"]
    first = run(args)
    assert first.returncode == 0, first.stderr
    assert "embedded 4, skipped 0 (unchanged), failed 0" in first.stdout
    again = run(args)
    assert "embedded 0, skipped 4 (unchanged), failed 0, removed 0" in again.stdout
    found = run(["search", str(index), odd.decode("utf-8", "surrogateescape"), "-k", "1"])
    assert found.returncode == 0 and "bad\\xffname.png" in found.stdout, found.stderr
    import mocoserve.index.reader

    paths = mocoserve.index.reader.open(index).store.paths()
    assert odd in [os.fsencode(p) for p in paths]  # the exact bytes of the name
    os.unlink(odd)
    removed = run(args)
    assert "removed 1" in removed.stdout and "3 images" in removed.stdout


def test_11_a_full_disk_during_embed_keeps_what_was_committed(tmp_path, model_dir):
    folder = make_labelled(tmp_path / "many", classes=4, per_class=60, size=40)
    index = tmp_path / "out.faiss"
    args = ["embed", str(folder), "--index", str(index), "--model", str(model_dir)]
    args += ["--batch-size", "8", "--workers", "1", "--quiet"]
    full = run(args, limit_file_bytes=256 << 10)  # the store outgrows 256 KB part way
    line = assert_one_error(full, 1, "cannot write the")
    assert "File too large" in line and ".shards/" in line  # which file, and why
    kept = committed(index)
    assert 0 < kept < 240
    finished = run(args)
    assert finished.returncode == 0, finished.stderr
    assert f"embedded {240 - kept}, skipped {kept}" in finished.stdout


def _edited(pkg: Path, where: Path, **fields) -> Path:
    shutil.copytree(pkg, where)
    manifest = json.loads((where / "manifest.json").read_text())
    manifest.update(fields)
    if "input_size" in fields:
        manifest["preprocess"]["crop"] = fields["input_size"]
        manifest["preprocess"]["resize"] = fields["input_size"]
    (where / "manifest.json").write_text(json.dumps(manifest))
    return where


@pytest.mark.parametrize("field,value", [("input_size", 64), ("embedding_dim", 128)])
def test_12_an_edited_manifest_is_caught_before_anything_is_written(
    tmp_path, flat_dir, model_dir, field, value
):
    bad = _edited(model_dir, tmp_path / "edited", **{field: value})
    with pytest.raises(UserError, match="export the package again"):
        load(bad)
    index = tmp_path / "new.faiss"
    result = run(["embed", str(flat_dir), "--index", str(index), "--model", str(bad)])
    assert_one_error(result, 2, "manifest.json")
    assert not index.exists() and not Path(f"{index}.db").exists()
    info = run(["info", str(bad)])
    assert info.returncode == 1 and "MISMATCH" in info.stdout and field in info.stdout


def test_13_export_input_size_out_of_range_is_one_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c.pt")
    for size in ("-1", "0", "8", "100000"):
        result = run(["export", str(ckpt), "--out", str(tmp_path / "m"), "--input-size", size])
        assert_one_error(result, 2, f"--input-size must be from 16 to 4096 px, got {size}")
        assert not (tmp_path / "m").exists()


# --- smaller things a user meets, and promises that had no test ---


def test_knn_caps_k_says_so_and_a_rerun_embeds_nothing(tmp_path, labelled_dir, val_dir, model_dir):
    args = ["knn", "--model", str(model_dir), "--train", str(labelled_dir), "--val", str(val_dir)]
    args += ["--out", str(tmp_path / "r"), "-k", "100000", "--workers", "0"]
    first = run(args)
    assert first.returncode == 0, first.stderr
    assert "note: k capped at 24: the train set has 24 images (k 100000)" in first.stdout
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["k"] == 24 and list(report["by_k"]) == ["24"]
    assert report["embedded"] == {"train": 24, "val": 12}
    again = run(args)
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rerun["embedded"] == {"train": 0, "val": 0}  # the report's cache: nothing embedded
    assert rerun["top1"] == report["top1"]


def test_knn_without_a_model_says_what_to_give(tmp_path, labelled_dir):
    result = run(["knn", "--train", str(labelled_dir), "--loo", "--out", str(tmp_path / "r")])
    assert_one_error(result, 2, "give --model (the package folder made by export)")
    assert "None" not in result.stderr


def test_search_for_a_label_the_index_lacks(tmp_path, labelled_dir, model_dir):
    index = tmp_path / "l.faiss"
    made = run(["embed", str(labelled_dir), "--index", str(index), "--model", str(model_dir)]
               + ["--labels-from-folders", "--quiet"])  # fmt: skip
    assert made.returncode == 0, made.stderr
    query = str(sorted(labelled_dir.rglob("*.png"))[0])
    result = run(["search", str(index), query, "--label", "nosuch"])
    assert_one_error(result, 2, "label 'nosuch' is not in")
    assert "class_0, class_1, class_2" in result.stderr
    assert run(["search", str(index), query, "--label", "class_1"]).returncode == 0


def test_a_second_embed_on_the_same_index_is_refused(tmp_path, labelled_dir, model_dir):
    from mocoserve.index.writer import IndexWriter

    index = tmp_path / "busy.faiss"
    with IndexWriter(index):  # its writer lock, as a running embed holds it
        result = run(["embed", str(labelled_dir), "--index", str(index), "--model", str(model_dir)])
    assert_one_error(result, 2, "is being written by another process")
    assert not Path(f"{index}.db").exists()


def test_os_errors_are_one_line_with_exit_code_1(tmp_path, flat_dir, model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    result = run(["train", str(flat_dir), *TINY, "--out", str(blocker / "run")])
    assert_one_error(result, 1, str(blocker))
    report = run(["knn", "--model", str(model_dir), "--train", str(flat_dir), "--loo"]
                 + ["--out", str(blocker / "report")])  # fmt: skip
    assert_one_error(report, 1, str(blocker))
    assert blocker.read_text() == "in the way"


def test_help_texts_say_what_options_do():
    from typer.testing import CliRunner

    from mocoserve.cli import app

    runner = CliRunner()
    env = {"COLUMNS": "240", "TERM": "dumb"}
    help_of = lambda *cmd: runner.invoke(app, [*cmd, "--help"], env=env).output  # noqa: E731
    train = help_of("train")
    assert "Softmax temperature of the contrastive loss" in train
    assert "--lr-batch" not in train and "optim.lr_batch" in train
    assert "--set" in train
    assert not re.search(r"-m\s+TEXT|-m\s+--method|--method\s+-m", train)  # -m is --model
    for command in ("embed", "search", "app", "knn"):
        assert "-m" in help_of(command) and "--model" in help_of(command)
