"""FAISS helpers on seeded synthetic vectors with known exact neighbours."""

import faiss
import numpy as np
import pytest

from mocoserve.ann import planner
from mocoserve.ann.build import build
from mocoserve.ann.factory import base_ivf, inner, new_index, normalize
from mocoserve.ann.io import read, write_atomic
from mocoserve.ann.params import SearchSettings, apply_settings
from mocoserve.ann.search import Searcher
from mocoserve.ann.sync import ids_of, sync
from mocoserve.ann.train import train
from mocoserve.ann.tune import RECALL_TARGET, exact_knn, recall_at
from mocoserve.core.errors import UserError


def clustered(n: int, dim: int = 32, clusters: int = 50, seed: int = 0) -> np.ndarray:
    """Points around the same fixed cluster centres; `seed` draws different points."""
    centres = np.random.default_rng(0).normal(size=(clusters, dim))
    rng = np.random.default_rng(seed + 1)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dim))
    return normalize(x)


def blocks_of(ids: np.ndarray, x: np.ndarray, size: int = 1000):
    return lambda: ((ids[i : i + size], x[i : i + size]) for i in range(0, len(ids), size))


def sampler(x: np.ndarray):
    rng = np.random.default_rng(1)
    return lambda m: x[rng.choice(len(x), size=min(m, len(x)), replace=False)]


def test_choose_without_a_budget():
    assert planner.choose("auto", 10, 32).factory == "Flat"
    assert planner.choose("auto", 2_000_000, 32).factory == "IVF5657,Flat"
    assert planner.ivf_nlist(1_000_000) == 4000
    assert planner.choose("auto", 5000, 32, flat_limit=1000).factory == "IVF128,Flat"  # n/39
    assert planner.choose("hnsw", 10, 32).factory == "HNSW32,Flat"
    assert planner.choose("IDMap2,PQ8", 10, 32).factory == "PQ8"
    assert planner.choose("auto", 100_000_000, 32).factory == "IVF40000,Flat"
    assert planner.choose("ivf", 300_000_000, 32).factory == "IVF69282_HNSW32,Flat"


def test_bad_factory_is_a_user_error():
    with pytest.raises(UserError, match="FAISS factory"):
        new_index("NoSuchIndex99", 16)


def test_exact_knn_over_blocks_equals_brute_force():
    x = clustered(3000)
    ids = np.arange(100, 3100, dtype=np.int64)
    q = clustered(20, seed=5)
    scores, found = exact_knn(q, blocks_of(ids, x, 700), 10)
    ref = np.argsort(-(q @ x.T), axis=1)[:, :10] + 100
    assert np.array_equal(found, ref)
    assert np.allclose(scores, np.take_along_axis(q @ x.T, ref - 100, axis=1), atol=1e-5)


def test_auto_ivf_meets_recall_target_on_held_out_queries():
    n = 20_000
    x = clustered(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 7  # ids need not be positions
    factory = planner.choose("auto", n, 32, flat_limit=1000).factory
    assert factory.startswith("IVF")
    built = build(factory, 32, blocks_of(ids, x), sampler(x), n)
    assert built.nprobe is not None and built.recall_at_10 >= RECALL_TARGET
    assert base_ivf(built.index).nprobe == built.nprobe
    # fresh queries from the same clusters, never indexed
    q = clustered(500, seed=9)
    _, truth = exact_knn(q, blocks_of(ids, x), 10)
    _, found = built.index.search(q, 10)
    assert recall_at(found, truth) >= RECALL_TARGET


def test_sync_adds_and_removes_to_match_wanted_ids():
    x = clustered(200)
    ids = np.arange(200, dtype=np.int64)
    index = new_index("Flat", 32)
    index.add_with_ids(x[:150], ids[:150])
    wanted = np.concatenate([ids[20:150], ids[160:200]])

    def vectors_for(missing):
        yield missing, x[missing]

    assert sync(index, wanted, vectors_for) == 20 + 40
    assert np.array_equal(np.sort(ids_of(index)), wanted)
    _, found = index.search(x[170:171], 1)
    assert found[0, 0] == 170


@pytest.mark.parametrize("factory", ["IVF8,Flat", "HNSW32,Flat"])
def test_sync_refills_bases_that_do_not_renumber(factory):
    x = clustered(400)
    ids = np.arange(400, dtype=np.int64) + 5
    index = new_index(factory, 32)
    index.train(x)
    index.add_with_ids(x, ids)
    apply_settings(index, SearchSettings(nprobe=8))
    keep = np.setdiff1d(ids, ids[::7])

    def vectors_for(wanted):
        yield wanted, x[wanted - 5]

    sync(index, keep, vectors_for)
    assert np.array_equal(np.sort(ids_of(index)), keep)
    _, found = index.search(x[keep - 5], 1)
    assert np.array_equal(found[:, 0], keep)  # every kept vector finds itself under its id


def test_write_atomic_and_read_round_trip(tmp_path):
    x = clustered(100)
    index = new_index("Flat", 32)
    index.add_with_ids(x, np.arange(100, dtype=np.int64))
    path = tmp_path / "i.faiss"
    write_atomic(index, path)
    assert [p.name for p in tmp_path.iterdir()] == ["i.faiss"]  # no temp file left
    again = read(path, 32)
    assert again.ntotal == 100
    assert read(path, 64) is None  # wrong dim: not ours
    path.write_bytes(b"garbage")
    assert read(path, 32) is None


def test_searcher_on_cpu_maps_ids_and_caps_k():
    x = clustered(50)
    index = new_index("Flat", 32)
    index.add_with_ids(x, np.arange(1000, 1050, dtype=np.int64))
    searcher = Searcher(index, None, "cpu")
    scores, ids = searcher.search(x[:3], 100)
    assert ids.shape == (3, 50) and list(ids[:, 0]) == [1000, 1001, 1002]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(UserError, match="cuda"):
            Searcher(index, None, "cuda")


def test_ivf_is_trained_by_kmeans_into_its_quantizer():
    n = 5000
    x = clustered(n)
    index = new_index("IVF64,Flat", 32)
    train(index, x[:3000], gpu=False)
    assert index.is_trained and base_ivf(index).quantizer.ntotal == 64
    ids = np.arange(n, dtype=np.int64)
    index.add_with_ids(x, ids)
    apply_settings(index, SearchSettings(nprobe=8))
    _, found = index.search(x[:200], 1)
    assert np.array_equal(found[:, 0], ids[:200])
    _, truth = exact_knn(x[:200], blocks_of(ids, x), 10)
    _, top = index.search(x[:200], 10)
    assert recall_at(top, truth) >= 0.9
    # the same unit centroids as FAISS's own IVF training (spherical k-means for inner product)
    centroids = base_ivf(index).quantizer.reconstruct_n(0, 64)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)
    own = new_index("IVF64,Flat", 32)
    own.train(x[:3000])
    theirs = base_ivf(own).quantizer.reconstruct_n(0, 64)
    assert np.allclose(np.sort(centroids @ theirs.T, axis=1)[:, -1], 1.0, atol=1e-3)
    # other types: their own train(); HNSW-Flat is trained at creation and stays searchable
    hnsw = new_index("HNSW16,Flat", 32)
    assert hnsw.is_trained
    train(hnsw, x[:100], gpu=False)
    hnsw.add_with_ids(x[:100], ids[:100])
    assert np.array_equal(hnsw.search(x[:100], 1)[1][:, 0], ids[:100])
    # a scalar quantizer is not: train() learns its per-dimension ranges
    sq = new_index("SQ8", 32)
    assert not sq.is_trained
    train(sq, x[:1000], gpu=False)
    assert sq.is_trained and len(faiss.vector_to_array(inner(sq).sq.trained)) == 2 * 32
    sq.add_with_ids(x[:1000], ids[:1000])
    assert np.array_equal(sq.search(x[:200], 1)[1][:, 0], ids[:200])
