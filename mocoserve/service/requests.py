"""A request's images, vectors or ids: read from its body, admitted, decoded and embedded.

A body is multipart files (and a search's options), JSON (base64 images, vectors or ids)
or one raw image (options in the query string): `read_query` reads each into a `Query`.
Images are admitted by their header's pixels before any decode (`decode_all`), then go
through the batcher (`embed_images`); a bad image is an error of its own, not the
request's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from mocoserve.core.decode import Decoded, Header, decode_bytes, read_header
from mocoserve.model import PackageEncoder
from mocoserve.service import schemas
from mocoserve.service.admission import SMALL_DECODE_PIXELS
from mocoserve.service.batching import QueueFull
from mocoserve.service.errors import ApiError, describe
from mocoserve.service.runtime import Runtime
from mocoserve.service.state import ServiceConfig

RAW_IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff"}
FORM_OPTIONS = ("k", "label", "min_score")  # a search's fields in a multipart form, beside files

Blob = bytes | schemas.ErrorDetail  # an image's bytes, or why it has none (bad base64)


@dataclass
class Query:
    """The images, vectors or ids of a search or embed request, and its options."""

    blobs: list[Blob] | None = None
    vectors: list[list[float]] | None = None
    ids: list[int] | None = None
    k: int = 10
    label: str | None = None
    min_score: float | None = None

    def take_options(self, opts: schemas.SearchRequest) -> None:
        self.k, self.label, self.min_score = opts.k, opts.label, opts.min_score


def search_options(fields: dict[str, str]) -> schemas.SearchRequest:
    """A search's options from a form's fields or the query string; a 422 if not valid."""
    try:
        return schemas.SearchRequest(**fields)  # type: ignore[arg-type]
    except ValidationError as e:
        raise ApiError(422, "invalid_request", describe(list(e.errors()))) from None


async def read_query(request: Request, json_model: type[BaseModel], config: ServiceConfig) -> Query:
    """The body of an embed (`EmbedRequest`) or search (`SearchRequest`) request."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    searching = json_model is schemas.SearchRequest
    if kind == "multipart/form-data":
        blobs, fields = await read_form(
            request, config.max_images + 1, FORM_OPTIONS if searching else ()
        )
        query = Query(blobs=list(blobs))
        if searching:
            query.take_options(search_options(fields))
    elif kind == "application/json":
        try:
            body: Any = json_model.model_validate_json(await request.body())
        except ValidationError as e:
            status = 400 if any(x["type"] == "json_invalid" for x in e.errors()) else 422
            raise ApiError(status, "invalid_request", describe(list(e.errors()))) from None
        query = Query(blobs=[from_base64(s) for s in body.images] if body.images else None)
        if isinstance(body, schemas.SearchRequest):
            query.vectors, query.ids = body.vectors, body.ids
            query.take_options(body)
    elif kind in RAW_IMAGE_TYPES:
        query = Query(blobs=[await request.body()])
        if searching:
            query.take_options(search_options(dict(request.query_params)))
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


def from_base64(text: str) -> Blob:
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
            else:
                raise not_a_form_field(name, options)
        return blobs, fields
    finally:
        await form.close()


def not_a_form_field(name: str, options: tuple[str, ...]) -> ApiError:
    """Why a multipart form cannot carry the field `name`."""
    if name in ("ids", "vectors") and options:
        return ApiError(
            400,
            "bad_request",
            f"{name} go in a JSON body; a multipart form carries image files "
            f"(and {', '.join(options)})",
        )
    if name == "images":
        return ApiError(422, "invalid_request", "images: send each image as a file part")
    takes = f"image files and {', '.join(options)}" if options else "image files"
    return ApiError(422, "invalid_request", f"{name}: not a field (the form takes {takes})")


async def decode_all(
    runtime: Runtime, encoder: PackageEncoder, blobs: list[Blob]
) -> list[Decoded | schemas.ErrorDetail]:
    """Each image decoded to the model's input, in the decode pool; large ones admitted first.

    Headers are read first: a request whose images hold more than --max-request-pixels
    together is a 413 before anything is decoded, and an image over --max-image-pixels
    fails alone.
    """
    config, metrics = runtime.config, runtime.metrics
    loop = asyncio.get_running_loop()
    limit = config.max_image_pixels
    datas = [b for b in blobs if isinstance(b, bytes)]
    # headers first (lazy opens, in the pool: a PNG's text chunks may need inflating)
    headers = await asyncio.gather(
        *(
            loop.run_in_executor(runtime.decode_pool, read_header, b, encoder.resize, limit)
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
            return decode_bytes(
                data,
                encoder.resize,
                encoder.input_size,
                max_pixels=limit,
                interpolation=encoder.interpolation,
            )
        finally:
            metrics.decode_seconds.observe(time.perf_counter() - started)

    async def decode(data: bytes, header: Header) -> Decoded:
        if header.error is not None:  # refused from its header: nothing to decode
            return Decoded("", len(data), 0, error=header.error, code=header.code)
        if header.cost <= SMALL_DECODE_PIXELS:
            return await loop.run_in_executor(runtime.decode_pool, timed, data)
        return await runtime.large_decodes.run(runtime.decode_pool, timed, data, cost=header.cost)

    done = iter(await asyncio.gather(*map(decode, datas, headers)))
    return [next(done) if isinstance(b, bytes) else b for b in blobs]


async def embed_images(
    runtime: Runtime, encoder: PackageEncoder, blobs: list[Blob]
) -> tuple[list[np.ndarray | None], list[schemas.ErrorDetail | None]]:
    """Each image's embedding (None where it failed) and its error (None where it embedded).

    The decoded images of every request go through the batcher; a full queue is a 503.
    """
    decoded = await decode_all(runtime, encoder, blobs)
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
            vectors = await runtime.batcher.embed(good)
        except QueueFull:
            raise ApiError(
                503, "busy", "the model's queue is full; try again", {"Retry-After": "1"}
            ) from None
    it = iter(vectors)
    return [next(it) if e is None else None for e in errors], errors


def body_docs(model: type[BaseModel]) -> dict[str, Any]:
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
