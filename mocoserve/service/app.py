"""The FastAPI app of `mocoserve serve`: embeddings and similar-image search over HTTP.

    create_app(ServiceConfig(index=Path("out.faiss")))  ->  FastAPI (run it with uvicorn)

Handlers are thin: they parse and check the request, decode images off the event loop,
queue them for the `Batcher` (one model call for many requests) and search the current
index, and build a search's answer, in a thread. Middleware, outermost first: metrics and
the last-resort error boundary, the in-flight limit, CORS (only with --cors-origin), API
keys, the body-size limit, Gradio's file route guard. Connections (idle, header and body
deadlines, a cap per client address) are bounded below the app, in `connections.py`.
Every error is `{"error": {"code", "message"}}`; nothing from a request is ever used as a
filesystem path (items are looked up by id).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import mimetypes
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mocoserve import __version__
from mocoserve.core.decode import Decoded, Header, decode_bytes, read_header
from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text
from mocoserve.core.images import IMAGE_EXTENSIONS
from mocoserve.core.manifest import sha256_file
from mocoserve.index.store import DamagedIndex
from mocoserve.service import schemas
from mocoserve.service.admission import SMALL_DECODE_PIXELS, PixelBudget, return_large_frees
from mocoserve.service.batching import Batcher, BatchStats, QueueFull
from mocoserve.service.metrics import ServiceMetrics
from mocoserve.service.middleware import (
    UI_PATH,
    ApiKeys,
    BodyLimit,
    Boundary,
    InFlight,
    error_body,
    is_ui,
)
from mocoserve.service.state import Served, ServiceConfig, ServiceState, reason

log = logging.getLogger("mocoserve.serve")
NPY = "application/x-npy"
RAW_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}
FORM_OPTIONS = ("k", "label", "min_score")  # a search's fields in a multipart form, beside files


class ApiError(Exception):
    """An answer other than 200: status, a code word and a sentence (and headers)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# --- the app ---


@dataclass
class Query:
    """The images, vectors or ids of a search or embed request, and its options."""

    blobs: list[bytes | schemas.ErrorDetail] | None = None
    vectors: list[list[float]] | None = None
    ids: list[int] | None = None
    k: int = 10
    label: str | None = None
    min_score: float | None = None


def create_app(
    config: ServiceConfig,
    state: ServiceState | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service's app; the model and index load in the background once it starts."""
    state = state or ServiceState(config)
    metrics = ServiceMetrics()
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="mocoserve-decode")
    # searches build their answers in Python: two threads keep the cores busy (the index
    # lock serialises the searches themselves) without more threads taking the GIL from
    # the event loop
    search_pool = ThreadPoolExecutor(2, thread_name_prefix="mocoserve-search")
    return_large_frees()
    # large decodes: one thread always left to small images; one full-size image at a time
    large_decodes = PixelBudget(config.max_image_pixels, max(1, config.decode_threads - 1))
    batcher = Batcher(
        lambda x: state.encoder.embed(x),  # type: ignore[union-attr]
        config.max_batch,
        config.max_delay_ms / 1000,
        config.max_queue,
        BatchStats(metrics.observe_batch, metrics.queue_wait.observe),
    )
    metrics.queue_images.set_function(lambda: batcher.waiting)

    def on_swap(served: Served) -> None:
        metrics.index_items.set(len(served.index))
        metrics.index_version.set(served.version)

    state.on_swap.append(on_swap)

    state.on_reload_error.append(lambda _message: metrics.reload_failures.inc())

    async def load_then_watch() -> None:
        try:
            await asyncio.to_thread(state.load)
        except Exception as e:  # any error (a damaged database's too), said in one line
            if on_fatal is not None:
                on_fatal(reason(e))  # the CLI stops the server and says it in one line
            else:
                log.error("cannot load: %s", reason(e))
            return
        encoder = state.encoder
        if encoder is not None:
            metrics.model.info(
                {
                    "sha256": model_sha256(encoder),
                    "dim": str(encoder.embedding_dim),
                    "provider": encoder.provider,
                }
            )
        while config.index is not None:
            await asyncio.sleep(config.reload_seconds)
            try:  # a reload records its own failures; this is for a bug: watching goes on
                await asyncio.to_thread(state.reload_if_changed)
            except Exception as e:
                log.error("watching the index: %s", reason(e))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        task = asyncio.get_running_loop().create_task(load_then_watch())
        try:
            yield
        finally:
            task.cancel()
            await batcher.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)
            search_pool.shutdown(wait=False, cancel_futures=True)

    # /docs and /redoc load Swagger UI and ReDoc from the package (under /docs/static), not
    # from a CDN: they work on a machine without internet, behind the same API keys as the rest
    app = FastAPIOffline(
        static_url="/docs/static",
        title="mocoserve",
        version=__version__,
        summary="Image embeddings and similar-image search",
        lifespan=lifespan,
        responses={
            s: {"model": schemas.ErrorResponse} for s in (400, 401, 404, 413, 415, 422, 503)
        },
    )
    app.state.service = state

    # errors: one JSON shape
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.code, e.message), e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse(error_body(code, str(e.detail)), e.status_code, headers=e.headers)

    @app.exception_handler(DamagedIndex)
    async def damaged(_request: Request, e: DamagedIndex) -> JSONResponse:
        # the server's fault, not the client's: one log line, no server path in the answer
        log.error("the index is damaged: %s", e)
        message = hide_paths(f"the index is damaged: {e}", config)
        return JSONResponse(error_body("index_damaged", message), 503, {"Retry-After": "60"})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", describe(e.errors())), 422)

    # helpers
    def ready() -> None:
        if not state.ready:
            raise ApiError(
                503, state.status, f"the service is {state.status}", {"Retry-After": "5"}
            )

    def served_index() -> Served:
        ready()
        if state.served is None:
            raise ApiError(404, "no_index", "this service has no index (started with --model only)")
        return state.served

    async def decode_all(
        blobs: list[bytes | schemas.ErrorDetail],
    ) -> list[Decoded | schemas.ErrorDetail]:
        encoder = state.encoder
        assert encoder is not None
        loop = asyncio.get_running_loop()
        limit = config.max_image_pixels
        datas = [b for b in blobs if isinstance(b, bytes)]
        # headers first (lazy opens, in the pool: a PNG's text chunks may need inflating)
        headers = await asyncio.gather(
            *(
                loop.run_in_executor(decode_pool, read_header, b, encoder.resize, limit)
                for b in datas
            )
        )
        total = sum(h.pixels for h in headers if h.error is None)
        if total > config.max_request_pixels:
            raise ApiError(
                413,
                "too_many_pixels",
                f"this request's images hold {total / 1e6:.1f} MP together; at most "
                f"{config.max_request_pixels / 1e6:.1f} MP per request",
            )

        def timed(data: bytes) -> Decoded:
            started = time.perf_counter()
            try:
                return decode_bytes(data, encoder.resize, encoder.input_size, max_pixels=limit)
            finally:
                metrics.decode_seconds.observe(time.perf_counter() - started)

        async def decode(data: bytes, header: Header) -> Decoded:
            if header.error is not None:  # refused from its header: nothing to decode
                return Decoded("", len(data), 0, error=header.error, code=header.code)
            if header.cost <= SMALL_DECODE_PIXELS:
                return await loop.run_in_executor(decode_pool, timed, data)
            return await large_decodes.run(decode_pool, timed, data, cost=header.cost)

        done = iter(await asyncio.gather(*map(decode, datas, headers)))
        return [next(done) if isinstance(b, bytes) else b for b in blobs]

    async def embed_blobs(
        blobs: list[bytes | schemas.ErrorDetail],
    ) -> tuple[list[np.ndarray | None], list[schemas.ErrorDetail | None]]:
        decoded = await decode_all(blobs)
        errors: list[schemas.ErrorDetail | None] = []
        good = []
        for d in decoded:
            if isinstance(d, schemas.ErrorDetail):
                errors.append(d)
            elif d.error:
                errors.append(schemas.ErrorDetail(code=d.code or "undecodable", message=d.error))
            else:
                errors.append(None)
                good.append(d.pixels)
        vectors = np.zeros((0, 0), np.float32)
        if good:
            try:
                vectors = await batcher.embed(good)
            except QueueFull:
                raise ApiError(
                    503, "busy", "the model's queue is full; try again", {"Retry-After": "1"}
                ) from None
        it = iter(vectors)
        return [next(it) if e is None else None for e in errors], errors

    async def read_query(request: Request, json_model: type) -> Query:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            searching = json_model is schemas.SearchRequest
            blobs, fields = await read_form(
                request, config.max_images + 1, FORM_OPTIONS if searching else ()
            )
            query = Query(blobs=list(blobs))
            if searching:
                try:
                    opts = schemas.SearchRequest(**fields)
                except ValidationError as e:
                    raise ApiError(422, "invalid_request", describe(e.errors())) from None
                query.k, query.label, query.min_score = opts.k, opts.label, opts.min_score
        elif kind == "application/json":
            try:
                body = json_model.model_validate_json(await request.body())
            except ValidationError as e:
                status = 400 if any(x["type"] == "json_invalid" for x in e.errors()) else 422
                raise ApiError(status, "invalid_request", describe(e.errors())) from None
            query = Query(blobs=[from_base64(s) for s in body.images] if body.images else None)
            if isinstance(body, schemas.SearchRequest):
                query.vectors, query.ids = body.vectors, body.ids
                query.k, query.label, query.min_score = body.k, body.label, body.min_score
        elif kind in RAW_IMAGE_TYPES:
            query = Query(blobs=[await request.body()])
            if json_model is schemas.SearchRequest:
                try:
                    opts = schemas.SearchRequest(**dict(request.query_params))
                except ValidationError as e:
                    raise ApiError(422, "invalid_request", describe(e.errors())) from None
                query.k, query.label, query.min_score = opts.k, opts.label, opts.min_score
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "send multipart/form-data files, JSON with base64 images, or one image body",
            )
        count = len(query.blobs or query.vectors or query.ids or [])
        most = min(config.max_images, config.max_queue)  # more could never fit the queue
        if count > most:
            raise ApiError(413, "too_many", f"at most {most} images or queries per request")
        return query

    # routes
    @app.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz() -> schemas.Health:
        """Live: the process answers."""
        return schemas.Health(status="ok")

    @app.get("/readyz", response_model=schemas.Health, tags=["health"])
    async def readyz() -> Any:
        """Ready: able to answer (503 while loading; 200 during a reload: the old index serves)."""
        if not state.ready:
            code = state.status
            return JSONResponse(error_body(code, f"the service is {code}"), 503)
        return schemas.Health(status="ready")

    @app.post(
        "/v1/embed",
        response_model=schemas.EmbedResponse,
        tags=["embeddings"],
        openapi_extra=body_docs(schemas.EmbedRequest),
    )
    async def embed(request: Request) -> Any:
        """Images -> L2-normalised embeddings (a per-image error for each bad image).

        Send multipart files, JSON `{"images": [base64, ...]}` or one image as the body.
        `Accept: application/x-npy` answers a float32 N x D array (NaN rows where an image
        failed; `X-Mocoserve-Errors` lists them).
        """
        ready()
        query = await read_query(request, schemas.EmbedRequest)
        if not query.blobs:
            raise ApiError(400, "no_images", "send at least one image")
        vectors, errors = await embed_blobs(query.blobs)
        encoder = state.encoder
        assert encoder is not None
        sha, dim = model_sha256(encoder), encoder.embedding_dim
        if NPY in request.headers.get("accept", ""):
            array = np.full((len(vectors), dim), np.nan, np.float32)
            for i, v in enumerate(vectors):
                if v is not None:
                    array[i] = v
            buffer = io.BytesIO()
            np.save(buffer, array)
            failed = [{"index": i, **e.model_dump()} for i, e in enumerate(errors) if e is not None]
            headers = {"X-Mocoserve-Model-Sha256": sha}
            if failed:
                headers["X-Mocoserve-Errors"] = json.dumps(failed)
            return Response(buffer.getvalue(), media_type=NPY, headers=headers)
        # written with orjson straight from the float32 rows (the schema is EmbedResponse):
        # validating and re-encoding D floats per image through Pydantic costs more CPU
        body = {
            "model": {"sha256": sha, "dim": dim},
            "embeddings": vectors,
            "errors": [e.model_dump() if e is not None else None for e in errors],
        }
        return Response(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json"
        )

    @app.post(
        "/v1/search",
        response_model=schemas.SearchResponse,
        tags=["search"],
        openapi_extra=body_docs(schemas.SearchRequest),
    )
    async def search(request: Request) -> Response:
        """The k nearest indexed items to query images, vectors or indexed items' ids.

        At most `max_hits` (10,000) hits per request: k x the number of queries; more is a
        422 `too_many_hits`, before any work is done.
        """
        served = served_index()
        query = await read_query(request, schemas.SearchRequest)
        given = [x for x in (query.blobs, query.vectors, query.ids) if x]
        if len(given) != 1:
            raise ApiError(400, "bad_request", "give exactly one of images, vectors or ids")
        asked = len(given[0]) * query.k
        if asked > config.max_hits:
            raise ApiError(
                422,
                "too_many_hits",
                f"{len(given[0])} queries x k={query.k} asks for {asked} hits; at most "
                f"{config.max_hits} per request: send fewer queries or a smaller k",
            )
        if query.label is not None:
            labels = await asyncio.to_thread(served_labels, served)
            if query.label not in labels:
                raise ApiError(400, "unknown_label", f"label {query.label!r} is not in the index")
        errors: list[schemas.ErrorDetail | None] = []
        rows: list[np.ndarray] | None = None  # None: the vectors of query.ids, read in the thread
        if query.blobs:
            embedded, errors = await embed_blobs(query.blobs)
            rows = [v for v in embedded if v is not None]
        elif query.vectors:
            rows = [check_vector(v, served.index.dim) for v in query.vectors]
            errors = [None] * len(rows)
        else:
            errors = [None] * len(query.ids or [])
        body, seconds = await asyncio.get_running_loop().run_in_executor(
            search_pool, search_answer, served, query, rows, errors, config.expose_paths
        )
        metrics.search_seconds.observe(seconds)
        return Response(body, media_type="application/json")

    @app.get("/v1/items/{item_id}", response_model=schemas.Item, tags=["items"])
    async def item(item_id: int = PathParam(ge=0, le=schemas.MAX_ID)) -> schemas.Item:
        """An indexed item's metadata, looked up by id."""
        found = await asyncio.to_thread(lookup, served_index(), item_id)
        return schemas.Item(
            id=found.id,
            label=found.label,
            sha256=found.sha256,
            bytes=found.bytes,
            width=found.width,
            height=found.height,
            url=f"/v1/items/{found.id}/image",
            path=path_text(found.path) if config.expose_paths else None,
        )

    @app.get("/v1/items/{item_id}/image", tags=["items"], response_class=Response)
    async def item_image(item_id: int = PathParam(ge=0, le=schemas.MAX_ID)) -> Response:
        """The indexed file itself, by id: exactly the bytes that were embedded, or 404."""
        found = await asyncio.to_thread(lookup, served_index(), item_id)
        data = await asyncio.to_thread(read_indexed, found.path, found.sha256)
        if data is None:
            raise ApiError(404, "gone", f"item {item_id}'s file changed or is gone since embed")
        name = os.path.basename(found.path)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        inline = kind.startswith("image/") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
        disposition = "inline" if inline else "attachment"
        safe_name = quote(os.fsencode(name), safe="")
        return Response(
            data,
            media_type=kind if inline else "application/octet-stream",
            headers={
                "Content-Disposition": f"{disposition}; filename*=UTF-8''{safe_name}",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "private, max-age=3600",
            },
        )

    @app.get("/v1/info", tags=["info"])
    async def info() -> dict[str, Any]:
        """The model (manifest summary, ONNX Runtime provider) and the index (count, version)."""
        ready()
        encoder = state.encoder
        assert encoder is not None
        m = encoder.manifest
        model: dict[str, Any] = {
            "sha256": model_sha256(encoder),
            "dim": m.embedding_dim,
            "input_size": m.input_size,
            "output": m.output,
            "method": m.source.get("method"),
            "arch": m.source.get("arch"),
            "epochs": m.source.get("epochs"),
            "backend": encoder.backend,
            "provider": encoder.provider,
            "device": encoder.device,
        }
        if config.expose_paths:
            model["path"] = path_text(encoder.path)
        index: dict[str, Any] | None = None
        served = state.served
        if served is not None:
            facts, version = await asyncio.to_thread(index_facts, served)
            index = {
                "items": facts["items"],
                "dim": facts["dim"],
                "type": facts["factory"],
                "nprobe": facts["nprobe"],
                "labels": len(facts["labels"]),
                "device": facts["search_device"],
                "version": version,
                "loaded_at": served.loaded_at,
                "reload_error": hide_paths(state.reload_error, config),
            }
            if config.expose_paths:
                index["path"] = path_text(facts["index"])
        service = {
            "version": __version__,
            "max_batch": config.max_batch,
            "max_delay_ms": config.max_delay_ms,
            "max_queue": config.max_queue,
            "max_hits": config.max_hits,
            "max_connections": config.max_connections,
            "queued_images": batcher.waiting,
            "ui": bool(config.ui and config.index),
        }
        return {"model": model, "index": index, "service": service}

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def prometheus() -> Response:
        """Prometheus metrics (text format)."""
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    if config.ui and config.index is not None:
        mount_ui(app, state, config)

    routes = [r for r in app.router.routes if getattr(r, "path", None) != UI_PATH]

    def endpoint(scope: dict) -> str:
        if is_ui(scope.get("path", "")):
            return UI_PATH
        for route in routes:
            if route.matches(scope)[0] == Match.FULL:
                return route.path  # the template: bounded label values
        return "other"

    from starlette.middleware.cors import CORSMiddleware

    from mocoserve.app.ui import FileRouteGuard

    app.add_middleware(FileRouteGuard)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(ApiKeys, keys=config.api_keys)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
        )
    app.add_middleware(InFlight, limit=config.max_connections)
    app.add_middleware(Boundary, metrics=metrics, endpoint=endpoint)
    return app


def mount_ui(app: FastAPI, state: ServiceState, config: ServiceConfig) -> None:
    """The Gradio page at /ui, searching the service's own model and index."""
    import gradio as gr

    from mocoserve.app.search import Searcher
    from mocoserve.app.ui import build_app

    searcher = Searcher(None, config.max_body_bytes)
    state.on_swap.append(lambda served: searcher.swap(served.index, served.lock))
    blocks = build_app(searcher)
    blocks.queue(default_concurrency_limit=2, max_size=256)
    keys = config.api_keys

    def login(_user: str, password: str) -> bool:
        valid = False
        for key in keys:
            valid |= hmac.compare_digest(password.encode(), key.encode())
        return valid

    gr.mount_gradio_app(
        app,
        blocks,
        path=UI_PATH,
        auth=login if keys else None,
        auth_message="Log in with any name and one of the service's API keys.",
        allowed_paths=[],
        max_file_size=config.max_body_bytes,
        show_error=False,
        footer_links=["api"],
    )


# --- plain functions the handlers use ---


def describe(errors: list[dict[str, Any]]) -> str:
    """Pydantic's errors as one sentence: `k: Input should be ... (and 2 more)`."""
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}{more}"


def from_base64(text: str) -> bytes | schemas.ErrorDetail:
    """An image sent as base64 (or a data: URL); a per-image error if it is not base64."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return schemas.ErrorDetail(code="bad_base64", message="this image is not valid base64")


class _Tail:
    """An ASGI receive channel that remembers the last `keep` bytes of the body it passes."""

    def __init__(self, receive: Callable[[], Any], keep: int) -> None:
        self.receive, self.keep, self.last = receive, keep, b""

    async def __call__(self) -> dict[str, Any]:
        message = await self.receive()
        if message["type"] == "http.request":
            self.last = (self.last + message.get("body", b""))[-self.keep :]
        return message


async def read_form(
    request: Request, max_files: int, options: tuple[str, ...]
) -> tuple[list[bytes], dict[str, str]]:
    """A multipart body's files and its `options` fields.

    A form that cannot be parsed, or that ends before its closing boundary (the parser
    keeps quiet about a body cut short: its last file would be lost or half-read), is a
    400; a field the form cannot carry (ids or vectors: JSON only) is a 400 or 422.
    """
    header = Message()  # the stdlib's parser of header parameters (a quoted boundary too)
    header["content-type"] = request.headers.get("content-type", "")
    boundary = str(header.get_param("boundary") or "").encode("latin-1", "replace")
    closing = b"--" + boundary + b"--"
    tail = _Tail(request.receive, len(closing) + 64)  # room for the CRLF or a short epilogue
    try:
        form = await Request(request.scope, tail).form(
            max_files=max_files, max_fields=max_files + 16
        )
    except Exception as e:  # MultiPartException and friends: a malformed body
        raise ApiError(400, "bad_request", f"the multipart form could not be read: {e}") from None
    try:
        if boundary and closing not in tail.last:
            raise ApiError(
                400,
                "bad_request",
                "the multipart form could not be read: it ends before its closing boundary "
                "(was the body cut short?)",
            )
        blobs, fields = [], {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                blobs.append(await value.read())
            elif name in options:
                fields[name] = value
            elif name in ("ids", "vectors") and options:
                raise ApiError(
                    400,
                    "bad_request",
                    f"{name} go in a JSON body; a multipart form carries image files "
                    f"(and {', '.join(options)})",
                )
            elif name == "images":
                raise ApiError(422, "invalid_request", "images: send each image as a file part")
            else:
                takes = f"image files and {', '.join(options)}" if options else "image files"
                raise ApiError(
                    422, "invalid_request", f"{name}: not a field (the form takes {takes})"
                )
        return blobs, fields
    finally:
        await form.close()


def hide_paths(message: str | None, config: ServiceConfig) -> str | None:
    """An error message for a client without the server's paths (unless --expose-paths).

    Names under the index's folder become relative to it (`out.faiss.shards/3/items.db`),
    any other absolute path its last part.
    """
    if message is None or config.expose_paths:
        return message
    if config.index is not None:
        folder = os.path.dirname(os.path.abspath(config.index))
        message = message.replace(folder.rstrip(os.sep) + os.sep, "")
    return _ABSOLUTE_PATH.sub(lambda m: os.path.basename(m[0].rstrip("/")) or "/", message)


_ABSOLUTE_PATH = re.compile(r"(?<![\w./-])/[^\s'\",:;()\[\]]*")


def check_vector(values: list[float], dim: int) -> np.ndarray:
    """A query vector as a float32 unit vector; a 400 if it has another size or no direction.

    Normalised here in float64, scaled by its largest entry first: a vector of 1e-30s (or
    1e30s) is a direction too, but its squared norm under- or overflows float32, where it
    would score 0 against everything.
    """
    vector = np.asarray(values, dtype=np.float64)
    if vector.shape != (dim,):
        raise ApiError(
            400, "bad_vector", f"query vectors must have {dim} numbers, not {len(values)}"
        )
    largest = float(np.max(np.abs(vector)))  # NaN if any entry is
    if not np.isfinite(largest) or largest == 0:
        raise ApiError(
            400, "bad_vector", "a query vector must be finite and not all zeros (normalisable)"
        )
    scaled = vector / largest
    return (scaled / np.linalg.norm(scaled)).astype(np.float32)


def search_rows(served: Served, rows: list[np.ndarray], k: int, label: str | None) -> list:
    if not rows:
        return []
    with served.lock:
        return served.index.search_vectors(np.stack(rows), k, label)


def search_answer(
    served: Served,
    query: Query,
    rows: list[np.ndarray] | None,
    errors: list[schemas.ErrorDetail | None],
    expose_paths: bool,
) -> tuple[bytes, float]:
    """A search's JSON answer (`SearchResponse`) and the seconds the index search took.

    Runs in a worker thread, from the search to the bytes: an answer of 10,000 hits is
    megabytes of JSON, and building it on the event loop stalled every other request
    (/healthz too). Plain dicts and orjson, not Pydantic: several times less CPU under
    the GIL, which the loop shares.
    """
    index = served.index
    if rows is None:  # by ids: their stored vectors
        assert query.ids is not None
        try:
            with served.lock:
                rows = list(index.vectors_of(query.ids))
        except DamagedIndex:
            raise
        except UserError:
            with served.lock:
                missing = [i for i in query.ids if i not in index.items([i])] or query.ids
            raise ApiError(404, "unknown_id", f"no item with id {missing[0]}") from None
    started = time.perf_counter()
    found = search_rows(served, rows, query.k, query.label)
    seconds = time.perf_counter() - started
    with served.lock:  # the index's SQLite connection is shared
        version = served.version
    results: list[dict[str, Any]] = []
    it = iter(found)
    for position, error in enumerate(errors):
        if error is not None:
            results.append({"query": position, "hits": [], "error": error.model_dump()})
            continue
        own = query.ids[position] if query.ids else None
        hits = [
            hit_fields(h, expose_paths, h.id == own if own is not None else h.is_query)
            for h in next(it)
            if query.min_score is None or h.score >= query.min_score
        ]
        results.append({"query": position, "hits": hits, "error": None})
    return orjson.dumps({"index_version": version, "results": results}), seconds


def hit_fields(h: Any, expose_paths: bool, is_query: bool) -> dict[str, Any]:
    """One `schemas.Hit` as a dict, for orjson."""
    fields = {
        "id": h.id,
        "score": h.score,
        "label": h.label,
        "width": h.width,
        "height": h.height,
        "url": f"/v1/items/{h.id}/image",
        "is_query": is_query,
    }
    if expose_paths:
        fields["path"] = path_text(h.path)  # not UTF-8: its bytes as \xNN
    return fields


def index_facts(served: Served) -> tuple[dict[str, Any], int]:
    """The index's facts and version for /v1/info (SQLite reads, under the index's lock)."""
    with served.lock:
        return served.index.info(), served.version


def served_labels(served: Served) -> set[str]:
    labels = getattr(served, "_labels", None)
    if labels is None:
        with served.lock:
            labels = set(served.index.labels())
        served._labels = labels  # type: ignore[attr-defined]
    return labels


def lookup(served: Served, item_id: int) -> Any:
    with served.lock:
        found = served.index.items([item_id]).get(item_id)
    if found is None:
        raise ApiError(404, "unknown_id", f"no item with id {item_id}")
    return found


def read_indexed(path: str, sha256: str) -> bytes | None:
    """The file's bytes if they are still the ones embedded (same sha256), else None."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha256 else None


def model_sha256(encoder: Any) -> str:
    """sha256 of the package's manifest.json (what an index records as its model), once."""
    if getattr(encoder, "_manifest_sha256", None) is None:
        encoder._manifest_sha256 = sha256_file(os.path.join(encoder.path, "manifest.json"))
    return encoder._manifest_sha256


def body_docs(model: type) -> dict[str, Any]:
    """OpenAPI: the body is JSON (this model), multipart files, or one raw image."""
    return {
        "requestBody": {
            "content": {
                "application/json": {"schema": model.model_json_schema()},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "images": {
                                "type": "array",
                                "items": {"type": "string", "format": "binary"},
                            },
                            "k": {"type": "integer"},
                            "label": {"type": "string"},
                            "min_score": {"type": "number"},
                        },
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            }
        }
    }
