"""Run a traced model in FLOAT, HYBRID or integer-only INT8, layer by layer.

Quantization scheme: symmetric, zero point 0. Activations are int8 in [-128, 127] with one scale per
tensor (from :class:`~components.quantize.calibrate.Calibration`); weights are int8 in [-127, 127] with
one scale per output channel (or per tensor). Integer products are computed exactly: an int8 x int8
convolution run as a float convolution on integer-valued tensors equals the int32 accumulation while no
partial sum can lose a bit - float32 when max|x| * sum|w| < 2^24 (checked per call), else float64.
Element-wise integer steps on int8 inputs (activations, add, cat requantization) are evaluated once per
possible input value (256, or 256x256 for add) and looked up: bit-identical, and much faster.

Per-layer precisions (a model-wide mode sets every layer; CROSS mixes them):

- ``float``: the layer runs in float32 (int8 inputs are dequantized first).
- ``hybrid``: Conv2d/Linear quantize their input and weights to int8, accumulate in int32 and rescale the
  accumulator to float (``acc * s_in * s_w + bias``); other layers run in float.
- ``int8``: integer only. Conv2d/Linear: int32 bias ``round(b / (s_in s_w))``, then fixed-point
  requantization (``M = s_in s_w / s_out = M0 2^(shift-31)``) to int8. ReLU/LeakyReLU: two fixed-point
  multipliers (slope 1 and the negative slope). SiLU/Sigmoid/GELU: a 256-entry lookup table. Add: TFLite's
  scheme (inputs shifted left 20 bits, rescaled to a common scale, summed, requantized). Cat: each input
  requantized to the output scale. Nearest upsample, flatten, transpose, reshape, max-pool: pass-through
  (the output keeps the input's scale). Float inputs (the image, or a float layer before a CROSS) are
  quantized with their tensor's calibrated scale. The model output is dequantized for decoding.

Layers without an integer-only implementation (LayerNorm, the segmenter's attention core with its
softmax and activation x activation matmuls, its position-embedding add, any "other" op) make a
model-wide ``int8`` run raise :class:`UnsupportedLayerError` naming the layer. :func:`int8_precisions`
gives the explicit alternative: ``int8`` wherever an integer implementation exists and ``float`` for
the rest ("float islands": the int8 input is dequantized, the op runs in float32, and the next int8
layer requantizes its output with the output tensor's calibrated scale). The islands show as ``float``
layers in the inspector report and the model graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from components.quantize.calibrate import Batches, Calibration, calibrate, log2_scale
from components.quantize.errors import CalibrationError, EditError, UnsupportedLayerError
from components.quantize.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize,
)
from components.quantize.graph import (
    ACTIVATION_KINDS,
    MERGE_KINDS,
    PASS_THROUGH_KINDS,
    WEIGHTED_KINDS,
    Layer,
    QuantGraph,
)

ACT_QMIN, ACT_QMAX = -128, 127
W_QMAX = 127
ADD_LEFT_SHIFT = 20  # TFLite's headroom for the two rescaled add inputs
_IntPair = int | tuple[int, ...]


class Precision(StrEnum):
    FLOAT = "float"
    HYBRID = "hybrid"
    INT8 = "int8"


def parse_precision(value: str | Precision) -> Precision:
    try:
        return Precision(value)
    except ValueError:
        raise ValueError(f"unknown precision {value!r}; allowed: {[p.value for p in Precision]}") from None


@dataclass
class Value:
    """A tensor flowing between layers: float32 (``scale is None``) or int8 with its scale."""

    tensor: torch.Tensor
    scale: float | None = None

    @property
    def is_int8(self) -> bool:
        return self.scale is not None

    def dequantize(self) -> torch.Tensor:
        return self.tensor.float() * self.scale if self.scale is not None else self.tensor


def quantize_tensor(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float -> int8 ``clamp(round(x / scale), -128, 127)`` (round half to even)."""
    return torch.clamp(torch.round(x / scale), ACT_QMIN, ACT_QMAX).to(torch.int8)


@dataclass
class QuantizedWeight:
    """int8 weights of a Conv2d/Linear with one scale per output channel (repeated when per tensor)."""

    q: torch.Tensor  # int8, same shape as the float weight
    scale: torch.Tensor  # float64, (C_out,)
    bias: torch.Tensor | None  # float32 bias (C_out,) or None


def quantize_weight(weight: torch.Tensor, bias: torch.Tensor | None, *, per_channel: bool = True,
                    power_of_two: bool = False) -> QuantizedWeight:
    """Symmetric int8 weights: ``s_c = max|w_c| / 127`` per output channel (dim 0) or one per tensor."""
    w = weight.detach().to(torch.float64)
    amax = w.abs().flatten(1).amax(dim=1) if per_channel else w.abs().max().expand(w.shape[0])
    # An all-zero channel quantizes to 0 at any scale; 1/127 keeps its int32 bias b / (s_in s_w) in range.
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale = (torch.tensor([log2_scale(float(a)) for a in amax], dtype=torch.float64) if power_of_two
             else amax / W_QMAX)
    view = (-1,) + (1,) * (w.ndim - 1)
    q = torch.clamp(torch.round(w / scale.view(view)), -W_QMAX, W_QMAX).to(torch.int8)
    return QuantizedWeight(q=q, scale=scale, bias=None if bias is None else bias.detach().float())


def _int_conv(x_q: torch.Tensor, w_q: torch.Tensor, stride: _IntPair, padding: _IntPair | str, dilation: _IntPair,
              groups: int) -> torch.Tensor:
    """Exact int32 accumulation of an int8 x int8 convolution (no bias), as int64."""
    dtype = _exact_float_dtype(x_q, w_q)
    acc = F.conv2d(x_q.to(dtype), w_q.to(dtype), None, stride, padding, dilation, groups)
    return acc.to(torch.int64)


def _exact_float_dtype(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.dtype:
    """float32 when no partial sum can reach 2^24 (then every float32 sum of integer products is exact,
    in any order), else float64 (exact below 2^53). Bound: max|x| * sum|w| over one output's weights."""
    if not _float32_is_ieee():
        return torch.float64
    bound = int(x_q.abs().max()) * int(w_q.abs().flatten(1).sum(1).max()) if x_q.numel() and w_q.numel() else 0
    return torch.float32 if bound < 2**24 else torch.float64


def _float32_is_ieee() -> bool:
    """False when someone let oneDNN run float32 conv/matmul in bf16/tf32 (then only float64 is exact)."""
    settings = [getattr(getattr(torch.backends.mkldnn, part, None), "fp32_precision", "none")
                for part in ("conv", "matmul")]
    return all(str(value) in ("none", "ieee") for value in settings)


def _requantize_acc(acc: torch.Tensor, x_scale: float, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    out_scale: float, channel_dim: int) -> torch.Tensor:
    acc_scale = x_scale * w_scale.to(torch.float64)  # (C_out,)
    view = [1] * acc.ndim
    view[channel_dim] = -1
    if bias is not None:
        bias_q = torch.round(bias.double() / acc_scale).clamp(INT32_MIN, INT32_MAX).to(torch.int64)
        acc = acc + bias_q.view(view)
    return requantize(acc.clamp(INT32_MIN, INT32_MAX), acc_scale / out_scale, channel_dim=channel_dim)


def conv2d_int8(x_q: torch.Tensor, x_scale: float, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_scale: float, *, stride: _IntPair = 1,
                padding: _IntPair | str = 0, dilation: _IntPair = 1, groups: int = 1) -> torch.Tensor:
    """Integer-only conv: int8 x (BxCxHxW) and int8 w (OxC/gxkxk, scales (O,)) -> int8 output at ``out_scale``.

    The bias (float, (O,)) becomes int32 ``round(b / (x_scale * w_scale))``; the int32 accumulator is
    requantized with per-channel fixed-point multipliers ``x_scale * w_scale / out_scale``.
    """
    acc = _int_conv(x_q, w_q, stride, padding, dilation, groups)
    return _requantize_acc(acc, x_scale, w_scale, bias, out_scale, channel_dim=1)


def linear_int8(x_q: torch.Tensor, x_scale: float, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    """Integer-only linear: int8 x (...xIn) and int8 w (OutxIn, scales (Out,)) -> int8 (...xOut)."""
    dtype = _exact_float_dtype(x_q, w_q)
    acc = F.linear(x_q.to(dtype), w_q.to(dtype)).to(torch.int64)
    return _requantize_acc(acc, x_scale, w_scale, bias, out_scale, channel_dim=acc.ndim - 1)


def int_accumulate(layer_kind: str, module: nn.Module, x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of int8 x int8 for a Conv2d/Linear module (no bias), as int64."""
    if layer_kind == "conv2d":
        assert isinstance(module, nn.Conv2d)
        if module.padding_mode != "zeros":  # reflect/replicate padding would need padded int8 inputs
            raise UnsupportedLayerError(f"Conv2d padding_mode {module.padding_mode!r}: only 'zeros' is supported")
        return _int_conv(x_q, w_q, module.stride, _padding(module), module.dilation, module.groups)
    dtype = _exact_float_dtype(x_q, w_q)
    return F.linear(x_q.to(dtype), w_q.to(dtype)).to(torch.int64)


def _padding(module: nn.Conv2d) -> _IntPair | str:
    padding = module.padding
    return padding if isinstance(padding, str) else (int(padding[0]), int(padding[1]))


class QuantEngine:
    """Executes a :class:`QuantGraph` with per-layer precision, using the ranges of a :class:`Calibration`.

    ``run(images, "int8")`` gives the dequantized float output; ``execute(layer, env, precision)`` runs a
    single layer on named :class:`Value` inputs (the inspector drives it this way).
    """

    def __init__(self, graph: QuantGraph | nn.Module, calibration: Calibration) -> None:
        self.graph = graph if isinstance(graph, QuantGraph) else QuantGraph(graph)
        self.calibration = calibration
        missing = [name for name in [self.graph.input_name] + [lay.name for lay in self.graph.layers]
                   if name not in calibration.activations and self._is_scaled(name)]
        if missing:
            raise CalibrationError(f"calibration does not match this model: no range for tensors {missing[:10]} "
                                   f"(calibrated: {len(calibration.activations)} tensors)")
        self._weights: dict[int, QuantizedWeight] = {}
        for layer in self.graph.layers:
            if layer.kind in WEIGHTED_KINDS:
                self.requantize_weights(layer.index)

    # ------------------------------------------------------------------------------------------- scales

    def _is_scaled(self, name: str) -> bool:
        if name == self.graph.input_name:
            return True
        kind = self.graph.by_name(name).kind
        return kind not in PASS_THROUGH_KINDS

    def tensor_scale(self, name: str) -> float:
        """int8 scale of tensor ``name``; a pass-through layer's output keeps its input's scale."""
        while name != self.graph.input_name:
            layer = self.graph.by_name(name)
            if layer.kind not in PASS_THROUGH_KINDS:
                break
            name = layer.inputs[0]
        return self.calibration.scale(name)

    def weights(self, index: int) -> QuantizedWeight:
        layer = self.graph.layer(index)
        if index not in self._weights:
            raise EditError(f"layer {index} ({layer.name}, {layer.op}) has no weights")
        return self._weights[index]

    def requantize_weights(self, index: int) -> QuantizedWeight:
        """Re-derive layer ``index``'s int8 weights from its (possibly edited) float weights."""
        module = self.graph.module(self.graph.layer(index))
        assert isinstance(module, nn.Conv2d | nn.Linear)
        qw = quantize_weight(module.weight, module.bias,
                             per_channel=self.calibration.weight_granularity == "per_channel",
                             power_of_two=self.calibration.power_of_two)
        self._weights[index] = qw
        return qw

    # ---------------------------------------------------------------------------------------- running

    def precisions(self, mode: str | Precision | Sequence[str | Precision]) -> list[Precision]:
        """One precision per layer from a model-wide mode or an explicit list."""
        if isinstance(mode, str | Precision):
            return [parse_precision(mode)] * len(self.graph.layers)
        out = [parse_precision(p) for p in mode]
        if len(out) != len(self.graph.layers):
            raise ValueError(f"need one precision per layer ({len(self.graph.layers)}), got {len(out)}")
        return out

    @torch.no_grad()
    def run(self, images: torch.Tensor, mode: str | Precision | Sequence[str | Precision] = "int8",
            on_value: Callable[[Layer, Value], None] | None = None) -> torch.Tensor:
        """images Bx3xHxW float -> the model's float output (dequantized when the last layer is int8)."""
        precisions = self.precisions(mode)
        env: dict[str, Value] = {self.graph.input_name: Value(images.float())}
        for layer, precision in zip(self.graph.layers, precisions, strict=True):
            env[layer.name] = value = self.execute(layer, env, precision)
            if on_value is not None:
                on_value(layer, value)
        return env[self.graph.output_name].dequantize()

    def execute(self, layer: Layer, env: dict[str, Value], precision: Precision) -> Value:
        """Run one layer on the named values in ``env`` in ``precision``; returns its output value."""
        if precision == Precision.INT8:
            return self._execute_int8(layer, env)
        if precision == Precision.HYBRID and layer.kind in WEIGHTED_KINDS:
            return self._execute_hybrid(layer, env)
        floats = {name: env[name].dequantize() for name in layer.inputs}
        return Value(self.graph.run_float_layer(layer, floats))

    def _int8_input(self, env: dict[str, Value], name: str) -> Value:
        value = env[name]
        if value.is_int8:
            return value
        scale = self.tensor_scale(name)
        return Value(quantize_tensor(value.tensor, scale), scale)

    def _execute_hybrid(self, layer: Layer, env: dict[str, Value]) -> Value:
        x = self._int8_input(env, layer.inputs[0])
        assert x.scale is not None
        qw = self.weights(layer.index)
        acc = int_accumulate(layer.kind, self.graph.module(layer), x.tensor, qw.q)
        channel = _channel_view(acc.ndim, layer.kind, qw.scale)
        out = (acc.to(torch.float64) * (x.scale * channel)).float()
        if qw.bias is not None:
            out = out + _channel_view(acc.ndim, layer.kind, qw.bias)
        return Value(out)

    def _execute_int8(self, layer: Layer, env: dict[str, Value]) -> Value:
        kind = layer.kind
        if kind in PASS_THROUGH_KINDS:
            x = self._int8_input(env, layer.inputs[0])
            # These ops only move values: running them on integer-valued floats is exact.
            out = self.graph.run_float_layer(layer, {layer.inputs[0]: x.tensor.float()})
            return Value(out.round().to(torch.int8), x.scale)
        if kind not in WEIGHTED_KINDS | ACTIVATION_KINDS | MERGE_KINDS:
            raise UnsupportedLayerError(
                f"layer {layer.index} ({layer.name}): {layer.op} has no integer-only implementation; "
                f"run it in float or hybrid, or as a float island (int8_precisions); supported in int8: "
                f"{', '.join(sorted(INT8_KINDS))} (upsample: nearest only)")
        s_out = self.tensor_scale(layer.name)
        inputs = [self._int8_input(env, name) for name in layer.inputs]
        if kind in WEIGHTED_KINDS:
            return Value(self._int8_weighted(layer, inputs[0], s_out), s_out)
        if kind in ACTIVATION_KINDS:
            return Value(self._int8_activation(layer, inputs[0], s_out), s_out)
        if kind == "add":
            if len(inputs) != 2:
                raise UnsupportedLayerError(f"layer {layer.index} ({layer.name}): add of {len(inputs)} tensors "
                                            "(int8 supports two tensor inputs)")
            return Value(int8_add_lut(inputs[0], inputs[1], s_out), s_out)
        dim = _cat_dim(layer)
        parts = [requantize_lut(float(v.scale) / s_out)[v.tensor.to(torch.int64) + 128]  # type: ignore[arg-type]
                 if v.scale != s_out else v.tensor for v in inputs]
        return Value(torch.cat(parts, dim=dim), s_out)

    def _int8_weighted(self, layer: Layer, x: Value, s_out: float) -> torch.Tensor:
        """Same arithmetic as :func:`conv2d_int8` / :func:`linear_int8`, on the layer's module settings."""
        assert x.scale is not None
        qw = self.weights(layer.index)
        acc = int_accumulate(layer.kind, self.graph.module(layer), x.tensor, qw.q)
        channel_dim = 1 if layer.kind == "conv2d" else acc.ndim - 1
        return _requantize_acc(acc, x.scale, qw.scale, qw.bias, s_out, channel_dim=channel_dim)

    def _int8_activation(self, layer: Layer, x: Value, s_out: float) -> torch.Tensor:
        assert x.scale is not None
        # An int8 input has 256 possible values: evaluate the integer arithmetic once per value, then
        # index. Bit-identical to applying it elementwise (see leaky_relu_int8), and far fewer passes.
        if layer.kind in ("relu", "leaky_relu"):
            slope = 0.0 if layer.kind == "relu" else _negative_slope(self.graph, layer)
            table = leaky_relu_int8(_INT8_GRID, x.scale, s_out, slope)
        else:
            table = build_lut(_lut_function(self.graph, layer), x.scale, s_out)
        return table[x.tensor.to(torch.int64) + 128]


_INT8_GRID = torch.arange(-128, 128, dtype=torch.int8)
# Layer kinds with an integer-only implementation (everything else is float-only in this engine).
INT8_KINDS = WEIGHTED_KINDS | ACTIVATION_KINDS | MERGE_KINDS | PASS_THROUGH_KINDS


def int8_precisions(graph: QuantGraph) -> list[Precision]:
    """Per-layer precisions: ``int8`` where the layer has an integer-only implementation, else ``float``.

    The ``float`` entries are the model's float islands (see the module docstring); for a model without
    any (the detector) this equals the model-wide ``int8`` mode.
    """
    return [Precision.INT8 if layer.kind in INT8_KINDS else Precision.FLOAT for layer in graph.layers]


def _lut_function(graph: QuantGraph, layer: Layer) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float function behind a table-driven activation (silu, sigmoid, gelu with its approximation)."""
    if layer.kind == "silu":
        return F.silu
    if layer.kind == "sigmoid":
        return torch.sigmoid
    approximate = "none"
    if layer.node.op == "call_module":
        approximate = str(getattr(graph.module(layer), "approximate", "none"))
    elif isinstance(layer.node.kwargs.get("approximate"), str):
        approximate = str(layer.node.kwargs["approximate"])
    return lambda t: F.gelu(t, approximate=approximate)


def leaky_relu_int8(q: torch.Tensor, s_in: float, s_out: float, slope: float) -> torch.Tensor:
    """Integer (Leaky)ReLU: ``q >= 0``: ``q * s_in / s_out``; else ``q * slope * s_in / s_out``, both in fixed point."""
    q64 = q.to(torch.int64)
    pos = requantize(q64, s_in / s_out)
    neg = requantize(q64, slope * s_in / s_out) if slope != 0 else torch.zeros_like(pos)
    return torch.where(q64 >= 0, pos, neg)


def requantize_lut(real_multiplier: float) -> torch.Tensor:
    """256-entry int8 table of :func:`requantize` (fixed point) over every int8 value ``q`` at index ``q + 128``."""
    return requantize(_INT8_GRID.to(torch.int64), real_multiplier)


def int8_add_lut(a: Value, b: Value, s_out: float) -> torch.Tensor:
    """:func:`int8_add` through a 256x256 table of every input pair (bit-identical, one gather)."""
    grid_a = Value(_INT8_GRID.view(-1, 1).expand(256, 256), a.scale)
    grid_b = Value(_INT8_GRID.view(1, -1).expand(256, 256), b.scale)
    table = int8_add(grid_a, grid_b, s_out).flatten()
    return table[(a.tensor.to(torch.int64) + 128) * 256 + (b.tensor.to(torch.int64) + 128)]


def build_lut(fn: Callable[[torch.Tensor], torch.Tensor], s_in: float, s_out: float) -> torch.Tensor:
    """256-entry int8 table: entry ``q + 128`` = quantize(fn(q * s_in), s_out)."""
    grid = torch.arange(-128, 128, dtype=torch.float64) * s_in
    return quantize_tensor(fn(grid).double(), s_out)


def int8_add(a: Value, b: Value, s_out: float) -> torch.Tensor:
    """TFLite integer add: both inputs shifted left 20 bits, rescaled to 2*max(s_a, s_b), summed, requantized."""
    assert a.scale is not None and b.scale is not None
    twice_max = 2.0 * max(a.scale, b.scale)
    m_a, sh_a = quantize_multiplier(a.scale / twice_max)
    m_b, sh_b = quantize_multiplier(b.scale / twice_max)
    ta = multiply_by_quantized_multiplier(a.tensor.to(torch.int64) << ADD_LEFT_SHIFT, m_a, sh_a)
    tb = multiply_by_quantized_multiplier(b.tensor.to(torch.int64) << ADD_LEFT_SHIFT, m_b, sh_b)
    return requantize(ta + tb, twice_max / ((1 << ADD_LEFT_SHIFT) * s_out))


def _channel_view(ndim: int, kind: str, values: torch.Tensor) -> torch.Tensor:
    """Per-output-channel values shaped to broadcast over a conv (dim 1) or linear (last dim) output."""
    if kind == "conv2d":
        return values.view((1, -1) + (1,) * (ndim - 2))
    return values


def _negative_slope(graph: QuantGraph, layer: Layer) -> float:
    if layer.node.op == "call_module":
        return float(getattr(graph.module(layer), "negative_slope", 0.01))
    slope = layer.node.kwargs.get("negative_slope", layer.node.args[1] if len(layer.node.args) > 1 else 0.01)
    return float(slope)  # type: ignore[arg-type]


def _cat_dim(layer: Layer) -> int:
    dim = layer.node.kwargs.get("dim", layer.node.args[1] if len(layer.node.args) > 1 else 0)
    if not isinstance(dim, int):
        raise UnsupportedLayerError(f"layer {layer.index} ({layer.name}): cat dim must be a constant int, got {dim!r}")
    return dim


def build_engine(model: nn.Module, batches: Batches, *, method: str = "kl", percentile: float = 99.99,
                 weight_granularity: Literal["per_channel", "per_tensor"] = "per_channel") -> QuantEngine:
    """Trace ``model`` (BN folded), calibrate it on ``batches`` (Bx3xHxW in [0, 1]) and build its engine."""
    graph = QuantGraph(model)
    return QuantEngine(graph, calibrate(graph, batches, method=method, percentile=percentile,
                                        weight_granularity=weight_granularity))
