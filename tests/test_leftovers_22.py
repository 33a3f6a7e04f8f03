"""Leftovers of issue 22: a shard that lists another count than its shards.json is refused
(train) or a recorded failure (embed); method.freeze_patch_embed where nothing uses it is
refused; absurd timm sizes are refused before anything is allocated. Each refusal is one
`error: ...` line."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.core import tars
from mocoserve.core.shardwriter import write_shards
from mocoserve.train.config import save_yaml
from mocoserve.train.configure import build_config
from mocoserve.train.data import scan_data
from mocoserve.train.trainer import prepare_config
from tests.imagegen import make_labelled
from tests.test_embed_shards import failures, paths_of
from tests.test_train_cli import TINY, assert_user_error

runner = CliRunner()
SHORT = ["--epochs", "1", "--max-steps", "1", "-b", "4", "-K", "8"]


def train(*args: str):
    return runner.invoke(app, ["train", *args])


@pytest.fixture
def shard_set(tmp_path) -> Path:
    images = make_labelled(tmp_path / "images", classes=3, per_class=4)  # 12 images
    out = tmp_path / "shards"
    write_shards(images, out, shard_size=5, labels_from_folders=True)  # 5, 5, 2
    return out


def _drop_index_row(shard: Path) -> None:
    """The shard's index rewritten without its last row (the tar unchanged)."""
    idx = tars.index_path(shard)
    data = json.loads(idx.read_bytes())
    data["samples"] = data["samples"][:-1]
    idx.write_text(json.dumps(data))


def _drop_sample(shard: Path) -> None:
    """The tar rewritten without its last sample's members, and its index removed."""
    last = tars.list_shard(str(shard)).samples[-1].key
    with tarfile.open(shard) as src:
        parts = [
            (m, src.extractfile(m).read())  # type: ignore[union-attr]
            for m in src.getmembers()
            if tars.sample_key(m.name)[0] != last
        ]
    with tarfile.open(shard, "w") as dst:
        for m, payload in parts:
            dst.addfile(m, io.BytesIO(payload))
    os.unlink(tars.index_path(shard))


@pytest.mark.parametrize("change", [_drop_index_row, _drop_sample], ids=["index", "tar"])
def test_train_refuses_a_shard_that_lists_another_count_than_shards_json(
    change, shard_set, tmp_path
):
    changed = shard_set / "shard-000001.tar"
    change(changed)
    result = train(str(shard_set), *SHORT, *TINY, "--out", str(tmp_path / "run"))
    assert_user_error(result, f"{changed.resolve()}: lists 4 samples, shards.json says 5")
    assert "rerun mocoserve shards" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_shard_list_without_counts_and_a_damaged_tar_still_train(shard_set, capsys):
    """Another tool's shards.json (urls only) is not checked; a tar cut short lists fewer
    samples, and its own failure (a warning) says why: not refused for its count."""
    _drop_index_row(shard_set / "shard-000001.tar")
    listed = shard_set / tars.SHARD_LIST
    data = json.loads(listed.read_bytes())
    counted = json.dumps(data)
    data["shardlist"] = [{"url": e["url"]} for e in data["shardlist"]]
    listed.write_text(json.dumps(data))
    assert tars.shard_list_counts(listed) == {}
    assert len(scan_data(str(shard_set))) == 11  # 5 + 4 + 2

    data = json.loads(counted)  # counts again, without the changed shard
    data["shardlist"] = [e for e in data["shardlist"] if "000001" not in e["url"]]
    listed.write_text(json.dumps(data))
    cut = shard_set / "shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    os.unlink(tars.index_path(cut))
    index = scan_data(str(shard_set))
    assert 2 < len(index) < 5 + 2 and "warning:" in capsys.readouterr().err


def test_embed_records_a_shard_that_lists_another_count_and_indexes_the_rest(
    shard_set, model_dir, tmp_path
):
    changed = shard_set / "shard-000001.tar"
    _drop_index_row(changed)
    index = tmp_path / "out.faiss"
    result = runner.invoke(
        app,
        ["embed", str(shard_set), "--index", str(index), "--model", str(model_dir)]
        + ["--workers", "0", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    changed = changed.resolve()
    reason = failures(index)[tars.shard_key(str(changed))]
    assert "lists 4 samples, shards.json says 5" in reason
    indexed = paths_of(index)
    assert len(indexed) == 7  # shard-000000's 5 and shard-000002's 2
    assert not any(p.startswith(tars.shard_key(str(changed)) + "/") for p in indexed)


@pytest.mark.parametrize("method", ["moco-v1", "moco-v2", "supcon", "supcon-queue"])
def test_freeze_patch_embed_outside_moco_v3_is_one_line(method, labelled_dir, tmp_path):
    result = train(
        str(labelled_dir), "--method", method, *SHORT, *TINY, "--out", str(tmp_path / "r"),
        "--set", "method.freeze_patch_embed=true",
    )  # fmt: skip
    assert_user_error(result, f"patch projection); {method} does not use it (leave it unset)")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_freeze_patch_embed_on_a_resnet_under_moco_v3_is_one_line(labelled_dir, tmp_path):
    result = train(
        str(labelled_dir), "--method", "moco-v3", *SHORT, *TINY, "--out", str(tmp_path / "r"),
        "--set", "method.freeze_patch_embed=true",
    )  # fmt: skip
    assert_user_error(result, "freezes a ViT's patch projection; resnet18 has none")


def test_a_saved_config_of_another_method_runs_again(tmp_path):
    """The default is off (moco-v3's ViT recipe turns it on): a moco-v2 run's config.yaml
    given back with --config is not refused for a setting it never asked for."""
    cfg = build_config("moco-v2", None, None, {"data.root": str(tmp_path)})
    assert cfg.method.freeze_patch_embed is False
    save_yaml(cfg, tmp_path / "config.yaml")
    again, _ = prepare_config(None, None, str(tmp_path / "config.yaml"), {}, None)
    assert again.method.name == "moco-v2" and not again.method.freeze_patch_embed


TIMM_TINY = ["--image-size", "32", "--dim", "16", "--workers", "0", "-q"]
VIT_TINY = "timm:vit_tiny_patch16_224"


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        ("moco-v2", "{depth: 100000}", "depth: 100000 is far beyond any real net (at most 1000)"),
        # moco-v3 builds it on meta first, to pick its recipe: refused there
        ("moco-v3", "{depth: 100000}", "depth: 100000 is far beyond any real net"),
        ("moco-v2", "{embed_dim: 65536, num_heads: 16}", f"{VIT_TINY} with timm_kwargs"),
        ("moco-v3", "{embed_dim: 65536, num_heads: 16}", "GiB for its weights alone, over half"),
    ],
    ids=["depth", "depth-v3", "weights", "weights-v3"],
)
def test_absurd_timm_sizes_are_refused_before_allocating(
    method, kwargs, message, flat_dir, tmp_path
):
    pytest.importorskip("timm")
    result = train(
        str(flat_dir), "--method", method, *SHORT, *TIMM_TINY, "--out", str(tmp_path / "r"),
        "--arch", VIT_TINY, "--set", f"model.timm_kwargs={kwargs}",
    )  # fmt: skip
    assert_user_error(result, message)
    assert not (tmp_path / "r" / "checkpoints").exists()
