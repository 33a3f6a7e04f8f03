"""GET /v1/info (the model, the index, the service's settings) and GET /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from mocoserve import __version__
from mocoserve.core.files import path_text
from mocoserve.service.deps import ConfigDep, EncoderDep, MetricsDep, ReadyState, RuntimeDep
from mocoserve.service.errors import hide_paths
from mocoserve.service.state import Served, model_sha256

router = APIRouter()


@router.get("/v1/info", tags=["info"])
async def info(
    state: ReadyState, encoder: EncoderDep, runtime: RuntimeDep, config: ConfigDep
) -> dict[str, Any]:
    """The model (manifest summary, ONNX Runtime provider) and the index (count, version)."""
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
        "queued_images": runtime.batcher.waiting,
        "ui": bool(config.ui and config.index),
    }
    return {"model": model, "index": index, "service": service}


@router.get("/metrics", tags=["health"], response_class=Response)
async def prometheus(metrics: MetricsDep) -> Response:
    """Prometheus metrics (text format)."""
    body, kind = metrics.render()
    return Response(body, media_type=kind)


def index_facts(served: Served) -> tuple[dict[str, Any], int]:
    """The index's facts and version for /v1/info (SQLite reads, under the index's lock)."""
    with served.lock:
        return served.index.info(), served.version
