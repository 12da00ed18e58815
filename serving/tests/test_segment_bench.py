"""A tiny ``bench segment`` run and a segmenter-only application, beside the shared app on the same Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
from ray import serve

from serving.app import ServeArgs
from serving.bench_segment import bench_segment
from serving.server import run_server


def test_bench_segment_reports_cached_ratio_and_auto_latency(serve_url: str, segmenter_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "bench" / "segment.json"
    report = bench_segment(ServeArgs(segmenter_model_uri=str(segmenter_dir)), requests=4, out=out)
    assert json.loads(out.read_text()) == report
    for key in ("cached_ratio", "auto_p50_ms", "uncached_p50_ms", "cached_p50_ms"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    assert report["cached_ratio"] == pytest.approx(report["cached_p50_ms"] / report["uncached_p50_ms"])
    for kind in ("uncached", "cached"):
        rows = report["throughput"][kind]
        assert set(rows) == {"1", "8"}
        for row in rows.values():
            assert row["errors"] == 0 and row["requests"] == 4 and row["throughput_rps"] > 0
            assert 0 < row["p50_ms"] <= row["p95_ms"]
    assert report["auto"]["requests"] == 3 and report["auto"]["errors"] == 0
    assert report["raw"]["encoder_ms"] > 0 and report["raw"]["decoder_ms"] > 0
    assert report["cached_response_bytes_p50"] > 100  # a JSON answer with at least one mask
    assert report["model"]["task"] == "segmentation" and report["model"]["preset"] == "tiny"
    # Every uncached request ran the encoder once; the cached ones never did.
    assert report["model"]["encoder_runs"] == 3 + 2 * 4 + 3
    assert httpx.get(f"{serve_url}/healthz", timeout=10).status_code == 200  # shared app untouched


def test_segmenter_only_application_answers_404_for_detect(serve_url: str, segmenter_dir: Path) -> None:
    url = run_server(ServeArgs(segmenter_model_uri=str(segmenter_dir)), blocking=False, app_name="seg-only",
                     route_prefix="/seg-only")
    try:
        assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok", "models": ["sam-tiny"]}
        r = httpx.post(f"{url}/v1/detect", files={"image": ("x.png", b"png", "image/png")}, timeout=10)
        assert r.status_code == 404, r.text
        assert "this service has no detector" in r.json()["detail"]
    finally:
        serve.delete("seg-only")
