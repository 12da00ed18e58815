"""``modelcommons bench serve``: what HTTP serving and dynamic batching cost and gain.

The same model is measured three ways, all on this machine and over loopback only:

1. raw in-process forward pass (``Detector.forward`` on a letterboxed batch) at batch 1 and 16, with
   the same number of torch threads as a serving replica;
2. ``POST /v1/detect`` over real HTTP with dynamic batching on (``max_batch_size=16``), at client
   concurrency 1 and 16;
3. the same with batching off (``max_batch_size=1``), applied to the running replicas through
   ``reconfigure`` (no restart).

Headline figures at the JSON top level:
- ``serving_overhead_ratio`` = p50 HTTP latency at concurrency 1 (batching off, so no batch wait)
  / p50 raw forward time at batch 1;
- ``batching_gain`` = throughput at concurrency 16 with batching / without.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
from PIL import Image, ImageDraw
from ray import serve

from serving.app import ServeArgs
from serving.loadgen import LoadStats, environment, percentile, replica_torch_threads, run_load, write_report
from serving.server import run_server, shutdown_server

BENCH_APP = "modelcommons-bench"
BENCH_PREFIX = "/bench"
CONCURRENCY_LEVELS: tuple[int, ...] = (1, 16)
RAW_BATCH_SIZES: tuple[int, ...] = (1, 16)
BATCHING_ON = 16
BATCHING_OFF = 1


def bench_image(width: int = 320, height: int = 240) -> bytes:
    """A deterministic PNG with a few shapes (the demo's kind of content), ``width`` x ``height``."""
    im = Image.new("RGB", (width, height), (96, 110, 90))
    draw = ImageDraw.Draw(im)
    draw.ellipse((20, 30, 110, 120), fill=(220, 40, 40))
    draw.rectangle((150, 60, 260, 140), fill=(40, 60, 220))
    draw.polygon([(60, 220), (120, 140), (180, 220)], fill=(240, 210, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def raw_forward(model_uri: str, image_png: bytes, *, batch_sizes: tuple[int, ...] = RAW_BATCH_SIZES,
                repeats: int = 20, threads: int = 1) -> dict[str, dict[str, float]]:
    """Time ``Detector.forward`` in this process on the letterboxed bench image, per batch size.

    Returns ``{"batch_<B>": {"p50_ms", "p95_ms", "ms_per_image", "images_per_s", "repeats"}}``.
    ``threads`` torch intra-op threads are used (a serving replica's count, for a fair ratio).
    """
    from components.models.preprocess import letterbox
    from serving.detector import load_model
    from serving.images import ImageLimits, decode_image

    loaded = load_model(model_uri)
    image = decode_image(image_png, ImageLimits(max_bytes=len(image_png), max_pixels=10**9))
    x, _ = letterbox(image, loaded.detector.config.img_size)  # (3, S, S)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, dict[str, float]] = {}
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                batch = x.expand(b, *x.shape).contiguous().to(loaded.device)  # (B, 3, S, S)
                reps = max(3, repeats if b == 1 else repeats // 4)
                for _ in range(2):  # warm-up: allocator and kernel selection
                    loaded.detector(batch)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    loaded.detector(batch)
                    times.append(time.perf_counter() - t0)
                p50 = percentile(times, 50)
                out[f"batch_{b}"] = {"p50_ms": p50 * 1e3, "p95_ms": percentile(times, 95) * 1e3,
                                     "ms_per_image": p50 * 1e3 / b, "images_per_s": b / p50,
                                     "repeats": float(reps)}
    finally:
        torch.set_num_threads(previous)
    return out


def http_load(url: str, image_png: bytes, *, concurrency: int, requests: int,
              warmup: int = 4) -> LoadStats:
    """Send ``requests`` multipart ``POST {url}/v1/detect`` from ``concurrency`` threads (one client each).

    At least ``concurrency`` unmeasured requests go first. Returns p50/p95 latency (ms), throughput
    (requests/s over the wall time) and the error count (see :func:`serving.loadgen.run_load`).
    """
    def detect(client: httpx.Client, _: int) -> httpx.Response:
        return client.post(f"{url}/v1/detect", files={"image": ("bench.png", image_png, "image/png")})

    return run_load(detect, requests=requests, concurrency=concurrency, warmup=max(warmup, concurrency),
                    timeout_s=60.0, what=f"benchmark requests to {url}")


def bench_serve(args: ServeArgs, *, requests_per_level: int, out: Path) -> dict[str, Any]:
    """Run the serving benchmark, write the JSON report to ``out`` and return it.

    Deploys the application as ``modelcommons-bench`` under ``/bench`` (beside any running app),
    measures with batching on and then off, and removes it again (shutting Ray down if it started it).
    """
    if requests_per_level < 1:
        raise ValueError(f"requests_per_level must be >= 1, got {requests_per_level}")
    image_png = bench_image()
    started_ray = not ray.is_initialized()
    configs: list[dict[str, Any]] = []
    threads = 1
    try:
        for batch_size in (BATCHING_ON, BATCHING_OFF):
            run_args = args.model_copy(update={"max_batch_size": batch_size})
            url = run_server(run_args, blocking=False, app_name=BENCH_APP, route_prefix=BENCH_PREFIX)
            info = httpx.get(f"{url}/v1/models", timeout=30.0).json()["models"][0]
            threads = replica_torch_threads("detector", BENCH_APP)
            for concurrency in CONCURRENCY_LEVELS:
                load = http_load(url, image_png, concurrency=concurrency, requests=requests_per_level)
                configs.append({"batching": batch_size > 1, "max_batch_size": batch_size,
                                "max_batch_size_reported": info["max_batch_size"],
                                "batch_wait_timeout_s": info["batch_wait_timeout_s"], **load})
        model_info = info
    finally:
        if started_ray:
            shutdown_server()
        elif ray.is_initialized():
            serve.delete(BENCH_APP)
    raw = raw_forward(args.model_uri, image_png, repeats=max(10, min(requests_per_level, 200)),
                      threads=threads)

    def row(batching: bool, concurrency: int) -> dict[str, Any]:
        return next(c for c in configs if c["batching"] == batching and c["concurrency"] == concurrency)

    report: dict[str, Any] = {
        "serving_overhead_ratio": row(False, 1)["p50_ms"] / raw["batch_1"]["p50_ms"],
        "batching_gain": row(True, 16)["throughput_rps"] / row(False, 16)["throughput_rps"],
        "serving_overhead_ratio_batching_on": row(True, 1)["p50_ms"] / raw["batch_1"]["p50_ms"],
        "definitions": {
            "serving_overhead_ratio": "p50 HTTP latency at concurrency 1 with batching off / p50 raw "
                                      "forward time at batch 1",
            "batching_gain": "HTTP throughput at concurrency 16 with max_batch_size 16 / with "
                             "max_batch_size 1",
        },
        "http": configs,
        "raw_forward": raw,
        "model": model_info,
        "image": {"width": 320, "height": 240, "bytes": len(image_png), "format": "PNG"},
        "settings": {"requests_per_level": requests_per_level, "num_cpus": args.num_cpus,
                     "num_gpus": args.num_gpus, "replicas": args.replicas,
                     "batch_wait_timeout_s": args.batch_wait_timeout_s, "torch_threads": threads},
        "environment": environment(),
    }
    return write_report(report, out)
