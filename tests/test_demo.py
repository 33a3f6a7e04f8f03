"""The main job: scikit-learn's digits as an image folder, and `mocoserve demo` end to end."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.demo import write_digits
from mocoserve.train.data import scan_folder


def test_write_digits_makes_a_labelled_split(tmp_path):
    train_dir, val_dir = write_digits(tmp_path)
    train, val = scan_folder(train_dir), scan_folder(val_dir)
    assert train.classes == [str(d) for d in range(10)] == val.classes
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert not {p.name for p in train.files} & {p.name for p in val.files}
    with Image.open(train.files[0]) as img:
        assert img.size == (32, 32) and img.mode == "RGB"


@pytest.mark.slow
def test_demo_command_runs_and_training_beats_random_weights(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "random weights" in result.output and "MoCo v2 (3 epochs)" in result.output
    trained = json.loads((tmp_path / "report" / "report.json").read_text())["top1"]
    random = json.loads((tmp_path / "report-random" / "report.json").read_text())["top1"]
    assert trained > random + 1.0, (trained, random)  # seeded on the CPU: the same every run
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    assert "knn_top1" in (tmp_path / "run" / "metrics.jsonl").read_text()
    for name in ("report", "report-random"):
        assert (tmp_path / name / "report.json").is_file()
        assert (tmp_path / name / "confusion.png").is_file()
    assert (tmp_path / "model" / "manifest.json").is_file()
    assert (tmp_path / "digits.faiss").is_file() and (tmp_path / "digits.faiss.db").is_file()
    assert "ResNet-18, random weights" in (tmp_path / "report" / "report.md").read_text()
    assert "mocoserve search" in result.output and "mocoserve app --index" in result.output
    assert "training did not beat" not in result.output
