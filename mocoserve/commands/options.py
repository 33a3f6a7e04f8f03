"""Option aliases shared by the commands, defined once, and the error boundary of a command."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from mocoserve.core.errors import RunError, UserError

T = TypeVar("T")

DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto | cpu | cuda (auto: a GPU when present).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Data-loading worker processes per process.")
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", "-b", help="Images per step per process.")
]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="Epochs to train for.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file with data/model/method/optim/run sections."),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Model package folder (made by export)."),
]
IndexArg = Annotated[Path, typer.Argument(help="Index file (its sidecar is FILE.db).")]
KOpt = Annotated[int, typer.Option("--k", "-k", help="Neighbours to return.", min=1)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def one_line(message: str) -> str:
    """A message fit for one line; an error re-raised from a DataLoader worker gets its own text.

    torch wraps a worker's exception as "Caught UserError in DataLoader worker process 0.
    Original Traceback ..."; the last line of that traceback holds the original message.
    """
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return message
    if "Original Traceback" in message and ": " in lines[-1]:
        return lines[-1].split(": ", 1)[1]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ({lines[-1].strip()})"


def _say(message: str) -> None:
    if _is_main_process():
        print(f"error: {one_line(message)}", file=sys.stderr)


def guarded(fn: Callable[[], T]) -> T:
    """Run a command's work; what goes wrong is one line on stderr and an exit code.

    UserError: 2. RunError and operating-system errors (permissions, a full disk): 1.
    Ctrl-C: 130.
    """
    try:
        return fn()
    except UserError as e:
        _say(str(e))
        raise typer.Exit(e.exit_code) from None
    except RunError as e:
        _say(str(e))
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        _say(f"{e.strerror or e}{where}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        _say("interrupted")
        raise typer.Exit(130) from None
