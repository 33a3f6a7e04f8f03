"""The ingest pipeline's stages apart: the folder source, decode, model, writer, the runner."""

import os
from pathlib import Path

import numpy as np
import pytest

from mocoserve.core.decode import decode_file
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.writer import IndexWriter
from mocoserve.ingest.embed import embed_folders
from mocoserve.ingest.runner import Runner, add_files
from mocoserve.ingest.scan import FolderSource, FoundFile, ImageSource, SourceItem
from mocoserve.ingest.stages import DecodeStage, ModelStage, WriterStage
from mocoserve.model import load
from tests.imagegen import class_image, make_labelled
from tests.stores import failures, rows


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes of three images, one image at the top (no label) and a file that is not one."""
    root = make_labelled(tmp_path / "images", classes=2, per_class=3)
    class_image(0, 9).save(root / "loose.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def encoder(model_dir):
    return load(model_dir)


def test_the_folder_source_yields_every_image_with_its_facts(folder):
    source: ImageSource = FolderSource([folder], labels_from_folders=True)
    found = source.scan()
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    assert [f.path for f in found] == [os.path.abspath(p) for p in images]
    for f in found:
        st = os.stat(f.path)
        assert (f.bytes, f.mtime) == (st.st_size, st.st_mtime_ns)
        parent = Path(f.path).parent
        assert f.label == (None if parent == folder else parent.name)
    assert source.roots == [os.path.abspath(folder)]
    assert (source.time.items, source.time.calls) == (len(found), 1) and source.time.seconds > 0
    # a process of many picks its own items by key before anything is stat'ed
    picked = source.scan(keep=lambda key: "class_1" in key)
    assert [f.path for f in picked] == [f.path for f in found if "class_1" in f.path]
    # read: every item asked for, in order, its bytes in the file named (read by a decoder)
    items = list(source.read(reversed(found)))
    assert [i.key for i in items] == [f.path for f in reversed(found)]
    for item, f in zip(items, reversed(found), strict=True):
        assert item.facts == f and Path(item.data).read_bytes() == Path(f.path).read_bytes()
    unlabelled = FolderSource([folder]).scan()
    assert all(f.label is None for f in unlabelled) and len(unlabelled) == len(found)


def test_decode_stage_takes_paths_or_bytes_and_counts_its_wait(folder, encoder):
    path = str(folder / "class_0" / "img_000.jpg")
    facts = FoundFile("shard-000000.tar/img_000.jpg", None, 0, 7)
    items = [
        SourceItem(path, path, FoundFile(path, None, 0, 0)),
        SourceItem(facts.path, Path(path).read_bytes(), facts),  # a tar member's bytes
        SourceItem("broken", b"not an image", FoundFile("broken", None, 0, 0)),
    ]
    stage = DecodeStage(encoder.resize, encoder.input_size, workers=0)
    out = list(stage(items))
    reference = decode_file(path, encoder.resize, encoder.input_size)
    assert [d.path for _, d in out] == [path, facts.path, "broken"]
    for _, d in out[:2]:
        assert d.error is None and d.sha256 == reference.sha256
        assert np.array_equal(d.pixels, reference.pixels)
    assert out[1][1].mtime == 7 and "not an image" in out[2][1].error
    assert stage.time.items == 3 and stage.time.calls == 3 and stage.time.seconds > 0


def test_decode_stage_in_worker_processes_keeps_the_order(folder, encoder):
    found = FolderSource([folder]).scan()
    items = list(FolderSource([folder]).read(found))
    in_process = [d for _, d in DecodeStage(encoder.resize, encoder.input_size, 0)(items)]
    pooled = DecodeStage(encoder.resize, encoder.input_size, workers=2)
    out = list(pooled(items))
    assert [d.path for _, d in out] == [f.path for f in found]
    assert [d.sha256 for _, d in out] == [d.sha256 for d in in_process]
    assert pooled.time.items == len(items)


def test_stage_timings_are_counted(folder, encoder):
    (folder / "class_1" / "bad.png").write_bytes(b"\x89PNG broken")
    source = FolderSource([folder], labels_from_folders=True)
    found = source.scan()
    assert len(found) == 8  # 7 images and the broken one
    commits: list[tuple[int, int]] = []
    runner = Runner(
        DecodeStage(encoder.resize, encoder.input_size, 0),
        ModelStage(encoder),
        WriterStage(lambda added, failed: commits.append((len(added), len(failed)))),
        batch_size=4,
        progress=lambda n: commits.append((-1, n)),
    )
    counts = runner.run(list(source.read(found)))
    assert (counts.embedded, counts.failed) == (7, 1)
    assert counts.failures[0][0].endswith("bad.png")
    # a batch of 4 decoded images (the failure before it rides along), then the last 3
    assert commits == [(4, 1), (-1, 5), (3, 0), (-1, 3)]
    assert (counts.decode.items, counts.decode.calls) == (8, 8)
    assert (counts.model.items, counts.model.calls) == (7, 2)
    assert (counts.write.items, counts.write.calls) == (8, 2)
    for stage in (counts.decode, counts.model, counts.write):
        assert stage.seconds > 0
    assert counts.embed_s == counts.model.seconds and counts.commit_s == counts.write.seconds
    assert counts.decode_wait_s == counts.decode.seconds


def test_model_stage_makes_unit_vectors(folder, encoder):
    stage = ModelStage(encoder)
    decoded = [
        decode_file(str(p), encoder.resize, encoder.input_size)
        for p in sorted((folder / "class_0").iterdir())
    ]
    vectors = stage(decoded)
    assert vectors.shape == (3, encoder.embedding_dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert stage(decoded[:0]).shape == (0, encoder.embedding_dim)
    assert (stage.time.items, stage.time.calls) == (3, 2)


def test_the_runner_writes_what_embed_folders_writes(folder, tmp_path, model_dir, encoder):
    (folder / "class_0" / "empty.png").write_bytes(b"")
    by_embed = tmp_path / "embed.faiss"
    summary = embed_folders([folder], model_dir, by_embed, workers=0, labels_from_folders=True)
    assert (summary.embedded, summary.failed) == (7, 1)
    assert list(summary.stages) == ["scan", "decode_wait", "embed", "commit"]
    assert all(seconds > 0 for seconds in summary.stages.values())

    by_runner = tmp_path / "runner.faiss"
    source = FolderSource([folder], labels_from_folders=True)
    with IndexWriter(by_runner) as writer:
        writer.prepare(ModelFacts.of_package(model_dir))
        writer.own(range(writer.shard_count))
        runner = Runner.for_encoder(encoder, writer.commit, batch_size=3, workers=0)
        counts = runner.run(list(source.read(source.scan())))
        writer.build()
    assert (counts.embedded, counts.failed) == (7, 1)
    a, b = rows(by_embed), rows(by_runner)
    assert a.keys() == b.keys() and len(a) == 7
    for path in a:
        assert a[path][1:3] == b[path][1:3]  # label, sha256
        assert np.allclose(a[path][3], b[path][3], atol=1e-5)
    assert failures(by_embed) == failures(by_runner)


def test_add_files_embeds_named_files_into_an_index(folder, tmp_path, model_dir, encoder):
    index = tmp_path / "out.faiss"
    embed_folders([folder / "class_0"], model_dir, index, workers=0)
    extra = sorted((folder / "class_1").iterdir())
    counts = add_files(index, encoder, extra, labels=["one"] * 3, batch_size=2)
    assert (counts.embedded, counts.failed) == (3, 0)
    held = rows(index)
    assert len(held) == 6 and {held[str(p)][1] for p in extra} == {"one"}
