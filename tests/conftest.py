import os
from pathlib import Path

import pytest

from tests.imagegen import make_flat, make_labelled

# Keep each test process to the machine's two cores without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def labelled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled(tmp_path_factory.mktemp("labelled") / "data")


@pytest.fixture(scope="session")
def val_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled(tmp_path_factory.mktemp("val") / "data", per_class=4, seed=1)


@pytest.fixture(scope="session")
def flat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_flat(tmp_path_factory.mktemp("flat") / "data")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ONNX model package of a tiny ResNet-18 (32 px, 512-d)."""
    from tests.models import make_package

    return make_package(tmp_path_factory.mktemp("package"))
