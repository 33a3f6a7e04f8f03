"""`mocoserve embed` / `search` and `mocoserve.index.reader` end to end on generated folders."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mocoserve.index.reader
from mocoserve.ann.factory import base_ivf
from mocoserve.ann.io import read
from mocoserve.ann.sync import ids_of
from mocoserve.cli import app
from mocoserve.core.decode import decode_file
from mocoserve.core.errors import UserError
from mocoserve.core.images import resize_crop
from mocoserve.index.formats import Sidecar, open_store
from mocoserve.index.items import NewItem
from mocoserve.ingest.embed import embed_folders
from mocoserve.ingest.runner import add_files
from tests.imagegen import class_image, exif_upright, make_awkward_files, make_labelled
from tests.procs import default_sigint
from tests.stores import committed, failures, rows

runner = CliRunner()


def assert_agree(index_path: Path) -> None:
    """The FAISS file holds exactly the store's ids, with the store's vectors."""
    stored = rows(index_path)
    index = read(index_path, len(next(iter(stored.values()))[3]))
    assert index is not None
    held = ids_of(index)
    assert sorted(held.tolist()) == sorted(r[0] for r in stored.values())
    if base_ivf(index) is None:  # IVF has no id -> vector map to read back
        for _, (i, _, _, v) in list(stored.items())[:5]:
            assert np.allclose(index.reconstruct(int(i)), v, atol=1e-6)


def embed(*args: str) -> object:
    return runner.invoke(app, ["embed", *args, "--quiet", "--workers", "0"])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_labelled(tmp_path / "images", classes=3, per_class=6)


def test_awkward_files_are_embedded_or_recorded(tmp_path, model_dir):
    expected = make_awkward_files(tmp_path / "awkward")
    index = tmp_path / "out.faiss"
    result = embed(str(tmp_path / "awkward"), "--index", str(index), "--model", str(model_dir))
    assert result.exit_code == 0, result.output
    failed = {Path(p).name: e for p, e in failures(index).items()}
    embedded = {Path(p).name for p in rows(index)}
    for name, reason in expected.items():
        if reason is None:
            assert name in embedded, f"{name} should be embedded; {failed.get(name)}"
        else:
            assert reason in failed[name], (name, failed.get(name))
    n_bad = sum(r is not None for r in expected.values())
    assert f"embedded {len(expected) - n_bad}, skipped 0 (unchanged), failed {n_bad}" in (
        result.output
    )
    assert "Traceback" not in result.output
    strict = embed(str(tmp_path / "awkward"), "--index", str(index), "--strict")
    assert strict.exit_code == 1  # the bad files are retried and fail again
    assert f"failed {n_bad}" in strict.output
    assert_agree(index)


def test_exif_rotation_and_size_are_applied(tmp_path):
    from tests.imagegen import make_exif_rotated

    make_exif_rotated(tmp_path)
    decoded = decode_file(str(tmp_path / "rotated.png"), 32, 32)
    assert (decoded.width, decoded.height) == (48, 32)
    assert np.array_equal(decoded.pixels, np.asarray(resize_crop(exif_upright(), 32, 32)))


def test_every_indexed_image_finds_itself_first(folder, tmp_path, model_dir):
    index = tmp_path / "out.faiss"
    assert embed(str(folder), "--index", str(index), "--model", str(model_dir)).exit_code == 0
    idx = mocoserve.index.reader.open(index)
    files = sorted(str(p) for p in folder.rglob("*.*"))
    assert len(idx) == len(files) == 18
    for path, hits in zip(files, idx.search_images(files, k=3), strict=True):
        assert hits[0].path == path and hits[0].is_query
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert not any(h.is_query for h in hits[1:])


def test_search_cli_table_and_json(folder, tmp_path, model_dir):
    index = tmp_path / "out.faiss"
    embed(str(folder), "--index", str(index), "--model", str(model_dir), "--labels-from-folders")
    query = folder / "class_1" / "img_002.jpg"
    table = runner.invoke(app, ["search", str(index), str(query), "-k", "3"])
    assert table.exit_code == 0, table.output
    assert "the query" in table.output and "(in the index)" in table.output
    result = runner.invoke(app, ["search", str(index), str(query), "-k", "3", "--json"])
    payload = json.loads(result.stdout)
    assert payload[0]["in_index"] is True
    top = payload[0]["results"][0]
    assert top["path"] == str(query) and top["label"] == "class_1" and top["rank"] == 1
    assert len(payload[0]["results"]) == 3
    only = runner.invoke(app, ["search", str(index), str(query), "--label", "class_2", "--json"])
    assert {r["label"] for r in json.loads(only.stdout)[0]["results"]} == {"class_2"}
    # an outside query image is not flagged
    class_image(1, 99).save(tmp_path / "outside.png")
    outside = runner.invoke(app, ["search", str(index), str(tmp_path / "outside.png"), "--json"])
    assert json.loads(outside.stdout)[0]["in_index"] is False
    # a copy of an indexed file elsewhere is the same bytes: flagged
    shutil.copy(query, tmp_path / "copy.jpg")
    copy = runner.invoke(app, ["search", str(index), str(tmp_path / "copy.jpg"), "--json"])
    hits = json.loads(copy.stdout)[0]["results"]
    assert hits[0]["path"] == str(query) and hits[0]["is_query"]


def test_rerun_skips_and_follows_adds_changes_and_deletes(folder, tmp_path, model_dir):
    index = tmp_path / "out.faiss"
    base = ["--index", str(index), "--model", str(model_dir), "--labels-from-folders"]
    assert embed(str(folder), *base).exit_code == 0
    again = embed(str(folder), *base)
    assert "embedded 0, skipped 18 (unchanged), failed 0, removed 0" in again.output
    before = rows(index)

    (folder / "class_0" / "img_000.jpg").unlink()  # delete
    changed = folder / "class_1" / "img_001.png"
    class_image(2, 7).save(changed)  # change (new content, new size/mtime)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    class_image(0, 50).save(folder / "class_0" / "new.png")  # add
    result = embed(str(folder), *base)
    assert "embedded 2, skipped 16 (unchanged), failed 0, removed 1" in result.output
    after = rows(index)
    assert str(folder / "class_0" / "img_000.jpg") not in after
    assert after[str(changed)][0] != before[str(changed)][0]  # a new id for the new vector
    assert not np.allclose(after[str(changed)][3], before[str(changed)][3])
    assert_agree(index)

    # the same as embedding the final folder from scratch
    fresh = tmp_path / "fresh.faiss"
    assert embed(str(folder), "--index", str(fresh), "--model", str(model_dir)).exit_code == 0
    scratch = rows(fresh)
    assert after.keys() == scratch.keys()
    for path in after:
        assert after[path][2] == scratch[path][2]
        assert np.allclose(after[path][3], scratch[path][3], atol=1e-5)
    a, b = mocoserve.index.reader.open(index), mocoserve.index.reader.open(fresh)
    q = np.stack([v[3] for v in scratch.values()])
    assert [[h.path for h in r] for r in a.search_vectors(q, 5)] == [
        [h.path for h in r] for r in b.search_vectors(q, 5)
    ]


def test_python_api_add_remove_len(folder, tmp_path, model_dir):
    index = tmp_path / "out.faiss"
    embed_folders([folder / "class_0"], model_dir, index, workers=0)
    idx = mocoserve.index.reader.open(index)
    assert len(idx) == 6
    extra = sorted((folder / "class_1").iterdir())[:3]
    counts = add_files(index, idx.encoder, extra, labels=["one"] * 3)
    idx = mocoserve.index.reader.open(index)
    assert counts.embedded == 3 and len(idx) == 9
    hits = idx.search_images([extra[0]], k=1)[0]
    assert hits[0].path == str(extra[0]) and hits[0].label == "one"
    assert idx.remove([extra[0], tmp_path / "never-indexed.png"]) == 1
    assert len(idx) == 8
    assert_agree(index)
    reopened = mocoserve.index.reader.open(index)
    assert len(reopened) == 8 and not reopened.repaired
    assert reopened.search_images([extra[0]], k=1)[0][0].path != str(extra[0])


def test_crash_between_commit_and_index_write_is_repaired(folder, tmp_path, model_dir):
    from mocoserve.core.manifest import ModelFacts
    from mocoserve.index.writer import IndexWriter
    from mocoserve.ingest.runner import ingest
    from mocoserve.model import load

    index = tmp_path / "out.faiss"
    embed_folders([folder / "class_0"], model_dir, index, workers=0)
    new = sorted(str(p) for p in (folder / "class_2").iterdir())
    encoder = load(model_dir)
    with IndexWriter(index) as writer:  # committed to the shards, the index file not built
        writer.prepare(ModelFacts.of_package(model_dir))
        writer.own(range(writer.shard_count))
        ingest(encoder, new, [None] * len(new), writer.commit, 4, 0)
    reopened = mocoserve.index.reader.open(index)
    assert reopened.repaired and len(reopened) == 12
    assert reopened.search_images([new[0]], k=1)[0][0].path == str(new[0])
    result = embed(str(folder / "class_2"), "--index", str(index))
    assert "embedded 0, skipped 6" in result.output
    assert_agree(index)
    # a damaged index file is rebuilt from the store
    index.write_bytes(b"not a faiss index")
    assert mocoserve.index.reader.open(index).repaired
    assert embed(str(folder / "class_2"), "--index", str(index)).exit_code == 0
    assert_agree(index)


def signal_part_way(proc: subprocess.Popen, index: Path, sig: int, at_least: int) -> int:
    """Send `sig` once the store holds `at_least` items; how many it held then.

    The process is frozen (SIGSTOP) while the store is read and the signal sent, so it
    cannot finish in between however busy the machine is.
    """
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        done = committed(index)
        if done >= at_least:
            proc.send_signal(sig)
        os.kill(proc.pid, signal.SIGCONT)
        if done >= at_least:
            return done
    return 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_killed_run_resumes_to_the_same_index(tmp_path, model_dir, sig):
    folder = make_labelled(tmp_path / "many", classes=4, per_class=150, size=64)
    clean = tmp_path / "clean.faiss"
    assert embed(str(folder), "--index", str(clean), "--model", str(model_dir)).exit_code == 0
    killed = tmp_path / "killed.faiss"
    cmd = [sys.executable, "-m", "mocoserve", "embed", str(folder), "--index", str(killed)]
    # batches of one: a few seconds of work, committed item by item
    cmd += ["--model", str(model_dir), "--batch-size", "1", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    done = signal_part_way(proc, killed, sig, at_least=40)
    _, stderr = proc.communicate(timeout=60)
    assert 40 <= done < 600, "the run should be stopped part way"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "run the same command again" in stderr, stderr
        assert "Traceback" not in stderr
    assert not killed.exists()  # never got to write the index
    result = embed(str(folder), "--index", str(killed))
    assert result.exit_code == 0, result.output
    assert "failed 0" in result.output and "embedded" in result.output
    a, b = rows(clean), rows(killed)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path][:3] == b[path][:3]  # same id, label and sha256
        assert np.allclose(a[path][3], b[path][3], atol=1e-6)
    assert_agree(killed)


def test_model_mismatch_and_bad_input_are_clear_errors(folder, tmp_path, model_dir):
    from tests.models import make_package

    index = tmp_path / "out.faiss"
    assert embed(str(folder), "--index", str(index), "--model", str(model_dir)).exit_code == 0
    other = make_package(tmp_path / "other", formats=("torchscript",))
    result = embed(str(folder), "--index", str(index), "--model", str(other))
    assert result.exit_code == 2 and "different model" in result.output
    missing = embed(str(tmp_path / "nope"), "--index", str(index))
    assert missing.exit_code == 2 and "does not exist" in missing.output
    new_without_model = embed(str(folder), "--index", str(tmp_path / "new.faiss"))
    assert new_without_model.exit_code == 2 and "--model" in new_without_model.output
    bad_type = embed(
        str(folder),
        "--index",
        str(tmp_path / "t.faiss"),
        "--model",
        str(model_dir),
        "--index-type",
        "Bogus12",
    )
    assert bad_type.exit_code == 2 and "FAISS factory" in bad_type.output
    untrainable = embed(
        str(folder),
        "--index",
        str(tmp_path / "pq.faiss"),
        "--model",
        str(model_dir),
        "--index-type",
        "OPQ4,IVF2,PQ4",
    )
    assert untrainable.exit_code == 2 and "cannot be trained on 18 vectors" in untrainable.output
    assert "embedded" not in bad_type.output  # refused before any embedding
    precious = tmp_path / "photo.jpg"
    precious.write_bytes(b"not to be overwritten")
    clobber = embed(str(folder), "--index", str(precious), "--model", str(model_dir))
    assert clobber.exit_code == 2 and "is not an index made by embed" in clobber.output
    assert precious.read_bytes() == b"not to be overwritten"
    nowhere = embed(str(folder), "--index", str(tmp_path / "no" / "o.faiss"), "--model", "x")
    assert nowhere.exit_code == 2 and "does not exist" in nowhere.output
    no_index = runner.invoke(app, ["search", str(tmp_path / "none.faiss"), str(folder)])
    assert no_index.exit_code == 2 and "not an index" in no_index.output
    not_image = tmp_path / "q.jpg"
    not_image.write_text("text")
    bad_query = runner.invoke(app, ["search", str(index), str(not_image)])
    assert bad_query.exit_code == 2 and "not an image" in bad_query.output
    with pytest.raises(UserError, match="different model"):
        mocoserve.index.reader.open(index, model=other)


@pytest.mark.parametrize(
    "index_type",
    ["hnsw", "IVF4,Flat", "ivf", "ivf --on-disk", "IVF2,PQ4x4", "IVF2,SQ8"],
)
def test_other_index_types_follow_changes(folder, tmp_path, model_dir, index_type):
    """Every kind keeps each kept vector findable under its id after removes (and adds)."""
    index = tmp_path / "out.faiss"
    kind, *more = index_type.split()
    args = ["--index", str(index), "--model", str(model_dir), "--index-type", kind, *more]
    result = embed(str(folder), *args)
    assert result.exit_code == 0, result.output
    (folder / "class_2" / "img_000.jpg").unlink()
    assert "removed 1" in embed(str(folder), "--index", str(index)).output
    assert_agree(index)
    idx = mocoserve.index.reader.open(index)
    files = sorted(str(p) for p in folder.rglob("*.*"))
    assert [h[0].path for h in idx.search_images(files, k=1)] == files
    idx.close()
    original, copy = folder / "class_1" / "img_002.jpg", folder / "class_1" / "copy.jpg"
    shutil.copy(original, copy)
    assert "embedded 1" in embed(str(folder), "--index", str(index)).output
    assert_agree(index)
    idx = mocoserve.index.reader.open(index)
    found = {h.path for h in idx.search_images([copy], k=2)[0]}
    assert found == {str(original), str(copy)}  # the added copy and its twin, both exact
    if "--on-disk" in more:
        assert [p.name for p in tmp_path.glob("out.faiss.lists-*")] == ["out.faiss.lists-3"]


def test_budget_target_and_on_disk_are_remembered_and_reported(folder, tmp_path, model_dir):
    index = tmp_path / "out.faiss"
    made = embed(
        str(folder),
        "--index",
        str(index),
        "--model",
        str(model_dir),
        "--on-disk",
        "--max-index-memory",
        "1M",
        "--recall-target",
        "0.9",
    )
    assert made.exit_code == 0, made.output
    assert "of lists on disk" in made.output and "recall@10" in made.output
    (folder / "class_0" / "img_000.jpg").unlink()
    again = embed(str(folder), "--index", str(index))  # remembered: still on disk
    assert "removed 1" in again.output and "of lists on disk" in again.output
    assert [p.name for p in tmp_path.glob("out.faiss.lists-*")] == ["out.faiss.lists-2"]
    shown = runner.invoke(app, ["index", "info", str(index), "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.stdout)
    assert facts["on_disk"] and facts["items"] == 17 and facts["max_index_memory"] == 1 << 20
    assert facts["recall_target"] == 0.9 and facts["recall_at_10"] >= 0.9
    assert facts["disk_bytes"] == (tmp_path / "out.faiss.lists-2").stat().st_size
    table = runner.invoke(app, ["index", "info", str(index)])
    assert table.exit_code == 0 and "on disk (lists)" in table.output and "nprobe" in table.output
    back = runner.invoke(app, ["index", "build", str(index), "--in-memory"])
    assert back.exit_code == 0, back.output
    assert not list(tmp_path.glob("out.faiss.lists-*"))
    store = open_store(index)
    assert store.get_meta("gpu_fp16") == "true"  # exact codes, recall with room for fp16
    store.close()
    assert not json.loads(runner.invoke(app, ["index", "info", str(index), "--json"]).stdout)[
        "on_disk"
    ]
    assert_agree(index)
    for bad, words in (
        (["--max-index-memory", "lots"], "max-index-memory"),
        (["--recall-target", "2"], "recall-target"),
        (["--index-type", "hnsw", "--on-disk"], "on-disk"),
    ):
        refused = runner.invoke(app, ["index", "build", str(index), *bad])
        assert refused.exit_code == 2 and words in refused.output, refused.output
    idx = mocoserve.index.reader.open(index)
    files = sorted(str(p) for p in folder.rglob("*.*"))
    assert [h[0].path for h in idx.search_images(files, k=1)] == files


def test_symlink_loop_and_linked_files(tmp_path, model_dir):
    root = tmp_path / "root"
    make_labelled(root, classes=2, per_class=2)
    (root / "class_0" / "loop").symlink_to(root, target_is_directory=True)
    index = tmp_path / "out.faiss"
    result = embed(str(root), "--index", str(index), "--model", str(model_dir))
    assert result.exit_code == 0, result.output
    assert len(rows(index)) == 4


def test_sidecar_rows_under_is_a_case_sensitive_prefix(tmp_path):
    sidecar = Sidecar(tmp_path / "x.faiss.db")  # format 1
    sidecar.set_meta({"dim": "2"})
    paths = ["/d/Val/a.png", "/d/val/b.png", "/d/val_x/c.png", "/d/val%/d.png"]
    vector = np.array([1.0, 0.0], dtype=np.float32)
    sidecar.commit_batch([NewItem(p, "c", "0" * 64, 1, 1, 1, 1, vector) for p in paths], [])
    assert [r[0] for r in sidecar.rows_under("/d/val/")] == ["/d/val/b.png"]
    assert [r[0] for r in sidecar.rows_under("/d/val%/")] == ["/d/val%/d.png"]
    assert len(sidecar.rows_under("")) == 4
    assert np.array_equal(np.frombuffer(sidecar.rows_under("/d/Val/")[0][2], np.float32), vector)
    sidecar.close()


def test_shard_under_is_a_case_sensitive_prefix(tmp_path):
    from mocoserve.index.store import Shard

    shard = Shard(tmp_path / "s", 0, 1, 2, writer=True)  # format 2
    paths = ["/d/Val/a.png", "/d/val/b.png", "/d/val_x/c.png", "/d/val%/d.png"]
    vector = np.array([1.0, 0.0], dtype=np.float32)
    shard.commit_batch([NewItem(p, "c", "0" * 64, 1, 1, 1, 1, vector) for p in paths], [])
    assert [r[0] for r in shard.under("/d/val/")] == ["/d/val/b.png"]
    assert [r[0] for r in shard.under("/d/val%/")] == ["/d/val%/d.png"]
    assert len(shard.under("")) == 4
    rows = np.array([r[2] for r in shard.under("/d/Val/")])
    assert np.array_equal(shard.read_rows(rows)[0], vector)
    shard.close()
