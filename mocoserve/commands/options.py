"""Option aliases shared by the commands, defined once, and the error boundary of a command."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from mocoserve.core.errors import UserError

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


def guarded(fn: Callable[[], T]) -> T:
    """Run a command's work; a UserError becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except UserError as e:
        if _is_main_process():
            print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # permissions, a full disk: a sentence, not a traceback
        if _is_main_process():
            where = f": {e.filename}" if e.filename else ""
            print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        raise typer.Exit(1) from None
    except FloatingPointError as e:
        if _is_main_process():
            print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
