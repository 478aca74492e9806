"""Closed-loop HTTP clients for the benchmarks: each client sends one image to ``POST /segment``,
waits for the answer, sends the next."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np


def closed_loop(
    url: str,
    image: bytes,
    clients: int,
    *,
    per_client: int | None = None,
    seconds: float | None = None,
    params: dict[str, str] | None = None,
    ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
) -> dict[str, Any]:
    """``clients`` threads, each ``per_client`` requests or until ``seconds`` have passed.
    Returns clients, requests, errors (answers ``ok`` refuses), throughput (req/s), p50/p99
    latency (ms) and the wall time (s)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = None if seconds is None else time.perf_counter() + seconds

    def client(_: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=120) as c:
            c.get("/healthz")  # connected before the first timed request
            sent = 0
            while (per_client is None or sent < per_client) and (deadline is None or time.perf_counter() < deadline):
                t = time.perf_counter()
                r = c.post("/segment", params=params, content=image, headers={"content-type": "image/jpeg"})
                dt = (time.perf_counter() - t) * 1000
                sent += 1
                with lock:
                    latencies.append(dt)
                    errors += not ok(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / wall,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "wall": wall,
    }
