"""A tiny ``bench serve`` run, and a model that cannot load failing the deployment clearly.

Both deploy a second application beside the shared one on the same local Ray Serve.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from serving.app import ServeArgs
from serving.bench import bench_serve
from serving.server import ServeStartError, run_server


def test_bench_serve_reports_headline_ratios(serve_url: str, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench" / "serve.json"
    report = bench_serve(ServeArgs(model_uri=str(model_dir), num_cpus=0.5), requests_per_level=8, out=out)
    assert json.loads(out.read_text()) == report
    for key in ("serving_overhead_ratio", "batching_gain"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, report[key]
    rows = {(r["batching"], int(r["concurrency"])): r for r in report["http"]}
    assert set(rows) == {(True, 1), (True, 16), (False, 1), (False, 16)}
    for (batching, _), r in rows.items():
        assert r["errors"] == 0 and r["requests"] == 8
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["throughput_rps"] > 0
        # The batching switch reached the running replicas through reconfigure.
        assert r["max_batch_size_reported"] == (16 if batching else 1)
    raw = report["raw_forward"]
    assert raw["batch_1"]["p50_ms"] > 0 and raw["batch_16"]["ms_per_image"] > 0
    overhead = rows[(False, 1)]["p50_ms"] / raw["batch_1"]["p50_ms"]
    assert report["serving_overhead_ratio"] == pytest.approx(overhead)
    # The bench app is gone; the shared one still answers.
    assert httpx.get(f"{serve_url}/healthz", timeout=10).status_code == 200


def test_model_that_cannot_load_fails_the_deployment(serve_url: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ServeStartError, match=r"failed to deploy with model .*no-such-model") as info:
        run_server(ServeArgs(model_uri=str(missing)), blocking=False, app_name="broken",
                   route_prefix="/broken", timeout_s=60)
    message = str(info.value)
    assert "ModelLoadError" in message and "could not load model" in message, message
    assert "not a directory" in message, message
    assert httpx.get(f"{serve_url}/healthz", timeout=10).status_code == 200
