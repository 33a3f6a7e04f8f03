"""Damaged indexes: every reader refuses by name, embed never builds over one, and
`mocoserve index check` lists every problem without writing a file.

One small two-shard index is embedded once; each test damages a copy of it as a disk, a
careless script or a bad restore would, and drives the CLI as a user does.
"""

import hashlib
import json
import os
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.index.files import IndexFiles
from tests.imagegen import make_labelled


def mocoserve(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result, code: int, *words: str) -> str:
    """The command failed with `code` and one `error:` line holding every word."""
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def files(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: relative path -> (sha256, mtime_ns)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(folder))] = (digest, path.stat().st_mtime_ns)
    return out


def check(index: Path):
    """`index check`, which must leave every file of the index as it was."""
    before = files(index.parent)
    result = mocoserve("index", "check", index)
    assert "Traceback" not in result.output, result.output
    assert files(index.parent) == before, "index check changed a file"
    return result


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_labelled(tmp_path_factory.mktemp("damage") / "images", classes=3, per_class=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory, images, model_dir) -> Path:
    index = tmp_path_factory.mktemp("built") / "idx" / "out.faiss"
    index.parent.mkdir()
    made = mocoserve(
        "embed", images, "--index", index, "--model", model_dir, "--labels-from-folders",
        "--shards", "2", "--workers", "0", "-q",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    return index


@pytest.fixture
def index(built, tmp_path) -> Path:
    """A fresh copy of the built index to damage."""
    shutil.copytree(built.parent, tmp_path / "idx")
    return tmp_path / "idx" / built.name


def vector_file(index: Path) -> Path:
    """The vector file of the shard with the most rows (which shard a file hashes to
    depends on its path)."""
    return max(IndexFiles(index).shards.glob("*/vectors-*"), key=lambda p: p.stat().st_size)


def search_scores(index: Path, images: Path) -> list[float]:
    query = sorted(images.rglob("*.png"))[0]
    result = mocoserve("search", index, query, "--json", "-k", "12")
    assert result.exit_code == 0, result.output
    return [hit["score"] for q in json.loads(result.stdout) for hit in q["results"]]


def test_a_clean_index_checks_clean_and_the_check_writes_nothing(index):
    result = check(index)
    assert result.exit_code == 0, result.output
    assert "no problems" in result.output and "12 items in 2 shard(s)" in result.output
    assert "12 by checksum" in result.output


def test_a_float16_store_checks_clean_and_a_changed_value_is_found(images, model_dir, tmp_path):
    index = tmp_path / "half" / "out.faiss"
    index.parent.mkdir()
    made = mocoserve(
        "embed", images, "--index", index, "--model", model_dir, "--store-dtype", "float16",
        "--workers", "0", "-q",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert check(index).exit_code == 0
    vectors = next(IndexFiles(index).shards.glob("*/vectors-*.f16"))
    data = bytearray(vectors.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one value: what a norm check cannot see
    vectors.write_bytes(bytes(data))
    found = check(index)
    assert found.exit_code == 1 and "do not match their checksum" in found.output


@pytest.mark.parametrize("damage", ["empty", "not sqlite", "no meta"])
def test_a_damaged_catalog_is_refused_and_embed_makes_no_index_over_the_shards(
    index, images, model_dir, damage
):
    catalog = IndexFiles(index).catalog
    if damage == "no meta":  # a SQLite file whose meta table lost its rows
        catalog.unlink()
        with sqlite3.connect(catalog) as db:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    else:
        catalog.write_bytes(b"" if damage == "empty" else os.urandom(4096))
    shards = files(IndexFiles(index).shards)
    again = mocoserve(
        "embed", images, "--index", index, "--model", model_dir, "--workers", "0", "-q"
    )
    one_error(again, 2, str(catalog), "is damaged")
    assert files(IndexFiles(index).shards) == shards  # not a byte of the shards changed, no new one
    one_error(mocoserve("embed", images, "--index", index, "-q"), 2, str(catalog), "damaged")
    one_error(mocoserve("index", "info", index), 2, str(catalog), "is damaged")
    one_error(mocoserve("index", "build", index), 2, str(catalog), "is damaged")
    found = check(index)
    assert found.exit_code == 1 and f"problem: {catalog} is damaged" in found.output


@pytest.mark.parametrize("lost", ["folder", "items.db"])
def test_a_missing_shard_is_refused_by_every_reader_and_not_made_anew(
    index, images, model_dir, tmp_path, lost
):
    folder = IndexFiles(index).shard(1, 2)
    gone = folder if lost == "folder" else folder / "items.db"
    shutil.rmtree(gone) if lost == "folder" else gone.unlink()
    query = sorted(images.rglob("*.png"))[0]
    for args in (
        ["index", "info", index],
        ["index", "build", index],
        ["index", "export", index, "--to", tmp_path / "exported"],
        ["search", index, query],
        ["embed", images, "--index", index, "--model", model_dir, "--workers", "0", "-q"],
    ):
        one_error(mocoserve(*args), 2, f"{gone} is missing", "listed in its catalog")
        assert not gone.exists(), f"{args[0]} made the lost shard anew"
    assert not (tmp_path / "exported").exists()
    found = check(index)
    assert found.exit_code == 1 and f"{gone} is missing" in found.output


def test_bytes_appended_to_a_vector_file_are_refused(index, images, tmp_path):
    vectors = vector_file(index)
    with open(vectors, "ab") as f:  # more than a write in flight could have left
        f.write(os.urandom(64 << 10))
    query = sorted(images.rglob("*.png"))[0]
    for args in (
        ["index", "info", index],
        ["index", "build", index],
        ["index", "export", index, "--to", tmp_path / "exported"],
        ["search", index, query],
    ):
        one_error(mocoserve(*args), 2, f"{vectors} is damaged", "bytes past its", "committed rows")
    found = check(index)
    assert found.exit_code == 1 and f"{vectors} is damaged" in found.output


def test_random_bytes_inside_a_vector_file_are_refused_and_never_scored(index, images, tmp_path):
    vectors = vector_file(index)
    with open(vectors, "r+b") as f:
        f.seek(vectors.stat().st_size // 2)
        f.write(os.urandom(256))
    for args in (
        ["index", "info", index],
        ["index", "build", index],
        ["index", "export", index, "--to", tmp_path / "exported"],
    ):
        one_error(mocoserve(*args), 2, f"{vectors} is damaged", "do not match their checksum")
    assert not (tmp_path / "exported").exists()
    # search answers from the FAISS file (built before the damage): true scores, never 5e37
    assert max(search_scores(index, images)) <= 1.001
    Path(index).unlink()  # now a reader must build it in memory from the damaged store
    query = sorted(images.rglob("*.png"))[0]
    one_error(mocoserve("search", index, query), 2, f"{vectors} is damaged")
    found = check(index)
    assert found.exit_code == 1, found.output
    assert re.search(
        rf"{re.escape(str(vectors))} is damaged: rows 0-\d+ do not match", found.output
    )
    assert f"{index} is missing" in found.output  # every problem, not the first


def test_an_index_from_before_checksums_opens_and_its_rows_are_checked_by_norm(index, images):
    """Format 2 as written before this check existed: no checksums, no shard list."""
    for db in IndexFiles(index).shards.glob("*/items.db"):
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE blocks")
            conn.execute("DELETE FROM meta WHERE key IN ('crc_from', 'crc_block_rows', 'reserved')")
    with sqlite3.connect(IndexFiles(index).catalog) as conn:
        conn.execute("DELETE FROM meta WHERE key = 'shards_made'")
    assert mocoserve("index", "info", index).exit_code == 0
    found = check(index)
    assert found.exit_code == 0, found.output
    assert "have no checksums" in found.output and "does not list its shards" in found.output
    vectors = vector_file(index)
    with open(vectors, "r+b") as f:
        f.seek(vectors.stat().st_size // 2)
        f.write(os.urandom(256))
    found = check(index)
    assert found.exit_code == 1 and "are not unit vectors" in found.output, found.output
    one_error(mocoserve("index", "export", index, "--to", index.parent / "x"), 2, str(vectors))


def test_the_torn_tail_of_an_interrupted_write_still_reads(index, images, model_dir):
    """What a killed embed leaves (vectors written, never committed) is no damage."""
    vectors = vector_file(index)
    size = vectors.stat().st_size
    with open(vectors, "ab") as f:
        f.write(os.urandom(1000))  # part of a row of a batch that was being written
    assert max(search_scores(index, images)) <= 1.001
    found = check(index)
    assert found.exit_code == 0 and "1,000 bytes past its committed rows" in found.output
    again = mocoserve("embed", images, "--index", index, "--workers", "0", "-q")
    assert again.exit_code == 0, again.output
    assert vectors.stat().st_size == size  # the writer truncated the tail


def test_the_service_answers_a_damaged_row_with_a_503_naming_no_server_path(index):
    """Search by id reads stored rows: a damaged one is the server's fault (503), not a 404
    or a 500, and the answer names the file relative to the index, not its server path."""
    import asyncio

    import httpx

    from mocoserve.service.main import create_app
    from tests.test_reload import loaded_state

    vectors = vector_file(index)
    with open(vectors, "r+b") as f:  # every row garbled: whatever id is asked for
        f.seek(0)
        f.write(os.urandom(vectors.stat().st_size))
    state = loaded_state(index)
    ids = sorted(int(i) for i in state.served.index.ids())

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(state.config, state))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/search", json={"ids": ids, "k": 1})

    answer = asyncio.run(ask())
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "index_damaged" and "is damaged" in error["message"]
    assert str(index.parent) not in error["message"]
