"""The HTTP API's request and response models (validated by FastAPI; errors are 4xx)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_QUERY_CHARS = 512
MAX_K = 100
BLANK = " \t\n\r\f\v"  # what a query may not consist of only (the schema's pattern)


class Filters(BaseModel):
    # strict: a JSON 0 is not a bool and "5" is not a number; the API rejects what it documents
    model_config = ConfigDict(extra="forbid", strict=True)

    category: str | None = Field(None, max_length=256,
                                 description="category path prefix, e.g. 'Home > Kitchen'")
    # Any two bounds are valid, as the schema says: a range with price_min above price_max
    # matches no product, and the answer is an empty result list (not an error the published
    # schema could not announce: JSON Schema cannot compare two fields).
    price_min: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="lowest price (inclusive)")
    price_max: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description="highest price (inclusive); below price_min, "
                                                "nothing matches")


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # the schema's pattern says what the service accepts: at least one character that is not an
    # ASCII space, tab or line break (_not_blank checks exactly that, with a readable message)
    query: str = Field(..., min_length=1, max_length=MAX_QUERY_CHARS,
                       json_schema_extra={"pattern": r"[^ \t\n\r\f\v]"},
                       description="the shopper's query")
    k: int = Field(10, ge=1, le=MAX_K, description="results to return")
    mode: Literal["dense", "lexical", "hybrid"] = Field(
        "dense", description="dense (the dual encoder), lexical (BM25) or hybrid (the index's "
                             "fusion of both: RRF by default)")
    filters: Filters | None = None
    allow_partial: bool = Field(
        False, description="answer from the shards that responded when some failed "
                           "(marked partial) instead of a 503")

    @field_validator("k", mode="before")
    @classmethod
    def _integral_number(cls, value: object) -> object:
        # JSON Schema's "integer" includes 82.0 (a number with no fractional part); strict
        # mode still refuses strings, booleans and 82.5
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        stripped = value.strip(BLANK)
        if not stripped:
            raise ValueError("query must contain non-whitespace characters")
        return stripped


class Hit(BaseModel):
    product_id: str
    title: str | None
    score: float
    shard: int | None = Field(None, description="the shard that returned it (dense results)")
    category: str | None = None
    price: float | None = None


class ShardStatus(BaseModel):
    answered: list[int]
    failed: list[int]


class SearchResponse(BaseModel):
    results: list[Hit]
    mode: str
    version: str
    model_id: str
    partial: bool = Field(False, description="true when some shards failed and "
                                             "allow_partial was set")
    shards: ShardStatus
    timings_ms: dict[str, float]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    shards: ShardStatus
