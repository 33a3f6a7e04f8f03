"""The `mocoserve` command: command groups assembled in one place.

Each group's module imports its heavy dependencies (train, export, app) inside the command.
"""

from __future__ import annotations

import typer

from mocoserve.commands import demo as demo_commands
from mocoserve.commands import export as export_commands
from mocoserve.commands import gui as app_commands
from mocoserve.commands import index as index_commands
from mocoserve.commands import knn as knn_commands
from mocoserve.commands import serve as serve_commands
from mocoserve.commands import shards as shards_commands
from mocoserve.commands import train as train_commands
from mocoserve.commands.options import Group, click_help

app = typer.Typer(
    name="mocoserve",
    cls=Group,
    help="Image embeddings from pretraining to serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(train_commands.app)
app.add_typer(export_commands.app)
app.add_typer(index_commands.app)
app.add_typer(index_commands.index_app)
app.add_typer(shards_commands.app)
app.add_typer(knn_commands.app)
app.add_typer(app_commands.app)
app.add_typer(serve_commands.app)
app.add_typer(demo_commands.app)
click_help(app)  # after every add_typer: one help style for every command


def main() -> None:
    app()
