"""``modelcommons bench segment``: what the image-embedding cache saves, and what automatic mode costs.

Everything runs on this machine, over loopback, against a segmenter-only application deployed as
``modelcommons-bench-segment`` under ``/bench-segment``. Every request asks for ``output=json`` with
one foreground point, on a 320x240 PNG:

- **uncached**: each request uploads a new image (its pixels differ, so its sha256 differs): decode,
  hash, image encoder, prompt decoder, answer;
- **cached**: each request names an already encoded image by ``image_id`` with a new point: prompt
  decoder and answer only (``cached_resend`` uploads the same image again instead);
- **automatic**: a new image with no prompt, with the deployment's default thresholds;
- throughput of the cached and uncached requests at client concurrency 1 and 8.

Headline figures at the JSON top level:

- ``cached_ratio`` = p50 latency of a cached prompt / p50 latency of an uncached request (target <= 0.15);
- ``auto_p50_ms`` = p50 latency of automatic mode.

``raw`` has the in-process encoder and decoder times with the replica's torch thread count, which
bound what any serving path can reach.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
from PIL import Image, ImageDraw
from ray import serve

from serving.app import ServeArgs
from serving.loadgen import LoadStats, Send, environment, percentile, replica_torch_threads, run_load, write_report
from serving.server import run_server, shutdown_server

BENCH_APP = "modelcommons-bench-segment"
BENCH_PREFIX = "/bench-segment"
CONCURRENCY_LEVELS: tuple[int, ...] = (1, 8)
WIDTH, HEIGHT = 320, 240
POINT = (65.0, 75.0)  # inside the red ellipse of every bench image
# The default model: an untrained ``tiny`` segmenter at the preset's largest input. At its 128 px
# default the encoder costs only about twice the prompt decoder plus the answer, so even in-process
# (``raw_cached_ratio``) a cached prompt could not get near 15% of an uncached request.
BENCH_TINY_IMG_SIZE = 256


def bench_images(count: int) -> list[bytes]:
    """``count`` distinct 320x240 PNGs with the same shapes; the background shade differs per image."""
    images = []
    for i in range(count):
        im = Image.new("RGB", (WIDTH, HEIGHT), (96, 110, 90))
        draw = ImageDraw.Draw(im)
        draw.ellipse((20, 30, 110, 120), fill=(220, 40, 40))
        draw.rectangle((150, 60, 260, 140), fill=(40, 60, 220))
        draw.polygon([(60, 220), (120, 140), (180, 220)], fill=(240, 210, 30))
        im.putpixel((WIDTH - 1 - i % WIDTH, HEIGHT - 1 - i // WIDTH % HEIGHT), (i % 251, 7, 7))  # a new sha256
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        images.append(buf.getvalue())
    return images


def _load(send: Send, *, requests: int, concurrency: int, warmup: int = 0) -> LoadStats:
    # A generous client timeout: automatic mode on a busy 2-core machine takes seconds per request.
    return run_load(send, requests=requests, concurrency=concurrency, warmup=warmup, timeout_s=120.0,
                    what="segment benchmark requests")


def raw_model_times(model_uri: str, image_png: bytes, *, threads: int, repeats: int = 20) -> dict[str, float]:
    """In-process p50 of the image encoder (one image) and of the prompt decoder (one point), in ms."""
    from serving.images import ImageLimits, decode_image
    from serving.schemas import SegmentParams
    from serving.segmenter import build_prompts, decode_prompts, encode_images, load_segmenter_model

    loaded = load_segmenter_model(model_uri)
    image = decode_image(image_png, ImageLimits(max_bytes=len(image_png), max_pixels=10**9))
    prompts = build_prompts(SegmentParams(points=[POINT], labels=[1]), WIDTH, HEIGHT)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def timed(fn: Callable[[], object]) -> float:
            for _ in range(3):
                fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return percentile(times, 50) * 1e3

        (embedding,) = encode_images(loaded, [image])
        encoder_ms = timed(lambda: encode_images(loaded, [image]))
        decoder_ms = timed(lambda: decode_prompts(loaded, embedding, prompts))
    finally:
        torch.set_num_threads(previous)
    return {"encoder_ms": encoder_ms, "decoder_ms": decoder_ms, "torch_threads": float(threads),
            "repeats": float(repeats)}


def bench_segment(args: ServeArgs, *, requests: int, out: Path, seed: int | None = None) -> dict[str, Any]:
    """Run the segmentation benchmark, write the JSON report to ``out`` and return it.

    ``args.segmenter_model_uri`` must be set; the detector is left out of the bench application.
    ``requests`` is the number of measured requests per level (automatic mode uses a quarter, >= 3).
    ``seed`` is only reported: the weight seed of an untrained model the caller built.
    """
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if not args.segmenter_model_uri:
        raise ValueError("bench segment needs a segmenter: set segmenter_model_uri")
    model_uri = args.segmenter_model_uri
    args = args.model_copy(update={"model_uri": ""})
    auto_requests = max(3, requests // 4)
    levels = len(CONCURRENCY_LEVELS)
    # Fresh images for: uncached levels, automatic mode, and the one image the cached prompts use.
    images = bench_images(requests * levels + auto_requests + 2 + 8)
    fresh = iter(range(len(images)))
    started_ray = not ray.is_initialized()
    results: dict[str, Any] = {}
    try:
        url = run_server(args, blocking=False, app_name=BENCH_APP, route_prefix=BENCH_PREFIX)
        endpoint = f"{url}/v1/segment"
        threads = replica_torch_threads("segmenter", BENCH_APP)
        prompt = json.dumps({"points": [list(POINT)], "labels": [1]})

        def upload(client: httpx.Client, index: int, body: str = prompt) -> httpx.Response:
            return client.post(endpoint, files={"image": ("bench.png", images[index], "image/png")},
                               data={"prompts": body})

        # Warm-up (first batches, allocator, connections); then one image whose id the cached prompts use.
        with httpx.Client(timeout=120.0) as client:
            for _ in range(2):
                upload(client, next(fresh)).raise_for_status()
            cached_index = next(fresh)
            first = upload(client, cached_index)
            first.raise_for_status()
        image_id = first.json()["image_id"]

        cached_bytes: list[int] = []

        def cached(client: httpx.Client, i: int) -> httpx.Response:
            x, y = 10 + (i * 37) % (WIDTH - 20), 10 + (i * 53) % (HEIGHT - 20)  # a new point every time
            r = client.post(endpoint, json={"image_id": image_id, "points": [[x, y]], "labels": [1]})
            cached_bytes.append(len(r.content))
            return r

        def uploads(indices: list[int]) -> Callable[[httpx.Client, int], httpx.Response]:
            return lambda client, i: upload(client, indices[i])

        uncached_rows, cached_rows = [], []
        for concurrency in CONCURRENCY_LEVELS:
            new_images = uploads([next(fresh) for _ in range(requests)])
            uncached_rows.append(_load(new_images, requests=requests, concurrency=concurrency))
            cached_rows.append(_load(cached, requests=requests, concurrency=concurrency, warmup=concurrency))
        resend = _load(lambda c, i: upload(c, cached_index), requests=requests, concurrency=1)
        auto_indices = [next(fresh) for _ in range(auto_requests)]
        auto_masks: list[int] = []

        def automatic(client: httpx.Client, i: int) -> httpx.Response:
            r = client.post(endpoint, files={"image": ("bench.png", images[auto_indices[i]], "image/png")})
            if r.status_code == 200:
                auto_masks.append(len(r.json()["masks"]))
            return r

        auto = _load(automatic, requests=auto_requests, concurrency=1)
        info = next(m for m in httpx.get(f"{url}/v1/models", timeout=30.0).json()["models"]
                    if m["task"] == "segmentation")
        results = {"uncached": uncached_rows, "cached": cached_rows, "resend": resend, "auto": auto,
                   "auto_masks": auto_masks, "info": info, "threads": threads,
                   "cached_bytes": cached_bytes}
    finally:
        if started_ray:
            shutdown_server()
        elif ray.is_initialized():
            serve.delete(BENCH_APP)
    raw = raw_model_times(model_uri, images[0], threads=results["threads"])
    uncached_1, cached_1 = results["uncached"][0], results["cached"][0]
    report: dict[str, Any] = {
        "cached_ratio": cached_1["p50_ms"] / uncached_1["p50_ms"],
        "auto_p50_ms": results["auto"]["p50_ms"],
        "uncached_p50_ms": uncached_1["p50_ms"],
        "cached_p50_ms": cached_1["p50_ms"],
        "cached_resend_ratio": results["resend"]["p50_ms"] / uncached_1["p50_ms"],
        "raw_cached_ratio": raw["decoder_ms"] / (raw["encoder_ms"] + raw["decoder_ms"]),
        "target_cached_ratio": 0.15,
        "definitions": {
            "cached_ratio": "p50 latency of a one-point prompt on a cached image sent by image_id / p50 latency "
                            "of the same prompt on a new image upload (concurrency 1, output=json)",
            "cached_resend_ratio": "the same, with the cached image uploaded again instead of its image_id",
            "raw_cached_ratio": "in-process model time only: prompt decoder / (image encoder + prompt decoder)",
            "auto_p50_ms": "p50 latency of automatic mode (no prompt) on a new image upload, default thresholds",
        },
        "throughput": {
            "uncached": {str(int(r["concurrency"])): r for r in results["uncached"]},
            "cached": {str(int(r["concurrency"])): r for r in results["cached"]},
        },
        "resend": results["resend"],
        "auto": {**results["auto"], "masks_mean": (sum(results["auto_masks"]) / len(results["auto_masks"])
                                                   if results["auto_masks"] else 0.0)},
        "raw": raw,
        # The answer's size follows the masks (an untrained model's are ragged): it costs in the replica
        # (RLE, polygons, JSON) and on every hop back to the client.
        "cached_response_bytes_p50": percentile(results["cached_bytes"], 50),
        "model": {**results["info"], "untrained_seed": seed},
        "image": {"width": WIDTH, "height": HEIGHT, "format": "PNG", "bytes": len(images[0])},
        "settings": {"requests": requests, "auto_requests": auto_requests, "segmenter_num_cpus":
                     args.segmenter_num_cpus, "max_batch_size": args.max_batch_size,
                     "encoder_batch_wait_timeout_s": args.batch_wait_timeout_s,
                     "torch_threads": results["threads"]},
        "environment": environment(),
    }
    return write_report(report, out)
