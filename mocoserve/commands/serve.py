"""`mocoserve serve`: the HTTP service (FastAPI under uvicorn), imported inside the command."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Annotated

import typer

from mocoserve.commands.options import DeviceOpt, ModelOpt, guarded
from mocoserve.core.errors import UserError

app = typer.Typer()


def read_api_keys(path: Path) -> tuple[str, ...]:
    """One key a line (blank lines and # comments skipped); short or shared keys refused."""
    if not path.is_file():
        raise UserError(f"--api-key-file {path} is not a file")
    keys = []
    for line in path.read_text().splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            if len(key) < 16 or any(c.isspace() for c in key):
                raise UserError(f"{path}: API keys must be 16+ characters with no spaces")
            keys.append(key)
    if not keys:
        raise UserError(f"{path} holds no API key (one a line)")
    if stat.S_IMODE(path.stat().st_mode) & 0o004:
        print(f"note: {path} is readable by every user; chmod o-r it", file=sys.stderr)
    return tuple(keys)


@app.command()
def serve(
    index: Annotated[
        Path | None, typer.Option("--index", "-i", help="Index made by embed (search + UI).")
    ] = None,
    model: ModelOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (0.0.0.0: every one).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.")] = 8000,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Images per model call, at most.")
    ] = 64,
    max_delay_ms: Annotated[
        float, typer.Option("--max-delay-ms", help="How long a batch waits to fill up.")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Images waiting for the model; beyond: 503.")
    ] = 1024,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Requests handled at once; beyond: 503.")
    ] = 128,
    api_key_file: Annotated[
        Path | None,
        typer.Option("--api-key-file", help="Keys, one a line: Authorization: Bearer KEY."),
    ] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="The Gradio page at /ui.")] = True,
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest request body.")
    ] = 20.0,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Allow browsers on this origin (repeatable)."),
    ] = None,
    expose_paths: Annotated[
        bool, typer.Option("--expose-paths", help="Show server file paths in answers.")
    ] = False,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="One log line per request.")
    ] = False,
    device: DeviceOpt = None,
) -> None:
    """Serve embeddings and similar-image search over HTTP (+ the Gradio page at /ui).

    POST /v1/embed, POST /v1/search, GET /v1/items/{id} and its /image, GET /v1/info, /healthz,
    /readyz, /metrics; OpenAPI at /openapi.json and /docs.
    """

    def work() -> None:
        import logging

        import uvicorn

        from mocoserve.core.manifest import Manifest
        from mocoserve.service.app import create_app
        from mocoserve.service.state import ServiceConfig

        if index is None and model is None:
            raise UserError("give --index (search and embeddings) or --model (embeddings only)")
        if index is not None and not Path(f"{index}.db").is_file():
            raise UserError(f"{index} is not an index (no {index}.db); make one with embed")
        if model is not None:
            Manifest.read(model)  # a clear error now, not in the background
        checks = [
            (1 <= port <= 65535, "--port must be from 1 to 65535"),
            (1 <= max_batch <= 4096, "--max-batch must be from 1 to 4096"),
            (0 <= max_delay_ms <= 10_000, "--max-delay-ms must be from 0 to 10000"),
            (max_queue >= max_batch, "--max-queue must be at least --max-batch"),
            (max_connections >= 1, "--max-connections must be at least 1"),
            (0 < max_upload_mb <= 1024, "--max-upload-mb must be above 0, at most 1024"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        config = ServiceConfig(
            model=model,
            index=index,
            device=device or "auto",
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            max_queue=max_queue,
            max_upload_mb=max_upload_mb,
            api_keys=read_api_keys(api_key_file) if api_key_file else (),
            ui=ui,
            cors_origins=tuple(cors_origin or ()),
            expose_paths=expose_paths,
        )
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        logging.getLogger("mocoserve").setLevel(logging.INFO)
        failed: list[str] = []
        server: uvicorn.Server | None = None

        def fatal(message: str) -> None:
            failed.append(message)
            if server is not None:
                server.should_exit = True

        service = create_app(config, on_fatal=fatal)
        server = uvicorn.Server(
            uvicorn.Config(
                service,
                host=host,
                port=port,
                log_level="warning",
                access_log=access_log,
                limit_concurrency=max_connections,
                timeout_graceful_shutdown=10,
            )
        )
        where = f"http://{host}:{port}"
        parts = ["API /v1 (docs: /docs)", *(["UI /ui"] if ui and index else [])]
        print(f"serving on {where}: {', '.join(parts)}", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print("note: reachable from other machines (--host)", flush=True)
            if not config.api_keys:
                print("note: no --api-key-file: anyone who can reach it can use it", flush=True)
        server.run()  # a port in use: uvicorn says so in one line and exits 1
        if failed:
            raise UserError(failed[0])

    guarded(work)
