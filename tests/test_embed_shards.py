"""`mocoserve embed` from tar shards: the second reader of the ingest pipeline (TarSource).

The same images as a folder and as shards give the same vectors, labels and search results;
img2dataset's layout reads as it is; damage is a recorded failure; reruns skip unchanged
shards; pipe: streams; process shards take whole tars; the service serves a member's bytes.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import mocoserve.index.reader
from mocoserve.cli import app as cli
from mocoserve.core import tars
from mocoserve.core.shardwriter import write_shards
from mocoserve.index.store import ShardedStore, shard_of
from tests.imagegen import class_image, make_labelled


def embed(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, ["embed", *args, "--quiet"])
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory, model_dir) -> dict:
    root = tmp_path_factory.mktemp("embed-shards")
    images = make_labelled(root / "images", classes=3, per_class=4)  # 12 images
    write_shards(images, root / "shards", shard_size=5, labels_from_folders=True)  # 5, 5, 2
    return {"root": root, "images": images, "shards": root / "shards", "model": model_dir}


def by_sha(index_path: Path) -> dict[str, tuple[str | None, np.ndarray, str]]:
    """sha256 -> (label, vector, path) of every item."""
    index = mocoserve.index.reader.open(index_path, readonly=True)
    try:
        ids = [int(i) for i in index.ids()]
        items = index.items(ids)
        vectors = index.vectors_of(ids)
        return {
            items[i].sha256: (items[i].label, v, items[i].path)
            for i, v in zip(ids, vectors, strict=True)
        }
    finally:
        index.close()


def paths_of(index_path: Path) -> list[str]:
    index = mocoserve.index.reader.open(index_path, readonly=True)
    try:
        return [item.path for item in index.items([int(i) for i in index.ids()]).values()]
    finally:
        index.close()


def failures(index_path: Path) -> dict[str, str]:
    store = ShardedStore(index_path)
    try:
        return dict(store.failures())
    finally:
        store.close()


def search_json(index_path: Path, query: Path) -> list[dict]:
    result = CliRunner().invoke(cli, ["search", str(index_path), str(query), "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)[0]["results"]


def test_embed_from_shards_equals_embed_from_the_folder(world, tmp_path):
    folder_index, shard_index = tmp_path / "folder.faiss", tmp_path / "shards.faiss"
    model = str(world["model"])
    embed(str(world["images"]), "--index", str(folder_index), "--model", model,
          "--labels-from-folders", "--workers", "0")  # fmt: skip
    pattern = str(world["shards"] / "shard-{000000..000002}.tar")
    # a decoder process reads each member at its offset itself
    embed(pattern, "--index", str(shard_index), "--model", model, "--workers", "1")
    labelled, shard_items = by_sha(folder_index), by_sha(shard_index)
    assert set(shard_items) == set(labelled) and len(shard_items) == 12
    for sha, (label, vector, path) in shard_items.items():
        assert tars.split_item_key(path) is not None  # tar:<shard>//<member>
        assert label == labelled[sha][0]  # the class name, as --labels-from-folders gives
        np.testing.assert_array_equal(vector, labelled[sha][1])  # the same bytes, decoded alike

    query = world["images"] / "class_1" / "img_002.jpg"
    from_folder, from_shards = search_json(folder_index, query), search_json(shard_index, query)
    assert [(h["sha256"], h["label"]) for h in from_shards] == [
        (h["sha256"], h["label"]) for h in from_folder
    ]
    assert [h["score"] for h in from_shards] == pytest.approx([h["score"] for h in from_folder])
    assert from_shards[0]["is_query"]  # the query's own bytes, found in a tar


def write_img2dataset_shard(path: Path, n: int = 6) -> list[str]:
    """A shard as img2dataset writes it: keys of shard id and index (9 digits), .jpg + .json
    (key, caption, url, status, ...) + .txt members; the label in a json field of our own."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"00000{i:04d}"
            buf = io.BytesIO()
            class_image(i % 2, i, 40, 3).save(buf, format="JPEG")
            meta = {
                "key": key,
                "caption": f"a picture number {i}",
                "url": f"https://example.com/{i}.jpg",
                "status": "success",
                "error_message": None,
                "width": 40,
                "height": 40,
                "original_width": 40,
                "original_height": 40,
                "exif": "{}",
                "sha256": None,
                "species": ["cat", "dog"][i % 2],
            }
            for name, data in (
                (f"{key}.jpg", buf.getvalue()),
                (f"{key}.txt", meta["caption"].encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def test_img2dataset_layout_embeds_with_labels_from_a_json_field(world, tmp_path):
    shard = tmp_path / "00000.tar"
    keys = write_img2dataset_shard(shard)
    index = tmp_path / "out.faiss"
    embed(str(shard), "--index", str(index), "--model", str(world["model"]),
          "--label-key", "species", "--workers", "0")  # fmt: skip
    items = by_sha(index)
    assert sorted(tars.split_item_key(p)[1] for _, _, p in items.values()) == [  # type: ignore[index]
        f"{k}.jpg" for k in keys
    ]
    got = {tars.split_item_key(p)[1]: label for label, _, p in items.values()}  # type: ignore[index]
    assert got == {f"{k}.jpg": ["cat", "dog"][i % 2] for i, k in enumerate(keys)}

    plain = tmp_path / "plain.faiss"  # no --label-key: img2dataset's json has no label
    embed(str(shard), "--index", str(plain), "--model", str(world["model"]), "--workers", "0")
    assert all(label is None for label, _, _ in by_sha(plain).values())


def test_a_truncated_tar_and_a_corrupt_member_are_failures_and_the_rest_is_indexed(world, tmp_path):
    good = tmp_path / "good.tar"
    keys = write_img2dataset_shard(good)
    cut = tmp_path / "cut.tar"
    data = good.read_bytes()
    listing = tars.list_shard(str(good))
    third = listing.samples[3]
    cut.write_bytes(data[: third.offset + third.size // 2])  # inside the 4th image
    corrupt = tmp_path / "corrupt.tar"
    with tarfile.open(good) as src, tarfile.open(corrupt, "w") as dst:
        for m in src.getmembers():
            payload = src.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == f"{keys[1]}.jpg":
                payload = b"\xff\xd8\xff" + b"garbage" * 50
                m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    index = tmp_path / "out.faiss"
    result = embed(str(cut), str(corrupt), "--index", str(index), "--model",
                   str(world["model"]), "--workers", "0", ok=False)  # fmt: skip
    assert result.exit_code == 0, result.output
    failed = failures(index)
    assert "truncated" in failed[tars.shard_key(str(cut))]
    assert "cut short" in failed[tars.item_key(str(cut), keys[3])]
    assert failed[tars.item_key(str(corrupt), f"{keys[1]}.jpg")].startswith("not an image")
    indexed = set(paths_of(index))  # the same images in both tars: not by sha256
    assert indexed == {tars.item_key(str(cut), f"{k}.jpg") for k in keys[:3]} | {
        tars.item_key(str(corrupt), f"{k}.jpg") for k in keys if k != keys[1]
    }
    assert "failed" in result.output and "Traceback" not in result.output


def test_a_rerun_skips_unchanged_shards_embeds_a_changed_one_and_drops_a_removed_one(
    world, tmp_path
):
    shards = tmp_path / "shards"
    write_shards(world["images"], shards, shard_size=5, labels_from_folders=True)
    (shards / tars.SHARD_LIST).unlink()  # a folder of shards, listed by name
    index, model = tmp_path / "out.faiss", str(world["model"])
    embed(str(shards), "--index", str(index), "--model", model, "--workers", "0")
    again = CliRunner().invoke(cli, ["embed", str(shards), "--index", str(index), "--workers", "0"])
    assert "embedded 0, skipped 12 (unchanged), failed 0, removed 0" in again.output

    changed = str(shards / "shard-000001.tar")  # rewritten: one image replaced
    samples = tars.list_shard(changed).samples
    with tarfile.open(changed) as src:
        parts = [(m, src.extractfile(m).read()) for m in src.getmembers()]  # type: ignore[union-attr]
    new = io.BytesIO()
    class_image(2, 99, 40, 7).save(new, format="PNG")
    with tarfile.open(changed, "w") as dst:
        for m, payload in parts:
            if m.name == samples[0].member:
                payload = new.getvalue()
                m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    os.unlink(tars.index_path(changed))  # listed by its headers now
    result = CliRunner().invoke(
        cli, ["embed", str(shards), "--index", str(index), "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "embedded 5, skipped 7 (unchanged), failed 0, removed 0" in result.output

    gone = shards / "shard-000002.tar"
    os.unlink(gone)
    os.unlink(tars.index_path(gone))
    result = CliRunner().invoke(
        cli, ["embed", str(shards), "--index", str(index), "--workers", "0"]
    )
    assert "embedded 0, skipped 10 (unchanged), failed 0, removed 2" in result.output
    assert len(by_sha(index)) == 10


def test_a_pipe_command_streams_a_shard(world, tmp_path):
    shard = world["shards"] / "shard-000000.tar"
    index = tmp_path / "out.faiss"
    url = f"pipe:cat {shard}"
    embed(url, "--index", str(index), "--model", str(world["model"]), "--workers", "0")
    items = by_sha(index)
    assert len(items) == 5 and {label for label, _, _ in items.values()} <= {"class_0", "class_1"}
    assert all(tars.split_item_key(p)[0] == url for _, _, p in items.values())  # type: ignore[index]
    again = CliRunner().invoke(cli, ["embed", url, "--index", str(index), "--workers", "0"])
    assert "embedded 0, skipped 5" in again.output, again.output


def test_a_stalled_or_failing_pipe_is_a_recorded_failure_and_the_rest_is_indexed(world, tmp_path):
    """A command that hangs is stopped after --stream-timeout; one that exits non-zero is
    recorded with its stderr; the other shard is indexed."""
    shard = world["shards"] / "shard-000000.tar"
    index = tmp_path / "out.faiss"
    spec = f"pipe:{{cat {shard},sleep 120,cat {shard}; echo lost >&2; exit 5}}"
    began = time.monotonic()
    result = embed(spec, "--index", str(index), "--model", str(world["model"]), "--workers",
                   "0", "--stream-timeout", "1")  # fmt: skip
    assert time.monotonic() - began < 60
    assert "failed 2" in result.output, result.output
    reasons = list(failures(index).values())
    assert any("no data for 1 s; the command was stopped" in r for r in reasons), reasons
    assert any("the command failed (status 5): lost" in r for r in reasons), reasons
    assert len(by_sha(index)) == 5
    bad = CliRunner().invoke(cli, ["embed", spec, "--index", str(index), "--stream-timeout", "0"])
    assert bad.exit_code == 2 and "--stream-timeout must be positive" in bad.output


def test_the_service_serves_a_tar_items_bytes_by_id_and_refuses_a_changed_shard(world, tmp_path):
    from mocoserve.service.main import create_app
    from mocoserve.service.state import ServiceConfig, ServiceState

    shards = tmp_path / "shards"
    write_shards(world["images"], shards, shard_size=5)
    index = tmp_path / "out.faiss"
    embed(str(shards / tars.SHARD_LIST), "--index", str(index), "--model", str(world["model"]),
          "--workers", "0")  # fmt: skip
    state = ServiceState(ServiceConfig(index=index, device="cpu", ui=False))
    state.load()
    served = state.served.index
    items = served.items([int(i) for i in served.ids()])
    with TestClient(create_app(state.config, state)) as http:
        for item_id, item in items.items():
            shard, member = tars.split_item_key(item.path)  # type: ignore[misc]
            sample = next(s for s in tars.list_shard(shard).samples if s.member == member)
            meta = json.loads(_member(shard, f"{sample.key}.json"))
            answer = http.get(f"/v1/items/{item_id}/image")
            assert answer.status_code == 200, answer.text
            assert answer.content == (world["images"] / meta["path"]).read_bytes()
            assert answer.headers["content-type"].startswith("image/")
        item_id, item = next(iter(items.items()))
        shard = tars.split_item_key(item.path)[0]  # type: ignore[index]
        os.utime(shard, ns=(0, 10**18))  # the shard changed since embed
        answer = http.get(f"/v1/items/{item_id}/image")
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "gone"
        assert "changed" in answer.json()["error"]["message"]
        os.unlink(shard)
        answer = http.get(f"/v1/items/{item_id}/image")
        assert answer.status_code == 404 and "gone" in answer.json()["error"]["message"]


def _member(shard: str, name: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(name).read()  # type: ignore[union-attr]


def test_process_shards_split_whole_tars(world, tmp_path):
    shards = tmp_path / "shards"
    write_shards(world["images"], shards, shard_size=3)  # 4 tars
    index, model = tmp_path / "out.faiss", str(world["model"])
    tar_files = tars.expand([shards])
    first = embed(str(shards), "--index", str(index), "--model", model, "--shard", "0/2",
                  "--workers", "0")  # fmt: skip
    mine = [t for t in tar_files if shard_of(tars.shard_key(t), 2) == 0]
    assert f"embedded {3 * len(mine)}," in first.output
    embed(str(shards), "--index", str(index), "--shard", "1/2", "--workers", "0")
    store = ShardedStore(index)
    try:
        where: dict[str, set[int]] = {}
        for s in store.all_shards():
            for key in s.stats():
                where.setdefault(tars.split_item_key(key)[0], set()).add(s.shard)  # type: ignore[index]
        assert len(store) == 12
    finally:
        store.close()
    assert sorted(where) == sorted(tar_files)
    assert all(len(owners) == 1 for owners in where.values())  # a tar is one process's
    assert {t for t, owners in where.items() if owners == {0}} == set(mine)


def test_a_stale_shard_index_is_a_recorded_failure_and_a_moved_range_is_never_read(world, tmp_path):
    from mocoserve.core.decode import ByteRange, decode_file

    shards = tmp_path / "shards"
    write_shards(world["images"], shards, shard_size=5)
    stale = shards / "shard-000000.tar"
    sample = tars.list_shard(str(stale)).samples[0]
    with open(stale, "ab") as f:
        f.write(bytes(1024))  # grown after its index was written
    index = tmp_path / "out.faiss"
    embed(str(shards), "--index", str(index), "--model", str(world["model"]), "--workers", "0")
    failed = failures(index)
    assert "changed" in failed[tars.shard_key(str(stale))]
    assert len(paths_of(index)) == 7  # the other two shards

    st = os.stat(stale)
    moved = ByteRange(str(stale), sample.offset, sample.size, st.st_mtime_ns - 1)
    decoded = decode_file(moved, 32, 32)
    assert decoded.code == "unreadable" and "changed since it was listed" in decoded.error  # type: ignore[operator]
    ok = decode_file(ByteRange(str(stale), sample.offset, sample.size, st.st_mtime_ns), 32, 32)
    assert ok.error is None and ok.bytes == sample.size


def test_knn_report_thumbnails_of_tar_items_are_the_images(world):
    """The k-NN report draws a tar item from its member's bytes, not a grey placeholder."""
    from PIL import Image

    from mocoserve.report import _thumb

    listing = tars.list_shard(str(world["shards"] / "shard-000000.tar"))
    sample = listing.samples[0]
    thumb = _thumb(tars.item_key(sample.shard, sample.member), 40, "black")
    inner = thumb.crop((3, 3, 37, 37))
    grey = Image.new("RGB", inner.size, "grey")
    assert inner.tobytes() != grey.tobytes()
    gone = _thumb(tars.item_key(str(world["root"] / "no.tar"), sample.member), 40, "black")
    assert gone.crop((3, 3, 37, 37)).tobytes() == grey.tobytes()
