"""`mocoserve train` from tar shards: the same weights as the folder they were written from,
exact resume after SIGKILL, DDP, labels from cls parts or img2dataset's json, bad shards."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.core import tars
from mocoserve.core.images import iter_image_files
from mocoserve.train import checkpoint
from mocoserve.train.data import ImageDataset, ShardIndex, scan_data, scan_folder
from tests.test_train_cli import TINY, assert_user_error, sigkill_then_resume

runner = CliRunner()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, out: Path, shard_size: int) -> Path:
    """`folder`'s images as shards, in its scan order, with index files and shards.json:
    `mocoserve shards --labels-from-folders` (core.shardwriter) where it is there, else the
    same layout here (`{key}.{ext}`, `.cls` the class number, `.json` with the class name)."""
    labelled = scan_folder(folder).labelled
    try:
        from mocoserve.core.shardwriter import write_shards as convert
    except ImportError:
        convert = None
    if convert is not None:
        convert(folder, out, shard_size=shard_size, labels_from_folders=labelled)
        return out
    out.mkdir(parents=True)
    files = list(iter_image_files(folder))
    classes = scan_folder(folder).classes
    counts = []
    for start in range(0, len(files), shard_size):
        shard = out / f"shard-{start // shard_size:06d}.tar"
        with tarfile.open(shard, "w") as tar:
            for i, path in enumerate(files[start : start + shard_size], start):
                rel = path.relative_to(folder).as_posix()
                key = f"{i:09d}"
                _add(tar, f"{key}{path.suffix}", path.read_bytes())
                label = rel.split("/")[0] if labelled else None
                if label:
                    _add(tar, f"{key}.cls", str(classes.index(label)).encode())
                _add(tar, f"{key}.json", json.dumps({"path": rel, "label": label}).encode())
        listing = tars.list_shard(str(shard))
        tars.write_index(shard, listing.samples)
        counts.append((str(shard), len(listing.samples)))
    tars.write_shard_list(out / tars.SHARD_LIST, counts)
    return out


@pytest.fixture(scope="module")
def flat_shards(flat_dir, tmp_path_factory) -> Path:
    return write_shards(flat_dir, tmp_path_factory.mktemp("flat") / "shards", shard_size=5)


@pytest.fixture(scope="module")
def labelled_shards(labelled_dir, tmp_path_factory) -> Path:
    return write_shards(labelled_dir, tmp_path_factory.mktemp("lab") / "shards", shard_size=7)


def train(*args: str):
    return runner.invoke(app, ["train", *args])


def models_equal(a: Path, b: Path) -> None:
    sa = checkpoint.load(a / "checkpoints" / "last.pt")
    sb = checkpoint.load(b / "checkpoints" / "last.pt")
    assert sa["train_state"] == sb["train_state"]
    for key in sa["model"]:  # weights, BN statistics, key encoder, queue and its pointer
        assert torch.equal(sa["model"][key], sb["model"][key]), key


def test_shards_index_as_the_folder(labelled_dir, labelled_shards):
    """Same items, same order, same label ids; the same decoded pixels."""
    folder = scan_folder(labelled_dir)
    shards = scan_data(str(labelled_shards))
    assert isinstance(shards, ShardIndex) and len(shards) == len(folder) == 24
    assert shards.classes == folder.classes and shards.labels.tolist() == folder.labels
    a = ImageDataset(folder.files, folder.labels, np.asarray)
    b = ImageDataset(shards.files, shards.labels, np.asarray)
    for i in (0, 5, 23):
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    # a brace pattern names the same shards, in the same order
    pattern = scan_data(str(labelled_shards / "shard-{000000..000003}.tar"))
    assert pattern.files.offsets.tolist() == shards.files.offsets.tolist()


@pytest.mark.parametrize("method", ["moco-v2", "supcon"])
def test_shards_train_to_the_folders_weights(method, labelled_dir, labelled_shards, tmp_path):
    """Folder -> shards -> train equals training on the folder, bit for bit (supcon: labels
    from the shards' cls parts), and the k-NN monitor reads shards too."""
    args = ["--method", method, "--epochs", "1", "-b", "8", "-K", "16", "--bn-splits", "2"]
    args += ["--max-steps", "2", "--seed", "3", *TINY]
    a = train(str(labelled_dir), *args, "--val", str(labelled_dir), "--out", str(tmp_path / "a"))
    assert a.exit_code == 0, a.output
    b = train(
        str(labelled_shards), *args, "--val", str(labelled_shards), "--out", str(tmp_path / "b")
    )
    assert b.exit_code == 0, b.output
    models_equal(tmp_path / "a", tmp_path / "b")
    header = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")["classes"]
    assert header == ["class_0", "class_1", "class_2"]


def test_knn_monitor_on_shards_equals_the_folder(labelled_dir, labelled_shards, val_dir, tmp_path):
    args = ["--epochs", "1", "-b", "8", "-K", "16", "--knn-every", "1", "--seed", "1", *TINY]
    val_shards = write_shards(val_dir, tmp_path / "val", shard_size=5)
    a = train(str(labelled_dir), *args, "--val", str(val_dir), "--out", str(tmp_path / "a"))
    b = train(str(labelled_shards), *args, "--val", str(val_shards), "--out", str(tmp_path / "b"))
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    knn = [
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()][-1]
        for r in "ab"
    ]
    assert knn[0]["knn_top1"] == knn[1]["knn_top1"] and knn[0]["knn_top5"] == knn[1]["knn_top5"]


@pytest.mark.slow  # three fresh processes; mid-epoch resume on shards is tested in-process below
def test_sigkill_on_shards_then_resume_auto_matches_uninterrupted_run(flat_shards, tmp_path):
    args = [str(flat_shards), "--epochs", "3", "-b", "4", "-K", "10", "--bn-splits", "2"]
    args += ["--save-every", "1", "--seed", "7", *TINY[:-3], "--workers", "2", "-q"]
    sigkill_then_resume(args, tmp_path)
    models_equal(tmp_path / "clean", tmp_path / "killed")


def test_mid_epoch_stop_on_shards_resumes_exactly(flat_dir, flat_shards, tmp_path):
    """--max-steps mid-epoch then --resume auto on shards equals one run on the folder."""
    args = ["--epochs", "1", "-b", "4", "-K", "10", "--bn-splits", "2", *TINY]
    assert train(str(flat_dir), *args, "--out", str(tmp_path / "a")).exit_code == 0
    first = train(str(flat_shards), *args, "--out", str(tmp_path / "b"), "--max-steps", "3")
    assert first.exit_code == 0 and "stopped after 3 steps" in first.output, first.output
    again = train(str(flat_shards), *args, "--out", str(tmp_path / "b"), "--resume", "auto")
    assert again.exit_code == 0, again.output
    models_equal(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow  # as test_train_cli's: two processes start torch and gloo (> 20 s)
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_gloo_processes_on_shards(flat_shards, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "mocoserve", "train"]
    cmd += [str(flat_shards / "shard-{000000..000004}.tar"), "--epochs", "1", "-b", "4"]
    cmd += ["-K", "20", "--max-steps", "2", "--out", str(out), *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stderr and "global 8" in result.stderr
    assert "24 images" in result.stderr and "3 steps/epoch" in result.stderr
    ckpt = checkpoint.load(out / "checkpoints" / "last.pt")
    assert ckpt["train_state"]["step"] == 2
    assert int(ckpt["model"]["queue_ptr"]) == (2 * 8) % 20  # keys of both ranks enqueued


def write_img2dataset_shard(path: Path, labelled_dir: Path) -> None:
    """img2dataset's layout: `{shard:05d}{i:04d}.jpg` + `.json` (its metadata) + `.txt`, no
    cls part, no index file; the class in a json field of the user's choosing."""
    with tarfile.open(path, "w") as tar:
        for i, f in enumerate(p for p in iter_image_files(labelled_dir) if p.suffix == ".jpg"):
            key = f"00000{i:04d}"
            meta = {
                "url": f"https://example.com/{f.name}",
                "key": key,
                "status": "success",
                "caption": f.stem,
                "width": 40,
                "height": 40,
                "category": f.parent.name,
            }
            _add(tar, f"{key}.jpg", f.read_bytes())
            _add(tar, f"{key}.txt", f.stem.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())


def test_img2dataset_shard_trains_supcon_with_label_key(labelled_dir, tmp_path):
    """img2dataset's output folder as it is (its tars beside its parquet and stats files)."""
    output = tmp_path / "i2d"
    output.mkdir()
    write_img2dataset_shard(output / "00000.tar", labelled_dir)
    (output / "00000.parquet").write_bytes(b"PAR1")
    (output / "00000_stats.json").write_text('{"count": 12}')
    args = [str(output), "--method", "supcon", "--epochs", "1", "-b", "4", *TINY]
    result = train(
        *args, "--label-key", "category", "--val", str(labelled_dir), "--out", str(tmp_path / "r")
    )
    assert result.exit_code == 0, result.output
    assert "knn_top1" in (tmp_path / "r" / "metrics.jsonl").read_text()  # a folder's val
    assert checkpoint.load(tmp_path / "r" / "checkpoints" / "last.pt")["classes"] == [
        "class_0",
        "class_1",
        "class_2",
    ]
    assert_user_error(train(*args, "--out", str(tmp_path / "u")), "supcon needs labels")
    assert_user_error(
        train(*args, "--label-key", "colour", "--out", str(tmp_path / "v")),
        "--label-key colour: 12 of 12 samples",
    )
    moco = train(
        str(output / "00000.tar"),
        "--epochs",
        "1",
        "-b",
        "4",
        "-K",
        "8",
        *TINY,
        "--out",
        str(tmp_path / "m"),
    )
    assert moco.exit_code == 0, moco.output


def test_bad_shards_are_one_line_errors(flat_dir, tmp_path):
    shards = write_shards(flat_dir, tmp_path / "s", shard_size=5)
    out = ["--out", str(tmp_path / "o"), "-b", "4", *TINY]
    assert_user_error(train(str(shards / "shard-{000000..000009}.tar"), *out), "does not exist")
    val = ["--val", "pipe:cat x.tar"]  # training streams pipe: shards; --val does not
    assert_user_error(train(str(shards), *val, *out), "--val reads its shards by offset")
    with open(shards / "shard-000001.tar", "ab") as f:  # changed since its index was written
        f.write(bytes(512))
    assert_user_error(train(str(shards), *out), "the shard changed")
    assert_user_error(train(str(flat_dir), "--label-key", "x", *out), "is a folder")


def test_truncated_shard_without_index_keeps_what_precedes_the_cut(labelled_dir, tmp_path, capsys):
    """A shard cut short (a copy that stopped): one warning, its whole samples still train."""
    whole = tmp_path / "whole.tar"
    write_img2dataset_shard(whole, labelled_dir)
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    index = scan_data(str(cut), label_key="category")
    assert 0 < len(index) < 12 and index.labelled
    assert "warning:" in capsys.readouterr().err
    full = scan_data(str(whole), label_key="category")
    assert full.files.offsets[: len(index)].tolist() == index.files.offsets.tolist()
