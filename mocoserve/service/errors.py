"""The service's errors: one JSON shape, `{"error": {"code", "message"}}`, with its status.

Handlers raise `ApiError`; the exception handlers here turn it, FastAPI's validation
errors, Starlette's 404/405 and a damaged index into that shape. Messages never carry the
server's paths unless --expose-paths (`hide_paths`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mocoserve.index.files import DamagedIndex
from mocoserve.service.middleware import error_body
from mocoserve.service.state import ServiceConfig

log = logging.getLogger("mocoserve.serve")


class ApiError(Exception):
    """An answer other than 200: status, a code word and a sentence (and headers)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def describe(errors: list[dict[str, Any]]) -> str:
    """Pydantic's errors as one sentence: `k: Input should be ... (and 2 more)`."""
    if not errors:
        return "the request is not valid"
    first = errors[0]
    where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}{more}"


_ABSOLUTE_PATH = re.compile(r"(?<![\w./-])/[^\s'\",:;()\[\]]*")


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


async def api_error(_request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, ApiError)
    return JSONResponse(error_body(e.code, e.message), e.status, headers=e.headers)


async def http_error(_request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(error_body(code, str(e.detail)), e.status_code, headers=e.headers)


async def invalid(_request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return JSONResponse(error_body("invalid_request", describe(list(e.errors()))), 422)


def add_exception_handlers(app: FastAPI, config: ServiceConfig) -> None:
    """Every error the app answers, in one JSON shape."""

    async def damaged(_request: Request, e: Exception) -> JSONResponse:
        # the server's fault, not the client's: one log line, no server path in the answer
        log.error("the index is damaged: %s", e)
        message = hide_paths(f"the index is damaged: {e}", config)
        return JSONResponse(error_body("index_damaged", message), 503, {"Retry-After": "60"})

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(DamagedIndex, damaged)
    app.add_exception_handler(RequestValidationError, invalid)
