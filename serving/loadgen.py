"""HTTP load for the serving benchmarks: N threads, an ``httpx.Client`` each, latency percentiles.

``run_load(send, requests=..., concurrency=...)`` calls ``send(client, i)`` for every request index
``i`` from a thread pool and returns a :class:`LoadStats` row (the benchmarks' JSON rows):

    {"concurrency", "requests", "errors", "p50_ms", "p95_ms", "throughput_rps", "wall_s"}

Each thread keeps one client (one keep-alive connection) for all its requests, so the figures hold
request handling, not connection set-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypedDict

import httpx
import numpy as np

__all__ = ["LoadStats", "Send", "percentile", "replica_torch_threads", "run_load"]

Send = Callable[[httpx.Client, int], httpx.Response]
"""Sends request number ``i`` (0-based, warm-up included) with the calling thread's client."""


class LoadStats(TypedDict):
    """One load level: counts as floats (JSON rows of numbers), latencies of successful requests only."""

    concurrency: float  # client threads
    requests: float  # measured requests (warm-up excluded)
    errors: float  # measured requests whose status was not 200
    p50_ms: float
    p95_ms: float
    throughput_rps: float  # successful requests / wall_s
    wall_s: float  # wall time of the measured requests, first sent to last answered


def percentile(values: Sequence[float], q: float) -> float:
    """``q``-th percentile (0..100) of non-empty ``values``, interpolating linearly between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    return float(np.percentile(values, q))


def run_load(send: Send, *, requests: int, concurrency: int, warmup: int = 0, timeout_s: float = 60.0,
             what: str = "benchmark requests") -> LoadStats:
    """Call ``send(client, i)`` for ``i`` in ``range(warmup + requests)`` from ``concurrency`` threads.

    The first ``warmup`` indices are sent first and not measured (connections, replicas, allocators
    warm); the next ``requests`` are timed one by one and as a whole. A status other than 200 counts
    as an error; an exception raised by ``send`` (e.g. a connection error) propagates. ``timeout_s``
    is each client's httpx timeout. Raises RuntimeError, naming ``what`` and the statuses seen, when
    no measured request succeeded.
    """
    if requests < 1 or concurrency < 1 or warmup < 0:
        raise ValueError(f"load needs requests >= 1, concurrency >= 1 and warmup >= 0, got requests={requests}, "
                         f"concurrency={concurrency}, warmup={warmup}")
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def one(i: int) -> tuple[float, int]:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=timeout_s)
            with lock:
                clients.append(client)
        t0 = time.perf_counter()
        status = send(client, i).status_code
        return time.perf_counter() - t0, status

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(one, range(warmup)))
            t0 = time.perf_counter()
            results = list(pool.map(one, range(warmup, warmup + requests)))
            wall = time.perf_counter() - t0
    finally:
        for c in clients:
            c.close()
    latencies = [t for t, status in results if status == 200]
    if not latencies:
        raise RuntimeError(f"all {requests} {what} failed (statuses {sorted({s for _, s in results})})")
    return {"concurrency": float(concurrency), "requests": float(requests),
            "errors": float(len(results) - len(latencies)),
            "p50_ms": percentile(latencies, 50) * 1e3, "p95_ms": percentile(latencies, 95) * 1e3,
            "throughput_rps": len(latencies) / wall, "wall_s": wall}


def environment() -> dict[str, Any]:
    """What a benchmark ran on: CPU count, Python, torch and Ray versions, and the ``RAY_SERVE_*``
    variables Ray runs with (they pick Ray Serve's proxy and transport)."""
    import ray
    import torch

    from serving.server import serve_env

    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__,
            "ray_serve_env": serve_env() or {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}}


def write_report(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write ``report`` as indented JSON to ``out`` (parents created) and return it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def replica_torch_threads(deployment: str, app_name: str) -> int:
    """Torch intra-op threads of a replica of ``deployment`` (its ``torch_threads()`` method).

    Asked from inside an event loop: in Ray Serve's throughput-optimized mode a handle's router runs
    on the caller's loop, and a plain ``.result()`` from this thread would have none.
    """
    from ray import serve

    async def ask() -> int:
        return int(await serve.get_deployment_handle(deployment, app_name).torch_threads.remote())

    return asyncio.run(ask())
