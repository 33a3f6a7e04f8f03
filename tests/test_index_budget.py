"""Indexes chosen by a memory budget, compressed, on disk: measured on generated vectors.

The big runs go through subprocesses (`tests/budget_scripts.py`) so that each one's peak RSS
is its own: a store of clustered vectors is written the way embed writes it (IndexWriter
commits), built by the writer, then searched by a fresh process through
`mocoserve.index.reader.open`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from mocoserve.ann import planner
from mocoserve.ann.factory import new_index, normalize, on_disk
from mocoserve.ann.io import read
from mocoserve.ann.ondisk import to_memory
from mocoserve.ann.params import SearchSettings
from mocoserve.ann.search import GPU_MAX_K, Searcher, gpu_layout
from mocoserve.ann.sync import ids_of
from mocoserve.ann.train import train
from mocoserve.ann.tune import exact_knn, recall_at
from mocoserve.core.errors import UserError
from mocoserve.index.store import ShardedStore

ROOT = Path(__file__).resolve().parents[1]


def run(command: str, *args: str, timeout: float = 900) -> dict:
    """`python -m tests.budget_scripts COMMAND ARGS...` in a fresh process; its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.budget_scripts", command, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_queries(n: int, dim: int) -> np.ndarray:
    """New points around the store's cluster centres (never indexed)."""
    centres = np.random.default_rng(0).normal(size=(1000, dim)).astype(np.float32)
    rng = np.random.default_rng(12345)
    q = centres[rng.integers(0, 1000, n)] + 0.35 * rng.standard_normal((n, dim))
    return normalize(q)


def exact(index: Path, q: np.ndarray, k: int = 10) -> np.ndarray:
    store = ShardedStore(index)
    try:
        return exact_knn(q, store.vectors, k)[1]
    finally:
        store.close()


def test_the_planner_walks_down_the_ladder_as_the_budget_shrinks():
    n, d = 2_000_000, 128
    assert planner.plan_index(200_000, d, 2 << 30).factory == "Flat"
    assert planner.plan_index(n, d, 2 << 30).factory == "IVF5657,Flat"  # Flat: too slow
    assert planner.plan_index(n, d, 1100 << 20).factory == "IVF5657,Flat"
    assert planner.plan_index(n, d, 400 << 20).factory == "IVF5657,SQ8"
    plan = planner.plan_index(n, d, 256 << 20)
    assert plan.factory == "OPQ32,IVF5657,PQ32" and plan.ram_bytes <= 256 << 20
    assert planner.plan_index(n, d, 64 << 20).factory == "OPQ16,IVF5657,PQ16"
    with pytest.raises(UserError, match="too small"):
        planner.plan_index(n, d, 8 << 20)
    disk = planner.plan_index(n, d, 64 << 20, on_disk=True)
    assert disk.factory == "IVF5657,Flat" and disk.disk_bytes > disk.ram_bytes
    assert planner.plan_index(300_000_000, 512, 64 << 30).factory.startswith("OPQ")
    assert "HNSW32" in planner.plan_index(300_000_000, 512, 64 << 30).factory
    assert planner.parse_size("256M") == 256 << 20 and planner.parse_size("1.5G") == 3 << 29
    for bad in ("lots", "12Q", "0"):
        with pytest.raises(UserError, match="max-index-memory"):
            planner.parse_size(bad)
    with pytest.raises(UserError, match="on-disk"):
        planner.choose("hnsw", n, d, on_disk=True)
    with pytest.raises(UserError, match="recall-target"):
        planner.IndexChoice(recall_target=1.5)


def test_a_choice_is_remembered_and_overridden_field_by_field():
    made = planner.IndexChoice("auto", 256 << 20, 0.9, False)
    meta = made.to_meta()
    again = planner.IndexChoice.from_meta(meta).merged(planner.IndexChoice(on_disk=True))
    assert again == planner.IndexChoice("auto", 256 << 20, 0.9, True)


def test_gpu_layout_replicates_when_one_gpu_holds_it_and_shards_when_all_do():
    gb = 1 << 30
    assert gpu_layout(10 * gb, [80 * gb] * 4) == "replicate"
    assert gpu_layout(100 * gb, [80 * gb] * 4) == "shard"
    assert gpu_layout(400 * gb, [80 * gb] * 4) is None
    assert gpu_layout(1 * gb, []) is None


def test_a_gpu_never_gets_a_k_or_nprobe_it_would_clamp():
    x = normalize(np.random.default_rng(0).normal(size=(3000, 16)))
    index = new_index("IVF16,Flat", 16)
    train(index, x, gpu=False)
    index.add_with_ids(x, np.arange(3000, dtype=np.int64))
    searcher = Searcher(index, SearchSettings(nprobe=16), "cpu")
    searcher.gpu = object()  # what a GPU copy would be; never searched past its limits
    assert searcher._gpu_can(GPU_MAX_K) and not searcher._gpu_can(GPU_MAX_K + 1)
    searcher.settings = SearchSettings(nprobe=GPU_MAX_K + 1)
    assert not searcher._gpu_can(10)


@pytest.mark.slow
def test_two_million_vectors_in_256m_compressed_tuned_and_searched_the_same(tmp_path):
    """2M x 128 (Flat: 1 GB) with --max-index-memory 256M: OPQ + IVF-PQ, re-ranked."""
    index, n, dim, budget = tmp_path / "big.faiss", 2_000_000, 128, 256 << 20
    choice = planner.IndexChoice("auto", budget, 0.9).to_meta()
    made = run("make", str(index), str(n), str(dim), json.dumps(choice))
    assert made["items"] == n and made["factory"].startswith("OPQ32,IVF")
    assert os.path.getsize(index) <= budget
    q = fresh_queries(300, dim)
    np.save(tmp_path / "q.npy", q)
    searched = run("search", str(index), str(tmp_path / "q.npy"), str(tmp_path / "ids.npy"))
    info = searched["info"]
    assert info["ram_bytes"] == os.path.getsize(index) and info["recall_at_10"] >= 0.9
    assert searched["peak_above_imports"] < budget, searched
    ours = np.load(tmp_path / "ids.npy")
    # measured, not assumed: recall@10 of fresh queries against exact search
    truth = exact(index, q)
    assert recall_at(ours, truth) >= 0.9
    # FAISS directly, with the tuned settings, re-ranked by the stored vectors: the same
    raw = faiss.read_index(str(index))
    ps = faiss.ParameterSpace()
    ps.set_index_parameter(raw, "nprobe", info["nprobe"])
    _, candidates = raw.search(q, 10 * info["k_factor"])
    store = ShardedStore(index)
    try:
        stored, found = store.gather(candidates.reshape(-1))
    finally:
        store.close()
    scores = np.einsum("qkd,qd->qk", stored.reshape(len(q), -1, dim), q)
    scores[(candidates < 0) | ~found.reshape(candidates.shape)] = -np.inf
    best = np.argsort(-scores, axis=1)[:, :10]
    direct = np.take_along_axis(candidates, best, axis=1)
    same = np.all(ours == direct, axis=1)
    assert same.mean() > 0.95  # the rest: near-equal scores summed in another order
    direct_scores = np.take_along_axis(scores, best, axis=1)
    for row in np.flatnonzero(~same):
        pos = np.searchsorted(np.sort(candidates[row]), ours[row])
        ours_scores = scores[row][np.argsort(candidates[row])][pos]
        assert np.allclose(ours_scores, direct_scores[row], atol=1e-5)


@pytest.mark.slow
def test_on_disk_lists_answer_as_in_memory_with_less_rss_and_take_changes(tmp_path):
    """--on-disk: IVF-Flat lists in a file, memory-mapped; add/remove into new lists."""
    index, n, dim = tmp_path / "disk.faiss", 400_000, 128
    choice = planner.IndexChoice("auto", 64 << 20, 0.95, True).to_meta()
    made = run("make", str(index), str(n), str(dim), json.dumps(choice))
    assert made["factory"].startswith("IVF") and "on disk" in made["summary"]
    lists = list(tmp_path.glob("disk.faiss.lists-*"))
    assert len(lists) == 1 and lists[0].stat().st_size > n * dim * 4
    assert os.path.getsize(index) < 64 << 20
    q = fresh_queries(200, dim)
    np.save(tmp_path / "q.npy", q)
    searched = run("search", str(index), str(tmp_path / "q.npy"), str(tmp_path / "ids.npy"))
    assert searched["info"]["on_disk"] and searched["peak_above_imports"] < lists[0].stat().st_size
    ours = np.load(tmp_path / "ids.npy")
    # the same index with its lists copied into memory answers identically
    disk = read(index, dim)
    memory = to_memory(disk)
    assert not on_disk(memory) and memory.ntotal == disk.ntotal == n
    settings = SearchSettings(searched["info"]["nprobe"])
    for other in (Searcher(memory, settings, "cpu"), Searcher(disk, settings, "cpu")):
        assert np.array_equal(other.search(q, 10)[1], ours)
    assert recall_at(ours, exact(index, q)) >= 0.95
    del disk, memory
    # incremental: remove every 10th, add 5% new; every kept vector is found under its id
    run("make", str(index), str(n), str(dim), json.dumps(choice), "change")
    assert [p.name for p in tmp_path.glob("disk.faiss.lists-*")] == ["disk.faiss.lists-2"]
    store = ShardedStore(index)
    try:
        wanted = store.ids()
        probe = wanted[:: len(wanted) // 500]
        vectors, _ = store.gather(probe)
    finally:
        store.close()
    disk = read(index, dim)
    assert np.array_equal(np.sort(ids_of(disk)), np.sort(wanted))
    _, found = Searcher(disk, SearchSettings(64), "cpu").search(vectors, 1)
    assert np.array_equal(found[:, 0], probe)


def test_a_reader_of_on_disk_lists_that_lags_the_store_hides_and_adds(tmp_path, monkeypatch):
    """Between a writer's commits and its build, a reader never edits the mapped lists: the
    removed ids are hidden, the new ones searched beside them; the build then patches."""
    import mocoserve.index.faissfile
    import mocoserve.index.reader
    from mocoserve.core.manifest import ModelFacts
    from mocoserve.index.items import NewItem
    from mocoserve.index.writer import IndexWriter

    index, n, dim = tmp_path / "lag.faiss", 6000, 32
    x = normalize(np.random.default_rng(3).normal(size=(n + 100, dim)))

    def items(rows):
        return [NewItem(f"/v/{i:05d}", None, "0", 1, 1, 1, 1, x[i]) for i in rows]

    with IndexWriter(index) as w:
        choice = planner.IndexChoice("auto", 1 << 20, 0.95, True)
        w.prepare(ModelFacts("0" * 64, dim), 2, choice=choice)  # vectors no package made
        w.own(range(2))
        w.commit(items(range(n)), [])
        assert "of lists on disk" in w.build().summary
        w.remove_paths([f"/v/{i:05d}" for i in range(0, 100)])
        w.commit(items(range(n, n + 100)), [])  # committed, not built
        lists = sorted(p.name for p in tmp_path.glob("lag.faiss.lists-*"))
        reader = mocoserve.index.reader.open(index, readonly=True)
        assert reader.repaired and on_disk(reader.index)
        hits = reader.search_vectors(x[:100], k=1)
        assert [len(row) for row in hits] == [1] * 100  # a neighbour, never the removed one
        assert all(row[0].path != f"/v/{i:05d}" for i, row in enumerate(hits))
        found = reader.search_vectors(x[n : n + 100], k=1)
        assert [row[0].path for row in found] == [f"/v/{i:05d}" for i in range(n, n + 100)]
        assert sorted(p.name for p in tmp_path.glob("lag.faiss.lists-*")) == lists  # untouched
        # more new vectors than a reader holds beside the lists: they wait for the build,
        # and the reader still opens and searches (removed ids still hidden)
        monkeypatch.setattr(mocoserve.index.faissfile, "EXTRA_LIMIT", 50)
        limited = mocoserve.index.reader.open(index, readonly=True)
        hits = limited.search_vectors(x[:100], k=1)
        assert [len(row) for row in hits] == [1] * 100
        assert all(row[0].path != f"/v/{i:05d}" for i, row in enumerate(hits))
        new = {f"/v/{i:05d}" for i in range(n, n + 100)}
        waiting = limited.search_vectors(x[n : n + 100], k=1)
        assert [len(row) for row in waiting] == [1] * 100
        assert not {row[0].path for row in waiting} & new
        limited.close()
        w.build()
    reader.close()
    after = mocoserve.index.reader.open(index, readonly=True)
    assert not after.repaired and after.index.ntotal == n
    found = after.search_vectors(x[n : n + 100], k=1)
    assert [row[0].path for row in found] == [f"/v/{i:05d}" for i in range(n, n + 100)]
