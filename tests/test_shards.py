"""`mocoserve shards`: a folder as tar shards, bytes as they are, indexes and shards.json as
specified, written safely; and the text keys of tar items (core.tars)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mocoserve.cli import app as cli
from mocoserve.core import tars
from mocoserve.index.store import shard_of
from tests.imagegen import make_labelled


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def folder(tmp_path) -> Path:
    images = make_labelled(tmp_path / "images", classes=3, per_class=4)  # 12, jpg and png
    (images / "notes.txt").write_text("not an image")
    (images / "class_1" / "broken.jpg").write_bytes(b"no jpeg at all")
    (images / "top.JPG").write_bytes((images / "class_0" / "img_000.jpg").read_bytes())
    return images


def members(shard: str) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_folder_to_shards_keeps_bytes_and_writes_indexes_and_the_list(folder, tmp_path):
    out = tmp_path / "shards"
    result = run("shards", str(folder), "--out", str(out), "--shard-size", "5")
    assert result.exit_code == 0, result.output
    assert "wrote 3 shards, 13 images; skipped 2" in result.output
    assert "skipped notes.txt" in result.output and "broken.jpg" in result.output
    names = sorted(p.name for p in out.iterdir())
    shard_names = [f"shard-{i:06d}.tar" for i in range(3)]
    assert names == sorted([*shard_names, *(f"{s}.idx.json" for s in shard_names), "shards.json"])

    listed = json.loads((out / "shards.json").read_text())
    assert listed["__kind__"] == "wids-shard-index-v1"
    assert [(e["url"], e["nsamples"]) for e in listed["shardlist"]] == list(
        zip(shard_names, [5, 5, 3], strict=True)
    )
    assert listed["mocoserve"]["classes"] == []  # unlabelled: no --labels-from-folders

    seen = []
    for shard in tars.expand([out]):
        by_index = tars.list_shard(shard)
        assert by_index.from_index and not by_index.failures
        idx = json.loads(tars.index_path(shard).read_text())
        assert idx["size"] == os.path.getsize(shard)
        parts = members(shard)
        for sample in by_index.samples:
            meta = json.loads(parts[f"{sample.key}.json"])
            original = (folder / meta["path"]).read_bytes()
            data = tars.read_member(shard, sample.offset, sample.size)
            assert data == original == parts[sample.member]  # never re-encoded
            assert meta["sha256"] == hashlib.sha256(original).hexdigest()
            assert sample.member == sample.key + Path(meta["path"]).suffix.lower()
            assert sample.label == meta["label"]
            if meta["label"] is None:
                assert f"{sample.key}.cls" not in parts
            seen.append(meta["path"])
        os.rename(tars.index_path(shard), tmp_path / "aside")  # the headers list the same
        by_headers = tars.list_shard(shard)
        os.rename(tmp_path / "aside", tars.index_path(shard))
        assert not by_headers.from_index and by_headers.samples == by_index.samples
    # the folder reader's order, every image once; unlabelled without --labels-from-folders
    assert seen[0].startswith("class_0/") and seen[-1] == "top.JPG" and len(set(seen)) == 13


def test_labels_are_class_indexes_in_cls_and_names_in_json(folder, tmp_path):
    out = tmp_path / "shards"
    result = run("shards", str(folder), "--out", str(out), "--labels-from-folders")
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards, 13 images, 3 classes" in result.output
    listed = json.loads((out / "shards.json").read_text())
    assert listed["mocoserve"]["classes"] == ["class_0", "class_1", "class_2"]
    (shard,) = tars.expand([out / "shards.json"])
    parts = members(shard)
    for sample in tars.list_shard(shard).samples:
        meta = json.loads(parts[f"{sample.key}.json"])
        if "/" in meta["path"]:
            name = meta["path"].split("/")[0]
            assert meta["label"] == sample.label == name
            assert parts[f"{sample.key}.cls"] == str(int(name[-1])).encode()
        else:  # a file at the top has no folder label
            assert meta["label"] is None and f"{sample.key}.cls" not in parts


def test_a_rerun_is_a_noop_for_the_same_set_and_refuses_another(folder, tmp_path):
    out = tmp_path / "shards"
    assert run("shards", str(folder), "--out", str(out), "--shard-size", "4").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run("shards", str(folder), "--out", str(out), "--shard-size", "4")
    assert again.exit_code == 0 and "already holds this folder's set" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    other = run("shards", str(folder), "--out", str(out), "--shard-size", "6")
    assert other.exit_code == 2 and "error: --out" in other.output
    assert "--overwrite" in other.output and "Traceback" not in other.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # untouched

    (out / "mine.txt").write_text("keep me")
    replaced = run("shards", str(folder), "--out", str(out), "--shard-size", "6", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    shards = tars.expand([out])
    assert [Path(s).name for s in shards] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert sum(len(tars.list_shard(s).samples) for s in shards) == 13
    assert not (out / "shard-000003.tar").exists()  # the old set's fourth shard is gone
    assert (out / "mine.txt").read_text() == "keep me"  # only the set's own files go


def test_a_folder_of_other_files_is_refused(folder, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.bin").write_bytes(b"x")
    result = run("shards", str(folder), "--out", str(out))
    assert result.exit_code == 2 and "already holds files" in result.output
    assert run("shards", str(tmp_path / "nowhere"), "--out", str(out)).exit_code == 2


def test_item_keys_split_and_group_by_shard():
    for shard in ["/data/shard-000001.tar", "pipe:aws s3 cp s3://b/s-1.tar -", "/a/%2F#x/"]:
        key = tars.item_key(shard, "sub/000123.jpg")
        assert not key.startswith("/")  # a folder's keys are absolute paths: never one
        assert tars.split_item_key(key) == (shard, "sub/000123.jpg")
        assert key.startswith(tars.shard_key(shard) + "/")  # the shard's key covers it
        assert tars.key_group(key) == tars.shard_key(shard)
        assert shard_of(key, 8) == shard_of(tars.item_key(shard, "000999.png"), 8)
    assert tars.split_item_key("/data/shard-000001.tar#000123.jpg") is None
