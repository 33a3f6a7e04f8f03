"""The Dockerfile cannot be built here: what it copies exists, what it runs is documented."""

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from mocoserve.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()


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


def test_readme_docker_run_commands_are_real_commands():
    runs = re.findall(r"docker run [^\n]*? mocoserve (\w+)", README)
    assert {"train", "embed"} <= set(runs)
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
