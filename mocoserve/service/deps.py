"""What a handler needs, as `Annotated` dependencies (the FastAPI template's `deps.py`).

    async def info(state: ReadyState, config: ConfigDep) -> ...

Everything hangs off `app.state.runtime` (`get_runtime`); a test swaps any part with
`app.dependency_overrides[get_served] = ...`. The dependencies are `async def`: a plain
`def` would run in a thread on every request.

API keys are not a dependency: `middleware.ApiKeys` checks them before the body is read
and on every path (/docs, /openapi.json and unknown paths too, which no router owns).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from mocoserve.model import PackageEncoder
from mocoserve.service.errors import ApiError
from mocoserve.service.metrics import ServiceMetrics
from mocoserve.service.runtime import Runtime
from mocoserve.service.state import Served, ServiceConfig, ServiceState


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_config(runtime: RuntimeDep) -> ServiceConfig:
    return runtime.config


async def get_state(runtime: RuntimeDep) -> ServiceState:
    return runtime.state


async def get_metrics(runtime: RuntimeDep) -> ServiceMetrics:
    return runtime.metrics


ConfigDep = Annotated[ServiceConfig, Depends(get_config)]
StateDep = Annotated[ServiceState, Depends(get_state)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]


def check_ready(state: ServiceState) -> ServiceState:
    """The state if it can answer; a 503 with Retry-After while loading (or failed)."""
    if not state.ready:
        raise ApiError(503, state.status, f"the service is {state.status}", {"Retry-After": "5"})
    return state


def served_index(state: ServiceState) -> Served:
    """The index being served; a 503 while loading, a 404 for a service without one."""
    check_ready(state)
    if state.served is None:
        raise ApiError(404, "no_index", "this service has no index (started with --model only)")
    return state.served


async def get_ready_state(state: StateDep) -> ServiceState:
    return check_ready(state)


ReadyState = Annotated[ServiceState, Depends(get_ready_state)]


async def get_served(state: StateDep) -> Served:
    return served_index(state)


ServedDep = Annotated[Served, Depends(get_served)]


async def get_encoder(state: ReadyState) -> PackageEncoder:
    """The loaded model (every ready service has one: an index brings its own)."""
    assert state.encoder is not None
    return state.encoder


EncoderDep = Annotated[PackageEncoder, Depends(get_encoder)]
