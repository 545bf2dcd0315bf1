"""HTTP guard of the ingress: the read key, the write key and request body size, checked
before any parsing. Writes (PUT, PATCH, DELETE, POST under ``/products``) need the write key
(``X-Write-Key``) and only it; everything else but the open paths needs the read key
(``X-API-Key``) when one is set."""

import hmac
import json
from typing import Any

# The settings of this process's Ingress replica (one per process), set by ``configure``.
SETTINGS: dict[str, Any] = {"api_key": None, "write_key": None, "max_body_bytes": 16_384,
                            "max_write_body_bytes": 4 << 20}
WRITE_METHODS = frozenset({"PUT", "PATCH", "DELETE", "POST"})
# POST /events: its schema bounds it (256 events of ids up to 64 + 256 characters, each up to
# 12 bytes JSON-escaped: under 1 MiB), so any body the schema allows fits; the read-path limit
# (max_body_bytes) would refuse valid posts
EVENTS_PATH, MAX_EVENTS_BODY_BYTES = "/events", 2 << 20


def configure(*, api_key: str | None, max_body_bytes: int, write_key: str | None = None,
              max_write_body_bytes: int = 4 << 20) -> None:
    SETTINGS.update(api_key=api_key.encode() if api_key else None,
                    write_key=write_key.encode() if write_key else None,
                    max_body_bytes=max_body_bytes, max_write_body_bytes=max_write_body_bytes)


# the methods of each write path: anything else is 405 with this Allow (Starlette's own 405
# names only the first route of a path, which serves one method each)
PRODUCT_METHODS = {"item": "DELETE, GET, PATCH, PUT", "bulk": "POST"}


def _allowed(path: str) -> str | None:
    if path == "/products:bulk":
        return PRODUCT_METHODS["bulk"]
    if path.startswith("/products/") and "/" not in path[len("/products/"):]:
        return PRODUCT_METHODS["item"]
    return None


def is_write(scope: dict) -> bool:
    return scope.get("method") in WRITE_METHODS and str(scope.get("path", "")).startswith(
        "/products")


class GuardMiddleware:
    """ASGI guard: API key (constant-time compare) and body size limit (413).

    The docs, the OpenAPI schema and the health check stay open without a key."""

    OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect"})

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        allow = _allowed(str(scope.get("path", "")))
        if allow is not None and scope.get("method") not in allow.split(", "):
            await _reply(send, 405, "method not allowed", [(b"allow", allow.encode())])
            return
        if is_write(scope):
            write_key, limit = SETTINGS["write_key"], SETTINGS["max_write_body_bytes"]
            # no write key: a read-only deployment, which the route itself says (403)
            if write_key is not None and not hmac.compare_digest(
                    headers.get(b"x-write-key", b""), write_key):
                await _reply(send, 401, "missing or wrong X-Write-Key header")
                return
        else:
            api_key, limit = SETTINGS["api_key"], SETTINGS["max_body_bytes"]
            if scope.get("path") == EVENTS_PATH:
                limit = MAX_EVENTS_BODY_BYTES
            protected = api_key is not None and scope.get("path") not in self.OPEN_PATHS
            if protected and not hmac.compare_digest(headers.get(b"x-api-key", b""), api_key):
                await _reply(send, 401, "missing or wrong X-API-Key header")
                return
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _reply(send, 413, f"request body over {limit} bytes")
            return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _reply(send, 413, f"request body over {limit} bytes")


class _BodyTooLarge(Exception):
    pass


async def _reply(send: Any, status: int, detail: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
