"""What the HTTP benchmarks share: timed requests from concurrent clients, and new images.

Standard library only at the top: `artalign --help` imports the benchmarks that use it.
"""

from __future__ import annotations

import io
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx


@dataclass
class EndpointResult:
    endpoint: str
    requests: int
    ok: int
    refused: int  # 503: the service's inference limit said "come back later"
    failed: int
    p50_ms: float
    p95_ms: float
    mean_ms: float
    throughput_rps: float
    max_ms: float = float("nan")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between closest ranks; NaN when empty."""
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def new_image(image: Any, rng: random.Random) -> bytes:
    """PNG bytes of a random 85-100 % crop of ``image``, flipped half the time: a new image."""
    from PIL import ImageOps

    width, height = image.size
    w, h = int(width * rng.uniform(0.85, 1.0)), int(height * rng.uniform(0.85, 1.0))
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    new = image.crop((x, y, x + w, y + h))
    if rng.random() < 0.5:
        new = ImageOps.mirror(new)
    buffer = io.BytesIO()
    new.save(buffer, "PNG")
    return buffer.getvalue()


async def load_requests(client: httpx.AsyncClient, name: str, total: int, clients: int,
                        make_request: Callable[[int], Awaitable[httpx.Response]],
                        ok_status: tuple[int, ...] = (200,)) -> EndpointResult:
    """``total`` calls of ``make_request(index)`` shared by ``clients`` concurrent workers;
    answers in ``ok_status`` are timed, 503s counted as refused, the rest as failed."""
    import asyncio

    import httpx

    latencies: list[float] = []
    counts = {"ok": 0, "refused": 0, "failed": 0}
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < total:
            index = next_index
            next_index += 1  # one event loop thread: no lock needed
            start = time.perf_counter()
            try:
                response = await make_request(index)
            except httpx.HTTPError:
                counts["failed"] += 1
                continue
            elapsed = time.perf_counter() - start
            if response.status_code in ok_status:
                counts["ok"] += 1
                latencies.append(elapsed * 1000)
            elif response.status_code == 503:
                counts["refused"] += 1
            else:
                counts["failed"] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    return EndpointResult(
        endpoint=name, requests=total, ok=counts["ok"], refused=counts["refused"],
        failed=counts["failed"], p50_ms=round(percentile(latencies, 50), 1),
        p95_ms=round(percentile(latencies, 95), 1),
        mean_ms=round(statistics.fmean(latencies), 1) if latencies else float("nan"),
        throughput_rps=round(counts["ok"] / wall, 2),
        max_ms=round(max(latencies), 1) if latencies else float("nan"),
    )
