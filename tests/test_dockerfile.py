"""The Dockerfile cannot be built here: what it copies exists, what it runs is documented."""

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from mocoserve.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [tuple(ln.split(None, 1)) for ln in lines]


def test_every_copied_path_exists():
    copies = [args for op, args in instructions() if op == "COPY" and "--from" not in args]
    assert copies
    for args in copies:
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is missing"


def test_base_images_are_pinned_and_user_is_not_root():
    froms = [args for op, args in instructions() if op == "FROM"]
    assert len(froms) >= 2  # multi-stage
    for image in froms:
        name = image.split()[0]
        assert ":" in name and not name.endswith(":latest"), f"pin {name} by tag"
    users = [args for op, args in instructions() if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(op == "ENTRYPOINT" and "mocoserve" in args for op, args in instructions())


def test_install_commands_are_the_readmes():
    installs = [
        args.replace("--no-cache-dir ", "")
        for op, args in instructions()
        if op == "RUN" and "pip install" in args
    ]
    assert installs
    for command in installs:
        assert command in README, f"README does not show the Dockerfile's `{command}`"


def test_the_image_installs_the_serving_extras_and_no_training_stack():
    runs = [args for op, args in instructions() if op == "RUN"]
    installs = " ".join(args for args in runs if "pip install" in args)
    assert "torch" not in installs and "tensorboard" not in installs
    (extras,) = re.findall(r"'\.\[([\w,]+)\]'", installs)
    extras = set(extras.split(","))
    for extra in extras:
        assert re.search(rf"^{extra} = \[", PYPROJECT, re.M), f"pyproject has no [{extra}] extra"
    assert not extras & {"train", "all", "demo"}, "the serving image must not install torch"
    (cmd,) = [args for op, args in instructions() if op == "CMD"]
    assert "serve" in cmd and "serve" in extras
    if "--no-ui" not in cmd:  # the page at /ui is the Gradio app
        assert "app" in extras


def test_readme_docker_run_commands_are_real_commands():
    runs = re.findall(r"docker run [^\n]*? mocoserve (\w+)", README)
    assert {"embed", "serve"} <= set(runs)
    # the serving image has no torch: these would exit 2 (needs the [train] extra)
    assert not set(runs) & {"train", "lincls", "export", "demo"}, runs
    for command in set(runs):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, f"README runs `mocoserve {command}`, which does not exist"


def test_the_images_command_is_the_service_with_real_options():
    import json

    (cmd,) = [json.loads(args) for op, args in instructions() if op == "CMD"]
    assert cmd[0] == "serve" and "--index" in cmd and "0.0.0.0" in cmd
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for option in (a for a in cmd if a.startswith("--")):
        assert option in help_text, f"the Dockerfile runs serve {option}, which it lacks"
    assert any(op == "EXPOSE" and "8000" in args for op, args in instructions())
    assert re.search(r"docker run [^\n]*-p 8000:8000[^\n]* mocoserve serve", README)
