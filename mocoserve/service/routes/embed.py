"""POST /v1/embed: images in, L2-normalised embeddings out (JSON, or a .npy array)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from mocoserve.service import schemas
from mocoserve.service.deps import ConfigDep, EncoderDep, RuntimeDep
from mocoserve.service.errors import ApiError
from mocoserve.service.requests import body_docs, embed_images, read_query
from mocoserve.service.state import model_sha256

router = APIRouter(tags=["embeddings"])
NPY = "application/x-npy"


@router.post(
    "/v1/embed",
    response_model=schemas.EmbedResponse,
    openapi_extra=body_docs(schemas.EmbedRequest),
)
async def embed(
    request: Request, encoder: EncoderDep, runtime: RuntimeDep, config: ConfigDep
) -> Any:
    """Images -> L2-normalised embeddings (a per-image error for each bad image).

    Send multipart files, JSON `{"images": [base64, ...]}` or one image as the body.
    `Accept: application/x-npy` answers a float32 N x D array (NaN rows where an image
    failed; `X-Mocoserve-Errors` lists them).
    """
    query = await read_query(request, schemas.EmbedRequest, config)
    if not query.blobs:
        raise ApiError(400, "no_images", "send at least one image")
    vectors, errors = await embed_images(runtime, encoder, query.blobs)
    sha, dim = model_sha256(encoder), encoder.embedding_dim
    if NPY in request.headers.get("accept", ""):
        return npy_answer(vectors, errors, sha, dim)
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


def npy_answer(
    vectors: list[np.ndarray | None],
    errors: list[schemas.ErrorDetail | None],
    sha: str,
    dim: int,
) -> Response:
    """The embeddings as one float32 N x D .npy array: NaN rows where an image failed."""
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
