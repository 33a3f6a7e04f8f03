"""Unit tests of mocoserve.ann's modules on tiny seeded vectors (seconds, real FAISS)."""

import ast
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from mocoserve.ann import ondisk
from mocoserve.ann.factory import (
    base_ivf,
    exact_codes,
    inner,
    is_ivf_factory,
    new_index,
    normalize,
    on_disk,
)
from mocoserve.ann.io import lists_file, quiet_stdout, read, write_atomic
from mocoserve.ann.ondisk import empty_like, fill_on_disk, patch_on_disk, to_memory
from mocoserve.ann.params import SearchSettings, apply_settings, param_names, search_params
from mocoserve.ann.search import Searcher, gpu_layout, index_bytes, rerank
from mocoserve.ann.sync import add_blocks, add_rows, diff_ids, ids_of, sync
from mocoserve.ann.train import train, train_size
from mocoserve.ann.tune import RECALL_TARGET, exact_knn, recall_at, tune

ANN = Path(__file__).resolve().parents[1] / "mocoserve" / "ann"
# each module imports only the ones before it: build stands on top, planner and knn apart
LAYERS = ("factory", "params", "sync", "train", "io", "ondisk", "search", "tune", "build")


def points(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Clustered unit vectors (20 fixed centres)."""
    centres = np.random.default_rng(0).normal(size=(20, dim))
    rng = np.random.default_rng(seed + 1)
    return normalize(centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim)))


def trained(factory: str, x: np.ndarray) -> faiss.Index:
    index = new_index(factory, x.shape[1])
    train(index, x, gpu=False)
    return index


def blocks_of(ids: np.ndarray, x: np.ndarray, size: int):
    return lambda: ((ids[i : i + size], x[i : i + size]) for i in range(0, len(ids), size))


def ann_imports(name: str) -> set[str]:
    """The mocoserve.ann modules a module of ann imports, at any depth."""
    found = set()
    for node in ast.walk(ast.parse((ANN / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("mocoserve.ann."):
                found.add(node.module.split(".")[2])
            elif node.module == "mocoserve.ann":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.count(".") >= 2)
    return found


def test_ann_modules_build_on_each_other_without_a_cycle():
    modules = {p.stem for p in ANN.glob("*.py")} - {"__init__"}
    assert set(LAYERS) <= modules and "vectors" not in modules
    for at, name in enumerate(LAYERS):
        assert ann_imports(name) <= set(LAYERS[:at]), name
    assert ann_imports("planner") == set()
    assert ann_imports("knn") <= set(LAYERS)


def test_factory_tells_the_kinds_of_index_apart():
    flat, hnsw = new_index("Flat", 16), new_index("HNSW8,Flat", 16)
    ivf_pq, ivf_flat = new_index("IVF4,PQ4", 16), new_index("OPQ4,IVF4,Flat", 16)
    assert isinstance(flat, faiss.IndexIDMap2) and isinstance(inner(flat), faiss.IndexFlat)
    assert isinstance(inner(hnsw), faiss.IndexHNSW) and base_ivf(hnsw) is None
    assert base_ivf(ivf_pq).nlist == 4 and base_ivf(ivf_flat).nlist == 4
    assert [exact_codes(i) for i in (flat, ivf_pq, ivf_flat)] == [True, False, True]
    assert not exact_codes(new_index("HNSW8,SQ8", 16)) and not exact_codes(new_index("PQ4", 16))
    # HNSW over full vectors scores exactly: nothing to re-rank or tune across k factors
    assert exact_codes(new_index("HNSW8,Flat", 16)) and exact_codes(new_index("HNSW8", 16))
    assert not any(on_disk(i) for i in (flat, hnsw, ivf_pq))
    assert is_ivf_factory("OPQ4,IVF8_HNSW32,PQ4") and not is_ivf_factory("HNSW32,Flat")
    raw = np.array([[3.0, 4.0], [0.0, 2.0]])
    unit = normalize(raw)
    assert unit.dtype == np.float32 and np.allclose(unit, [[0.6, 0.8], [0.0, 1.0]])
    assert raw[0, 0] == 3.0  # a copy


def test_settings_round_trip_through_the_catalog_strings():
    tuned = SearchSettings(nprobe=8, ef_search=64, k_factor=4)
    assert tuned.to_meta() == {"nprobe": "8", "ef_search": "64", "k_factor": "4"}
    assert SearchSettings.from_meta(tuned.to_meta()) == tuned
    assert SearchSettings.from_meta(SearchSettings().to_meta()) == SearchSettings()
    assert SearchSettings.from_meta({}) == SearchSettings(None, None, 1)
    assert tuned.describe() == "nprobe 8, efSearch 64, re-rank x4"
    assert (
        SearchSettings(ef_search=32).describe() == "efSearch 32" and not SearchSettings().describe()
    )


def test_settings_reach_the_index_and_the_per_call_parameters():
    x = points(600)
    ivf = trained("IVF8_HNSW4,Flat", x)
    assert param_names(ivf) == {"nprobe": 1, "quantizer_efSearch": 1}
    apply_settings(ivf, SearchSettings(nprobe=3, ef_search=40))
    quantizer = faiss.downcast_index(base_ivf(ivf).quantizer)
    assert base_ivf(ivf).nprobe == 3 and quantizer.hnsw.efSearch == 40
    selector = faiss.IDSelectorRange(0, 10)
    assert search_params(ivf, SearchSettings(), None) is None
    params = search_params(ivf, SearchSettings(), selector)  # the index's own values
    assert params.nprobe == 3 and params.quantizer_params is not None
    ivf.add_with_ids(x, np.arange(600, dtype=np.int64))
    _, only = ivf.search(x[:20], 5, params=params)  # the selector travels with them
    assert ((only >= 0) & (only < 10) | (only == -1)).all() and (
        only[:10, 0] == np.arange(10)
    ).all()
    assert search_params(ivf, SearchSettings(nprobe=5), selector).nprobe == 5
    hnsw = new_index("HNSW8,Flat", 16)
    assert param_names(hnsw) == {"efSearch": 1}
    apply_settings(hnsw, SearchSettings(ef_search=77))
    assert inner(hnsw).hnsw.efSearch == 77
    assert search_params(hnsw, SearchSettings(), selector).efSearch == 77
    flat = new_index("Flat", 16)
    assert param_names(flat) == {}
    assert type(search_params(flat, SearchSettings(), selector)) is faiss.SearchParameters


def test_diff_ids_and_sync_patch_an_ivf_index_by_id():
    x = points(300)
    ids = np.arange(300, dtype=np.int64) * 2 + 1
    index = trained("IVF4,Flat", x)
    add_blocks(index, ids[:200], x[:200])
    wanted = ids[50:300]
    stale, missing = diff_ids(index, wanted)
    assert np.array_equal(np.sort(stale), ids[:50]) and np.array_equal(missing, ids[200:])
    assert sync(index, wanted, lambda m: [(m, x[(m - 1) // 2])]) == 150
    assert np.array_equal(np.sort(ids_of(index)), wanted)
    assert sync(index, wanted, lambda m: pytest.fail("nothing to add")) == 0
    apply_settings(index, SearchSettings(nprobe=4))
    _, found = index.search(x[250:260], 1)
    assert np.array_equal(found[:, 0], ids[250:260])
    with pytest.raises(TypeError, match="no ids"):
        ids_of(faiss.IndexFlatIP(16))


def test_pq_indexes_are_added_in_bounded_chunks_with_the_same_result():
    x = points(3000, dim=32)
    assert add_rows(new_index("Flat", 32)) == 65536
    assert add_rows(new_index("IVF4,PQ16x4", 32)) == (32 << 20) // (16 * 16 * 4)
    pq = new_index("PQ16", 32)
    assert add_rows(pq) == (32 << 20) // (16 * 256 * 4) == 2048  # 3,000 rows: two calls
    # codebooks drawn at random: training 16 x 256 centroids takes seconds, encoding does not
    codebooks = np.random.default_rng(0).normal(size=16 * 256 * 2).astype(np.float32)
    faiss.copy_array_to_vector(codebooks, inner(pq).pq.centroids)
    inner(pq).is_trained = pq.is_trained = True
    ids = np.arange(3000, dtype=np.int64) + 7
    chunked, whole = faiss.clone_index(pq), faiss.clone_index(pq)
    add_blocks(chunked, ids, x)
    whole.add_with_ids(x, ids)
    assert chunked.ntotal == 3000 and np.array_equal(ids_of(chunked), ids)
    assert np.array_equal(chunked.search(x[:50], 5)[1], whole.search(x[:50], 5)[1])


def test_train_size_draws_enough_for_the_codebooks_and_never_more_than_there_are():
    assert train_size(new_index("IVF64,Flat", 16), 1_000_000) == 10_000
    assert train_size(new_index("IVF1024,Flat", 16), 1_000_000) == 1024 * 64
    assert train_size(new_index("IVF64,PQ4", 16), 1_000_000) == 65_536
    assert train_size(new_index("IVF64,PQ4", 16), 5000) == 5000


def test_gpu_layout_and_the_bytes_it_weighs():
    assert gpu_layout(100, [130]) == "replicate"  # 1.3 headroom, just fits
    assert gpu_layout(100, [129]) is None
    assert gpu_layout(100, [200, 65]) == "shard"  # the smallest GPU decides
    assert gpu_layout(100, [200, 64]) is None
    assert gpu_layout(100, [1000, 1000], headroom=1.0) == "replicate"
    x = points(500)
    flat = new_index("Flat", 16)
    flat.add_with_ids(x, np.arange(500, dtype=np.int64))
    assert index_bytes(flat) == 500 * (16 * 4 + 8)
    ivf = trained("IVF8,Flat", x)
    ivf.add_with_ids(x, np.arange(500, dtype=np.int64))
    assert index_bytes(ivf) == 500 * (16 * 4 + 8) + 8 * 16 * 4


def test_exact_knn_keeps_the_blocks_ids_and_pads_short_results():
    x = points(7)
    ids = np.array([40, 41, 42, 43, 44, 45, 46], dtype=np.int64)
    scores, found = exact_knn(x[:2], blocks_of(ids, x, 3), 10)
    assert found.shape == (2, 10) and list(found[:, 0]) == [40, 41]
    assert (found[:, 7:] == -1).all() and (scores[:, 7:] < -1e30).all()  # the heap's floor
    assert sorted(found[0, :7].tolist()) == ids.tolist()
    assert recall_at(found, found) == 1.0 and recall_at(found[:, :1], found) == pytest.approx(1 / 7)


def test_tune_reaches_the_target_and_leaves_flat_alone():
    x = points(4000, dim=32)
    ids = np.arange(4000, dtype=np.int64) + 10
    ivf = trained("IVF32,Flat", x)
    add_blocks(ivf, ids, x)
    settings, recall, qps = tune(ivf, blocks_of(ids, x, 1000), 4000, queries=200)
    assert settings.nprobe and 1 <= settings.nprobe <= 32 and recall >= RECALL_TARGET and qps > 0
    assert settings.k_factor == 1  # exact codes: nothing to re-rank
    flat = new_index("Flat", 32)
    add_blocks(flat, ids, x)
    assert tune(flat, blocks_of(ids, x, 1000), 4000) == (SearchSettings(), None, None)


def test_rerank_scores_candidates_with_the_stored_vectors():
    x = points(20)
    q = x[:2]

    def gather(wanted):
        found = wanted < 15  # ids 15+ are gone from the store
        return x[np.where(found, wanted, 0)], found

    candidates = np.array([[3, 0, 16, -1], [5, 1, 2, 19]], dtype=np.int64)
    scores, ids = rerank(q, candidates, gather, 3)
    assert list(ids[0]) == [0, 3, -1] and ids[1, 0] == 1 and 19 not in ids[1]
    assert np.allclose(scores[0, :2], [1.0, x[3] @ x[0]], atol=1e-5) and np.isneginf(scores[0, 2])


def test_searcher_hides_adds_beside_and_allows_only():
    x = points(100)
    index = new_index("Flat", 16)
    index.add_with_ids(x[:90], np.arange(90, dtype=np.int64))
    extra = (np.arange(90, 100, dtype=np.int64), x[90:])
    searcher = Searcher(index, None, "cpu", hidden=np.array([0, 1]), extra=extra)
    _, ids = searcher.search(x[:3], 1)
    assert ids[0, 0] not in (0, 1) and ids[2, 0] == 2
    assert searcher.search(x[95:96], 1)[1][0, 0] == 95  # found beside the index
    searcher.hide([95])
    assert 95 not in searcher.search(x[95:96], 5)[1]
    _, only = searcher.search(x[:1], 5, allowed=np.array([10, 20, 95, 96]))
    assert sorted(only[0].tolist()) == [-1, 10, 20, 96]  # 95 stays hidden
    scores, none = searcher.search(x[:2], 4, allowed=np.array([], dtype=np.int64))
    assert (none == -1).all() and np.isneginf(scores).all()
    assert searcher.search(x[:1], 500)[1].shape == (1, 100)


def test_lists_on_disk_in_pieces_answer_as_in_memory_and_take_patches(tmp_path, monkeypatch):
    monkeypatch.setattr(ondisk, "PIECE_ROWS", 100)  # several piece files, merged
    x = points(450)
    ids = np.arange(450, dtype=np.int64) * 3
    base = trained("IVF8,Flat", x)
    lists = tmp_path / "i.faiss.lists-1"
    disk = fill_on_disk(empty_like(base), blocks_of(ids[:400], x[:400], 64)(), lists)
    assert on_disk(disk) and lists_file(disk) == str(lists) and disk.ntotal == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.faiss.lists-1"]  # pieces gone
    assert not [m for m in Path("/proc/self/maps").read_text().splitlines() if ".piece-" in m]
    assert np.array_equal(np.sort(ids_of(disk)), ids[:400])
    memory = to_memory(disk)
    assert not on_disk(memory) and lists_file(memory) is None and memory.ntotal == 400
    settings = SearchSettings(nprobe=8)
    answers = [Searcher(i, settings, "cpu").search(x[:30], 5) for i in (disk, memory)]
    assert np.array_equal(answers[0][1], answers[1][1])
    assert np.allclose(answers[0][0], answers[1][0])
    write_atomic(disk, tmp_path / "i.faiss")
    again = read(tmp_path / "i.faiss", 16)  # lists memory-mapped from beside the file
    assert on_disk(again) and np.array_equal(np.sort(ids_of(again)), ids[:400])
    stale = ids[:50]
    patched = patch_on_disk(disk, stale, [(ids[400:], x[400:])], tmp_path / "i.faiss.lists-2")
    assert np.array_equal(np.sort(ids_of(patched)), ids[50:]) and patched.ntotal == 400
    assert disk.ntotal == 400 and np.array_equal(np.sort(ids_of(disk)), ids[:400])  # untouched
    found = Searcher(patched, settings, "cpu").search(x[400:450], 1)[1][:, 0]
    assert np.array_equal(found, ids[400:450])


def test_quiet_stdout_silences_file_descriptor_1_only_while_inside(capfd):
    with quiet_stdout():
        os.write(1, b"resizing lists\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


def test_read_refuses_what_is_not_ours(tmp_path):
    assert read(tmp_path / "missing.faiss", 16) is None
    path = tmp_path / "plain.faiss"
    faiss.write_index(faiss.IndexFlatIP(16), str(path))  # no ids of ours: not an index we write
    assert read(path, 16) is None
    l2 = faiss.index_factory(16, "IDMap2,Flat", faiss.METRIC_L2)
    write_atomic(l2, path)
    assert read(path, 16) is None  # wrong metric
