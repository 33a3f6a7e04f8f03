"""One module per command group, each with its own typer.Typer(); assembled in mocoserve.cli."""
