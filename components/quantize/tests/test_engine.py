from __future__ import annotations

import pytest
import torch
import torch.ao.nn.quantized.functional as qF
from torch import nn

from components.models.detector import Detector
from components.quantize.calibrate import calibrate
from components.quantize.engine import (
    Precision,
    QuantEngine,
    Value,
    build_lut,
    conv2d_int8,
    int8_add,
    linear_int8,
    quantize_tensor,
    quantize_weight,
)
from components.quantize.errors import CalibrationError, UnsupportedLayerError
from components.quantize.graph import QuantGraph
from components.quantize.metrics import error_stats

torch.backends.quantized.engine = "x86"


def _quint8(q: torch.Tensor, scale: float) -> torch.Tensor:
    """Our symmetric int8 (zero point 0) as PyTorch's quint8 with zero point 128: same real values."""
    return torch._make_per_tensor_quantized_tensor((q.to(torch.int32) + 128).to(torch.uint8), scale, 128)


def _qint8_per_channel(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch._make_per_channel_quantized_tensor(q, scales, torch.zeros(len(scales), dtype=torch.long), 0)


CONV_CASES = [  # c_in, c_out, kernel, stride, padding, size, groups
    (3, 16, 3, 2, 1, 17, 1),
    (16, 8, 1, 1, 0, 9, 1),
    (32, 24, 3, 1, 1, 12, 1),
    (8, 8, 3, 2, 1, 11, 2),
    (64, 5, 1, 1, 0, 6, 1),
    (12, 20, 5, 1, 2, 10, 1),
]


@pytest.mark.parametrize(("c_in", "c_out", "k", "stride", "pad", "size", "groups"), CONV_CASES)
def test_int8_conv_matches_pytorch_quantized_kernel_within_one_lsb(c_in: int, c_out: int, k: int, stride: int,
                                                                  pad: int, size: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(c_in * 100 + c_out)
    x_q = torch.randint(-128, 128, (2, c_in, size, size), generator=gen).to(torch.int8)
    x_scale = 0.02
    # Per-channel magnitudes differ a lot, so per-channel scales matter.
    w = torch.randn(c_out, c_in // groups, k, k, generator=gen) * torch.rand(c_out, 1, 1, 1, generator=gen) * 2
    bias = torch.randn(c_out, generator=gen)
    qw = quantize_weight(w, bias)
    real = nn.functional.conv2d(x_q.float() * x_scale, qw.q.float() * qw.scale.float().view(-1, 1, 1, 1), bias,
                                stride, pad, 1, groups)
    out_scale = float(real.abs().max()) / 110  # a few values saturate, most use the full range
    ours = conv2d_int8(x_q, x_scale, qw.q, qw.scale, bias, out_scale, stride=stride, padding=pad, groups=groups)
    ref = qF.conv2d(_quint8(x_q, x_scale), _qint8_per_channel(qw.q, qw.scale), bias, stride=stride, padding=pad,
                    groups=groups, scale=out_scale, zero_point=128, dtype=torch.quint8)
    diff = (ours.to(torch.int32) - (ref.int_repr().to(torch.int32) - 128)).abs()
    assert ours.shape == ref.shape
    assert int(diff.max()) <= 1
    assert float((diff > 0).double().mean()) < 0.01  # off-by-one only at rounding ties
    assert int(ours.abs().max()) >= 100  # the outputs really span int8


@pytest.mark.parametrize(("rows", "fin", "fout"), [(4, 32, 10), (7, 96, 48), (3, 200, 3)])
def test_int8_linear_matches_pytorch_quantized_kernel_within_one_lsb(rows: int, fin: int, fout: int) -> None:
    gen = torch.Generator().manual_seed(fin)
    x_q = torch.randint(-128, 128, (rows, fin), generator=gen).to(torch.int8)
    w = torch.randn(fout, fin, generator=gen) * torch.rand(fout, 1, generator=gen)
    bias = torch.randn(fout, generator=gen)
    qw = quantize_weight(w, bias)
    real = nn.functional.linear(x_q.float() * 0.03, qw.q.float() * qw.scale.float()[:, None], bias)
    out_scale = float(real.abs().max()) / 110
    ours = linear_int8(x_q, 0.03, qw.q, qw.scale, bias, out_scale)
    ref = qF.linear(_quint8(x_q, 0.03), _qint8_per_channel(qw.q, qw.scale), bias, scale=out_scale, zero_point=128)
    diff = (ours.to(torch.int32) - (ref.int_repr().to(torch.int32) - 128)).abs()
    assert int(diff.max()) <= 1


def test_int8_add_and_activations_are_within_one_lsb_of_float() -> None:
    gen = torch.Generator().manual_seed(5)
    a = Value(torch.randint(-128, 128, (1000,), generator=gen).to(torch.int8), 0.031)
    b = Value(torch.randint(-128, 128, (1000,), generator=gen).to(torch.int8), 0.017)
    s_out = 0.05
    got = int8_add(a, b, s_out).to(torch.int32)
    exact = torch.clamp((a.dequantize() + b.dequantize()) / s_out, -128, 127)
    assert (got - exact).abs().max() <= 0.5 + 1e-3
    lut = build_lut(nn.functional.silu, 0.05, 0.04)
    q = torch.arange(-128, 128)
    assert torch.equal(lut[q + 128], quantize_tensor(nn.functional.silu(q.double() * 0.05), 0.04))


def test_float_mode_reproduces_the_model(detector: Detector, engine: QuantEngine, images: list[torch.Tensor]) -> None:
    x = images[0]
    with torch.no_grad():
        expected = detector(x)
    assert torch.allclose(engine.run(x, "float"), expected, atol=1e-4)
    assert all(layer.op != "Identity" for layer in engine.graph.layers)  # folded BN left no Identity layers


def test_hybrid_and_int8_track_float(engine: QuantEngine, images: list[torch.Tensor]) -> None:
    x = images[1]
    ref = engine.run(x, "float")
    hybrid, int8 = error_stats(ref, engine.run(x, "hybrid")), error_stats(ref, engine.run(x, "int8"))
    assert hybrid.sqnr_db is not None and int8.sqnr_db is not None
    assert hybrid.sqnr_db > int8.sqnr_db > 30.0
    assert int8.cosine > 0.999


def test_int8_mode_keeps_int8_between_layers(engine: QuantEngine, images: list[torch.Tensor]) -> None:
    seen: dict[str, Value] = {}
    engine.run(images[0][:1], "int8", on_value=lambda layer, v: seen.__setitem__(layer.name, v))
    assert all(v.tensor.dtype == torch.int8 and v.scale is not None for v in seen.values())
    # Pass-through layers keep their input's scale; quantization points have their own.
    assert seen["upsample"].scale == seen["lateral_act"].scale
    assert seen["flatten"].scale == seen["cat_1"].scale
    hybrid: dict[str, Value] = {}
    engine.run(images[0][:1], "hybrid", on_value=lambda layer, v: hybrid.__setitem__(layer.name, v))
    assert all(not v.is_int8 for v in hybrid.values())  # hybrid convs rescale their accumulators to float


def test_int8_layer_equals_float_layer_on_integer_grid_for_pass_through(engine: QuantEngine,
                                                                         images: list[torch.Tensor]) -> None:
    env = {engine.graph.input_name: Value(images[0][:1])}
    for layer in engine.graph.layers:
        env[layer.name] = engine.execute(layer, env, Precision.INT8)
        if layer.name == "upsample":
            src = env["lateral_act"].tensor
            assert torch.equal(env["upsample"].tensor, src.repeat_interleave(2, 2).repeat_interleave(2, 3))
            break


def test_unsupported_op_is_refused_in_int8_but_runs_in_float() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.conv(x))

    graph = QuantGraph(Odd())
    x = torch.rand(1, 3, 8, 8)
    engine = QuantEngine(graph, calibrate(graph, [x], method="minmax"))
    assert engine.run(x, "hybrid").shape == (1, 4, 8, 8)
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(tanh\): tanh has no integer-only implementation"):
        engine.run(x, "int8")
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        engine.run(x, "int4")
    with pytest.raises(CalibrationError, match=r"calibration does not match this model: no range for tensors"):
        QuantEngine(graph, calibrate(QuantGraph(nn.Sequential(nn.Conv2d(3, 3, 1))), [x], method="minmax"))


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_integer_leaky_relu_rounds_like_float(slope: float) -> None:
    class Act(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.LeakyReLU(slope) if slope else nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x)

    graph = QuantGraph(Act())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    engine = QuantEngine(graph, calibrate(graph, [x], method="minmax"))
    s_in, s_out = engine.tensor_scale("x"), engine.tensor_scale("act")
    x_q = quantize_tensor(x, s_in)
    out = engine.execute(graph.layers[0], {"x": Value(x_q, s_in)}, Precision.INT8)
    exact = nn.functional.leaky_relu(x_q.double() * s_in, slope) / s_out
    assert out.scale == s_out
    # Round to nearest, up to gemmlowp's double rounding (high-mul, then shift): a few hundredths of an LSB.
    assert (out.tensor.double() - exact).abs().max() <= 0.6


def test_small_classifier_with_linear_pool_flatten_and_sigmoid_runs_integer_only() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.act = nn.SiLU()
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(8 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1)))

    torch.manual_seed(0)
    net = Net().eval()
    graph = QuantGraph(net)
    assert [layer.kind for layer in graph.layers] == ["conv2d", "silu", "max_pool2d", "flatten", "linear", "sigmoid"]
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    engine = QuantEngine(graph, calibrate(graph, [x], method="minmax"))
    seen: list[Value] = []
    out = engine.run(x, "int8", on_value=lambda layer, v: seen.append(v))
    assert all(v.tensor.dtype == torch.int8 for v in seen)
    err = error_stats(net(x), out)
    assert err.sqnr_db is not None and err.sqnr_db > 30 and err.max_abs < 0.02


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_detector_with_other_activations_runs_integer_only(activation: str, images: list[torch.Tensor]) -> None:
    from components.models.detector import detector_config

    torch.manual_seed(0)
    model = Detector(detector_config("nano", num_classes=3, img_size=64, activation=activation)).eval()
    graph = QuantGraph(model)
    assert activation in {layer.kind for layer in graph.layers}
    engine = QuantEngine(graph, calibrate(graph, images[:1], method="percentile"))
    with torch.no_grad():
        err = error_stats(model(images[1]), engine.run(images[1], "int8"))
    assert err.sqnr_db is not None and err.sqnr_db > 30 and err.cosine > 0.999


@pytest.mark.parametrize("dense", [False, True])
def test_int32_accumulation_is_exact_on_float32_and_float64_paths(dense: bool) -> None:
    from components.quantize.engine import _exact_float_dtype, _int_conv

    gen = torch.Generator().manual_seed(7)
    x_q = torch.randint(-128, 128, (1, 256, 6, 6), generator=gen).to(torch.int8)
    w_q = (torch.randint(100, 128, (4, 256, 3, 3), generator=gen) if dense
           else torch.randint(-20, 21, (4, 256, 3, 3), generator=gen)).to(torch.int8)
    w_q = w_q * torch.where(torch.rand(w_q.shape, generator=gen) < 0.5, -1, 1).to(torch.int8)
    # dense weights can reach 2^24 in a partial sum, so they must take the float64 path
    assert _exact_float_dtype(x_q, w_q) == (torch.float64 if dense else torch.float32)
    cols = nn.functional.unfold(x_q.double(), 3, padding=1).to(torch.int64)[0]  # (2304, 36), a copy: exact
    expected = (w_q.to(torch.int64).flatten(1) @ cols).view(1, 4, 6, 6)
    assert torch.equal(_int_conv(x_q, w_q, 1, 1, 1, 1), expected)


def test_table_lookups_equal_the_elementwise_integer_arithmetic() -> None:
    from components.quantize.engine import int8_add_lut, leaky_relu_int8, requantize_lut
    from components.quantize.fixed_point import requantize

    gen = torch.Generator().manual_seed(8)
    a = Value(torch.randint(-128, 128, (4, 8, 9, 9), generator=gen).to(torch.int8), 0.043)
    b = Value(torch.randint(-128, 128, (4, 8, 9, 9), generator=gen).to(torch.int8), 0.0171)
    assert torch.equal(int8_add_lut(a, b, 0.05), int8_add(a, b, 0.05))
    assert torch.equal(requantize_lut(0.37)[a.tensor.to(torch.int64) + 128], requantize(a.tensor, 0.37))
    graph = QuantGraph(nn.Sequential(nn.LeakyReLU(0.1)))
    engine = QuantEngine(graph, calibrate(graph, [torch.randn(1, 3, 4, 4)], method="minmax"))
    s_out = engine.tensor_scale(graph.layers[0].name)
    via_table = engine.execute(graph.layers[0], {graph.input_name: a}, Precision.INT8).tensor
    assert torch.equal(via_table, leaky_relu_int8(a.tensor, 0.043, s_out, 0.1))


def test_batchnorm_is_folded_for_models_without_fuse() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1)).eval()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2.0)
    graph = QuantGraph(model)
    assert [layer.kind for layer in graph.layers] == ["conv2d", "leaky_relu"]
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(graph.run_float(x), model(x), atol=1e-5)
