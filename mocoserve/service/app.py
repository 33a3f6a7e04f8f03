"""The FastAPI app of `mocoserve serve`: embeddings and similar-image search over HTTP.

    create_app(ServiceConfig(index=Path("out.faiss")))  ->  FastAPI (run it with uvicorn)

Handlers are thin: they parse and check the request, decode images off the event loop,
queue them for the `Batcher` (one model call for many requests) and search the current
index in a thread. Middleware, outermost first: metrics and the last-resort error
boundary, CORS (only with --cors-origin), API keys, the body-size limit, Gradio's file
route guard. Every error is `{"error": {"code", "message"}}`; nothing from a request is
ever used as a filesystem path (items are looked up by id).
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
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mocoserve import __version__
from mocoserve.core.errors import UserError
from mocoserve.core.images import IMAGE_EXTENSIONS
from mocoserve.core.manifest import sha256_file
from mocoserve.decode import Decoded, decode_bytes
from mocoserve.service import schemas
from mocoserve.service.batching import Batcher, BatchStats, QueueFull
from mocoserve.service.metrics import ServiceMetrics
from mocoserve.service.middleware import (
    UI_PATH,
    ApiKeys,
    BodyLimit,
    Boundary,
    error_body,
    is_ui,
)
from mocoserve.service.state import Served, ServiceConfig, ServiceState

log = logging.getLogger("mocoserve.serve")
NPY = "application/x-npy"
RAW_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}


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

    async def load_then_watch() -> None:
        try:
            await asyncio.to_thread(state.load)
        except (UserError, OSError) as e:
            if on_fatal is not None:
                on_fatal(str(e))  # the CLI stops the server and says it in one line
            else:
                log.error("cannot load: %s", e)
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
            await asyncio.to_thread(state.reload_if_changed)

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

    app = FastAPI(
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

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", describe(e.errors())), 422)

    # helpers
    def ready() -> None:
        if not state.ready and state.status != "reloading":
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

        def timed(data: bytes) -> Decoded:
            started = time.perf_counter()
            try:
                return decode_bytes(data, encoder.resize, encoder.input_size)
            finally:
                metrics.decode_seconds.observe(time.perf_counter() - started)

        jobs = [
            loop.run_in_executor(decode_pool, timed, b) if isinstance(b, bytes) else None
            for b in blobs
        ]
        done = await asyncio.gather(*(j for j in jobs if j is not None))
        it = iter(done)
        return [next(it) if j is not None else b for j, b in zip(jobs, blobs, strict=True)]

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
            try:
                form = await request.form(
                    max_files=config.max_images + 1, max_fields=config.max_images + 16
                )
            except Exception as e:  # MultiPartException and friends: a malformed body
                raise ApiError(400, "bad_request", f"cannot read the form: {e}") from None
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
            query = Query(blobs=[await f.read() for f in files])
            if json_model is schemas.SearchRequest:
                try:
                    opts = schemas.SearchRequest(
                        **{k: fields[k] for k in ("k", "label", "min_score") if k in fields}
                    )
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

    def hit(h: Any) -> schemas.Hit:
        return schemas.Hit(
            id=h.id,
            score=h.score,
            label=h.label,
            width=h.width,
            height=h.height,
            url=f"/v1/items/{h.id}/image",
            is_query=h.is_query,
            path=h.path if config.expose_paths else None,
        )

    # routes
    @app.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz() -> schemas.Health:
        """Live: the process answers."""
        return schemas.Health(status="ok")

    @app.get("/readyz", response_model=schemas.Health, tags=["health"])
    async def readyz() -> Any:
        """Ready: the model and index are loaded (503 while loading or reloading)."""
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
    async def search(request: Request) -> schemas.SearchResponse:
        """The k nearest indexed items to query images, vectors or indexed items' ids."""
        served = served_index()
        query = await read_query(request, schemas.SearchRequest)
        given = [x for x in (query.blobs, query.vectors, query.ids) if x]
        if len(given) != 1:
            raise ApiError(400, "bad_request", "give exactly one of images, vectors or ids")
        index = served.index
        if query.label is not None and query.label not in served_labels(served):
            raise ApiError(400, "unknown_label", f"label {query.label!r} is not in the index")
        errors: list[schemas.ErrorDetail | None] = []
        if query.blobs:
            embedded, errors = await embed_blobs(query.blobs)
            rows = [v for v in embedded if v is not None]
        elif query.vectors:
            rows = [check_vector(v, index.dim) for v in query.vectors]
            errors = [None] * len(rows)
        else:
            assert query.ids is not None
            try:
                with served.lock:
                    rows = list(index.vectors_of(query.ids))
            except UserError:
                missing = [i for i in query.ids if i not in index.items([i])]
                raise ApiError(404, "unknown_id", f"no item with id {missing[0]}") from None
            errors = [None] * len(rows)
        started = time.perf_counter()
        found = await asyncio.to_thread(search_rows, served, rows, query.k, query.label)
        metrics.search_seconds.observe(time.perf_counter() - started)
        results, it = [], iter(found)
        for position, error in enumerate(errors):
            if error is not None:
                results.append(schemas.QueryResult(query=position, hits=[], error=error))
                continue
            hits = next(it)
            if query.ids:
                own = query.ids[position]
                hits = [h.__class__(**{**h.to_dict(), "is_query": h.id == own}) for h in hits]
            if query.min_score is not None:
                hits = [h for h in hits if h.score >= query.min_score]
            results.append(schemas.QueryResult(query=position, hits=[hit(h) for h in hits]))
        return schemas.SearchResponse(index_version=served.version, results=results)

    @app.get("/v1/items/{item_id}", response_model=schemas.Item, tags=["items"])
    async def item(item_id: int = PathParam(ge=0)) -> schemas.Item:
        """An indexed item's metadata, looked up by id."""
        found = lookup(served_index(), item_id)
        return schemas.Item(
            id=found.id,
            label=found.label,
            sha256=found.sha256,
            bytes=found.bytes,
            width=found.width,
            height=found.height,
            url=f"/v1/items/{found.id}/image",
            path=found.path if config.expose_paths else None,
        )

    @app.get("/v1/items/{item_id}/image", tags=["items"], response_class=Response)
    async def item_image(item_id: int = PathParam(ge=0)) -> Response:
        """The indexed file itself, by id: exactly the bytes that were embedded, or 404."""
        found = lookup(served_index(), item_id)
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
            model["path"] = str(encoder.path)
        index: dict[str, Any] | None = None
        served = state.served
        if served is not None:
            with served.lock:
                facts = served.index.info()
            index = {
                "items": facts["items"],
                "dim": facts["dim"],
                "type": facts["factory"],
                "nprobe": facts["nprobe"],
                "labels": len(facts["labels"]),
                "device": facts["search_device"],
                "version": served.version,
                "loaded_at": served.loaded_at,
                "reload_error": state.reload_error,
            }
            if config.expose_paths:
                index["path"] = facts["index"]
        service = {
            "version": __version__,
            "max_batch": config.max_batch,
            "max_delay_ms": config.max_delay_ms,
            "max_queue": config.max_queue,
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


def check_vector(values: list[float], dim: int) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (dim,):
        raise ApiError(
            400, "bad_vector", f"query vectors must have {dim} numbers, not {len(values)}"
        )
    if not np.isfinite(vector).all() or not np.any(vector):
        raise ApiError(400, "bad_vector", "a query vector must be finite and not all zeros")
    return vector


def search_rows(served: Served, rows: list[np.ndarray], k: int, label: str | None) -> list:
    if not rows:
        return []
    with served.lock:
        return served.index.search_vectors(np.stack(rows), k, label)


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
