from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from components.quantize.engine import QuantEngine
from components.quantize.errors import (
    EditError,
    LayerIndexError,
    QuantizeError,
    SessionError,
    SessionLimitError,
    SessionStateError,
)
from components.quantize.inspector import InspectorSession
from components.quantize.store import SessionStore
from components.quantize.visualize import layer_picture, plot_report


@pytest.fixture
def session(engine: QuantEngine, images: list[torch.Tensor]) -> InspectorSession:
    return InspectorSession(engine, images[0][0], "int8")


def _index(session: InspectorSession, name: str) -> int:
    return session.graph.by_name(name).index


def test_step_runs_one_layer_and_reports_everything(session: InspectorSession) -> None:
    assert session.position == 0
    info = session.step()
    assert session.position == 1
    assert (info.index, info.name, info.op, info.kind, info.precision) == (0, "stem_conv", "Conv2d", "conv2d", "int8")
    assert info.input_shapes == [[1, 3, 64, 64]] and info.output_shape == [1, 16, 32, 32]
    assert info.params["count"] == 16 * 3 * 9 + 16
    assert (info.params["kernel_size"], info.params["stride"]) == ([3, 3], [2, 2])
    assert info.scales.weight is not None and len(info.scales.weight) == 16
    assert info.scales.inputs[0] == pytest.approx(session.engine.calibration.scale("images"))
    assert info.output_stats.dtype == "int8" and sum(info.output_stats.histogram.counts) == 16 * 32 * 32
    assert info.weight_stats is not None and info.weight_stats.saturated_fraction > 0  # max |w| of each channel
    assert info.error is not None and info.error.sqnr_db is not None and info.error.sqnr_db > 25
    assert info.local_error == info.error  # first layer: same inputs as the float run
    json.loads(info.model_dump_json())  # everything serialises (histograms included)


def test_run_to_and_inspect_semantics(session: InspectorSession) -> None:
    k = _index(session, "add")
    info = session.run_to(k)
    assert session.position == k + 1 and info.kind == "add" and len(info.input_stats) == 2
    assert session.inspect(3).index == 3  # earlier layers stay inspectable
    assert session.run_to(2).index == 2 and session.position == k + 1  # already run: nothing re-runs
    with pytest.raises(SessionStateError, match=rf"layer {k + 1} .* has not run yet.*run_to\({k + 1}\)"):
        session.inspect(k + 1)
    with pytest.raises(LayerIndexError, match=r"layer index 999 out of range: the model has \d+ layers"):
        session.run_to(999)
    with pytest.raises(LayerIndexError, match="out of range"):
        session.inspect(-1)


def test_edit_scale_channel_reruns_layer_and_invalidates_later_ones(session: InspectorSession) -> None:
    k = _index(session, "stage2_0_conv")
    session.cross(0, "float")  # float makes the expected change exact
    session.run_to(k + 5)
    before = session._values["stage2_0_conv"].tensor.clone()
    result = session.edit_weights(k, scale_channel=(3, 0.5))
    after = session._values["stage2_0_conv"].tensor
    assert session.position == k + 1 == result.position
    bias = session.graph.module(session.graph.layer(k)).bias.detach()
    assert torch.allclose(after[:, 3] - bias[3], 0.5 * (before[:, 3] - bias[3]), atol=1e-5)
    assert torch.equal(after[:, :3], before[:, :3])
    assert 0 < result.changed_fraction <= 1 / 32 + 1e-9  # one of 32 channels changed
    assert result.layer.error is not None and result.layer.error.sqnr_db is None  # float vs float (edited): exact
    with pytest.raises(SessionStateError):
        session.inspect(k + 1)


def test_edit_values_changes_int8_output_and_requantizes_weights(session: InspectorSession,
                                                                  engine: QuantEngine) -> None:
    k = _index(session, "stem_conv")
    session.run_to(k)
    w = session.graph.module(session.graph.layer(k)).weight.detach()
    result = session.edit_weights(k, values=torch.zeros_like(w))
    assert result.changed_fraction > 0.5
    bias = session.graph.module(session.graph.layer(k)).bias.detach()
    out = session._values["stem_conv"].dequantize()[0]
    assert torch.allclose(out, bias.view(-1, 1, 1).expand_as(out), atol=session.engine.tensor_scale("stem_conv"))
    assert float(session.engine.graph.module(session.graph.layer(k)).weight.abs().sum()) == 0
    assert int(session.engine.weights(k).q.abs().sum()) == 0
    # The edit stays inside the session: the engine it was created from is unchanged.
    assert float(engine.graph.module(engine.graph.layer(k)).weight.abs().sum()) > 0
    assert session.edited == {k}


def test_bad_edits_have_clear_errors(session: InspectorSession) -> None:
    k = _index(session, "stem_conv")
    shape = list(session.graph.module(session.graph.layer(k)).weight.shape)
    with pytest.raises(EditError, match=re.escape(f"weights must have shape {shape}, got [3, 3]")):
        session.edit_weights(k, values=torch.zeros(3, 3))
    with pytest.raises(EditError, match=r"must be a float tensor, got dtype torch\.int64"):
        session.edit_weights(k, values=torch.zeros(shape, dtype=torch.int64))
    with pytest.raises(EditError, match="finite"):
        session.edit_weights(k, values=np.full(shape, np.nan, dtype=np.float32))
    with pytest.raises(EditError, match=r"channel 16 out of range 0 .. 15"):
        session.edit_weights(k, scale_channel=(16, 2.0))
    with pytest.raises(EditError, match="exactly one of"):
        session.edit_weights(k)
    with pytest.raises(EditError, match=r"is a LeakyReLU: only Conv2d/Linear layers have weights"):
        session.edit_weights(_index(session, "stem_act"), scale_channel=(0, 2.0))
    with pytest.raises(LayerIndexError):
        session.edit_weights(10_000, scale_channel=(0, 2.0))
    # A nested list of numbers of the right shape is accepted (what JSON gives).
    assert session.edit_weights(k, values=np.zeros(shape).tolist()).position == k + 1


def test_cross_switches_precision_from_layer_k(session: InspectorSession, engine: QuantEngine) -> None:
    k = _index(session, "stage3_0_conv")
    session.run_to(k + 3)
    int8_before = session._values["stage2_0_conv"].tensor.clone()
    state = session.cross(k, "float")
    assert state.position == k and state.precisions[:k] == ["int8"] * k
    assert set(state.precisions[k:]) == {"float"}
    session.run_to(k)
    assert torch.equal(session._values["stage2_0_conv"].tensor, int8_before)  # before k: untouched
    out_k = session._values["stage3_0_conv"]
    assert not out_k.is_int8
    # Layer k ran in float on the dequantized int8 input.
    expected = engine.graph.module(engine.graph.layer(k))(session._values["add"].dequantize())
    assert torch.allclose(out_k.tensor, expected, atol=1e-6)
    # Crossing back to int8 from k re-quantizes the float input with its calibrated scale.
    session.cross(k + 1, "int8")
    assert session.run_to(k + 1).precision == "int8" and session._values[session.graph.layer(k + 1).name].is_int8


def test_float_session_is_exact_and_int8_report_has_every_layer(session: InspectorSession, engine: QuantEngine,
                                                                images: list[torch.Tensor], tmp_path: Path) -> None:
    float_session = InspectorSession(engine, images[0][0], "float")
    report = float_session.report()
    assert all(r.error is not None and r.error.sqnr_db is None for r in report.layers)  # identical to reference
    report = session.report()
    assert len(report.layers) == session.num_layers and report.precisions == {"int8": session.num_layers}
    assert report.output_error is not None and report.output_error.sqnr_db is not None
    assert report.output_error.sqnr_db > 30
    assert len(report.worst_layers) == 5
    conv = next(r for r in report.layers if r.name == "stem_conv")
    assert conv.local_error is not None and conv.local_error.mse > 0
    json.loads(report.model_dump_json())
    png = plot_report(report, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.allclose(session.run_all(), engine.run(images[0][:1], "int8"))


def test_step_past_the_end_and_bad_images(session: InspectorSession, engine: QuantEngine) -> None:
    session.run_all()
    with pytest.raises(SessionStateError, match=r"all .* layers have run"):
        session.step()
    with pytest.raises(QuantizeError, match=r"image must be a 3xHxW"):
        InspectorSession(engine, torch.rand(2, 3, 64, 64))
    with pytest.raises(QuantizeError, match="does not fit the model"):
        InspectorSession(engine, torch.rand(3, 56, 56))  # 7x7 at /8 vs 8x8 upsampled


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_session_store_bounds_count_memory_and_expiry(engine: QuantEngine, images: list[torch.Tensor]) -> None:
    clock = FakeClock()
    store = SessionStore(max_sessions=2, max_bytes=10**9, ttl_s=60, clock=clock)
    a = store.create(engine, images[0][0])
    b = store.create(engine, images[0][1], "hybrid")
    assert store.get(a.session_id) is a and len(store) == 2
    with pytest.raises(SessionLimitError, match=r"too many inspector sessions \(2 open\)"):
        store.create(engine, images[0][2])
    clock.now = 50.0
    store.get(a.session_id)  # a is used again; b is not
    clock.now = 100.0
    with pytest.raises(SessionError, match=rf"{b.session_id}' is expired"):
        store.get(b.session_id)
    assert store.get(a.session_id) is a and len(store) == 1
    store.close(a.session_id)
    with pytest.raises(SessionError, match="unknown or closed"):
        store.get(a.session_id)
    with pytest.raises(SessionError, match="unknown"):
        store.get("no-such-session")
    small = SessionStore(max_sessions=5, max_bytes=a.bytes_reserved + 1, ttl_s=60, clock=clock)
    small.create(engine, images[0][0])
    with pytest.raises(SessionLimitError, match="memory budget exceeded"):
        small.create(engine, images[0][1])
    assert small.bytes_reserved == a.bytes_reserved


def test_layer_pictures_and_tensors(session: InspectorSession, tmp_path: Path) -> None:
    k = _index(session, "stage2_0_conv")
    session.run_to(k)
    for which in ("input", "output", "weight", "error"):
        png = layer_picture(session, k, which, tmp_path / f"{which}.png")
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert layer_picture(session, 0, "input", tmp_path / "image.png").exists()
    error = session.tensor("stage2_0_conv") - session.reference("stage2_0_conv")
    assert 0 < float(error.abs().max()) < 0.1 * float(session.reference("stage2_0_conv").abs().max())
    with pytest.raises(QuantizeError, match="which must be"):
        layer_picture(session, k, "gradient", tmp_path / "x.png")
    with pytest.raises(SessionStateError, match="has not run yet"):
        layer_picture(session, k + 1, "output", tmp_path / "x.png")
    session.cross(k, "float")
    with pytest.raises(SessionStateError, match="not been computed"):
        session.tensor("stage2_0_conv")  # invalidated by the cross
