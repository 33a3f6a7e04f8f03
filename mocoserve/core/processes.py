"""How a torchrun worker ends (shared by training and embedding)."""

from __future__ import annotations

import contextlib
import os
import sys


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker whose work is saved and printed: flush, then `os._exit`.

    gloo's C++ threads can outlive the process group; the interpreter's normal shutdown
    then destroys them while joinable, which aborts the process (SIGABRT, "terminate called
    without an active exception") after an otherwise successful run, and torchrun reports
    the whole job failed. Skipping the C++ static destructors avoids that race.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
