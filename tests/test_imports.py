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
# The layers of docs/architecture.md: what each part may import of ours, even lazily inside a
# function. Arrows point down only: core <- ann <- index <- ingest <- service/app/commands.
# `mocoserve.model` (the package loader) stands on core alone; the CLI (`cli`, `commands`) and
# the demo (the whole pipeline) may import every part, inside commands.
CORE = ("mocoserve.core",)
ANN = (*CORE, "mocoserve.ann")
MODEL = (*CORE, "mocoserve.model")
INDEX = (*ANN, "mocoserve.model", "mocoserve.index")
INGEST = (*INDEX, "mocoserve.ingest")
ALLOWED = {
    "mocoserve.core": CORE,
    "mocoserve.model": MODEL,
    "mocoserve.ann": ANN,
    "mocoserve.index": INDEX,
    "mocoserve.ingest": INGEST,
    "mocoserve.report": (*INGEST, "mocoserve.report"),
    "mocoserve.app": (*INDEX, "mocoserve.app"),
    "mocoserve.service": (*INDEX, "mocoserve.app", "mocoserve.service"),
    "mocoserve.train": (*CORE, "mocoserve.train"),
    "mocoserve.export": (*CORE, "mocoserve.train", "mocoserve.export"),
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


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


def edges_of(path: Path, known: set[str]) -> set[str]:
    """The modules of ours an import statement loads, at any depth: `from pkg import sub` is an
    arrow to pkg.sub alone (a package's __init__ is not the submodule's importer)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            targets = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                for a in node.names
            ]
        else:
            continue
        found.update(t for t in (ours(t, known) for t in targets) if t and t != "mocoserve")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), or a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph.get(v, ()):
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        # a package's __init__ re-exporting its own submodules is not a cycle
        graph[name] = {
            t
            for t in edges_of(path, known)
            if t != name and not (path.name == "__init__.py" and t.startswith(package + "."))
        }
    return graph


def test_no_import_cycle_anywhere_function_level_imports_included():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_serving_module_belongs_to_a_layer():
    """A new flat module under mocoserve/ must be placed in a layer, not slip past the arrows."""
    free = {"mocoserve", "mocoserve.cli", "mocoserve.__main__", "mocoserve.demo"}
    unplaced = [
        n
        for n in module_files()
        if owner(n) is None and n not in free and not n.startswith("mocoserve.commands")
    ]
    assert unplaced == []


def test_no_module_is_longer_than_the_bound():
    long = {
        n: len(p.read_text().splitlines())
        for n, p in module_files().items()
        if len(p.read_text().splitlines()) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_function_in_mocoserve_is_longer_than_the_bound():
    """Commands' functions are exempt: their option lists are declarations, not logic."""
    long = []
    for name, path in module_files().items():
        if name.startswith("mocoserve.commands") or not name.startswith("mocoserve."):
            continue
        if name.startswith(("mocoserve.train", "mocoserve.export", "mocoserve.app")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines}")
    assert long == []


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
        "import mocoserve.app.search, mocoserve.model, mocoserve.service.main\n"
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
