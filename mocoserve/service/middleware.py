"""The service's ASGI middleware: metrics and the error boundary, the in-flight limit, API
keys, the body limit."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from mocoserve.service.metrics import ServiceMetrics

log = logging.getLogger("mocoserve.serve")
OPEN_PATHS = ("/healthz", "/readyz")
UI_PATH = "/ui"


def is_ui(path: str) -> bool:
    return path == UI_PATH or path.startswith(UI_PATH + "/")


def key_is_valid(token: bytes, keys: list[bytes]) -> bool:
    """Whether `token` is one of `keys`: compared in constant time with every key, every time
    (no early exit to time)."""
    valid = False
    for key in keys:
        valid |= hmac.compare_digest(token, key)
    return valid


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


async def send_error(send: Any, status: int, code: str, message: str, headers=()) -> None:
    """An error answer written straight to ASGI (for middleware)."""
    body = json.dumps(error_body(code, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Boundary:
    """Outermost: counts and times every request; turns anything unexpected into one log line
    and a 500 body (Starlette's own handler would log a traceback)."""

    def __init__(self, app: Any, metrics: ServiceMetrics, endpoint: Callable[[dict], str]):
        self.app, self.metrics, self.endpoint = app, metrics, endpoint

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # 499 (nginx's "client closed request") until an answer starts: a client that went
        # away, or a connection closed at its body deadline, is not counted as a 500
        started, status = time.perf_counter(), [499]

        async def send_counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as e:  # a bug, not bad input: one line in the log, a plain 500
            log.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(e).__name__, e)
            if status[0] == 499:
                status[0] = 500
                await send_error(send, 500, "internal", "internal error")
        finally:
            endpoint = self.endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class InFlight:
    """At most `limit` requests in the app at once; beyond, a JSON 503 with Retry-After.

    The health checks are not counted and never refused: a busy service still answers its
    liveness probe. Open connections are not counted here (uvicorn's `limit_concurrency`
    counts them, so idle sockets could refuse everyone); `connections.py` bounds those.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path", "") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            message = f"{self.limit} requests are in progress (--max-connections); try again"
            await send_error(send, 503, "busy", message, [("retry-after", "1")])
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class ApiKeys:
    """`Authorization: Bearer KEY` on every route but the health checks, compared in constant
    time against every key. The UI (/ui) has Gradio's login instead (any name, a key as
    the password), since a browser cannot send the header."""

    def __init__(self, app: Any, keys: tuple[str, ...]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys or path in OPEN_PATHS or is_ui(path):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        token = header[7:].strip() if header[:7].lower() == b"bearer " else b""
        if not key_is_valid(token, self.keys):
            message = "an API key is required: Authorization: Bearer KEY"
            if token:
                message = "that API key is not valid"
            await send_error(send, 401, "unauthorized", message, [("www-authenticate", "Bearer")])
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413, before the app parses any of it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or is_ui(path):
            await self.app(scope, receive, send)  # Gradio bounds its own uploads
            return
        too_big = f"the request body is over {self.limit / 2**20:g} MB (--max-upload-mb)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await send_error(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(length) > self.limit:
                await send_error(send, 413, "too_large", too_big)
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, 413, "too_large", too_big)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
