import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.imagegen import make_flat, make_labelled

# Keep the test processes to the machine's cores without oversubscription: under pytest-xdist
# (`make test`: -n 2) each worker gets its share, set before torch or FAISS read it.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, (os.cpu_count() or 1) // _WORKERS))))


def built_once(
    factory: pytest.TempPathFactory, config: pytest.Config, name: str, make: Callable[[Path], Path]
) -> Path:
    """`make(folder)`'s result, made once per run: under xdist the first worker to ask makes it
    (others wait on a lock) in the run's shared temp folder; alone, in a temp folder of its own.

    For session fixtures that tests only read (image folders, model packages).
    """
    if not hasattr(config, "workerinput"):  # not an xdist worker
        return make(factory.mktemp(name))
    shared = factory.getbasetemp().parent / "built-once"  # the run's folder, beside popen-gw*
    shared.mkdir(exist_ok=True)
    done = shared / f"{name}.path"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.is_file():
            folder = shared / name
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed left
            folder.mkdir()
            result = make(folder)
            done.write_text(str(result))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def labelled_dir(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    return built_once(
        tmp_path_factory, pytestconfig, "labelled", lambda f: make_labelled(f / "data")
    )


@pytest.fixture(scope="session")
def val_dir(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    return built_once(
        tmp_path_factory,
        pytestconfig,
        "val",
        lambda f: make_labelled(f / "data", per_class=4, seed=1),
    )


@pytest.fixture(scope="session")
def flat_dir(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    return built_once(tmp_path_factory, pytestconfig, "flat", lambda f: make_flat(f / "data"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Path:
    """An ONNX model package of a tiny ResNet-18 (32 px, 512-d)."""
    from tests.models import make_package

    return built_once(tmp_path_factory, pytestconfig, "package", make_package)
