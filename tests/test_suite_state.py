"""The suite passes however it is started: here, with SIGINT ignored, as a background job has it."""

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


LAUNCHER = """
import signal, subprocess, sys
from tests.procs import default_sigint
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the shell of `make test &` does this
probe = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
for preexec in (None, default_sigint):
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           preexec_fn=preexec)
    print(child.stdout.strip())
"""


def test_a_child_given_default_sigint_gets_ctrl_c_back_from_an_ignoring_parent():
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == ["False", "True"], out  # inherited ignore; then the default


def test_the_ctrl_c_tests_pass_with_sigint_ignored():
    """Started the way `make test &` starts it, the in-process Ctrl-C test still passes."""
    test = "tests/test_hostile.py::test_06_a_second_ctrl_c_stops_at_once"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        capture_output=True,
        text=True,
        cwd=ROOT,
        preexec_fn=ignore_sigint,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 passed" in result.stdout
