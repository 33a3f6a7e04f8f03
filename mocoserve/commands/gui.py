"""`mocoserve app`: the Gradio similar-image-search app (imports `app` and gradio lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mocoserve.commands.options import APP_MODULES, DeviceOpt, ModelOpt, guarded, needs
from mocoserve.core.errors import UserError

app = typer.Typer()


@app.command("app")
def app_command(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index made by embed.")],
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0: every one).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", help="Port.", min=1, max=65535)] = 7860,
    share: Annotated[
        bool, typer.Option("--share/--no-share", help="A public gradio.live link.")
    ] = False,
    auth: Annotated[
        str | None, typer.Option("--auth", help="user:password required to open the page.")
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest upload accepted.", min=0.01)
    ] = 20,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Searches run at once; the rest queue.", min=1)
    ] = 2,
    device: DeviceOpt = None,
) -> None:
    """Start the similar-image-search web app on an index."""

    def work() -> None:
        needs("app", *APP_MODULES, command="app")
        import logging

        import mocoserve.index.reader
        from mocoserve.app.search import Searcher
        from mocoserve.app.ui import build_app, launch_options

        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("mocoserve").setLevel(logging.INFO)

        credentials = None
        if auth is not None:
            user, sep, password = auth.partition(":")
            if not sep or not user or not password:
                raise UserError("--auth must be user:password")
            credentials = (user, password)
        idx = mocoserve.index.reader.open(
            index, model=model, device=device or "auto", readonly=True
        )
        searcher = Searcher(idx, int(max_upload_mb * 2**20))
        blocks = build_app(searcher)
        blocks.queue(default_concurrency_limit=concurrency, max_size=256)
        print(f"{len(idx):,} images from {index}; serving on http://{host}:{port}")
        if host not in ("127.0.0.1", "localhost"):
            print("note: the app is reachable from other machines (--host)")
        blocks.launch(**launch_options(searcher, host, port, share, credentials))

    guarded(work)
