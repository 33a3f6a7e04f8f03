"""Request and response bodies of the HTTP service (Pydantic models; they make /openapi.json)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 1000
MAX_ID = 2**63 - 1  # ids are int64 (FAISS, SQLite): a larger one can name no item
ItemId = Annotated[int, Field(ge=0, le=MAX_ID)]


def _absent(value: object) -> bool:
    return value is None


class ErrorDetail(BaseModel):
    code: str = Field(description="A word a program can switch on, e.g. not_an_image")
    message: str = Field(description="A sentence for people")


class ErrorResponse(BaseModel):
    """Every error: the HTTP status says which kind, the body says what and why."""

    error: ErrorDetail


class EmbedRequest(BaseModel):
    """Images as base64 (or data: URLs), for clients that send JSON."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(min_length=1, description="base64-encoded image files")


class ModelFacts(BaseModel):
    sha256: str = Field(description="sha256 of the package's manifest.json")
    dim: int


class EmbedResponse(BaseModel):
    model: ModelFacts
    embeddings: list[list[float] | None] = Field(
        description="L2-normalised, one per image in order; null where the image failed"
    )
    errors: list[ErrorDetail | None] = Field(description="null where the image embedded")


class SearchRequest(BaseModel):
    """Query by images (base64), by vectors, or by indexed items' ids: exactly one of them."""

    model_config = ConfigDict(extra="forbid")
    images: list[str] | None = None
    vectors: list[list[float]] | None = None
    ids: list[ItemId] | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    label: str | None = Field(None, description="only items with this label")
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description="drop hits below it"
    )


class Hit(BaseModel):
    id: int
    score: float
    label: str | None
    width: int
    height: int
    url: str = Field(description="the indexed file, looked up by id")
    is_query: bool = Field(False, description="the query itself (a query by id)")
    path: str | None = Field(
        None, description="the server's path (only with --expose-paths)", exclude_if=_absent
    )


class QueryResult(BaseModel):
    query: int = Field(description="position of the query in the request")
    hits: list[Hit]
    error: ErrorDetail | None = None


class SearchResponse(BaseModel):
    index_version: int
    results: list[QueryResult]


class Item(BaseModel):
    id: int
    label: str | None
    sha256: str
    bytes: int
    width: int
    height: int
    url: str
    path: str | None = Field(
        None, description="the server's path (only with --expose-paths)", exclude_if=_absent
    )


class Health(BaseModel):
    status: str
