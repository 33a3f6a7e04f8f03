"""The FastAPI app of `mocoserve serve`: embeddings and similar-image search over HTTP.

    create_app(ServiceConfig(index=Path("out.faiss")))  ->  FastAPI (run it with uvicorn)

The app holds its `ServiceState` (`app.state.service`: the model and the index, loaded in
the background) and its `Runtime` (`app.state.runtime`: metrics, pools, the batcher);
handlers in `routes/` reach both through `deps.py`. Middleware, outermost first: metrics
and the last-resort error boundary, the in-flight limit, CORS (only with --cors-origin),
API keys, the body-size limit, Gradio's file route guard (with the page at /ui).
Connections (idle, header and body deadlines, a cap per client address) are bounded below
the app, in `connections.py`. Every error is `{"error": {"code", "message"}}` (`errors.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.routing import Match

from mocoserve import __version__
from mocoserve.service import schemas
from mocoserve.service.errors import add_exception_handlers
from mocoserve.service.middleware import UI_PATH, ApiKeys, BodyLimit, Boundary, InFlight, is_ui
from mocoserve.service.routes import embed, health, info, items, search
from mocoserve.service.runtime import Runtime
from mocoserve.service.state import ServiceConfig, ServiceState

ROUTERS = (health.router, embed.router, search.router, items.router, info.router)


def create_app(
    config: ServiceConfig,
    state: ServiceState | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The service's app; the model and index load in the background once it starts."""
    state = state or ServiceState(config)
    runtime = Runtime(config, state, on_fatal)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime.batcher.start()
        task = asyncio.get_running_loop().create_task(runtime.load_then_watch())
        try:
            yield
        finally:
            task.cancel()
            await runtime.stop()

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
    app.state.service, app.state.runtime = state, runtime
    add_exception_handlers(app, config)
    for router in ROUTERS:
        app.include_router(router)
    if config.ui and config.index is not None:
        from mocoserve.service.ui import mount_ui

        mount_ui(app, state, config)
    add_middleware(app, runtime)
    return app


def add_middleware(app: FastAPI, runtime: Runtime) -> None:
    """The middleware stack, innermost first (each one added wraps those before it)."""
    from starlette.middleware.cors import CORSMiddleware

    config = runtime.config
    if config.ui and config.index is not None:  # the Gradio page is mounted
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
    app.add_middleware(Boundary, metrics=runtime.metrics, endpoint=endpoint_names(app))


def endpoint_names(app: FastAPI) -> Callable[[dict], str]:
    """A request's endpoint label for the metrics: its route's template, bounded values."""
    # the app's own routes (/docs, /openapi.json, ...) and the routers' (newer FastAPI keeps
    # an included router as one route object, without a path, in app.router.routes)
    routes = [r for r in app.router.routes if getattr(r, "path", UI_PATH) != UI_PATH]
    routes += [r for router in ROUTERS for r in router.routes]

    def endpoint(scope: dict) -> str:
        if is_ui(scope.get("path", "")):
            return UI_PATH
        for route in routes:
            if route.matches(scope)[0] == Match.FULL:
                return route.path  # type: ignore[attr-defined]  # the template
        return "other"

    return endpoint
