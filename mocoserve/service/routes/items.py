"""GET /v1/items/{id} and /v1/items/{id}/image: an indexed item, looked up by id.

Nothing from a request is used as a filesystem path or an offset: the id names a row of
the index, and its file (or tar member, at the offset its shard's listing gives) is served
only while its bytes are still the ones embedded.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from mocoserve.core.files import path_text
from mocoserve.core.images import IMAGE_EXTENSIONS
from mocoserve.index.items import ItemGone, item_bytes
from mocoserve.service import schemas
from mocoserve.service.deps import ConfigDep, StateDep, served_index
from mocoserve.service.errors import ApiError
from mocoserve.service.state import Served

router = APIRouter(tags=["items"])
ItemIdPath = Annotated[int, PathParam(ge=0, le=schemas.MAX_ID)]

# The index is looked up in the handler, not by `ServedDep`: FastAPI runs dependencies
# before it checks path parameters, and a bad id is a 422 whatever the service's state.


@router.get("/v1/items/{item_id}", response_model=schemas.Item)
async def item(item_id: ItemIdPath, state: StateDep, config: ConfigDep) -> schemas.Item:
    """An indexed item's metadata, looked up by id."""
    found = await asyncio.to_thread(lookup, served_index(state), item_id)
    return schemas.Item(
        id=found.id,
        label=found.label,
        sha256=found.sha256,
        bytes=found.bytes,
        width=found.width,
        height=found.height,
        url=f"/v1/items/{found.id}/image",
        path=path_text(found.path) if config.expose_paths else None,
    )


@router.get("/v1/items/{item_id}/image", response_class=Response)
async def item_image(item_id: ItemIdPath, state: StateDep) -> Response:
    """The indexed file (or tar member) itself, by id: exactly the bytes that were embedded,
    or 404 (code gone) saying why not."""
    found = await asyncio.to_thread(lookup, served_index(state), item_id)
    try:
        data = await asyncio.to_thread(item_bytes, found)
    except ItemGone as e:
        raise ApiError(404, "gone", f"item {item_id} cannot be served: {e}") from None
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


def lookup(served: Served, item_id: int) -> Any:
    """The item with this id (its catalog row); a 404 if there is none."""
    with served.lock:
        found = served.index.items([item_id]).get(item_id)
    if found is None:
        raise ApiError(404, "unknown_id", f"no item with id {item_id}")
    return found
