"""The quantization inspector over real HTTP: an application with a small session store (2 sessions, a few
seconds of expiry) deployed beside the shared one on the same local Ray Serve."""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from components.quantize.inspector import LayerReport, ModelReport
from components.quantize.visualize import ModelGraph
from serving.schemas import EditResponse, InspectorInfo, LayerResponse, SessionInfo, SessionStatus

from .test_precision import build_model_pair, scene_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TTL_S = 20.0  # longer than any gap between two calls on a loaded 2-core machine; short enough to wait out once
MAX_SESSIONS = 2
MAX_EDIT_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # minmax: no clipping, so the int8 error is rounding only and its size is predictable (kl on flat
    # drawn scenes clips the stem's output hard: about 2 dB).
    return build_model_pair(tmp_path_factory.mktemp("inspect"), calibrator="minmax")


@pytest.fixture(scope="module")
def url(serve_url: str, model_pair: tuple[Path, Path]) -> Iterator[str]:
    from ray import serve

    from serving.app import ServeArgs
    from serving.server import run_server

    float_dir, int8_dir = model_pair
    args = ServeArgs(model_uri=str(float_dir), int8_model_uri=str(int8_dir), num_cpus=0.25,
                     inspector_max_sessions=MAX_SESSIONS, inspector_ttl_s=TTL_S,
                     inspector_max_edit_bytes=MAX_EDIT_BYTES)
    base = run_server(args, blocking=False, app_name="inspect", route_prefix="/inspect")
    try:
        yield base
    finally:
        serve.delete("inspect")


class InspectClient(httpx.Client):
    """An HTTP client on ``/v1/inspect`` that remembers the sessions it opened, to close them after a test."""

    def __init__(self, url: str) -> None:
        super().__init__(base_url=f"{url}/v1/inspect", timeout=60.0)
        self.info_url = f"{url}/v1/inspect"
        self.opened: list[str] = []

    def create(self, **fields: str) -> httpx.Response:
        """POST /sessions with a drawn scene as multipart ``image`` and ``fields`` as text fields."""
        r = self.post("/sessions", files={"image": ("scene.png", scene_png(), "image/png")}, data=fields)
        if r.status_code == 201:
            self.opened.append(r.json()["session_id"])
        return r


@pytest.fixture
def client(url: str) -> Iterator[InspectClient]:
    with InspectClient(url) as c:
        yield c
        for sid in c.opened:  # the store holds two: leave none behind for the next test
            c.delete(f"/sessions/{sid}")


def _create(client: InspectClient, **fields: str) -> httpx.Response:
    return client.create(**fields)


def _assert_histogram(stats: dict, numel: int) -> None:
    hist = stats["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 == 65
    assert sum(hist["counts"]) == numel
    assert hist["edges"][0] == pytest.approx(stats["min"]) and hist["edges"][-1] == pytest.approx(stats["max"])
    assert 0.0 <= stats["saturated_fraction"] <= 1.0


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_create_step_inspect_edit_cross_report_delete(client: InspectClient) -> None:
    r = _create(client, precision="int8")
    assert r.status_code == 201, r.text
    info = SessionInfo.model_validate(r.json())
    sid = info.session_id
    assert info.position == 0 and info.num_layers == len(info.layers) > 20
    assert info.precisions == ["int8"] * info.num_layers and info.precision == "int8"
    assert (info.image_width, info.image_height) == (160, 120) and info.model.input_size == 96
    assert info.model.name == "shapes-q" and info.model.class_names == ["circle", "rectangle", "triangle"]
    # The app names an int8 model: its calibrated ranges are used, and the answer says so.
    assert info.calibration.source == "int8_version" and info.calibration.method == "minmax"
    assert info.calibration.images == 4 and "ranges of the int8 version" in info.calibration.note
    assert 0 < (info.expires_at - datetime.now(UTC)).total_seconds() <= TTL_S
    stem = info.layers[0]
    assert (stem.op, stem.kind, stem.inputs) == ("Conv2d", "conv2d", ["images"])
    assert stem.output_shape[:2] == [1, 16] and stem.param_count == 16 * 3 * 3 * 3 + 16

    # STEP: layer 0 runs and is reported with everything a page draws.
    r = client.post(f"/sessions/{sid}/step")
    assert r.status_code == 200, r.text
    step = LayerResponse.model_validate(r.json())
    layer = step.layer
    assert step.session.position == 1 and layer.index == 0 and layer.name == stem.name
    assert layer.precision == "int8" and layer.output_shape == stem.output_shape
    assert layer.input_shapes == [[1, 3, 96, 96]] and layer.params["out_channels"] == 16
    assert layer.scales.weight is not None and len(layer.scales.weight) == 16
    assert layer.scales.output is not None and layer.scales.output > 0
    body = r.json()["layer"]
    _assert_histogram(body["output_stats"], _numel(layer.output_shape))
    _assert_histogram(body["input_stats"][0], _numel(layer.input_shapes[0]))
    _assert_histogram(body["weight_stats"], 16 * 3 * 3 * 3)
    assert layer.output_stats.dtype == "int8" and layer.weight_stats is not None
    assert layer.error is not None and isinstance(layer.error.sqnr_db, float) and layer.error.sqnr_db > 25
    assert 0.99 < layer.error.cosine <= 1.0 + 1e-9 and layer.error.mse >= 0
    assert layer.local_error is not None and isinstance(layer.local_error.sqnr_db, float)

    # Inspecting a layer that has run repeats its report; one that has not is a 409.
    again = client.get(f"/sessions/{sid}/layers/0")
    assert again.status_code == 200 and LayerReport.model_validate(again.json()["layer"]) == layer
    ahead = client.get(f"/sessions/{sid}/layers/5")
    assert ahead.status_code == 409 and "has not run yet" in ahead.json()["detail"]
    r = client.post(f"/sessions/{sid}/run_to", json={"index": 5})
    assert r.status_code == 200, r.text
    assert r.json()["layer"]["index"] == 5 and r.json()["session"]["position"] == 6
    picture = client.get(f"/sessions/{sid}/layers/0/image", params={"which": "weight"})
    assert picture.status_code == 200 and picture.content.startswith(PNG_SIGNATURE)

    # Edit: doubling output channel 2 of the stem changes that channel only, and re-runs the layer.
    r = client.post(f"/sessions/{sid}/layers/0/weights", json={"scale_channel": {"channel": 2, "factor": 2.0}})
    assert r.status_code == 200, r.text
    edit = EditResponse.model_validate(r.json())
    assert edit.session.position == 1 and edit.session.edited_layers == [0]
    assert 0 < edit.edit.changed_fraction <= 1 / 16 + 1e-9  # one of 16 channels
    assert edit.edit.change.mse > 0 and edit.edit.layer.index == 0
    # Setting every weight to zero leaves the bias alone: one value per channel, nothing else.
    zeros = [[[[0.0] * 3] * 3] * 3] * 16
    r = client.post(f"/sessions/{sid}/layers/0/weights", json={"values": zeros, "dtype": "float32"})
    assert r.status_code == 200, r.text
    out = EditResponse.model_validate(r.json()).edit.layer
    assert out.weight_stats is not None and out.weight_stats.min == out.weight_stats.max == 0.0
    assert out.output_stats.std < r.json()["edit"]["before_output"]["std"]

    # CROSS: from layer 3 on, float.
    r = client.post(f"/sessions/{sid}/cross", json={"index": 3, "to": "float"})
    assert r.status_code == 200, r.text
    status = SessionStatus.model_validate(r.json())
    assert status.precisions[:3] == ["int8"] * 3 and set(status.precisions[3:]) == {"float"}
    assert status.position == 1  # the zero-weight edit left layer 0 run; nothing after it

    r = client.get(f"/sessions/{sid}/report")
    assert r.status_code == 200, r.text
    report = ModelReport.model_validate(r.json())
    assert len(report.layers) == info.num_layers and report.calibrator == "minmax"
    assert report.precisions == {"int8": 3, "float": info.num_layers - 3}
    assert report.layers[0].error is not None and report.layers[0].local_error is not None
    assert all(row.local_error is None for row in report.layers[3:])  # float layers have no local error
    chart = client.get(f"/sessions/{sid}/report", params={"format": "png"})
    assert chart.status_code == 200 and chart.headers["content-type"] == "image/png"
    assert chart.content.startswith(PNG_SIGNATURE)

    r = client.get(f"/sessions/{sid}/graph")
    assert r.status_code == 200, r.text
    graph = ModelGraph.model_validate(r.json())
    assert len(graph.nodes) == info.num_layers + 1 and graph.nodes[0].op == "input"
    assert [n.precision for n in graph.nodes[1:4]] == ["int8", "int8", "int8"]
    assert {e.target for e in graph.edges} == {layer.name for layer in info.layers}
    picture = client.get(f"/sessions/{sid}/graph", params={"format": "png"})
    assert picture.status_code == 200 and picture.content.startswith(PNG_SIGNATURE)

    assert client.delete(f"/sessions/{sid}").status_code == 204
    client.opened.remove(sid)
    for gone in (client.get(f"/sessions/{sid}"), client.post(f"/sessions/{sid}/step")):
        assert gone.status_code == 404 and "unknown or closed" in gone.json()["detail"]


def test_calibrating_on_the_image_with_a_chosen_calibrator_over_json(client: InspectClient) -> None:
    r = client.post("/sessions", json={"image_b64": base64.b64encode(scene_png()).decode(),
                                       "precision": "hybrid", "calibrator": "log2"})
    assert r.status_code == 201, r.text
    client.opened.append(r.json()["session_id"])
    info = SessionInfo.model_validate(r.json())
    assert info.calibration.source == "image" and info.calibration.method == "log2"
    assert info.calibration.images == 5 and "augmented copies" in info.calibration.note
    layer = client.post(f"/sessions/{info.session_id}/step").json()["layer"]
    scale = layer["scales"]["output"]
    assert layer["precision"] == "hybrid" and scale == 2.0 ** round(math.log2(scale))


def test_info_lists_limits_calibrators_and_use(client: InspectClient) -> None:
    before = InspectorInfo.model_validate(client.get(client.info_url).json())
    assert (before.max_sessions, before.ttl_s, before.served_model) == (MAX_SESSIONS, TTL_S, "shapes-q")
    assert before.calibrators == ["minmax", "percentile", "kl", "log2"]
    assert before.precisions == ["float", "hybrid", "int8"]
    assert _create(client).status_code == 201
    after = InspectorInfo.model_validate(client.get(client.info_url).json())
    assert after.sessions == before.sessions + 1 and after.bytes_reserved > before.bytes_reserved


def _edit(client: InspectClient, sid: str, body: object, index: int = 0) -> httpx.Response:
    return client.post(f"/sessions/{sid}/layers/{index}/weights", json=body)


BAD_SESSION_CALLS = [
    ("layer out of range", lambda c, s: c.get(f"/sessions/{s}/layers/999"), 404,
     "out of range"),
    ("run_to out of range", lambda c, s: c.post(f"/sessions/{s}/run_to", json={"index": 999}), 404,
     "out of range"),
    ("negative layer", lambda c, s: c.get(f"/sessions/{s}/layers/-1"), 404, "out of range"),
    ("wrong-shape edit", lambda c, s: _edit(c, s, {"values": [[0.0, 1.0]]}), 422,
     "weights must have shape [16, 3, 3, 3], got [1, 2]"),
    ("ragged edit", lambda c, s: _edit(c, s, {"values": [[0.0, 1.0], [2.0]]}), 422, "rectangular"),
    ("int8 dtype edit", lambda c, s: _edit(c, s, {"values": [[0.0]], "dtype": "int8"}), 422, "body.dtype"),
    ("non-number edit", lambda c, s: _edit(c, s, {"values": [["a"]]}), 422, "weights must be numbers"),
    ("both edits", lambda c, s: _edit(c, s, {"values": [[0.0]], "scale_channel": {"channel": 0, "factor": 1}}),
     422, "exactly one of"),
    ("channel out of range", lambda c, s: _edit(c, s, {"scale_channel": {"channel": 16, "factor": 2}}), 422,
     "channel 16 out of range 0 .. 15"),
    ("edit a layer without weights", lambda c, s: _edit(c, s, {"scale_channel": {"channel": 0, "factor": 2}},
                                                        index=1), 422, "only Conv2d/Linear layers have weights"),
    ("edit body too large", lambda c, s: _edit(c, s, {"values": [[0.0] * 20_000]}), 413,
     f"over {MAX_EDIT_BYTES} bytes"),
    ("edit not json", lambda c, s: c.post(f"/sessions/{s}/layers/0/weights", content=b"x",
                                          headers={"content-type": "text/plain"}), 415, "application/json"),
    ("cross to an unknown precision", lambda c, s: c.post(f"/sessions/{s}/cross", json={"index": 0, "to": "fp8"}),
     422, "body.to"),
    ("unknown session", lambda c, s: c.get("/sessions/0123456789abcdef0123456789abcdef/layers/0"), 404,
     "'0123456789abcdef0123456789abcdef' is unknown or closed"),
    ("unknown picture", lambda c, s: c.get(f"/sessions/{s}/layers/0/image", params={"which": "bias"}), 422,
     "query.which"),
]


@pytest.mark.parametrize(("case", "send", "status", "message"), BAD_SESSION_CALLS,
                         ids=[c[0] for c in BAD_SESSION_CALLS])
def test_bad_session_calls_are_4xx_and_the_session_keeps_working(client: InspectClient, case: str, send,
                                                                 status: int, message: str) -> None:
    r = _create(client)
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    bad = send(client, sid)
    assert bad.status_code == status, bad.text
    assert bad.headers["content-type"] == "application/json"
    assert message in bad.json()["detail"], bad.json()
    ok = client.post(f"/sessions/{sid}/step")
    assert ok.status_code == 200, ok.text


BAD_CREATES = [
    ("unknown calibrator", {"calibrator": "entropy"}, 422,
     "unknown calibrator 'entropy'; allowed: ['minmax', 'percentile', 'kl', 'log2']"),
    ("unknown precision", {"precision": "fp16"}, 422, "form.precision"),
    ("percentile out of range", {"calibrator": "percentile", "percentile": "20"}, 422, "form.percentile"),
    ("not a model reference", {"model": "../../etc"}, 404, "is not a model reference"),
    ("unknown field", {"size": "64"}, 422, "unknown multipart field(s) ['size']"),
]


@pytest.mark.parametrize(("case", "fields", "status", "message"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
def test_bad_session_requests_are_4xx(client: InspectClient, case: str, fields: dict, status: int,
                                      message: str) -> None:
    r = _create(client, **fields)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()
    assert _create(client).status_code == 201


def test_too_many_sessions_is_429_until_one_closes(client: InspectClient) -> None:
    first, second = _create(client), _create(client)
    assert first.status_code == second.status_code == 201
    third = _create(client)
    assert third.status_code == 429, third.text
    assert f"too many inspector sessions ({MAX_SESSIONS} open)" in third.json()["detail"]
    assert client.delete(f"/sessions/{first.json()['session_id']}").status_code == 204
    assert _create(client).status_code == 201


def test_openapi_declares_the_inspector_routes_and_their_errors(client: InspectClient) -> None:
    spec = client.get(client.info_url.replace("/v1/inspect", "/openapi.json")).json()
    create = spec["paths"]["/v1/inspect/sessions"]["post"]
    assert {"201", "404", "413", "422", "429"} <= set(create["responses"])
    assert set(create["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    edit = spec["paths"]["/v1/inspect/sessions/{session_id}/layers/{index}/weights"]["post"]
    assert {"404", "409", "413", "415", "422"} <= set(edit["responses"])
    for path in ("/step", "/run_to", "/cross", "/report", "/graph", "/layers/{index}", "/layers/{index}/image", ""):
        methods = spec["paths"][f"/v1/inspect/sessions/{{session_id}}{path}"]
        assert all("404" in op["responses"] for op in methods.values()), path


def test_an_unused_session_expires(client: InspectClient) -> None:
    r = _create(client)
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    assert client.post(f"/sessions/{sid}/step").status_code == 200
    time.sleep(TTL_S + 0.5)
    gone = client.post(f"/sessions/{sid}/step")
    assert gone.status_code == 404, gone.text
    assert f"inspector session {sid!r} is expired" in gone.json()["detail"]
    assert _create(client).status_code == 201  # its room is free again
