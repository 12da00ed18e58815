"""The HTTP API over real HTTP against ONE real local Ray Serve (see ``conftest.serve_url``)."""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from serving.schemas import DetectResponse, ModelInfo, ModelList
from serving.server import serve_env

from .conftest import CLASS_NAMES, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

W, H = 320, 200


def _png(width: int = W, height: int = H) -> bytes:
    im = Image.new("RGB", (width, height), (90, 100, 90))
    ImageDraw.Draw(im).ellipse((30, 40, 120, 130), fill=(220, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(serve_url: str) -> httpx.Client:
    with httpx.Client(base_url=serve_url, timeout=30.0) as c:
        yield c


def _post_file(client: httpx.Client, data: bytes, **params: object) -> httpx.Response:
    return client.post("/v1/detect", files={"image": ("x.png", data, "image/png")}, params=params)


def _assert_inside(body: dict, width: int, height: int) -> DetectResponse:
    resp = DetectResponse.model_validate(body)
    assert (resp.width, resp.height) == (width, height)
    assert resp.model == "shapes-nano" and resp.precision == "float"
    assert resp.detections, "score_threshold=0 must return boxes even from untrained weights"
    for d in resp.detections:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert d.class_name == CLASS_NAMES[d.class_id] and 0 <= d.score <= 1
    return resp


def test_local_server_runs_behind_ray_serve_haproxy(client: httpx.Client, serve_url: str) -> None:
    # run_server started Ray in Serve's high-throughput mode: HAProxy fronts the port, its stats page
    # (on the free port run_server picked) lists the application's backend.
    env = serve_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # Only Ray's processes got them: a process this one starts must not inherit this Ray's ports.
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in os.environ
    stats = httpx.get(f"http://127.0.0.1:{env['RAY_SERVE_HAPROXY_STATS_PORT']}/stats;csv", timeout=10)
    assert stats.status_code == 200
    assert any(row.startswith("http_frontend,FRONTEND,") for row in stats.text.splitlines()), stats.text[:500]
    assert client.get("/healthz").status_code == 200


def test_detect_multipart(client: httpx.Client) -> None:
    r = _post_file(client, _png(), score_threshold=0.0, max_detections=5)
    assert r.status_code == 200, r.text
    assert len(_assert_inside(r.json(), W, H).detections) <= 5


def test_detect_json_base64(client: httpx.Client) -> None:
    body = {"image_b64": base64.b64encode(_png(200, 300)).decode(), "score_threshold": 0.0,
            "max_detections": 7, "model": "shapes-nano"}
    r = client.post("/v1/detect", json=body)
    assert r.status_code == 200, r.text
    assert len(_assert_inside(r.json(), 200, 300).detections) <= 7


def test_detect_format_image_returns_png_of_original_size(client: httpx.Client) -> None:
    r = _post_file(client, _png(), format="image", score_threshold=0.0, max_detections=3)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert 1 <= int(r.headers["x-detections"]) <= 3
    with Image.open(io.BytesIO(r.content)) as im:
        im.load()
        assert im.format == "PNG" and im.size == (W, H)


def test_healthz_and_models(client: httpx.Client, model_dir: Path) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "models": ["shapes-nano", "sam-tiny"]}  # detector, segmenter
    r = client.get("/v1/models")
    assert r.status_code == 200, r.text
    info, _segmenter = ModelList.model_validate(r.json()).models
    assert isinstance(info, ModelInfo)
    assert info.name == "shapes-nano" and info.uri == str(model_dir)
    assert info.precision == "float" and info.version is None and info.alias is None
    assert info.class_names == list(CLASS_NAMES) and info.max_batch_size == 16


def test_openapi_declares_errors_and_both_bodies(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/detect"]["post"]
    assert {"400", "404", "413", "422"} <= set(op["responses"])
    assert set(op["requestBody"]["content"]) == {"multipart/form-data", "application/json"}


def _huge_small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, format="PNG")  # 4 Mpx in a few KB
    assert len(buf.getvalue()) < 50_000
    return buf.getvalue()


def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((side, side), 80).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


BAD_CASES = [
    ("non-image bytes", lambda c: _post_file(c, b"this is not an image at all"), 400,
     "not a recognised image"),
    ("truncated png", lambda c: _post_file(c, _noise_png(64)[:3000]), 400, "truncated"),
    ("over byte limit", lambda c: _post_file(c, _noise_png(400)), 413, f"limit is {MAX_IMAGE_BYTES} bytes"),
    ("over byte limit json", lambda c: c.post("/v1/detect", json={
        "image_b64": base64.b64encode(_noise_png(400)).decode()}), 413, "bytes"),
    ("over pixel limit", lambda c: _post_file(c, _huge_small_png()), 413,
     f"2000x2000 = 4000000 pixels; the limit is {MAX_IMAGE_PIXELS}"),
    ("missing multipart field", lambda c: c.post("/v1/detect", files={"file": ("x.png", _png())}), 422,
     "field 'image' is missing"),
    ("unknown multipart field", lambda c: c.post("/v1/detect", files={"image": ("x.png", _png(), "image/png")},
                                                 data={"score_treshold": "0.5"}), 422,
     "unknown multipart field(s) ['score_treshold']"),
    ("missing json field", lambda c: c.post("/v1/detect", json={"score_threshold": 0.5}), 422,
     "body.image_b64: Field required"),
    ("bad base64", lambda c: c.post("/v1/detect", json={"image_b64": "not*base64!"}), 400,
     "image_b64 is not valid base64"),
    ("threshold above 1", lambda c: _post_file(c, _png(), score_threshold=1.5), 422,
     "query.score_threshold: Input should be less than or equal to 1"),
    ("threshold not a number", lambda c: _post_file(c, _png(), iou_threshold="high"), 422,
     "query.iou_threshold"),
    ("json threshold below 0", lambda c: c.post("/v1/detect", json={
        "image_b64": base64.b64encode(_png()).decode(), "score_threshold": -0.1}), 422,
     "body.score_threshold: Input should be greater than or equal to 0"),
    ("bad format", lambda c: _post_file(c, _png(), format="gif"), 422, "query.format"),
    ("unknown model (query)", lambda c: _post_file(c, _png(), model="foo"), 404,
     "model 'foo' is not loaded; this service serves 'shapes-nano'"),
    ("unknown model (json)", lambda c: c.post("/v1/detect", json={
        "image_b64": base64.b64encode(_png()).decode(), "model": "detector@champion"}), 404,
     "'detector@champion' is not loaded"),
    ("unsupported content type", lambda c: c.post("/v1/detect", content=b"abc",
                                                  headers={"content-type": "text/plain"}), 415,
     "unsupported content type 'text/plain'"),
]


@pytest.mark.parametrize(("case", "send", "status", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_a_4xx_with_detail(client: httpx.Client, case: str, send, status: int,
                                        message: str) -> None:
    r = send(client)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and message in detail, detail


def test_still_serving_after_bad_input(client: httpx.Client) -> None:
    for send in (lambda: _post_file(client, b"junk"), lambda: _post_file(client, _png(), model="nope")):
        assert send().status_code in {400, 404}
    r = _post_file(client, _png(), score_threshold=0.0)
    assert r.status_code == 200, r.text
    _assert_inside(r.json(), W, H)


def test_concurrent_requests_all_succeed(serve_url: str) -> None:
    images = [_png(160 + 8 * i, 120 + 4 * i) for i in range(16)]

    def one(i: int) -> tuple[int, dict]:
        with httpx.Client(base_url=serve_url, timeout=60.0) as c:
            r = _post_file(c, images[i], score_threshold=0.0)
            return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(16)))
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        _assert_inside(body, 160 + 8 * i, 120 + 4 * i)  # each answer belongs to its own image


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def _total(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_prometheus_text_and_count(client: httpx.Client) -> None:
    before = _samples(client.get("/metrics").text)
    assert _post_file(client, _png(), score_threshold=0.0).status_code == 200
    assert _post_file(client, b"junk").status_code == 400
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = _samples(r.text)
    ok = {"endpoint": "/v1/detect", "method": "POST", "status": "200"}
    assert _total(after, "modelcommons_http_requests_total", **ok) == \
        _total(before, "modelcommons_http_requests_total", **ok) + 1
    bad = {"endpoint": "/v1/detect", "status": "400"}
    assert _total(after, "modelcommons_http_errors_total", **bad) == \
        _total(before, "modelcommons_http_errors_total", **bad) + 1
    labels = {"model": "shapes-nano", "version": "none"}
    assert _total(after, "modelcommons_detect_latency_seconds_count", **labels) == \
        _total(before, "modelcommons_detect_latency_seconds_count", **labels) + 1
    buckets = [s for s in after["modelcommons_detect_latency_seconds_bucket"]
               if s.labels["model"] == "shapes-nano"]
    assert {s.labels["le"] for s in buckets} >= {"0.1", "+Inf"}
    assert _total(after, "modelcommons_detect_latency_seconds_sum", **labels) > 0

