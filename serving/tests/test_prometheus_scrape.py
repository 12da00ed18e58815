"""A real Prometheus server scrapes the serving app's ``GET /metrics`` over HTTP.

Needs the ``prometheus`` and ``promtool`` binaries (Debian package ``prometheus``; ``.ci/run``
installs it). Reuses the session's one local Ray Serve (``conftest.serve_url``).
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving.schemas import DetectResponse

from .conftest import _free_port

SCRAPE_INTERVAL_S = 1
WAIT_S = 30.0  # bound on Prometheus start-up plus the first scrapes
DETECT_REQUESTS = 4
REQUESTS = "modelcommons_http_requests_total"
ERRORS = "modelcommons_http_errors_total"
LATENCY = "modelcommons_detect_latency_seconds"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name!r} is not on PATH: install the Debian package 'prometheus' as the "
                    "install_prometheus step of .ci/run does (apt-get install --no-install-recommends "
                    "prometheus)")
    return path


def _png(width: int = 96, height: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _write_config(path: Path, serve_url: str) -> None:
    url = urlsplit(serve_url)
    path.write_text(
        "global:\n"
        f"  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        "  - job_name: modelcommons-serving\n"
        f"    metrics_path: {url.path.rstrip('/')}/metrics\n"
        "    static_configs:\n"
        f"      - targets: ['{url.netloc}']\n"
    )


@contextmanager
def _prometheus(binary: str, tmp_path: Path, serve_url: str) -> Iterator[tuple[httpx.Client, Path]]:
    """A Prometheus server on 127.0.0.1 scraping the app every second; yields (API client, its log)."""
    config = tmp_path / "prometheus.yml"
    _write_config(config, serve_url)
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            yield client, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _query(client: httpx.Client, promql: str) -> list[dict]:
    r = client.get("/api/v1/query", params={"query": promql})
    assert r.status_code == 200, f"{promql}: HTTP {r.status_code} {r.text}"
    body = r.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _wait_for(client: httpx.Client, log: Path, promql: str, want: float) -> list[dict]:
    """Poll the instant query until its first value equals ``want`` (bounded by ``WAIT_S``)."""
    deadline = time.monotonic() + WAIT_S
    last: object = "no answer"
    while time.monotonic() < deadline:
        try:
            result = _query(client, promql)
        except httpx.TransportError as exc:  # still starting
            last = f"{type(exc).__name__}: {exc}"
        else:
            if result and float(result[0]["value"][1]) == want:
                return result
            last = result
        time.sleep(0.25)
    pytest.fail(f"{promql} did not become {want} within {WAIT_S:.0f} s (last: {last}); "
                f"prometheus log:\n{log.read_text()[-2000:]}")


def test_promtool_accepts_config_and_exposition(tmp_path: Path, serve_url: str) -> None:
    promtool = _tool("promtool")
    config = tmp_path / "prometheus.yml"
    _write_config(config, serve_url)
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True,
                             timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    with httpx.Client(base_url=serve_url, timeout=30.0) as app:
        # Make every metric family appear (a labelled family has no samples until first use).
        assert app.post("/v1/detect", files={"image": ("a.png", _png(), "image/png")}).status_code == 200
        assert app.post("/v1/detect", files={"image": ("a.png", b"not an image", "image/png")}).status_code == 400
        text = app.get("/metrics").text
    assert LATENCY + "_bucket" in text and ERRORS in text
    # promtool exits non-zero on a parse error and on lint problems (naming, units, counters).
    linted = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=30)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert linted.stdout.strip() == "" and linted.stderr.strip() == "", linted.stdout + linted.stderr


def test_prometheus_scrapes_requests_errors_and_latency(tmp_path: Path, serve_url: str) -> None:
    binary = _tool("prometheus")
    with _prometheus(binary, tmp_path, serve_url) as (client, log):
        _send_and_check(client, log, serve_url)


def _send_and_check(client: httpx.Client, log: Path, serve_url: str) -> None:
    with httpx.Client(base_url=serve_url, timeout=30.0) as app:
        responses = [app.post("/v1/detect", files={"image": ("a.png", _png(64 + 8 * i), "image/png")},
                              params={"score_threshold": 0.0, "max_detections": 3})
                     for i in range(DETECT_REQUESTS)]
        for r in responses:
            assert r.status_code == 200, r.text
        served = DetectResponse.model_validate(responses[0].json())
        bad = app.post("/v1/detect", files={"image": ("x.png", b"\x00definitely not an image", "image/png")})
        assert bad.status_code == 400, bad.text
        # No detect request follows, so these detect/error values are what every later scrape sees
        # (pytest runs tests one at a time; scrapes only add to the /metrics endpoint's own counter).
        expected = _samples(app.get("/metrics").text)

    model, version = served.model, served.version or "none"  # metrics label a missing version "none"
    count = _value(expected, LATENCY + "_count", model=model, version=version)
    ok = _value(expected, REQUESTS, endpoint="/v1/detect", method="POST", status="200")
    errors = _value(expected, ERRORS, endpoint="/v1/detect", status="400")
    assert count >= DETECT_REQUESTS and ok >= DETECT_REQUESTS and errors >= 1

    up = _wait_for(client, log, 'up{job="modelcommons-serving"}', 1.0)
    assert up[0]["metric"]["instance"] == urlsplit(serve_url).netloc
    sel = f'model="{model}",version="{version}"'
    _wait_for(client, log, f"{LATENCY}_count{{{sel}}}", count)
    _wait_for(client, log, f'{REQUESTS}{{endpoint="/v1/detect",method="POST",status="200"}}', ok)
    _wait_for(client, log, f'{ERRORS}{{endpoint="/v1/detect",status="400"}}', errors)

    buckets = _query(client, f"{LATENCY}_bucket{{{sel}}}")
    assert {b["metric"]["le"] for b in buckets} >= {"0.005", "1.0", "+Inf"}
    assert all(b["metric"]["model"] == model and b["metric"]["version"] == version for b in buckets)
    by_le = sorted((float(b["metric"]["le"]), float(b["value"][1])) for b in buckets)
    assert by_le[-1] == (math.inf, count)

    # The p90 Prometheus interpolates must lie in the bucket where the cumulative count reaches 90%.
    result = _query(client, f"histogram_quantile(0.9, {LATENCY}_bucket{{{sel}}})")
    assert len(result) == 1, result
    p90 = float(result[0]["value"][1])
    upper = next(i for i, (_, c) in enumerate(by_le) if c >= 0.9 * count)
    lower_le = by_le[upper - 1][0] if upper else 0.0
    assert math.isfinite(p90) and lower_le <= p90 <= by_le[upper][0], (p90, by_le)
