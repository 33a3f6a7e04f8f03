"""Liveness and readiness: /healthz and /readyz (open to all, never counted as in flight)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from mocoserve.service import schemas
from mocoserve.service.deps import StateDep
from mocoserve.service.middleware import error_body

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> schemas.Health:
    """Live: the process answers."""
    return schemas.Health(status="ok")


@router.get("/readyz", response_model=schemas.Health)
async def readyz(state: StateDep) -> Any:
    """Ready: able to answer (503 while loading; 200 during a reload: the old index serves)."""
    if not state.ready:
        code = state.status
        return JSONResponse(error_body(code, f"the service is {code}"), 503)
    return schemas.Health(status="ready")
