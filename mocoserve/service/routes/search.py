"""POST /v1/search: the k nearest indexed items to query images, vectors or items' ids.

The search and its JSON answer are built in the runtime's search pool, not on the event
loop: an answer of 10,000 hits is megabytes of JSON, and building it on the loop stalled
every other request (/healthz too).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from mocoserve.core.errors import UserError
from mocoserve.core.files import path_text
from mocoserve.index.files import DamagedIndex
from mocoserve.service import schemas
from mocoserve.service.deps import ConfigDep, EncoderDep, RuntimeDep, ServedDep
from mocoserve.service.errors import ApiError
from mocoserve.service.requests import Query, body_docs, embed_images, read_query
from mocoserve.service.state import Served

router = APIRouter(tags=["search"])


@router.post(
    "/v1/search",
    response_model=schemas.SearchResponse,
    openapi_extra=body_docs(schemas.SearchRequest),
)
async def search(
    request: Request,
    served: ServedDep,
    encoder: EncoderDep,
    runtime: RuntimeDep,
    config: ConfigDep,
) -> Response:
    """The k nearest indexed items to query images, vectors or indexed items' ids.

    At most `max_hits` (10,000) hits per request: k x the number of queries; more is a
    422 `too_many_hits`, before any work is done.
    """
    query = await read_query(request, schemas.SearchRequest, config)
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
        embedded, errors = await embed_images(runtime, encoder, query.blobs)
        rows = [v for v in embedded if v is not None]
    elif query.vectors:
        rows = [check_vector(v, served.index.dim) for v in query.vectors]
        errors = [None] * len(rows)
    else:
        errors = [None] * len(query.ids or [])
    body, seconds = await asyncio.get_running_loop().run_in_executor(
        runtime.search_pool, search_answer, served, query, rows, errors, config.expose_paths
    )
    runtime.metrics.search_seconds.observe(seconds)
    return Response(body, media_type="application/json")


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


def served_labels(served: Served) -> set[str]:
    """The index's labels, read once per loaded index."""
    labels = getattr(served, "_labels", None)
    if labels is None:
        with served.lock:
            labels = set(served.index.labels())
        served._labels = labels  # type: ignore[attr-defined]
    return labels


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

    Runs in a worker thread, from the search to the bytes. Plain dicts and orjson, not
    Pydantic: several times less CPU under the GIL, which the loop shares.
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
