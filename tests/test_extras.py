"""Installs by extra: each command without its extra says which in one line; the serving path
runs with the training stack, the service and Gradio absent (blocked in a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.imagegen import make_labelled

ROOT = Path(__file__).resolve().parents[1]
# What no base install has: every extra's top-level modules (and the demo's dataset); not
# pydantic, which recent typer versions need (typer._adapters) and so bring.
NOT_BASE = (
    "torch,torchvision,tensorboard,onnx,onnxscript,fastapi,fastapi_offline,uvicorn,"
    "prometheus_client,orjson,gradio,pyarrow,sklearn"
)

# Imported first by the subprocess's interpreter (PYTHONPATH): a meta-path finder that makes
# the modules named in MOCOSERVE_TEST_BLOCK look uninstalled, to find_spec and to import.
SITECUSTOMIZE = """
import os, sys

BLOCKED = set(filter(None, os.environ.get("MOCOSERVE_TEST_BLOCK", "").split(",")))


class NotInstalled:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled)
"""


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def blocker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def without(
    blocker: Path, blocked: str, *args: object, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`python -m mocoserve ARGS` with the modules in `blocked` (comma-separated) missing."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
        "MOCOSERVE_TEST_BLOCK": blocked,
    }
    return subprocess.run(
        [sys.executable, "-m", "mocoserve", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or ROOT,
        timeout=120,
    )


def test_the_blocker_blocks(blocker):
    env = {**os.environ, "PYTHONPATH": str(blocker), "MOCOSERVE_TEST_BLOCK": "torch"}
    probe = "import importlib.util as u, torch"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "No module named 'torch'" in done.stderr


@pytest.mark.parametrize(
    ("blocked", "args", "line"),
    [
        ("fastapi", ["serve", "--model", "m"], "mocoserve serve needs the [serve] extra"),
        ("uvicorn", ["serve", "--index", "x.faiss"], "mocoserve serve needs the [serve] extra"),
        (
            "gradio",
            ["serve", "--index", "x.faiss"],
            "mocoserve serve --ui needs the [app] extra: pip install 'mocoserve[app]' (or --no-ui)",
        ),
        ("gradio", ["app", "--index", "x.faiss"], "mocoserve app needs the [app] extra"),
        ("torch", ["train", "data"], "mocoserve train needs the [train] extra"),
        ("tensorboard", ["train", "data"], "mocoserve train needs the [train] extra"),
        ("torch", ["lincls", "data", "--pretrained", "p.pt"], "mocoserve lincls needs the [train]"),
        ("onnxscript", ["export", "c.pt"], "mocoserve export needs the [train] extra"),
        ("torch", ["demo", "--out", "out"], "mocoserve demo needs the [train] extra"),
        (
            "pyarrow",
            ["index", "export", "x.faiss", "--to", "out"],
            "mocoserve index export needs the [parquet] extra: pip install 'mocoserve[parquet]'",
        ),
    ],
)
def test_a_command_without_its_extra_names_it_in_one_line(blocker, tmp_path, blocked, args, line):
    done = without(blocker, blocked, *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {line}") and done.stderr.count("\n") == 1, done.stderr
    extra = line.split("[")[1].split("]")[0]
    assert f"pip install 'mocoserve[{extra}]'" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before it wrote anything


def test_the_service_without_the_page_needs_no_gradio(blocker, tmp_path):
    done = without(blocker, "gradio", "serve", "--index", tmp_path / "x.faiss", "--no-ui")
    assert done.returncode == 2  # past the extras: the index is what is missing
    assert "is not an index" in done.stderr and "extra" not in done.stderr


def test_the_serving_path_runs_without_training_service_or_gradio(blocker, tmp_path, model_dir):
    """embed, search, index info, info and knn on the base install (ONNX Runtime, FAISS)."""
    images = make_labelled(tmp_path / "images", classes=2, per_class=3)
    index = tmp_path / "out.faiss"
    embed = without(
        blocker, NOT_BASE, "embed", images, "--index", index, "--model", model_dir,
        "--labels-from-folders", "--workers", "0", "--quiet",
    )  # fmt: skip
    assert embed.returncode == 0, embed.stderr
    assert "embedded 6, skipped 0 (unchanged), failed 0" in embed.stdout
    query = sorted(images.rglob("*.png"))[0]
    search = without(blocker, NOT_BASE, "search", index, query, "-k", "2", "--json")
    assert search.returncode == 0, search.stderr
    (answer,) = json.loads(search.stdout)
    assert answer["in_index"] and len(answer["results"]) == 2
    info = without(blocker, NOT_BASE, "index", "info", index, "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["items"] == 6
    package = without(blocker, NOT_BASE, "info", model_dir)
    assert package.returncode == 0 and "encoder.onnx" in package.stdout, package.stderr
    knn = without(
        blocker, NOT_BASE, "knn", "--model", model_dir, "--train", images, "--loo", "-k", "2",
        "--workers", "0", "--out", tmp_path / "report",
    )  # fmt: skip
    assert knn.returncode == 0, knn.stderr
    assert (tmp_path / "report" / "report.json").is_file()


def test_the_base_install_is_the_serving_path_and_all_is_every_extra():
    project = pyproject()["project"]
    base = " ".join(project["dependencies"])
    for name in ("numpy", "pillow", "onnxruntime", "faiss", "typer", "rich", "pyyaml"):
        assert name in base
    for name in ("torch", "fastapi", "gradio", "pyarrow", "uvicorn", "tensorboard"):
        assert name not in base
    extras = project["optional-dependencies"]
    assert {"train", "serve", "app", "parquet", "all", "dev", "demo"} <= set(extras)
    (everything,) = extras["all"]
    assert everything == "mocoserve[train,serve,app,parquet]"
    declared = " ".join(extras["serve"])
    for name in ("fastapi", "uvicorn", "python-multipart", "prometheus-client", "orjson"):
        assert name in declared
    assert "pydantic" in declared  # imported by the service, once only through FastAPI
    assert any(d.startswith("pytest-xdist") for d in extras["dev"])


def test_every_package_folder_is_installed():
    """pyproject lists packages by hand: a new subpackage left out would not be installed."""
    setuptools = pyproject()["tool"]["setuptools"]
    listed, dirs = set(setuptools["packages"]), setuptools["package-dir"]
    found = set()
    for package, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *parts)))
    assert found == listed
