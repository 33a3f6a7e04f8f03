"""`mocoserve serve`: the HTTP service (FastAPI under uvicorn), imported inside the command."""

from __future__ import annotations

import socket
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mocoserve.commands.options import APP_MODULES, SERVE_MODULES, DeviceOpt, guarded, needs
from mocoserve.core.decode import MAX_IMAGE_PIXELS
from mocoserve.core.errors import RunError, UserError

if TYPE_CHECKING:
    from mocoserve.service.connections import ConnectionLimits
    from mocoserve.service.state import ServiceConfig

app = typer.Typer()


def read_api_keys(path: Path) -> tuple[str, ...]:
    """One key a line (blank lines and # comments skipped); short or shared keys refused."""
    if not path.is_file():
        raise UserError(f"--api-key-file {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is not)") from None
    keys = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            if len(key) < 16 or any(c.isspace() for c in key):
                raise UserError(f"{path}: API keys must be 16+ characters with no spaces")
            if not (key.isascii() and key.isprintable()):  # what an HTTP header can carry
                raise UserError(f"{path}: API keys must be printable ASCII characters")
            keys.append(key)
    if not keys:
        raise UserError(f"{path} holds no API key (one a line)")
    if stat.S_IMODE(path.stat().st_mode) & 0o004:
        print(f"note: {path} is readable by every user; chmod o-r it", file=sys.stderr)
    return tuple(keys)


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to --host and --port, as uvicorn would bind them; one line if not.

    Bound here, before the app is made, so that a name that does not resolve is a UserError
    and a port in use an OS error (exit 1), not uvicorn's log line and exit 3.
    """
    try:
        found = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError, ValueError):  # UnicodeError: a label too long for IDNA
        raise UserError(f"--host {host!r} is not an address or a host name that resolves") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio does: :: and 0.0.0.0 side by side
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as e:
        for sock in sockets:
            sock.close()
        raise RunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sockets


@app.command()
def serve(
    index: Annotated[
        Path | None,
        typer.Option(
            "--index",
            "-i",
            help="Index made by embed (search + UI). Give --index, --model or both.",
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Model package folder (made by export); alone: an embedding-only service.",
            show_default="the index's model",
        ),
    ] = None,
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
    max_connections_per_client: Annotated[
        int,
        typer.Option(
            "--max-connections-per-client",
            help="Open connections from one address (IPv6: a /64); beyond: closed. 0: no limit.",
        ),
    ] = 64,
    idle_timeout: Annotated[
        float,
        typer.Option("--idle-timeout", help="Seconds a connection may wait between requests."),
    ] = 5.0,
    header_timeout: Annotated[
        float, typer.Option("--header-timeout", help="Seconds to send a request's headers.")
    ] = 10.0,
    body_timeout: Annotated[
        float, typer.Option("--body-timeout", help="Seconds to send a request's whole body.")
    ] = 60.0,
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
    max_image_pixels: Annotated[
        int,
        typer.Option(
            "--max-image-pixels",
            help="Pixels one image may have (width x height); more: that image fails.",
        ),
    ] = MAX_IMAGE_PIXELS,
    max_request_pixels: Annotated[
        int,
        typer.Option(
            "--max-request-pixels", help="Pixels a request's images may have together; more: 413."
        ),
    ] = 256_000_000,
    device: DeviceOpt = None,
) -> None:
    """Serve embeddings and similar-image search over HTTP (+ the Gradio page at /ui).

    POST /v1/embed, POST /v1/search, GET /v1/items/{id} and its /image, GET /v1/info, /healthz,
    /readyz, /metrics; OpenAPI at /openapi.json and /docs.
    """

    def work() -> None:
        needs("serve", *SERVE_MODULES, command="serve")
        if ui and index is not None:  # the page at /ui is the Gradio app
            needs("app", *APP_MODULES, command="serve --ui", instead="--no-ui")
        from mocoserve.service.connections import ConnectionLimits
        from mocoserve.service.state import ServiceConfig

        check_inputs(index, model)
        check_limits(
            port=port,
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            max_queue=max_queue,
            max_connections=max_connections,
            max_connections_per_client=max_connections_per_client,
            timeouts={
                "--idle-timeout": idle_timeout,
                "--header-timeout": header_timeout,
                "--body-timeout": body_timeout,
            },
            max_upload_mb=max_upload_mb,
            max_image_pixels=max_image_pixels,
            max_request_pixels=max_request_pixels,
        )
        config = ServiceConfig(
            model=model,
            index=index,
            device=device or "auto",
            max_batch=max_batch,
            max_delay_ms=max_delay_ms,
            max_queue=max_queue,
            max_upload_mb=max_upload_mb,
            max_connections=max_connections,
            api_keys=read_api_keys(api_key_file) if api_key_file else (),
            ui=ui,
            cors_origins=tuple(cors_origin or ()),
            expose_paths=expose_paths,
            max_image_pixels=max_image_pixels,
            max_request_pixels=max_request_pixels,
        )
        limits = ConnectionLimits(
            idle_timeout, header_timeout, body_timeout, max_connections_per_client
        )
        run_service(config, host, port, limits, access_log)

    guarded(work)


def check_inputs(index: Path | None, model: Path | None) -> None:
    """An index or a model (or both) that exist; a clear error now, not in the background."""
    from mocoserve.core.manifest import Manifest
    from mocoserve.index.files import IndexFiles

    if index is None and model is None:
        raise UserError("give --index (search and embeddings) or --model (embeddings only)")
    if index is not None and not IndexFiles(index).catalog.is_file():
        raise UserError(f"{index} is not an index (no {index}.db); make one with embed")
    if model is not None:
        Manifest.read(model)


def check_limits(
    *,
    port: int,
    max_batch: int,
    max_delay_ms: float,
    max_queue: int,
    max_connections: int,
    max_connections_per_client: int,
    timeouts: dict[str, float],
    max_upload_mb: float,
    max_image_pixels: int,
    max_request_pixels: int,
) -> None:
    """The first option out of its range, as a UserError (exit 2)."""
    from PIL import Image

    checks = [
        (1 <= port <= 65535, "--port must be from 1 to 65535"),
        (1 <= max_batch <= 4096, "--max-batch must be from 1 to 4096"),
        (0 <= max_delay_ms <= 10_000, "--max-delay-ms must be from 0 to 10000"),
        (max_queue >= max_batch, "--max-queue must be at least --max-batch"),
        (max_connections >= 1, "--max-connections must be at least 1"),
        (max_connections_per_client >= 0, "--max-connections-per-client must be 0 or more"),
        *(
            (0 < seconds <= 3600, f"{name} must be above 0, at most 3600 (seconds)")
            for name, seconds in timeouts.items()
        ),
        (0 < max_upload_mb <= 1024, "--max-upload-mb must be above 0, at most 1024"),
        # above Pillow's own guard (core/images.py), Pillow would refuse first
        (
            1 <= max_image_pixels <= Image.MAX_IMAGE_PIXELS,
            f"--max-image-pixels must be from 1 to {Image.MAX_IMAGE_PIXELS}",
        ),
        (
            max_request_pixels >= max_image_pixels,
            "--max-request-pixels must be at least --max-image-pixels",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run_service(
    config: ServiceConfig, host: str, port: int, limits: ConnectionLimits, access_log: bool
) -> None:
    """The app under uvicorn on --host and --port until it stops; a load error: UserError."""
    import logging

    import uvicorn

    from mocoserve.service.connections import protocol_class
    from mocoserve.service.main import create_app

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("mocoserve").setLevel(logging.INFO)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def fatal(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    sockets = listen(host, port)
    service = create_app(config, on_fatal=fatal)
    server = uvicorn.Server(
        uvicorn.Config(
            service,
            host=host,
            port=port,
            log_level="warning",
            access_log=access_log,
            # requests in flight are limited in the app (a JSON 503; /healthz exempt), not
            # by uvicorn's limit_concurrency, which counts idle connections too
            http=protocol_class(limits),
            timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]  # takes a float
            timeout_graceful_shutdown=10,
        )
    )
    where = f"http://{host}:{port}"
    parts = ["API /v1 (docs: /docs)", *(["UI /ui"] if config.ui and config.index else [])]
    print(f"serving on {where}: {', '.join(parts)}", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("note: reachable from other machines (--host)", flush=True)
        if not config.api_keys:
            print("note: no --api-key-file: anyone who can reach it can use it", flush=True)
    server.run(sockets=sockets)
    if failed:
        raise UserError(failed[0])
