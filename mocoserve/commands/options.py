"""Option aliases shared by the commands, defined once, and the error boundary of a command."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from mocoserve.core.errors import RunError, UserError
from mocoserve.core.files import shown

T = TypeVar("T")


def batch_size_opt(default: str, help: str = "Images per step per process.") -> Any:
    """--batch-size with the default its command applies (None stands for it)."""
    return Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help=help, show_default=default),
    ]


def workers_opt(default: str) -> Any:
    """--workers with the default its command applies (None stands for it)."""
    return Annotated[
        int | None,
        typer.Option(
            "--workers", help="Data-loading worker processes per process.", show_default=default
        ),
    ]


DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto | cpu | cuda (auto: a GPU when present).", show_default="auto"
    ),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.", show_default="0")]
WorkersOpt = workers_opt("the cores, at most 8")
BatchSizeOpt = batch_size_opt("64", "Images per model call.")  # embed, knn
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file with data/model/method/optim/run sections."),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Model package folder (made by export)."),
]
IndexArg = Annotated[Path, typer.Argument(help="Index file (its catalog is INDEX.db).")]
KOpt = Annotated[int, typer.Option("--k", "-k", help="Neighbours to return.", min=1)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


def _click_names(params: list[Any]) -> list[Any]:
    """Name arguments in capitals and give flags no type, as click's help does.

    Typer's rich help (0.2x) shows `<bool>` after every flag, `--help` too, and writes a
    required argument `{data}` in the usage line; a flag takes no value, so it shows none.
    """
    for p in params:
        if isinstance(p, TyperArgument) and p.metavar is None:
            p.metavar = (p.name or "").upper()
        elif isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""  # the type column shows the metavar when there is one
    return params


class Command(TyperCommand):
    """A command whose help reads as click's: `Usage: mocoserve train [OPTIONS] DATA`."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _click_names(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = p.metavar + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
            else:
                pieces += p.get_usage_pieces(ctx)
        return pieces


class Group(TyperGroup):
    """A command group whose help names options as `Command` does."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _click_names(super().get_params(ctx))


def click_help(app: typer.Typer) -> None:
    """Make every command and group of `app`, at any depth, a `Command` or `Group`."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # typer's default; a command's own class stays
            command.cls = Command
    for group in app.registered_groups:
        if not isinstance(group.cls, type) or group.cls is TyperGroup:  # a DefaultPlaceholder
            group.cls = Group
        if group.typer_instance is not None:
            click_help(group.typer_instance)


def check_loading(batch_size: int | None, workers: int | None) -> None:
    """--batch-size and --workers as given (None: the command's default), as train checks
    them: 0 images a step never stands for the default, and no count is negative."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")


def needs(extra: str, *modules: str, command: str, instead: str | None = None) -> None:
    """A UserError (exit 2) naming the extra to install if any of `modules` is not installed.

    Checked before a command's lazy imports, so a missing extra is one line, not a traceback.
    `command` is what the user ran (`index export`); `instead` another way out (`--no-ui`).
    """
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken one
            found = False
        if not found:
            other = f" (or {instead})" if instead else ""
            raise UserError(
                f"mocoserve {command} needs the [{extra}] extra: "
                f"pip install 'mocoserve[{extra}]'{other}"
            )


# The modules each extra brings that a command imports (pyproject.toml's extras).
TRAIN_MODULES = ("torch", "torchvision", "tensorboard")
EXPORT_MODULES = ("torch", "torchvision", "onnx", "onnxscript")
SERVE_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "prometheus_client", "orjson", "pydantic")
APP_MODULES = ("gradio",)
PARQUET_MODULES = ("pyarrow",)


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
        print(f"error: {shown(one_line(message))}", file=sys.stderr)  # names in it: escaped


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
