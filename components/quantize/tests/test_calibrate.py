from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.quantize.calibrate import (
    CALIBRATORS,
    NUM_BINS,
    Calibration,
    calibrate,
    kl_threshold,
    load_calibration,
    make_range,
    percentile_threshold,
    save_calibration,
)
from components.quantize.engine import QuantEngine
from components.quantize.errors import CalibrationError
from components.quantize.graph import QuantGraph


class PassThrough(nn.Module):
    """A model whose only tensors are its input and a copy of it: calibrating it calibrates the data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - torch.relu(-x)  # == x, through two relus and an add


def _hist(x: np.ndarray, bins: int = NUM_BINS) -> tuple[np.ndarray, float]:
    amax = float(np.abs(x).max())
    counts, _ = np.histogram(np.abs(x), bins=bins, range=(0.0, amax))
    return counts, amax


def _kl_reference(hist: np.ndarray, amax: float, levels: int = 128) -> float:
    """Straight loop over candidates, as in TensorRT's description (slow, for checking the closed form)."""
    n = len(hist)
    best = (math.inf, n)
    for i in range(levels, n + 1):
        sliced = hist[:i].astype(np.float64)
        p = sliced.copy()
        p[i - 1] += hist[i:].sum()
        nonzero = p > 0
        level = (np.arange(i) * levels) // i
        q = np.zeros(i)
        for k in range(levels):
            sel = level == k
            if nonzero[sel].any():
                q[sel & nonzero] = sliced[sel].sum() / nonzero[sel].sum()
        pn, qn = p / p.sum(), q / q.sum()
        m = pn > 0
        if (qn[m] == 0).any():
            continue
        kl = float((pn[m] * np.log(pn[m] / qn[m])).sum())
        if kl < best[0] - 1e-12:
            best = (kl, i)
    return best[1] * amax / n


def test_minmax_is_the_exact_max_abs() -> None:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 3
    cal = calibrate(PassThrough(), [x[:2], x[2:]], method="minmax")
    assert cal.activations["x"].threshold == pytest.approx(float(x.abs().max()), rel=1e-7)
    assert cal.activations["x"].scale == pytest.approx(float(x.abs().max()) / 127, rel=1e-7)
    assert cal.images == 3


def test_percentile_matches_numpy_within_one_bin() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(300_000) * 2.0
    hist, amax = _hist(x)
    for p in (99.0, 99.9, 99.99):
        ours = percentile_threshold(hist, amax, p)
        assert abs(ours - np.percentile(np.abs(x), p)) <= amax / NUM_BINS
    # Through the collector too: the 2nd pass histograms |x| over [0, max |x|].
    t = torch.from_numpy(x.reshape(100, 3, 10, 100)).float()
    cal = calibrate(PassThrough(), [t[:50], t[50:]], method="percentile", percentile=99.9)
    assert abs(cal.activations["x"].threshold - np.percentile(np.abs(t.numpy()), 99.9)) <= amax / NUM_BINS


def test_kl_clips_gaussian_far_below_its_outliers() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(200_000), rng.uniform(40.0, 50.0, 20)])
    hist, amax = _hist(x)
    threshold = kl_threshold(hist, amax)
    assert 2.5 < threshold < 8.0  # keeps the Gaussian body (|x| > 2.5 is 1.2% of it), drops the outliers
    assert threshold < 0.2 * 40.0


def test_kl_closed_form_equals_the_candidate_loop() -> None:
    rng = np.random.default_rng(2)
    for x in (np.concatenate([rng.standard_normal(50_000), rng.uniform(20, 30, 10)]),
              rng.laplace(0, 1, 50_000), rng.uniform(0, 1, 5_000)):
        hist, amax = _hist(x, bins=640)  # fewer bins than 2048 keep the reference loop fast
        assert kl_threshold(hist, amax) == pytest.approx(_kl_reference(hist, amax), rel=1e-12)


def test_log2_scales_are_exact_powers_of_two(engine: QuantEngine, graph: QuantGraph,
                                             images: list[torch.Tensor]) -> None:
    cal = calibrate(graph, images[:1], method="log2")
    for name, rng in cal.activations.items():
        exponent = math.log2(rng.scale)
        assert exponent == int(exponent), name
        assert rng.threshold >= rng.amax  # rounding the scale up never clips
    log2_engine = QuantEngine(graph, cal)
    for layer in graph.layers:
        if layer.kind == "conv2d":
            exponents = torch.log2(log2_engine.weights(layer.index).scale)
            assert torch.equal(exponents, exponents.round())


def test_output_side_tensors_stay_unclipped(graph: QuantGraph, images: list[torch.Tensor]) -> None:
    cal = calibrate(graph, images[:1], method="kl")
    assert {"head_p3_cls_pred", "head_p4_reg_pred", "cat_1", "cat_3"} <= set(cal.unclipped)
    assert "stem_conv" not in cal.unclipped
    for name in cal.unclipped:
        assert cal.activations[name].threshold == pytest.approx(cal.activations[name].amax)
    clipped = calibrate(graph, images[:1], method="kl", output_minmax=False)
    assert clipped.unclipped == []


def test_weights_per_tensor_option(graph: QuantGraph, calibration: Calibration) -> None:
    per_tensor = QuantEngine(graph, calibration.model_copy(update={"weight_granularity": "per_tensor"}))
    per_channel = QuantEngine(graph, calibration)
    k = graph.by_name("stage2_0_conv").index
    assert len(set(per_tensor.weights(k).scale.tolist())) == 1
    assert len(set(per_channel.weights(k).scale.tolist())) > 1
    w = graph.module(graph.layer(k)).weight.detach().double()
    assert torch.allclose(per_channel.weights(k).scale, w.abs().flatten(1).amax(1) / 127)


def test_stream_is_read_twice_through_a_callable() -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    calls = []

    def stream():
        calls.append(1)
        yield x

    cal = calibrate(PassThrough(), stream, method="kl")
    assert len(calls) == 2 and cal.images == 2
    assert 0 < cal.activations["x"].threshold <= float(x.abs().max()) + 1e-6


def test_calibration_round_trips_through_json(calibration: Calibration, tmp_path: Path) -> None:
    assert load_calibration(save_calibration(calibration, tmp_path)) == calibration
    (tmp_path / "bad.json").write_text('{"method": "kl"}')
    with pytest.raises(CalibrationError, match=r"bad\.json: not a valid calibration"):
        load_calibration(tmp_path / "bad.json")
    with pytest.raises(CalibrationError, match="missing calibration file"):
        load_calibration(tmp_path / "none.json")


@pytest.mark.parametrize("method", CALIBRATORS)
def test_every_calibrator_runs_on_the_detector(graph: QuantGraph, images: list[torch.Tensor], method: str) -> None:
    cal = calibrate(graph, images[:1], method=method)
    assert set(cal.activations) == {graph.input_name, *(layer.name for layer in graph.layers)}
    assert all((r.scale > 0 and r.threshold <= max(r.amax, 1e-8) * 1.000001) or method == "log2"
               for r in cal.activations.values())


def test_bad_calibration_inputs_have_clear_errors(graph: QuantGraph) -> None:
    x = torch.rand(1, 3, 64, 64)
    with pytest.raises(CalibrationError, match=r"unknown calibrator 'entropy'.*minmax"):
        calibrate(graph, [x], method="entropy")
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        calibrate(graph, [], method="minmax")
    with pytest.raises(CalibrationError, match="one-shot iterator"):
        calibrate(graph, iter([x]), method="kl")
    with pytest.raises(CalibrationError, match=r"batch 0 must be a non-empty Bx3xHxW"):
        calibrate(graph, [torch.rand(3, 64, 64)], method="minmax")
    with pytest.raises(CalibrationError, match=r"dtype torch\.uint8"):
        calibrate(graph, [torch.zeros(1, 3, 64, 64, dtype=torch.uint8)], method="minmax")
    with pytest.raises(CalibrationError, match="percentile must be in"):
        make_range("percentile", 1.0, np.ones(NUM_BINS), percentile=120.0)
