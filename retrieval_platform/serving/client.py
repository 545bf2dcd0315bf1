"""A client of the search endpoint that a lost replica, proxy or node does not reach.

Serve's HTTP proxy does not retry: a request in flight on an ingress replica that dies is
answered 500 (docs/RELIABILITY.md §2b), and a request to a proxy whose node is gone gets no
answer at all. A search is read-only, so sending it again is safe; this client does, with
exponential backoff and jitter, to the next of its URLs (one per node's proxy, or per
direct-ingress port), so that losing one replica or one proxy loses no request. 4xx answers
are the caller's mistake and are never retried.

    with SearchClient(["http://10.0.0.1:8000", "http://10.0.0.2:8000"]) as client:
        answer = client.search("cordless drill", k=10, mode="hybrid")
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from retrieval_platform.errors import PlatformError

# 500: the proxy's answer for a replica that died mid-request; 502/504: a gateway in front;
# 503: the service's own "a replica is down, retry"
RETRYABLE_STATUS = frozenset({500, 502, 503, 504})


class SearchError(PlatformError):
    """The endpoint refused the request (4xx), or no URL answered it within the attempts."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in all, per request
    backoff_s: float = 0.05  # the pause before the second try; doubled before each next one
    max_backoff_s: float = 1.0  # also caps a Retry-After the service sends

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"bad retry policy {self}: attempts >= 1, pauses >= 0")

    def pause_s(self, attempt: int, retry_after: str | None) -> float:
        """Before try ``attempt + 1`` (``attempt`` ≥ 1): full jitter, so that clients that
        failed together do not come back together."""
        pause = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        pause = random.uniform(0, pause)
        if retry_after is not None:
            with contextlib.suppress(ValueError):  # an HTTP date: keep ours
                pause = max(pause, min(self.max_backoff_s, float(retry_after)))
        return pause


class SearchClient:
    """POST /search against one or more URLs of the same application, retried on transport
    errors and on 500/502/503/504. ``retried`` counts the tries after a first failure (a
    measure of what the retries hid)."""

    def __init__(self, urls: str | Sequence[str], *, api_key: str | None = None,
                 timeout_s: float = 30.0, retry: RetryPolicy | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("SearchClient needs at least one URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.retry = retry or RetryPolicy()
        headers = dict(headers or {})
        if api_key:
            headers["X-API-Key"] = api_key
        self._http = httpx.Client(headers=headers, timeout=timeout_s)
        self._next = random.randrange(len(self.urls))  # spread clients over the URLs
        self.retried = 0

    def search(self, query: str, k: int = 10, mode: str = "dense", **fields: Any
               ) -> dict[str, Any]:
        """The answer's JSON (see the service's /docs for ``fields``: filters, rerank,
        user_id, allow_partial, ...)."""
        return self.post("/search", {"query": query, "k": k, "mode": mode, **fields}).json()

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST an idempotent request (a search; not a write that may not be repeated)."""
        failure = ""
        for attempt in range(1, self.retry.attempts + 1):
            url = self.urls[self._next]
            retry_after = None
            try:
                r = self._http.post(url + path, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out: try the next URL
                failure = f"{url}: {type(exc).__name__}"
                self._next = (self._next + 1) % len(self.urls)
            else:
                if r.status_code < 400:
                    return r
                if r.status_code not in RETRYABLE_STATUS:
                    raise SearchError(f"HTTP {r.status_code} from {url}: {_detail(r)}",
                                      r.status_code)
                failure = f"{url}: HTTP {r.status_code} {_detail(r)}"
                retry_after = r.headers.get("Retry-After")
                self._next = (self._next + 1) % len(self.urls)
            if attempt < self.retry.attempts:
                self.retried += 1
                time.sleep(self.retry.pause_s(attempt, retry_after))
        raise SearchError(f"no answer after {self.retry.attempts} tries (last: {failure}); is "
                          "the Serve application running (`retrieval-platform status`)?")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)[:500]
