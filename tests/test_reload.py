"""Reloads and versions: what a loaded index serves while the files under it change.

Indexes are written the way embed writes them (`IndexWriter` commits and builds), with
generated unit vectors, so each test takes a second; one test runs the real server.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import mocoserve.index.reader
from mocoserve.ann.planner import IndexChoice
from mocoserve.core.errors import UserError
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.files import IndexFiles
from mocoserve.index.items import NewItem
from mocoserve.index.writer import IndexWriter
from mocoserve.model import load
from mocoserve.service.main import create_app
from mocoserve.service.state import ServiceConfig, ServiceState
from tests.models import make_checkpoint
from tests.test_service import Server

DIM = 512  # the test packages' embedding size
KINDS = {
    "flat": None,
    "ivf-on-disk": IndexChoice("IVF4,Flat", on_disk=True),  # hidden ids, mapped lists
}


@pytest.fixture(scope="module")
def encoder(model_dir):
    return load(model_dir)


@pytest.fixture(scope="module")
def other_encoder(tmp_path_factory):
    """Another model package (its manifest differs): an index made with it is refused."""
    from mocoserve.export.package import export_checkpoint

    root = tmp_path_factory.mktemp("other-model")
    package = export_checkpoint(make_checkpoint(root / "c.pt", dim=32), root / "model").out
    return load(package)


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """Vectors around 8 centres, so that each has close neighbours."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, DIM))
    x = centres[np.arange(n) % 8] + 0.5 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write(
    index: Path,
    encoder,
    vectors: np.ndarray,
    prefix: str = "a",
    labels: list[str | None] | None = None,
    remove: list[str] = (),  # type: ignore[assignment]
    choice: IndexChoice | None = None,
    build: bool = True,
) -> list[str]:
    """Commit items /data/{prefix}{i} with these vectors (and remove paths); their paths."""
    paths = [f"/data/{prefix}{i:04d}" for i in range(len(vectors))]
    labels = labels or [None] * len(vectors)
    with IndexWriter(index) as w:
        w.prepare(ModelFacts.of_package(encoder.path), choice=choice)
        w.own(range(w.shard_count))
        if remove:
            w.remove_paths(remove)
        items = [
            NewItem(p, label, f"{prefix}{i}", 1, 1, 1, 1, v)
            for i, (p, label, v) in enumerate(zip(paths, labels, vectors, strict=True))
        ]
        w.commit(items, [])
        if build:
            w.build()
    return paths


def files_of(index: Path) -> list[Path]:
    return sorted(index.parent.glob(f"{index.name}*"))


def replace(index: Path, staged: Path) -> None:
    """Put the index at `staged` (same file name, another folder) in place of `index`,
    the way `rm out.faiss*` and a new embed would: new files, the FAISS file last."""
    for old in files_of(index):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    moved = [p for p in files_of(staged) if p.name != index.name]
    for part in [*moved, staged]:
        part.rename(index.parent / part.name)


def break_shard_db(index: Path) -> None:
    """Garble the items table's root page: the database opens and its meta table reads,
    and sqlite3 raises DatabaseError ('malformed') on the first read of the items."""
    db = next(IndexFiles(index).shards.glob("*/items.db"))
    with sqlite3.connect(db) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'items'").fetchone()
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:
        f.seek((root[0] - 1) * page)
        f.write(b"\xff" * page)


def loaded_state(index: Path, **settings) -> ServiceState:
    state = ServiceState(ServiceConfig(index=index, device="cpu", ui=False, **settings))
    state.load()
    return state


# --- 4. a failed reload is recorded, the old index serves, and watching goes on ---


def test_a_failed_reload_is_counted_the_old_index_serves_and_a_later_index_loads(tmp_path, encoder):
    index = tmp_path / "live" / "out.faiss"
    index.parent.mkdir()
    write(index, encoder, unit_vectors(30, seed=1), "a")
    s = Server("--index", str(index), "--no-ui")
    try:
        s.wait_ready()
        broken = tmp_path / "broken" / "out.faiss"
        broken.parent.mkdir()
        write(broken, encoder, unit_vectors(40, seed=2), "b")
        break_shard_db(broken)
        replace(index, broken)

        def info() -> dict:
            return httpx.get(f"{s.url}/v1/info", timeout=10).json()["index"]

        deadline = time.monotonic() + 30
        while info()["reload_error"] is None:
            assert time.monotonic() < deadline, "the failed reload was not reported"
            time.sleep(0.2)
        kept = info()
        assert kept["items"] == 30 and kept["version"] == 1
        assert httpx.get(f"{s.url}/readyz").status_code == 200
        metrics = httpx.get(f"{s.url}/metrics").text
        failures = re.search(r"^mocoserve_index_reload_failures_total (\S+)$", metrics, re.M)
        assert failures and float(failures[1]) >= 1, metrics
        answer = httpx.post(f"{s.url}/v1/search", json={"ids": [1], "k": 3}).json()
        assert answer["index_version"] == 1
        assert answer["results"][0]["hits"][0]["id"] == 1

        good = tmp_path / "good" / "out.faiss"
        good.parent.mkdir()
        write(good, encoder, unit_vectors(50, seed=3), "c")
        replace(index, good)
        deadline = time.monotonic() + 30
        while info()["items"] != 50:
            assert time.monotonic() < deadline, f"the good index was not loaded: {info()}"
            time.sleep(0.2)
        assert info()["reload_error"] is None
    finally:
        s.stop()
    assert "malformed" in s.err and "kept the loaded index" in s.err, s.err
    assert "Traceback" not in s.err, s.err


def test_a_failed_reload_of_the_same_file_is_retried_after_a_pause(tmp_path, encoder):
    """A shard database that was unreadable for a while (restored from a copy, say) is
    loaded without a new save: the watcher tries the same file again, less and less often."""
    index = tmp_path / "out.faiss"
    write(index, encoder, unit_vectors(20, seed=1))
    state = loaded_state(index, reload_seconds=0.05)
    errors: list[str] = []
    state.on_reload_error.append(errors.append)
    write(index, encoder, unit_vectors(5, seed=2), "b")
    db = next(IndexFiles(index).shards.glob("*/items.db"))
    good_bytes = db.read_bytes()
    break_shard_db(index)
    assert state.reload_if_changed() is False
    assert "malformed" in (state.reload_error or "") and len(errors) == 1
    assert state.status == "ready" and state.served.version == 1
    assert state.reload_if_changed() is False and len(errors) == 1  # not at once
    db.write_bytes(good_bytes)
    deadline = time.monotonic() + 10
    while not state.reload_if_changed():
        assert time.monotonic() < deadline, state.reload_error
        time.sleep(0.02)
    assert state.served.version == 2 and len(state.served.index) == 25
    assert state.reload_error is None


# --- 5. a kept index serves from the files it loaded, whatever replaced them ---


@pytest.mark.parametrize("kind", KINDS)
def test_a_kept_index_reads_only_its_own_files_after_a_re_embed_with_another_model(
    tmp_path, encoder, other_encoder, kind
):
    index = tmp_path / "live" / "out.faiss"
    index.parent.mkdir()
    old = unit_vectors(200, seed=1)
    old_paths = write(index, encoder, old, "old", choice=KINDS[kind])
    state = loaded_state(index)
    new = tmp_path / "new" / "out.faiss"
    new.parent.mkdir()
    write(new, other_encoder, unit_vectors(200, seed=9), "new", choice=KINDS[kind])
    replace(index, new)  # the same ids, another model's vectors and paths

    assert state.reload_if_changed() is False
    assert "different model" in (state.reload_error or "")
    kept = state.served.index
    ids = [1, 57, 200]
    np.testing.assert_allclose(kept.vectors_of(ids), old[[i - 1 for i in ids]], atol=1e-6)
    for own, hits in zip(ids, kept.search_ids(ids, k=5), strict=True):
        assert hits[0].id == own and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].path == old_paths[own - 1]
        assert all(h.path.startswith("/data/old") for h in hits)
    assert kept.items([57])[57].path == old_paths[56]
    assert kept.version == 1 and kept.info()["items"] == 200


def test_reloads_leave_no_files_of_old_versions_open(tmp_path, encoder):
    index = tmp_path / "out.faiss"
    write(index, encoder, unit_vectors(20, seed=1))
    state = loaded_state(index)

    def open_files() -> list[str]:
        fds = Path("/proc/self/fd")
        return sorted(str(p.resolve()) for p in fds.iterdir() if p.resolve().is_file())

    counts = []
    for i in range(4):
        write(index, encoder, unit_vectors(2, seed=10 + i), f"r{i}")
        assert state.reload_if_changed()
        state.served.index.search_ids([1], 3)  # reads the vector file
        counts.append(len([f for f in open_files() if f.startswith(str(tmp_path))]))
    assert counts == [3] * 4  # the catalog, the shard's database and its vector file


def test_a_kept_reader_does_not_see_rows_a_writer_adds_after_it_loaded(tmp_path, encoder):
    index = tmp_path / "out.faiss"
    write(index, encoder, unit_vectors(20, seed=1), labels=["cat"] * 20)
    reader = mocoserve.index.reader.open(index, readonly=True)
    write(index, encoder, unit_vectors(5, seed=2), "b", labels=["dog"] * 5, build=False)
    newest = max(mocoserve.index.reader.open(index).ids())
    assert len(reader) == 20 and reader.items([int(newest)]) == {}
    assert reader.labels() == ["cat"] and len(reader.ids()) == 20
    assert reader.search_vectors(unit_vectors(5, seed=2), 3, label="dog") == [[]] * 5


# --- 6. an answer names the version that produced it ---


def test_answers_carry_the_version_of_the_index_that_answered(tmp_path, encoder):
    index = tmp_path / "out.faiss"
    write(index, encoder, unit_vectors(20, seed=1))
    state = loaded_state(index)
    app = create_app(state.config, state)
    query = {"vectors": [unit_vectors(1, seed=5)[0].tolist()], "k": 3}

    async def ask() -> tuple[dict, dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answer = (await client.post("/v1/search", json=query)).json()
            info = (await client.get("/v1/info")).json()["index"]
        return answer, info

    write(index, encoder, unit_vectors(5, seed=2), "b")  # version 2 saved, not yet reloaded
    answer, info = asyncio.run(ask())
    assert answer["index_version"] == 1 and info["version"] == 1
    assert {h["id"] for h in answer["results"][0]["hits"]} <= set(range(1, 21))
    assert state.served.index.info()["items"] == 20
    assert state.reload_if_changed()
    answer, info = asyncio.run(ask())
    assert answer["index_version"] == 2 and info["version"] == 2 and info["items"] == 25


# --- 7. removals that the FAISS file does not know yet are searched past ---


@pytest.mark.parametrize("kind", KINDS)
def test_removed_items_are_searched_past_until_the_next_build(tmp_path, encoder, kind):
    index = tmp_path / "out.faiss"
    vectors = unit_vectors(200, seed=1)
    labels = ["even" if i % 2 == 0 else "odd" for i in range(200)]
    paths = write(index, encoder, vectors, labels=labels, choice=KINDS[kind])
    reader = mocoserve.index.reader.open(index, readonly=True)
    query = vectors[:1]
    nearest = np.argsort(-(vectors @ query[0]))
    gone = [paths[i] for i in nearest[:40]]  # the query's whole neighbourhood
    with IndexWriter(index) as w:  # committed; the FAISS file is built at the end of a run
        w.prepare(ModelFacts.of_package(encoder.path))
        w.own(range(w.shard_count))
        w.remove_paths(gone)
    k = 5
    near = int(nearest[40]) + 1  # the id of the nearest item left
    for hits in (reader.search_vectors(query, k)[0], reader.search_ids([near], k)[0]):
        assert len(hits) == k and not {h.path for h in hits} & set(gone)
    with pytest.raises(UserError, match="no item with id 1 "):
        reader.search_ids([1], k)  # removed: not a query either
    labelled = reader.search_vectors(query, k, label="odd")[0]
    assert len(labelled) == k and {h.label for h in labelled} == {"odd"}
    assert not {h.path for h in labelled} & set(gone)
    if kind == "flat":  # exact: the nearest k of what is left
        visible = [i for i in nearest if paths[i] not in set(gone)]
        assert [h.path for h in reader.search_vectors(query, k)[0]] == [
            paths[i] for i in visible[:k]
        ]
        # an index that holds fewer visible items than k returns them all
        assert len(reader.search_vectors(query, 195)[0]) == 160
