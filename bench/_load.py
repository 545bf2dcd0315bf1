"""Open-loop load: requests sent at fixed, scheduled times whatever the answers do, each one's
latency measured from its scheduled send time, so a slow answer cannot hold the next request
back and hide the queue it builds (no coordinated omission). Loopback only, bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass
class LoadResult:
    offered_rps: float
    duration_s: float = 0.0  # of the arrivals
    latencies_s: list[float] = field(default_factory=list)  # of the answered requests
    errors: int = 0  # non-2xx answers and transport errors
    unanswered: int = 0  # still open when the run's bound came: cancelled, counted apart
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        ms = np.asarray(self.latencies_s or [np.nan]) * 1000
        return {"offered_rps": self.offered_rps,
                # answers per second of arrivals (answers inside the grace period count)
                "served_rps": round(len(self.latencies_s) / max(self.duration_s, 1e-9), 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": self.errors,
                "unanswered": self.unanswered}


async def open_loop(base_url: str, request: Callable[[int], tuple[str, str, dict | None]],
                    rate: float, duration_s: float, headers: dict[str, str] | None = None,
                    timeout_s: float = 30.0, grace_s: float | None = None) -> LoadResult:
    """``rate`` requests a second for ``duration_s``; ``request(i)`` gives the i-th one's
    (method, path, JSON body). With ``grace_s``, the run ends ``grace_s`` after the last
    arrival: requests still open are cancelled (their connections closed, so the service
    drops them too) and counted as unanswered, so an overloaded run cannot leave a backlog
    that the next run measures."""
    result = LoadResult(offered_rps=rate, duration_s=duration_s)
    n = int(rate * duration_s)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s,
                                 limits=limits) as client:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            scheduled = start + i / rate
            await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
            method, path, body = request(i)
            try:
                r = await client.request(method, path, json=body)
                ok = r.status_code < 300
            except httpx.HTTPError:
                ok = False
            if ok:
                result.latencies_s.append(time.perf_counter() - scheduled)
            else:
                result.errors += 1

        tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
        bound = None if grace_s is None else duration_s + grace_s
        _, pending = await asyncio.wait(tasks, timeout=bound)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        result.unanswered = len(pending)
        result.wall_s = time.perf_counter() - start
    return result
