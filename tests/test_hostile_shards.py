"""Hostile tar shards: tampered indexes, rewritten shards, odd member names, duplicate
members, oversized label parts, pipe: urls in a shard list, --out around the folder."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import mocoserve.index.reader
from mocoserve.cli import app as cli
from mocoserve.core import tars
from mocoserve.core.decode import ByteRange, decode_file
from mocoserve.core.errors import UserError
from mocoserve.core.shardwriter import write_shards
from tests.imagegen import class_image, make_labelled


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    class_image(i % 2, i, 32, 3).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shard_set(tmp_path: Path) -> Path:
    images = make_labelled(tmp_path / "images", classes=2, per_class=2)
    write_shards(images, tmp_path / "shards", shard_size=10, labels_from_folders=True)
    return tmp_path / "shards" / "shard-000000.tar"


def _tamper(shard: Path, change) -> None:
    idx = tars.index_path(shard)
    data = json.loads(idx.read_text())
    change(data["samples"])
    idx.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change",
    [
        lambda rows: rows[0].__setitem__(3, -1),  # negative size
        lambda rows: rows[0].__setitem__(2, True),  # a bool offset
        lambda rows: rows[0].__setitem__(2, 100),  # not on a block
        lambda rows: rows[0].__setitem__(4, {"x": 1}),  # a label that is no name
    ],
)
def test_a_tampered_index_row_is_refused_by_name(shard_set, change):
    _tamper(shard_set, change)
    with pytest.raises(UserError, match="is damaged"):
        tars.list_shard(str(shard_set))


def test_an_index_row_pointing_into_another_member_is_never_read(shard_set):
    rows = tars.list_shard(str(shard_set)).samples
    _tamper(shard_set, lambda r: r[0].__setitem__(2, r[1][2]))  # member 0 -> member 1's data
    bad = tars.list_shard(str(shard_set)).samples[0]
    mtime = os.stat(shard_set).st_mtime_ns
    decoded = decode_file(
        ByteRange(str(shard_set), bad.offset, bad.size, mtime, bad.member), 32, 32
    )
    assert decoded.code == "unreadable" and "not" in decoded.error  # type: ignore[operator]
    with pytest.raises(OSError, match="the shard changed"):
        tars.read_member(str(shard_set), bad.offset, bad.size, bad.member)
    ok = tars.read_member(str(shard_set), rows[1].offset, rows[1].size, rows[1].member)
    assert len(ok) == rows[1].size


def test_a_shard_rewritten_at_the_same_size_is_refused_not_read(shard_set):
    from mocoserve.train.data import ShardReader, TarMember

    sample = tars.list_shard(str(shard_set)).samples[0]
    data = bytearray(shard_set.read_bytes())
    data[sample.offset - 512 : sample.offset + 512] = os.urandom(1024)  # same size, new bytes
    shard_set.write_bytes(bytes(data))
    with pytest.raises(OSError):
        ShardReader().read(TarMember(str(shard_set), sample.offset, sample.size))
    with pytest.raises(OSError):
        tars.read_member(str(shard_set), sample.offset, sample.size, sample.member)


def test_duplicate_members_are_a_failure_and_a_huge_cls_is_not_read(tmp_path):
    shard = tmp_path / "dup.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.png", _png(0))
        _add(tar, "a.png", _png(1))  # the same member twice: which is the sample's?
        _add(tar, "b.png", _png(2))
        _add(tar, "b.cls", b"7" * (tars.MAX_JSON_BYTES + 1))
    listing = tars.list_shard(str(shard))
    assert [s.member for s in listing.samples] == ["b.png"]
    assert listing.samples[0].label is None  # not a 1 MiB class name
    assert dict(listing.failures)["a"].startswith("the tar holds this sample's members")


def test_a_shard_list_never_runs_a_pipe_command(tmp_path):
    listed = tmp_path / tars.SHARD_LIST
    flag = tmp_path / "ran"
    listed.write_text(json.dumps({"shardlist": [{"url": f"pipe:touch {flag}", "nsamples": 1}]}))
    result = CliRunner().invoke(cli, ["embed", str(listed), "--index", str(tmp_path / "o.faiss")])
    assert result.exit_code == 2 and "pipe:" in result.output and "Traceback" not in result.output
    assert not flag.exists()


def test_shards_out_is_never_the_folder_and_may_hold_it(tmp_path):
    images = make_labelled(tmp_path / "data" / "images", classes=2, per_class=2)
    same = CliRunner().invoke(cli, ["shards", str(images), "--out", str(images), "--quiet"])
    assert same.exit_code == 2 and "image folder itself" in same.output
    before = sorted(p for p in images.rglob("*") if p.is_file())
    above = write_shards(images, tmp_path / "data", overwrite=True)  # --out holds the folder
    assert above.samples == 4 and sorted(p for p in images.rglob("*") if p.is_file()) == before


def test_hostile_member_names_embed_and_serve_by_id(tmp_path, model_dir):
    from mocoserve.service.main import create_app
    from mocoserve.service.state import ServiceConfig, ServiceState

    names = ["../up.png", "/abs/x.png", "a//b.png", "h#1.png", "nl\nx.png",
             b"bad\xff.png".decode("utf-8", "surrogateescape")]  # fmt: skip
    shard = tmp_path / "odd.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, name in enumerate(names):
            _add(tar, name, _png(i))
        for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):  # links are no samples
            info = tarfile.TarInfo(f"link{kind!r}.png")
            info.type, info.linkname = kind, "h#1.png"
            tar.addfile(info)
        _add(tar, "zero.png", b"")
    index = tmp_path / "out.faiss"
    result = CliRunner().invoke(cli, ["embed", str(shard), "--index", str(index), "--model",
                                      str(model_dir), "--workers", "0", "--quiet"])  # fmt: skip
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    state = ServiceState(ServiceConfig(index=index, device="cpu", ui=False))
    state.load()
    served = state.served.index
    items = served.items([int(i) for i in served.ids()])
    got = {tars.split_item_key(item.path)[1]: i for i, item in items.items()}  # type: ignore[index]
    assert sorted(got) == sorted(names)
    with TestClient(create_app(state.config, state)) as http:
        for i, name in enumerate(names):
            answer = http.get(f"/v1/items/{got[name]}/image")
            assert answer.status_code == 200 and answer.content == _png(i)
        os.unlink(shard)
        gone = http.get(f"/v1/items/{got[names[0]]}/image")
        assert gone.status_code == 404 and "gone" in gone.json()["error"]["message"]
    reader = mocoserve.index.reader.open(index, readonly=True)
    reader.close()
