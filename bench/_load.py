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
    latencies_s: list[float] = field(default_factory=list)  # of the answered requests
    errors: int = 0  # non-2xx answers and transport errors
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        ms = np.asarray(self.latencies_s or [np.nan]) * 1000
        return {"offered_rps": self.offered_rps,
                "served_rps": round(len(self.latencies_s) / max(self.wall_s, 1e-9), 1),
                "p50_ms": round(float(np.percentile(ms, 50)), 1),
                "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": self.errors}


async def open_loop(base_url: str, request: Callable[[int], tuple[str, str, dict | None]],
                    rate: float, duration_s: float, headers: dict[str, str] | None = None,
                    timeout_s: float = 30.0) -> LoadResult:
    """``rate`` requests a second for ``duration_s``; ``request(i)`` gives the i-th one's
    (method, path, JSON body)."""
    result = LoadResult(offered_rps=rate)
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

        await asyncio.gather(*(one(i) for i in range(n)))
        result.wall_s = time.perf_counter() - start
    return result
