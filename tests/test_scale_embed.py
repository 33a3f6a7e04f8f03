"""`embed` at cluster scale: torchrun ranks, --shard tasks, killed ranks, format 1, the store."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mocoserve.index.reader
from mocoserve.ann.factory import new_index, normalize
from mocoserve.ann.io import read, write_atomic
from mocoserve.index.files import IndexFiles
from mocoserve.index.formats import Sidecar, open_store
from mocoserve.index.items import NewItem
from mocoserve.index.store import Shard, ShardedStore, shard_of
from tests.imagegen import class_image, make_labelled
from tests.stores import committed, rows

TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")


def embed_cmd(folder: Path, index: Path, *more: str) -> list[str]:
    return ["embed", str(folder), "--index", str(index), "--workers", "0", "-q", *more]


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mocoserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "mocoserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_same_index(a: Path, b: Path) -> None:
    """Same paths, labels and vectors (cosine >= 0.9999), and the same search results."""
    ra, rb = rows(a), rows(b)
    assert ra.keys() == rb.keys() and ra
    for path in ra:
        assert ra[path][1:3] == rb[path][1:3], path  # label, sha256
        va, vb = ra[path][3], rb[path][3]
        assert float(va @ vb) >= 0.9999, path
    ia, ib = mocoserve.index.reader.open(a), mocoserve.index.reader.open(b)
    queries = np.stack([v[3] for v in ra.values()])
    paths = lambda idx: [[h.path for h in hits] for hits in idx.search_vectors(queries, 5)]  # noqa: E731
    assert paths(ia) == paths(ib)
    assert read(a, ia.dim) is not None and read(b, ib.dim) is not None


@pytest.fixture
def images(tmp_path) -> Path:
    return make_labelled(tmp_path / "images", classes=3, per_class=10)


@pytest.fixture
def reference(tmp_path, images, model_dir) -> Path:
    index = tmp_path / "one.faiss"
    made = cli(*embed_cmd(images, index, "--model", str(model_dir), "--labels-from-folders"))
    assert made.returncode == 0, made.stderr
    return index


# --- the launchers ---


@pytest.mark.slow
@needs_torchrun
def test_torchrun_two_ranks_make_the_index_one_process_makes(
    tmp_path, images, model_dir, reference
):
    index = tmp_path / "two.faiss"
    run = torchrun(*embed_cmd(images, index, "--model", str(model_dir), "--labels-from-folders"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "images/s per rank: rank 0" in run.stdout and "rank 1" in run.stdout
    assert run.stdout.count("embedded 30, skipped 0") == 1  # printed by rank 0 only
    store = ShardedStore(index)
    assert store.shards == 2 and all(len(s) > 0 for s in store.all_shards())
    store.close()
    assert_same_index(reference, index)
    again = torchrun(*embed_cmd(images, index))
    assert again.returncode == 0 and "embedded 0, skipped 30" in again.stdout, again.stderr


def test_shard_tasks_then_the_last_builds_the_same_index(tmp_path, images, model_dir, reference):
    index = tmp_path / "tasks.faiss"
    base = embed_cmd(images, index, "--model", str(model_dir), "--labels-from-folders")
    first = cli(*base, "--shard", "1/2")
    assert first.returncode == 0, first.stderr
    assert "shard 1 of 2 done" in first.stdout and not index.exists()
    second = cli(*base, "--shard", "0/2")  # the last to finish builds
    assert second.returncode == 0, second.stderr
    assert index.exists()
    assert_same_index(reference, index)
    # a shard rerun alone, then an explicit build, give the same again
    rerun = cli(*base, "--shard", "1/2")
    assert rerun.returncode == 0 and "embedded 0" in rerun.stdout
    built = cli("index", "build", str(index))
    assert built.returncode == 0 and "30 images" in built.stdout, built.stderr
    assert_same_index(reference, index)
    wrong = cli(*base, "--shard", "0/3")
    assert wrong.returncode == 2 and "made with 2 shard(s), not 3" in wrong.stderr


def test_a_shard_is_assigned_by_its_path_not_its_position():
    paths = [f"/data/img_{i:05d}.jpg" for i in range(2000)]
    before = {p: shard_of(p, 8) for p in paths}
    more = sorted(paths + [f"/data/aaa_{i}.jpg" for i in range(500)])  # added files sort first
    assert all(shard_of(p, 8) == before[p] for p in more if p in before)
    counts = np.bincount([before[p] for p in paths], minlength=8)
    assert counts.min() > 180 and counts.max() < 320  # spread evenly enough


def test_incremental_changes_with_shards_match_a_clean_run(tmp_path, images, model_dir):
    index = tmp_path / "inc.faiss"
    base = embed_cmd(images, index, "--labels-from-folders")
    assert cli(*base, "--model", str(model_dir), "--shards", "3").returncode == 0
    (images / "class_0" / "img_000.jpg").unlink()  # delete
    changed = images / "class_1" / "img_001.png"
    class_image(2, 77).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # change
    class_image(0, 88).save(images / "class_2" / "added.png")  # add
    again = cli(*base)
    assert again.returncode == 0, again.stderr
    assert "embedded 2, skipped 28 (unchanged), failed 0, removed 1" in again.stdout
    clean = tmp_path / "clean.faiss"
    made = cli(*embed_cmd(images, clean, "--model", str(model_dir), "--labels-from-folders"))
    assert made.returncode == 0
    assert_same_index(clean, index)


@pytest.mark.slow
@needs_torchrun
def test_a_rank_killed_mid_run_then_a_rerun_gives_the_same_index(tmp_path, model_dir):
    folder = make_labelled(tmp_path / "many", classes=4, per_class=100, size=48)
    clean = tmp_path / "clean.faiss"
    made = cli(*embed_cmd(folder, clean, "--model", str(model_dir)))
    assert made.returncode == 0, made.stderr
    index = tmp_path / "killed.faiss"
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "mocoserve"]
    cmd += embed_cmd(folder, index, "--model", str(model_dir), "--batch-size", "1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while committed(index) < 60:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not get going"
            time.sleep(0.1)
        victim = next(pid for pid in worker_pids(proc.pid) if environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert 60 <= committed(index) < 400
    assert not index.exists()  # never got to build
    rerun = torchrun(*embed_cmd(folder, index))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_index(clean, index)


def worker_pids(root: int) -> list[int]:
    """Every descendant of a process."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


# --- format 1, export, the float16 store ---


def make_format_1_index(index: Path, model_dir: Path, folder: Path) -> None:
    """An index as mocoserve wrote them before sharding: every vector inside the sidecar."""
    from mocoserve.core.decode import decode_file
    from mocoserve.core.manifest import model_fingerprint
    from mocoserve.model import load, to_input

    encoder = load(model_dir)
    sidecar = Sidecar(Path(f"{index}.db"))
    sidecar.set_meta(
        {
            "model_sha256": model_fingerprint(model_dir),
            "model_path": str(model_dir),
            "dim": str(encoder.embedding_dim),
            "factory": "Flat",
            "labels": "folders",
        }
    )
    items = []
    for path in sorted(str(p) for p in folder.rglob("*.*")):
        d = decode_file(path, encoder.resize, encoder.input_size)
        v = normalize(encoder.embed(to_input(d.pixels[None])))[0]
        label = Path(path).parent.name
        items.append(NewItem(path, label, d.sha256, d.bytes, d.mtime, d.width, d.height, v))
    sidecar.commit_batch(items[:10], [])
    sidecar.remove_paths([items[3].path])  # a gap in the ids, as real indexes have
    sidecar.commit_batch(items[10:], [("/gone/bad.jpg", "not an image")])
    blocks = list(sidecar.vectors())
    ids, vectors = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
    index_ = new_index("Flat", encoder.embedding_dim)
    index_.add_with_ids(vectors, ids)
    write_atomic(index_, index)
    sidecar.close()


def test_a_format_1_index_searches_and_migrates_without_re_embedding(tmp_path, images, model_dir):
    index = tmp_path / "old.faiss"
    make_format_1_index(index, model_dir, images)
    old = mocoserve.index.reader.open(index)
    assert old.format == 1 and len(old) == 29
    query = sorted(images.rglob("*.png"))[4]
    before = [(h.id, h.path) for h in old.search_images([query], k=5)[0]]
    old_rows = rows(index)
    migrated = cli("index", "migrate", str(index))
    assert migrated.returncode == 0 and "moved 29 items" in migrated.stdout, migrated.stderr
    new = mocoserve.index.reader.open(index)
    assert new.format == 2
    assert [(h.id, h.path) for h in new.search_images([query], k=5)[0]] == before  # same ids
    new_rows = rows(index)
    assert new_rows.keys() == old_rows.keys()
    for path in old_rows:
        assert new_rows[path][:3] == old_rows[path][:3]
        assert np.array_equal(new_rows[path][3], old_rows[path][3])
    assert dict(open_store(index).failures()) == {"/gone/bad.jpg": "not an image"}
    # the next embed adds with fresh ids (none reused) and embeds nothing it had
    class_image(1, 99).save(images / "class_1" / "late.png")
    again = cli(*embed_cmd(images, index))
    assert again.returncode == 0 and "embedded 2, skipped 29" in again.stdout, again.stdout
    ids = open_store(index).ids()
    assert len(set(ids.tolist())) == len(ids) == 31 and ids.max() > max(
        r[0] for r in old_rows.values()
    )


def test_embed_on_a_format_1_index_migrates_it_first(tmp_path, images, model_dir):
    index = tmp_path / "old.faiss"
    make_format_1_index(index, model_dir, images)
    result = cli(*embed_cmd(images, index))
    assert result.returncode == 0, result.stderr
    assert "note: moved 29 items to the sharded layout (no re-embedding)" in result.stdout
    assert "embedded 1, skipped 29" in result.stdout  # the one removed before, back again
    assert mocoserve.index.reader.open(index).format == 2


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_export_in_the_autofaiss_and_clip_retrieval_layout(tmp_path, reference, fmt):
    import pyarrow.parquet as pq

    out = tmp_path / "export"
    result = cli("index", "export", str(reference), "--to", str(out), "--format", fmt)
    assert result.returncode == 0, result.stderr
    if fmt == "npy":
        embeddings = np.load(out / "img_emb" / "img_emb_0000.npy")
        table = pq.read_table(out / "metadata" / "metadata_0000.parquet").to_pydict()
    else:
        table = pq.read_table(out / "img_emb" / "img_emb_0000.parquet").to_pydict()
        embeddings = np.asarray(table["embedding"], dtype=np.float32)
    stored = rows(reference)
    assert embeddings.shape == (30, 512) and len(table["image_path"]) == 30
    for i, path in enumerate(table["image_path"]):  # row i of both files is one item
        assert np.allclose(embeddings[i], stored[path][3]) and table["id"][i] == stored[path][0]
        assert table["label"][i] == stored[path][1]
    again = cli("index", "export", str(reference), "--to", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_a_float16_store_halves_the_disk_and_keeps_search_quality(
    tmp_path, images, model_dir, reference
):
    index = tmp_path / "half.faiss"
    made = cli(*embed_cmd(images, index, "--model", str(model_dir), "--store-dtype", "float16"))
    assert made.returncode == 0, made.stderr
    full = sum(f.stat().st_size for f in IndexFiles(reference).shards.glob("*/vectors-*"))
    half = sum(f.stat().st_size for f in IndexFiles(index).shards.glob("*/vectors-*.f16"))
    assert half * 2 == full
    a, b = rows(reference), rows(index)
    cosines = [float(a[p][3] @ b[p][3]) for p in a]
    assert min(cosines) > 0.9999
    q = np.stack([v[3] for v in a.values()])

    def top(path: Path) -> list[list[str]]:
        found = mocoserve.index.reader.open(path).search_vectors(q, 10)
        return [[h.path for h in r] for r in found]

    ta, tb = top(reference), top(index)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb, strict=True)])
    assert recall >= 0.98


# --- the store on its own ---


def test_a_torn_tail_is_truncated_and_a_lost_write_is_re_embedded(tmp_path):
    folder = tmp_path / "s"
    shard = Shard(folder, 0, 1, 4, writer=True)
    vectors = np.eye(4, dtype=np.float32)
    shard.commit_batch(
        [NewItem(f"/x/{i}.png", None, "0" * 64, 1, 1, 1, 1, v) for i, v in enumerate(vectors)], []
    )
    shard.close()
    path = folder / "vectors-0000.f32"
    with open(path, "ab") as f:  # a run that died after writing vectors, before committing
        f.write(b"\x01" * 40)
    shard = Shard(folder, 0, 1, 4, writer=True)
    assert path.stat().st_size == 4 * 16 and len(shard) == 4
    assert np.array_equal(next(shard.vectors())[1], vectors)
    shard.close()
    with open(path, "r+b") as f:  # a lost write: the file is shorter than its commits
        f.truncate(2 * 16 + 5)
    shard = Shard(folder, 0, 1, 4, writer=True)
    assert len(shard) == 2 and shard.rows == 2 and path.stat().st_size == 2 * 16
    assert sorted(shard.stats()) == ["/x/0.png", "/x/1.png"]  # the others: embedded again
    shard.close()


SCALE_SCRIPT = """
import os, sys, time, resource
import numpy as np
from mocoserve.index.items import NewItem
from mocoserve.ann.planner import IndexChoice
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.writer import IndexWriter
from mocoserve.index.store import shard_of
# what the imports alone hold (faiss-gpu maps its CUDA libraries): the work is measured above
print("baseline_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
index, n, dim, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with IndexWriter(index) as w:
    # vectors no package made: a stand-in fingerprint, the same on every resume
    w.prepare(ModelFacts("0" * 64, dim), 4, "float32", IndexChoice("IVF64,PQ16"))
    w.own(range(4))
    # resume as embed does: by path (a batch spans shards, committed shard by shard)
    have = {int(p.rsplit("/", 1)[1]) for s in w.shards.values() for p in s.stats()}
    missing = np.setdiff1d(np.arange(n), np.fromiter(have, np.int64, len(have)))
    del have
    centres = np.random.default_rng(0).normal(size=(64, dim)).astype(np.float32)
    done = n - len(missing)
    for first in range(0, len(missing), 5000):
        k = missing[first : first + 5000]
        noise = np.stack([np.random.default_rng(int(i)).normal(size=dim) for i in k])
        v = centres[k % 64] + 0.3 * noise
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        w.commit([NewItem(f"/v/{i:07d}", None, "0" * 64, 1, 1, 1, 1, x) for i, x in zip(k, v)], [])
        done += len(k)
        print(done, flush=True)
    if "build" in sys.argv:
        info = w.build()
        print("built", info.items, info.factory, flush=True)
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
"""


@pytest.mark.slow
def test_two_hundred_thousand_vectors_journal_kill_resume_build_in_bounded_memory(tmp_path):
    """The storage layer at scale (vectors, not images): memory stays far below the data."""
    index, n, dim = tmp_path / "big.faiss", 200_000, 512  # 400 MB of float32
    script = tmp_path / "scale.py"
    script.write_text(SCALE_SCRIPT)
    cmd = [sys.executable, str(script), str(index), str(n), str(dim)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd + ["0"], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # kill it part way: SIGKILL, as the OOM killer would
        if line[0].isdigit() and int(line) >= 60_000:
            proc.kill()
            break
    proc.wait()
    kept = committed(index)
    assert 60_000 <= kept < n
    resumed = subprocess.run(cmd + ["0", "build"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout.splitlines()
    assert f"built {n} IVF64,PQ16" in out
    peak = float(out[-1].split()[1]) - float(out[0].split()[1])
    store = ShardedStore(index)
    assert len(store) == n and len(np.unique(store.ids())) == n
    assert sorted(store.paths()) == [f"/v/{i:07d}" for i in range(n)]
    # every vector is what a clean run writes (each row's noise is seeded by its number)
    centres = np.random.default_rng(0).normal(size=(64, dim)).astype(np.float32)
    for block_ids, block in store.vectors(store.ids()[:: n // 50]):
        items = store.items(block_ids)
        for i, v in zip(block_ids, block, strict=True):
            k = int(items[int(i)].path.rsplit("/", 1)[1])
            expected = centres[k % 64] + 0.3 * np.random.default_rng(k).normal(size=dim)
            expected /= np.linalg.norm(expected)
            assert np.allclose(v, expected, atol=1e-6)
    store.close()
    # the whole data is 391 MB; the resumed writer and builder grew far less than that
    data_mb = n * dim * 4 / 2**20
    print(f"\nresume + build, peak RSS above the imports: {peak:.0f} MB of {data_mb:.0f} MB data")
    assert peak < 0.5 * data_mb
