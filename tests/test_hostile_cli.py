"""Hostile findings against the command line (issue 19, items 9 and 10), one test each.

`serve` runs as a user runs it (`tests.test_hostile.run`: a subprocess in a session of its
own, no process left behind); the other commands through CliRunner. Each bad input is one
`error:` line and the documented exit code, never a traceback; names that are not UTF-8 or
hold control characters are kept exactly and shown escaped.
"""

import json
import os
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mocoserve.cli import app
from tests.imagegen import class_image, make_labelled
from tests.test_hostile import assert_one_error, run

KEY = "k3y-for-the-tests-0123456789"
runner = CliRunner()


def cli(*args: str, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def embed(folder: Path, index: Path, model: Path, *extra: str):
    return cli(
        "embed", folder, "--index", index, "--model", model, "--quiet", "--workers", "0", *extra
    )


def one_error(result, code: int, words: str) -> str:
    """The one `error:` line of a CliRunner result (no traceback), with its exit code."""
    assert result.exit_code == code, (result.exit_code, result.output[-2000:])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0], result.output[-2000:]
    return lines[0]


def odd_name(folder: Path, raw: bytes) -> str:
    """A path under `folder` whose last part is these bytes (not UTF-8), as Python holds it."""
    return (os.fsencode(folder) + b"/" + raw).decode("utf-8", "surrogateescape")


# --- item 9: start-up errors are one line ---


def test_an_api_key_file_that_is_not_utf8_is_one_line(tmp_path, model_dir):
    keys = tmp_path / "keys"
    keys.write_bytes(KEY.encode() + b"\n\xff\xfe-not-text-0123456789\n")
    keys.chmod(0o600)
    started = run(["serve", "--model", str(model_dir), "--api-key-file", str(keys)], timeout=60)
    assert_one_error(started, 2, "is not UTF-8")


def test_an_api_key_that_no_header_can_carry_is_refused_at_start_up(tmp_path, model_dir):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\nschlüssel-für-die-tests-0123\n", encoding="utf-8")
    keys.chmod(0o600)
    started = run(["serve", "--model", str(model_dir), "--api-key-file", str(keys)], timeout=60)
    line = assert_one_error(started, 2, "printable ASCII")
    assert "schl" not in line  # a key is never echoed


def test_a_host_that_is_not_a_host_name_is_one_line(model_dir):
    too_long = "a" * 70 + ".example"  # a DNS label of 70 characters: IDNA refuses it
    started = run(["serve", "--model", str(model_dir), "--host", too_long], timeout=60)
    assert_one_error(started, 2, "--host")


def test_a_port_in_use_exits_1_in_one_line_as_the_readme_says(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        started = run(["serve", "--model", str(model_dir), "--port", port], timeout=60)
    assert_one_error(started, 1, f"cannot listen on 127.0.0.1:{port}")


def test_a_memory_budget_too_large_to_convert_is_one_line(tmp_path, model_dir):
    folder = make_labelled(tmp_path / "images", classes=1, per_class=2)
    index = tmp_path / "out.faiss"
    huge = "9" * 400  # a float infinity: int() of it overflowed
    refused = embed(folder, index, model_dir, "--max-index-memory", huge)
    one_error(refused, 2, "--max-index-memory must be at most")
    assert not index.exists()
    assert embed(folder, index, model_dir).exit_code == 0
    rebuilt = cli("index", "build", index, "--max-index-memory", "2000T")
    one_error(rebuilt, 2, "--max-index-memory must be at most")


@pytest.mark.parametrize(
    "command",
    [
        ["embed", "{images}", "--index", "{index}", "--model", "{model}", "--batch-size", "0"],
        ["embed", "{images}", "--index", "{index}", "--model", "{model}", "--workers", "-3"],
        ["knn", "--model", "{model}", "--train", "{images}", "--loo", "-b", "0"],
        ["knn", "--model", "{model}", "--train", "{images}", "--loo", "--workers", "-3"],
        ["demo", "--out", "{index}", "--workers", "-3"],
    ],
    ids=["embed-b0", "embed-w-3", "knn-b0", "knn-w-3", "demo-w-3"],
)
def test_batch_size_0_and_negative_workers_are_refused(tmp_path, model_dir, command, monkeypatch):
    """As train refuses them: 0 images a step did silently become 64, -3 workers ran."""
    images = make_labelled(tmp_path / "images", classes=2, per_class=2)
    index = tmp_path / "out.faiss"
    values = {"images": images, "index": index, "model": model_dir}
    monkeypatch.chdir(tmp_path)  # knn's report folder would be ./report
    refused = cli(*(part.format(**values) for part in command))
    option = "--workers" if "--workers" in command else "--batch-size"
    one_error(refused, 2, option)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # nothing was written


# --- item 10 ---


def test_embedding_a_subfolder_of_a_labelled_index_says_what_it_unlabelled(tmp_path, model_dir):
    folder = make_labelled(tmp_path / "images", classes=2, per_class=3)
    index = tmp_path / "out.faiss"
    first = embed(folder, index, model_dir, "--labels-from-folders")
    assert first.exit_code == 0 and "6 images, 6 labelled" in first.output, first.output
    sub = embed(folder / "class_1", index, model_dir)  # the index keeps labelling by folder
    assert sub.exit_code == 0, sub.output
    assert "3 unlabelled" in sub.output and "6 images, 3 labelled" in sub.output, sub.output
    assert "embed the folder above" in sub.output
    back = embed(folder, index, model_dir)
    assert "3 relabelled, 0 unlabelled" in back.output and "6 labelled" in back.output


def test_a_folder_label_that_is_not_utf8_is_kept_as_its_bytes_escaped(tmp_path, model_dir):
    folder = tmp_path / "images"
    os.makedirs(os.fsencode(folder) + b"/caf\xe9")  # Latin-1: the label's name is not UTF-8
    (folder / "plain").mkdir()
    class_image(0, 1).save(odd_name(folder, b"caf\xe9/x.png"))
    class_image(1, 2).save(folder / "plain" / "y.png")
    index = tmp_path / "out.faiss"
    made = embed(folder, index, model_dir, "--labels-from-folders")
    assert made.exit_code == 0 and "2 images, 2 labelled" in made.output, made.output
    query = odd_name(folder, b"caf\xe9/x.png")
    found = cli("search", index, query, "-k", "2", "--label", "caf\\xe9", "--json")
    assert found.exit_code == 0, found.output
    assert [h["label"] for h in json.loads(found.stdout)[0]["results"]] == ["caf\\xe9"]
    again = embed(folder, index, model_dir)
    assert "skipped 2" in again.output and "relabelled" not in again.output  # stable


def test_parquet_export_keeps_a_names_exact_bytes(tmp_path, model_dir):
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "images"
    folder.mkdir()
    class_image(0, 1).save(folder / "plain.png")
    class_image(1, 2).save(odd_name(folder, b"caf\xe9.png"))  # Latin-1, not UTF-8
    index = tmp_path / "out.faiss"
    assert embed(folder, index, model_dir).exit_code == 0
    for fmt, table in (("parquet", "img_emb/img_emb_0000"), ("npy", "metadata/metadata_0000")):
        out = tmp_path / f"export-{fmt}"
        done = cli("index", "export", index, "--to", out, "--format", fmt)
        assert done.exit_code == 0, done.output
        columns = pq.read_table(out / f"{table}.parquet").to_pydict()
        exact = {os.fsencode(folder) + b"/plain.png", os.fsencode(folder) + b"/caf\xe9.png"}
        assert set(columns["image_path_bytes"]) == exact
        assert not any("\ufffd" in p for p in columns["image_path"])
        assert str(folder / "caf\\xe9.png") in columns["image_path"]


def test_control_characters_in_labels_and_paths_are_printed_escaped(tmp_path, model_dir):
    folder = tmp_path / "images"
    label = "red\x1b[31mclass"
    (folder / label).mkdir(parents=True)
    (folder / "plain").mkdir()
    query = folder / label / "title\x1b]0;owned\x07.png"
    class_image(0, 1).save(query)
    class_image(1, 2).save(folder / "plain" / "x.png")
    index = tmp_path / "out.faiss"
    made = embed(folder, index, model_dir, "--labels-from-folders")
    assert made.exit_code == 0, made.output
    found = cli("search", index, query, "-k", "2", env={"COLUMNS": "300"})
    assert found.exit_code == 0, found.output
    assert "\x1b" not in found.output and "\x07" not in found.output
    assert "red\\x1b[31mclass" in found.output and "title\\x1b]0;owned\\x07.png" in found.output
    missing = cli("search", index, folder / "gone\x1b[2J.png")
    line = one_error(missing, 2, "is not a file")
    assert "\x1b" not in line and "gone\\x1b[2J.png" in line
