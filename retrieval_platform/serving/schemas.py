"""The HTTP API's request and response models (validated by FastAPI; errors are 4xx)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrieval_platform.catalog.live import WriteOp, WriteResult

MAX_QUERY_CHARS = 512
MAX_K = 100
MAX_RERANK_DEPTH = 200
MAX_KEY_CHARS = 256
MAX_EVENTS = 256
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
    in_stock: bool | None = Field(None, description="true: only products not marked out of "
                                  "stock; false: only those marked out of stock")


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
    rerank: bool | None = Field(
        None, description="rerank the top rerank_depth with the cross-encoder (null: the "
                          "deployment's default; true where none is deployed: 400)")
    rerank_depth: int | None = Field(None, ge=1, le=MAX_RERANK_DEPTH,
                                     description="candidates reranked (null: the "
                                                 "deployment's default)")
    user_id: str | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS,
                                description="the shopper (an experiment's sticky assignment "
                                            "key; the log keeps only its hash)")
    session_id: str | None = Field(None, min_length=1, max_length=MAX_KEY_CHARS,
                                   description="the session: the assignment key when there "
                                               "is no user_id")

    @field_validator("k", "rerank_depth", mode="before")
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
    in_stock: bool | None = None
    first_stage_score: float | None = Field(None, description="a reranked hit's score before "
                                            "reranking (score is then the reranker's)")


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
    applied_position: int = Field(0, description="the catalog change log position this answer "
                                  "reflects: every write whose seq is at most this is in it")
    reranked: bool = Field(False, description="whether the cross-encoder ordered the results")
    rerank_error: str | None = Field(None, description="why a requested rerank did not happen "
                                     "(the reranker unavailable or too slow): the results are "
                                     "the first stage's")
    request_id: str = Field("", description="this answer's id: events (POST /events) name it")
    experiment: str | None = Field(None, description="the running experiment, if any")
    arm: str | None = Field(None, description="the experiment's arm that answered (A+B: two "
                            "arms interleaved)")
    assignment: Literal["key", "random"] | None = Field(
        None, description="key: the arm follows user_id, session_id or X-User-Id (sticky); "
                          "random: no key was given, the arm was drawn by weight")


class ShopperEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str = Field(..., min_length=1, max_length=64,
                            description="the request_id of the answer the product was in")
    product_id: str = Field(..., min_length=1, max_length=256)
    type: Literal["click", "add_to_cart", "order"]


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[ShopperEvent] = Field(..., min_length=1, max_length=MAX_EVENTS)


class EventsResponse(BaseModel):
    accepted: int = Field(..., description="events written to the log (all of the request's)")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    shards: ShardStatus


# ------------------------------------------------------------------------------------ writes

MAX_PRODUCT_ID_CHARS = 256


def _non_blank_title(value: str) -> str:
    if not value.strip(BLANK):
        raise ValueError("title must contain non-whitespace characters")
    return value


class ProductFields(BaseModel):
    """A whole product (``PUT /products/{id}``): the prepared catalog's fields. The text the
    encoder embeds is rendered from them exactly as the index build renders it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    title: str = Field(..., min_length=1, max_length=10_000,
                       json_schema_extra={"pattern": r"[^ \t\n\r\f\v]"})
    description: str | None = Field(None, max_length=100_000)
    brand: str | None = Field(None, max_length=256)
    category: str | None = Field(None, max_length=10_000,
                                 description="category path, 'Home > Kitchen > Kettles'")
    attributes: dict[str, str] | None = Field(None, max_length=256)
    price: float | None = Field(None, ge=0, allow_inf_nan=False)
    in_stock: bool | None = Field(None, description="false: out of stock (null: unknown, "
                                  "counted as in stock by the in_stock filter)")

    _title_not_blank = field_validator("title")(_non_blank_title)


class ProductPatch(BaseModel):
    """Some fields of a product (``PATCH /products/{id}``): price and in-stock change metadata
    only; a field the product's text is rendered from (title, description, brand, category,
    attributes) re-embeds it."""

    # at least one field: the schema says so (minProperties), the handler checks it
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"minProperties": 1})

    title: str = Field(None, min_length=1, max_length=10_000,  # type: ignore[assignment]
                       json_schema_extra={"pattern": r"[^ \t\n\r\f\v]"},
                       description="a new title (it cannot be removed)")
    description: str | None = Field(None, max_length=100_000)
    brand: str | None = Field(None, max_length=256)
    category: str | None = Field(None, max_length=10_000)
    attributes: dict[str, str] | None = Field(None, max_length=256)
    price: float | None = Field(None, ge=0, allow_inf_nan=False)
    in_stock: bool | None = None

    _title_not_blank = field_validator("title")(_non_blank_title)

    def changed(self) -> dict:
        fields = self.model_dump(exclude_unset=True)
        if not fields:
            raise ValueError("a patch must name at least one field")
        return fields


class BulkItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    op: Literal["upsert", "patch", "delete"]
    product_id: str = Field(..., min_length=1, max_length=MAX_PRODUCT_ID_CHARS)
    product: dict | None = Field(None, description="upsert: the whole product; patch: the "
                                 "fields to change; delete: absent")


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[BulkItem] = Field(..., min_length=1)


class WriteResponse(BaseModel):
    product_id: str
    op: Literal["upsert", "patch", "delete"]
    result: Literal["created", "updated", "patched", "deleted", "rejected"]
    status: int = Field(..., description="this write's HTTP status (per item in a bulk)")
    seq: int | None = Field(None, description="the change log position of this write: a "
                            "search whose applied_position is at least this reflects it")
    error: str | None = None


class BulkResponse(BaseModel):
    items: list[WriteResponse]
    errors: int = Field(..., description="items rejected (status >= 400); the others are "
                        "applied: a bulk request is per item, not all-or-nothing")
    position: int = Field(..., description="the highest seq this request wrote")


class ProductRecord(BaseModel):
    product_id: str
    record: dict
    position: int = Field(..., description="the writer's change log position")


def write_op(item: BulkItem) -> WriteOp | WriteResult:
    """A bulk item as a write, or its rejection (422) when its product does not validate."""
    try:
        if item.op == "delete":
            if item.product is not None:
                raise ValueError("a delete takes no product")
            return WriteOp("delete", item.product_id)
        if item.product is None:
            raise ValueError(f"an {item.op} needs a product")
        if item.op == "upsert":
            return WriteOp("upsert", item.product_id,
                           ProductFields.model_validate(item.product).model_dump())
        return WriteOp("patch", item.product_id,
                       ProductPatch.model_validate(item.product).changed())
    except (ValidationError, ValueError) as exc:
        message = (exc.errors(include_url=False, include_input=False)
                   if isinstance(exc, ValidationError) else str(exc))
        return WriteResult(item.product_id, item.op, 422, "rejected", error=str(message))
