"""k-NN classification and `mocoserve knn` reports."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mocoserve.ann import knn
from mocoserve.ann.factory import normalize
from mocoserve.cli import app
from tests.imagegen import class_image, make_labelled

runner = CliRunner()


def labelled_vectors(n: int, classes: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return normalize(centres[labels] + 1.2 * rng.normal(size=(n, dim))), labels


def brute_force(train, train_labels, queries, classes, k, t, loo=False, uniform=False):
    """The literature's weighted k-NN written out plainly."""
    sims = queries @ train.T
    if loo:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    predictions = []
    for row, idx in enumerate(order):
        votes = np.zeros(classes)
        for j in idx:
            votes[train_labels[j]] += 1.0 if uniform else np.exp(sims[row, j] / t)
        predictions.append(np.argsort(-votes, kind="stable")[:5])
    return np.array(predictions)


@pytest.mark.parametrize(("k", "t"), [(1, 0.07), (5, 0.1), (20, 0.07), (200, 0.5)])
def test_weighted_knn_equals_brute_force(k, t):
    train, train_labels = labelled_vectors(600, 7)
    queries, _ = labelled_vectors(150, 7, seed=1)
    result = knn.knn_classify(train, train_labels, queries, 7, (k,), t, chunk=64)
    assert np.array_equal(result.top5[k], brute_force(train, train_labels, queries, 7, k, t))


def test_leave_one_out_excludes_each_own_match():
    x, labels = labelled_vectors(300, 5)
    result = knn.knn_classify(x, labels, x, 5, (10,), 0.07, self_ids=np.arange(300), chunk=50)
    assert not (result.rows == np.arange(300)[:, None]).any()
    ref = brute_force(x, labels, x, 5, 10, 0.07, loo=True)
    assert np.array_equal(result.top5[10], ref)


def test_uniform_votes_match_scikit_learn():
    sklearn = pytest.importorskip("sklearn.neighbors")
    train, train_labels = labelled_vectors(800, 6)
    queries, _ = labelled_vectors(200, 6, seed=3)
    clf = sklearn.KNeighborsClassifier(n_neighbors=15, algorithm="brute").fit(train, train_labels)
    ours = knn.knn_classify(train, train_labels, queries, 6, (15,), 1.0, weighting="uniform")
    assert np.array_equal(ours.top5[15][:, 0], clf.predict(queries))


def test_several_ks_share_one_search_and_accuracy_is_percent():
    train, train_labels = labelled_vectors(400, 4)
    queries, query_labels = labelled_vectors(100, 4, seed=2)
    result = knn.knn_classify(train, train_labels, queries, 4, (10, 20, 100), 0.07)
    assert result.rows.shape == (100, 100)
    for k in (10, 20, 100):
        ref = brute_force(train, train_labels, queries, 4, k, 0.07)
        assert np.array_equal(result.top5[k], ref)
        top1, top5 = result.accuracy(query_labels, k)
        assert top1 == pytest.approx(np.mean(ref[:, 0] == query_labels) * 100)
        assert top5 == 100.0  # 4 classes: the true one is always in the top 5


def test_knn_cli_report_files_and_presets(tmp_path, labelled_dir, val_dir, model_dir):
    out = tmp_path / "report"
    args = ["knn", "--model", str(model_dir), "--train", str(labelled_dir), "--val", str(val_dir)]
    result = runner.invoke(app, [*args, "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["k"] == 20 and report["temperature"] == 0.07 and report["preset"] == "dino"
    assert list(report["by_k"]) == ["10", "20", "24"]  # 100 and 200 capped at the 24 there are
    assert report["notes"] == ["k capped at 24: the train set has 24 images (k 100, 200)"]
    assert report["counts"]["train"] == 24 and report["counts"]["val"] == 12
    assert report["model"]["manifest_sha256"]
    assert len(report["confusion"]) == 3 and sum(map(sum, report["confusion"])) == 12
    assert {p["class"] for p in report["per_class"]} == {"class_0", "class_1", "class_2"}
    assert "| k | top-1 % | top-5 % |" in (out / "report.md").read_text()
    for png in ("confusion.png", "neighbours.png"):
        with Image.open(out / png) as image:
            image.load()
            assert image.size[0] > 100 and image.size[1] > 100
    assert "top-1 %" in result.output
    moco = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--preset", "moco"])
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert moco.exit_code == 0 and report["preset"] == "moco" and report["temperature"] == 0.1
    assert report["k"] == 24 and list(report["by_k"]) == ["24"]  # 200, capped
    explicit = runner.invoke(app, [*args, "--out", str(tmp_path / "e"), "-k", "3", "-T", "0.5"])
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert explicit.exit_code == 0 and list(report["by_k"]) == ["3"]


def test_knn_loo_and_train_index(tmp_path, labelled_dir, val_dir, model_dir):
    loo = runner.invoke(
        app,
        [
            "knn",
            "--model",
            str(model_dir),
            "--train",
            str(labelled_dir),
            "--loo",
            "--out",
            str(tmp_path / "loo"),
            "-k",
            "5",
        ],
    )
    assert loo.exit_code == 0, loo.output
    report = json.loads((tmp_path / "loo" / "report.json").read_text())
    assert report["leave_one_out"] and report["counts"]["val"] == 24
    index = tmp_path / "train.faiss"
    embedded = runner.invoke(
        app,
        [
            "embed",
            str(labelled_dir),
            "--index",
            str(index),
            "--model",
            str(model_dir),
            "--labels-from-folders",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert embedded.exit_code == 0, embedded.output
    reused = runner.invoke(
        app,
        [
            "knn",
            "--train-index",
            str(index),
            "--val",
            str(val_dir),
            "--out",
            str(tmp_path / "r"),
            "-k",
            "5",
        ],
    )
    assert reused.exit_code == 0, reused.output
    a = json.loads((tmp_path / "r" / "report.json").read_text())
    direct = runner.invoke(
        app,
        [
            "knn",
            "--model",
            str(model_dir),
            "--train",
            str(labelled_dir),
            "--val",
            str(val_dir),
            "--out",
            str(tmp_path / "d"),
            "-k",
            "5",
        ],
    )
    assert direct.exit_code == 0
    b = json.loads((tmp_path / "d" / "report.json").read_text())
    assert a["confusion"] == b["confusion"] and a["top1"] == b["top1"]


def test_knn_errors_are_clear(tmp_path, labelled_dir, model_dir):
    val = make_labelled(tmp_path / "val", classes=4, per_class=2)  # class_3 not in train
    base = ["knn", "--model", str(model_dir), "--train", str(labelled_dir)]
    missing = runner.invoke(app, [*base, "--val", str(val), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "missing from the train set: class_3" in missing.output
    (tmp_path / "a-file").write_text("keep")
    to_file = runner.invoke(app, [*base, "--loo", "--out", str(tmp_path / "a-file")])
    assert to_file.exit_code == 2 and "is a file" in to_file.output
    neither = runner.invoke(app, [*base, "--out", str(tmp_path / "o")])
    assert neither.exit_code == 2 and "--loo" in neither.output
    preset = runner.invoke(app, [*base, "--loo", "--preset", "imagenet"])
    assert preset.exit_code == 2 and "--preset" in preset.output
    flat = tmp_path / "flat"
    flat.mkdir()
    class_image(0, 0).save(flat / "a.png")
    class_image(1, 0).save(flat / "b.png")
    unlabelled = runner.invoke(
        app,
        [
            "knn",
            "--model",
            str(model_dir),
            "--train",
            str(flat),
            "--loo",
            "--out",
            str(tmp_path / "u"),
        ],
    )
    assert unlabelled.exit_code == 2 and "no labelled images" in unlabelled.output
    assert "Traceback" not in unlabelled.output
    nowhere = tmp_path / "nowhere.faiss"
    gone = runner.invoke(app, ["knn", "--train-index", str(nowhere), "--loo"])
    assert gone.exit_code == 2 and "is not an index" in gone.output
    assert not list(tmp_path.glob("nowhere*"))  # nothing created beside it


def test_long_class_names_stay_apart_in_the_pictures():
    from mocoserve.report import short

    names = [f"a-rather-long-class-name-{i}" for i in range(12)]
    shortened = [short(n) for n in names]
    assert len(set(shortened)) == 12 and all(len(s) <= 16 for s in shortened)
    assert short("cat") == "cat" and short("a-rather-long-class-name-7").endswith("name-7")
