"""The files of an index by name (`IndexFiles`), and its store written and read back through
the library: a catalog, shards, items and vectors, reopened; a format-1 index migrated."""

import numpy as np
import pytest

from mocoserve.index.catalog import FORMAT_VERSION, Catalog
from mocoserve.index.dbfile import format_version
from mocoserve.index.files import IndexFiles, ShardFiles
from mocoserve.index.formats import Sidecar, migrate, open_store
from mocoserve.index.items import NewItem
from mocoserve.index.store import Shard, ShardCounts, ShardedStore, shard_of

DIM = 8


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def new_items(paths: list[str], seed: int = 0) -> list[NewItem]:
    vectors = unit_vectors(len(paths), seed)
    return [
        NewItem(p, p.split("/")[2], f"{i:064x}", 100 + i, 10**9 + i, 4, 3, v)
        for i, (p, v) in enumerate(zip(paths, vectors, strict=True))
    ]


def test_every_file_of_an_index_is_named_from_its_path(tmp_path):
    files = IndexFiles(str(tmp_path / "out.faiss"))
    assert files.faiss == tmp_path / "out.faiss"
    assert files.catalog == files.sidecar == tmp_path / "out.faiss.db"
    assert files.lock == tmp_path / "out.faiss.lock"
    assert files.shards == tmp_path / "out.faiss.shards"
    assert files.shard(3, 8) == tmp_path / "out.faiss.shards" / "0003-of-0008"
    assert files.shard_db(3, 8) == files.shard(3, 8) / "items.db"
    assert files.lists(7) == tmp_path / "out.faiss.lists-7"
    assert files.lists(7, 2) == tmp_path / "out.faiss.lists-7-2"
    inside = ShardFiles(files.shard(3, 8))
    assert inside.db == files.shard_db(3, 8) and inside.lock == files.shard(3, 8) / "lock"
    assert inside.vectors("f16") == files.shard(3, 8) / "vectors-0000.f16"
    assert inside.index == files.faiss
    assert IndexFiles(tmp_path / "out.faiss") == files  # str or Path: the same files


def test_lists_pieces_and_data_are_found_only_for_their_own_index(tmp_path):
    files = IndexFiles(tmp_path / "out.faiss")
    assert not files.has_data() and files.lists_files() == [] and files.pieces() == []
    for name in ["out.faiss.lists-2", "out.faiss.lists-3-1", ".out.faiss.lists-3.piece-0"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "other.faiss.lists-2").write_bytes(b"x")  # another index's
    assert [p.name for p in files.lists_files()] == ["out.faiss.lists-2", "out.faiss.lists-3-1"]
    assert [p.name for p in files.pieces()] == [".out.faiss.lists-3.piece-0"]
    assert not files.has_data()  # lists alone are no index data
    files.shards.mkdir()
    assert not files.has_data()  # an empty shards folder neither
    files.shard(0, 2).mkdir()
    assert files.has_data()


def make_catalog(index, shards: int) -> None:
    catalog = Catalog(IndexFiles(index).catalog)
    catalog.set_meta(
        {"format_version": str(FORMAT_VERSION), "dim": str(DIM), "shards": str(shards),
         "store_dtype": "float32"}
    )  # fmt: skip
    catalog.list_shards(range(shards))
    catalog.close()


def test_a_sharded_store_round_trips_through_the_library(tmp_path):
    index, n = tmp_path / "out.faiss", 2
    files = IndexFiles(index)
    make_catalog(index, n)
    paths = [f"/data/{c}/{i}.png" for c in ("cat", "dog") for i in range(6)]
    added = new_items(paths)
    ids: dict[str, int] = {}
    for s in range(n):
        shard = Shard(files.shard(s, n), s, n, DIM, writer=True)
        mine = [a for a in added if shard_of(a.path, n) == s]
        failed = [f for f in [("/data/bad.png", "not an image")] if shard_of(f[0], n) == s]
        ids.update(zip([a.path for a in mine], shard.commit_batch(mine, failed), strict=True))
        shard.close()
        assert files.shard_db(s, n).is_file() and ShardFiles(files.shard(s, n)).lock.is_file()

    store = open_store(index)
    assert isinstance(store, ShardedStore) and format_version(files.catalog) == 2
    try:
        assert len(store) == len(paths) and sorted(store.paths()) == sorted(paths)
        assert sorted(store.ids().tolist()) == sorted(ids.values())
        assert all(i % n == shard_of(p, n) for p, i in ids.items())  # id = seq * shards + shard
        assert store.labels() == ["cat", "dog"]
        items = store.items(ids.values())
        assert {items[i].path for i in ids.values()} == set(paths)
        want = np.stack([a.vector for a in added])
        got, found = store.gather(np.array([ids[p] for p in paths]))
        assert found.all() and np.allclose(got, want)
        counts = [store.shard(s).counts() for s in range(n)]
        assert sum(c.items for c in counts) == len(paths)
        assert sum(c.failures for c in counts) == 1  # the one failure, in its path's shard
        assert store.failures() == [("/data/bad.png", "not an image")]
        assert not any(s.check().problems for s in store.all_shards())
    finally:
        store.close()

    gone = paths[0]  # reopened to write: a removal is counted as garbage in its shard
    s = shard_of(gone, n)
    shard = Shard(files.shard(s, n), s, n, DIM, writer=True)
    before = shard.counts()
    assert shard.remove_paths([gone]) == 1
    assert shard.counts() == ShardCounts(before.items - 1, before.failures, before.rows, 1)
    shard.close()
    store = open_store(index)
    try:
        assert len(store) == len(paths) - 1 and gone not in store.paths()
    finally:
        store.close()


def test_a_shard_refuses_another_dim_and_a_second_writer(tmp_path):
    files = IndexFiles(tmp_path / "out.faiss")
    shard = Shard(files.shard(0, 1), 0, 1, DIM, writer=True)
    try:
        with pytest.raises(Exception, match="being written by another process"):
            Shard(files.shard(0, 1), 0, 1, DIM, writer=True)
    finally:
        shard.close()
    with pytest.raises(Exception, match=f"holds {DIM}-d float32 vectors, not 4-d"):
        Shard(files.shard(0, 1), 0, 1, 4, writer=True)


@pytest.mark.parametrize("kept", [4, 0])
def test_a_format_1_index_migrates_keeping_ids_vectors_and_failures(tmp_path, kept):
    index = tmp_path / "old.faiss"
    files = IndexFiles(index)
    sidecar = Sidecar(files.sidecar)
    sidecar.set_meta({"dim": str(DIM)})
    added = new_items([f"/data/cat/{i}.png" for i in range(5)])
    old_ids = sidecar.commit_batch(added, [("/data/bad.png", "truncated")])
    sidecar.remove_paths([a.path for a in added[kept:]])  # the newest ids must not come back
    sidecar.close()
    assert format_version(files.catalog) == 1

    assert migrate(index) == kept
    assert format_version(files.catalog) == FORMAT_VERSION
    assert migrate(index) == 0  # format 2 already: nothing to do
    store = open_store(index)
    assert isinstance(store, ShardedStore)
    try:
        assert store.ids().tolist() == old_ids[:kept]
        got, found = store.gather(np.array(old_ids[:kept]))
        assert found.all() and np.allclose(got, np.stack([a.vector for a in added])[:kept])
        assert store.failures() == [("/data/bad.png", "truncated")]
    finally:
        store.close()
    shard = Shard(files.shard(0, 1), 0, 1, DIM, writer=True)
    try:
        [new_id] = shard.commit_batch(new_items(["/data/cat/new.png"], seed=1), [])
        assert new_id > max(old_ids)  # AUTOINCREMENT goes on from format 1
    finally:
        shard.close()
