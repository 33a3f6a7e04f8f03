"""Import contracts: one namespace, the arrows of docs/architecture.md, no hijacking train.py."""

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder at the repository root -> the package it installs as (pyproject's package-dir)
FOLDERS = {
    "mocoserve": "mocoserve",
    "train": "mocoserve.train",
    "export": "mocoserve.export",
    "app": "mocoserve.app",
}
SERVING = ("mocoserve.core", "mocoserve.model", "mocoserve.ann", "mocoserve.index")
SERVING += ("mocoserve.ingest", "mocoserve.report")
# What each part may import of ours, even lazily inside a function. The CLI (`cli`,
# `commands`) and the demo (the whole pipeline) may import every part, inside commands.
ALLOWED = {
    "mocoserve.core": ("mocoserve.core",),
    "mocoserve.train": ("mocoserve.core", "mocoserve.train"),
    "mocoserve.export": ("mocoserve.core", "mocoserve.train", "mocoserve.export"),
    **{m: SERVING for m in SERVING},
    "mocoserve.app": (*SERVING, "mocoserve.app"),
    "mocoserve.service": (*SERVING, "mocoserve.app", "mocoserve.service"),
}


def module_files() -> dict[str, Path]:
    """Every module of the distribution by its installed name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def owner(module: str) -> str | None:
    """The part of ALLOWED a module belongs to (longest prefix), or None."""
    hits = [p for p in ALLOWED if module == p or module.startswith(p + ".")]
    return max(hits, key=len) if hits else None


def ours(name: str, known: set[str]) -> str | None:
    """The module of ours that an imported name refers to (from x import f names x.f)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_no_generic_top_level_import_anywhere():
    files = [*ROOT.glob("*/**/*.py")]
    bad = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        if ".venv" not in path.parts
        for name in imports_of(path)
        if name.split(".")[0] in ("train", "export", "app")
    ]
    assert not bad, bad


def test_every_part_imports_only_what_its_arrows_allow():
    modules = module_files()
    known = set(modules)
    violations = []
    for name, path in modules.items():
        part = owner(name)
        if part is None:  # the CLI and the demo
            continue
        for imported in imports_of(path):
            target = ours(imported, known)
            if target in (None, "mocoserve"):  # the root package holds only __version__
                continue
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[part]):
                violations.append(f"{name} imports {target}")
    assert not violations, violations


def test_core_imports_nothing_of_ours_but_core():
    core = {n: p for n, p in module_files().items() if n.startswith("mocoserve.core")}
    assert {"mocoserve.core.errors", "mocoserve.core.images", "mocoserve.core.manifest"} <= set(
        core
    )
    for name, path in core.items():
        for imported in imports_of(path):
            if imported.split(".")[0] == "mocoserve":
                assert imported.startswith("mocoserve.core"), f"{name} imports {imported}"


def test_serving_path_loads_neither_training_nor_export_nor_torch():
    code = (
        "import sys, mocoserve.cli, mocoserve.index.reader, mocoserve.ingest.embed\n"
        "import mocoserve.report\n"
        "import mocoserve.app.search, mocoserve.model, mocoserve.service.app\n"
        "bad = [m for m in sys.modules if m.startswith(('mocoserve.train', 'mocoserve.export'))"
        " or m.split('.')[0] == 'torch']\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


HIJACK = """import pathlib, sys
pathlib.Path(__file__).with_suffix(".imported").write_text("imported")
sys.exit(3)
"""


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """A user's project folder: train.py, export.py and app.py that must never be imported."""
    folder = tmp_path / "project"
    folder.mkdir()
    for name in ("train", "export", "app"):
        (folder / f"{name}.py").write_text(HIJACK)
    return folder


def assert_not_hijacked(folder: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(folder.glob("*.imported")), "a user's file was imported"


def test_a_users_train_export_app_files_are_not_imported(hostile_folder, tmp_path):
    from tests.models import make_checkpoint

    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "mocoserve", *args],
        cwd=hostile_folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_not_hijacked(hostile_folder, run("--help"))
    ckpt = make_checkpoint(tmp_path / "c.pt")
    result = run("export", str(ckpt), "--out", str(tmp_path / "model"), "--format", "onnx")
    assert_not_hijacked(hostile_folder, result)
    assert (tmp_path / "model" / "manifest.json").is_file()


@pytest.mark.slow
def test_torchrun_train_from_a_folder_with_a_train_py(hostile_folder, labelled_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    result = subprocess.run(
        [
            *(str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mocoserve", "train"),
            *(str(labelled_dir), "--epochs", "1", "-b", "4", "-K", "8", "--arch", "resnet18"),
            *("--image-size", "32", "--dim", "8", "--workers", "0", "-q"),
            *("--out", str(tmp_path / "run")),
        ],
        cwd=hostile_folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert_not_hijacked(hostile_folder, result)
    assert "2 process(es) on cpu" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_the_wheel_installs_one_top_level_name(tmp_path):
    """`pip install .` installs mocoserve and nothing else at the top level."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside it
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in FOLDERS:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*pip_wheel, "-q", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("mocoserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mocoserve"}, tops
    for module in ("train/trainer.py", "export/package.py", "app/ui.py", "core/manifest.py"):
        assert f"mocoserve/{module}" in names
