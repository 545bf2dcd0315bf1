"""HTTP guard of the ingress: API key and request body size, checked before any parsing."""

import hmac
import json
from typing import Any

# The settings of this process's Ingress replica (one per process), set by ``configure``.
SETTINGS: dict[str, Any] = {"api_key": None, "max_body_bytes": 16_384}


def configure(*, api_key: str | None, max_body_bytes: int) -> None:
    SETTINGS.update(api_key=api_key.encode() if api_key else None, max_body_bytes=max_body_bytes)


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
        api_key, limit = SETTINGS["api_key"], SETTINGS["max_body_bytes"]
        headers = dict(scope.get("headers") or [])
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


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
