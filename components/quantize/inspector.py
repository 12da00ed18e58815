"""STEP / CROSS inspection: run a model layer by layer on one image, look at any layer, edit, switch precision.

A session holds its own copy of the engine (weights edits stay in the session), the image, one precision
per layer, the values computed so far (``position`` layers have run) and a float reference run of the
same image with the same (edited) weights. Every result is a pydantic model, so the HTTP layer can return
it as JSON unchanged (histograms included).

    session = InspectorSession(engine, image, precision="int8")
    session.run_to(10)                      # STEP to layer 10 (inclusive)
    info = session.inspect(10)              # type, shapes, params, scales, stats, float-vs-int8 error
    session.edit_weights(10, scale_channel=(3, 0.5))   # re-runs layer 10; later layers must re-run
    session.cross(20, "float")              # CROSS: layers 20.. run in float
    report = session.report()               # per-layer error table for the whole model
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from components.quantize.calibrate import Calibration
from components.quantize.engine import Precision, QuantEngine, Value, parse_precision
from components.quantize.errors import (
    EditError,
    LayerIndexError,
    QuantizeError,
    SessionStateError,
)
from components.quantize.graph import PASS_THROUGH_KINDS, WEIGHTED_KINDS, Layer, QuantGraph
from components.quantize.metrics import ErrorStats, TensorStats, error_stats, tensor_stats

ParamValue = int | float | str | bool | list[int] | list[float] | None


class LayerScales(BaseModel):
    inputs: list[float | None] = Field(description="calibrated int8 scale of each input tensor")
    output: float | None = Field(description="int8 scale of the output (inherited by pass-through layers)")
    weight: list[float] | None = Field(default=None, description="per-output-channel weight scales")
    weight_granularity: str | None = None


class LayerReport(BaseModel):
    """Everything about one layer after it has run in the session."""

    index: int
    name: str
    op: str = Field(description="module class or function name, e.g. Conv2d, LeakyReLU, add, cat")
    kind: str
    target: str
    precision: str
    inputs: list[str] = Field(description="names of the tensors (layers, or the model input) it reads")
    input_shapes: list[list[int]]
    output_shape: list[int]
    params: dict[str, ParamValue] = Field(description="parameter count plus kernel/stride/... details")
    scales: LayerScales
    input_stats: list[TensorStats]
    output_stats: TensorStats
    weight_stats: TensorStats | None = None
    error: ErrorStats | None = Field(description="this session's output vs the float run of the same image")
    local_error: ErrorStats | None = Field(
        default=None, description="this layer alone in its precision, fed the float reference inputs, vs float")


class EditResult(BaseModel):
    layer: LayerReport = Field(description="layer k re-run with the edited weights")
    before_output: TensorStats
    change: ErrorStats = Field(description="new output vs the output before the edit")
    changed_fraction: float = Field(description="fraction of output elements whose value changed")
    position: int = Field(description="layers run now: everything after the edited layer must re-run")


class LayerError(BaseModel):
    index: int
    name: str
    op: str
    kind: str
    precision: str
    output_shape: list[int]
    error: ErrorStats | None
    local_error: ErrorStats | None
    saturated_fraction: float


class ModelReport(BaseModel):
    """Per-layer float-vs-quantized error of the whole model (like ORT QDQ loss debugging / AIMET MSE)."""

    calibrator: str
    precisions: dict[str, int] = Field(description="how many layers run in each precision")
    layers: list[LayerError]
    output_error: ErrorStats | None
    worst_layers: list[str] = Field(description="up to 5 layer names with the lowest local SQNR")


class SessionState(BaseModel):
    session_id: str
    position: int = Field(description="number of layers run so far (the next step runs this index)")
    num_layers: int
    precisions: list[str]
    edited_layers: list[int]
    image_shape: list[int]
    bytes_reserved: int


class InspectorSession:
    """One image through one model, layer by layer (see module docstring)."""

    def __init__(self, engine: QuantEngine, image: torch.Tensor, precision: str | Precision = "int8", *,
                 session_id: str | None = None) -> None:
        self.engine = copy.deepcopy(engine)  # edits must not leak into other sessions
        self.session_id = session_id or uuid.uuid4().hex
        self.image = _check_image(image)
        self.precisions = self.engine.precisions(precision)
        self.lock = threading.Lock()  # for callers that share a session between threads
        self.edited: set[int] = set()
        self._values: dict[str, Value] = {self.graph.input_name: Value(self.image)}
        self.position = 0
        self._ref: dict[str, torch.Tensor] = {self.graph.input_name: self.image}
        try:
            self._refresh_reference(0)
        except RuntimeError as exc:
            raise QuantizeError(f"image of shape {list(self.image.shape)} does not fit the model: {exc}") from exc
        self.bytes_reserved = self._estimate_bytes()

    @classmethod
    def from_model(cls, model: nn.Module, calibration: Calibration, image: torch.Tensor,
                   precision: str | Precision = "int8") -> InspectorSession:
        """A session for ``model`` (traced, BN folded) with the ranges of ``calibration`` on one 3xHxW image."""
        return cls(QuantEngine(QuantGraph(model), calibration), image, precision)

    @property
    def graph(self) -> QuantGraph:
        return self.engine.graph

    @property
    def num_layers(self) -> int:
        return len(self.engine.graph.layers)

    # ------------------------------------------------------------------------------------------ running

    def _layer(self, index: int) -> Layer:
        return self.engine.graph.layer(index)  # raises LayerIndexError with the allowed range

    @torch.no_grad()
    def _refresh_reference(self, start: int) -> None:
        floats = self._ref
        for layer in self.engine.graph.layers[start:]:
            floats[layer.name] = self.engine.graph.run_float_layer(layer, floats)

    def _advance_to(self, index: int) -> None:
        while self.position <= index:
            self._run_layer(self._layer(self.position))
            self.position += 1

    def _run_layer(self, layer: Layer) -> None:
        with torch.no_grad():
            self._values[layer.name] = self.engine.execute(layer, self._values, self.precisions[layer.index])

    def step(self) -> LayerReport:
        """Run the next layer (index ``position``) and return its report."""
        if self.position >= self.num_layers:
            raise SessionStateError(f"all {self.num_layers} layers have run; use inspect(k), report(), or "
                                    "cross/edit to re-run from a layer")
        layer = self._layer(self.position)
        self._run_layer(layer)
        self.position += 1
        return self.inspect(layer.index)

    def run_to(self, index: int) -> LayerReport:
        """Run every layer up to and including ``index`` (nothing when it has run already); its report."""
        self._layer(index)
        self._advance_to(index)
        return self.inspect(index)

    def run_all(self) -> torch.Tensor:
        """Run the remaining layers; the model output as float."""
        self._advance_to(self.num_layers - 1)
        return self._values[self.engine.graph.output_name].dequantize()

    # ---------------------------------------------------------------------------------------- inspecting

    def inspect(self, index: int, *, local: bool = True) -> LayerReport:
        """Report of layer ``index``, which must have run (``index < position``)."""
        layer = self._layer(index)
        if index >= self.position:
            raise SessionStateError(f"layer {index} ({layer.name}) has not run yet: {self.position} layers have "
                                    f"run; call run_to({index}) or step() first")
        out = self._values[layer.name]
        engine = self.engine
        threshold = {name: self._threshold(name) for name in [*layer.inputs, layer.name]}
        weight_stats, weight_scales = None, None
        if layer.kind in WEIGHTED_KINDS:
            qw = engine.weights(index)
            weight_scales = [float(s) for s in qw.scale]
            if self.precisions[index] == Precision.FLOAT:
                float_weight = engine.graph.module(layer).weight
                assert isinstance(float_weight, torch.Tensor)
                weight_stats = tensor_stats(float_weight.detach())
            else:
                # Dequantized int8 weights (per-channel scales); saturated = at +-127.
                scale_view = qw.scale.view((-1,) + (1,) * (qw.q.ndim - 1))
                weight_stats = tensor_stats(qw.q.double() * scale_view).model_copy(update={
                    "dtype": "int8", "saturated_fraction": float((qw.q.abs() >= 127).double().mean())})
        return LayerReport(
            index=index, name=layer.name, op=layer.op, kind=layer.kind, target=layer.target,
            precision=self.precisions[index].value, inputs=list(layer.inputs),
            input_shapes=[list(self._values[n].tensor.shape) for n in layer.inputs],
            output_shape=list(out.tensor.shape), params=self._params(layer),
            scales=LayerScales(inputs=[self._scale_or_none(n) for n in layer.inputs],
                               output=self._scale_or_none(layer.name), weight=weight_scales,
                               weight_granularity=(engine.calibration.weight_granularity
                                                   if weight_scales is not None else None)),
            input_stats=[_value_stats(self._values[n], threshold[n]) for n in layer.inputs],
            output_stats=_value_stats(out, threshold[layer.name]), weight_stats=weight_stats,
            error=error_stats(self._ref[layer.name], out.dequantize()),
            local_error=self._local_error(layer) if local else None)

    def _scale_or_none(self, name: str) -> float | None:
        try:
            return self.engine.tensor_scale(name)
        except QuantizeError:
            return None

    def _threshold(self, name: str) -> float | None:
        scale = self._scale_or_none(name)
        return None if scale is None else 127.0 * scale

    def _local_error(self, layer: Layer) -> ErrorStats | None:
        precision = self.precisions[layer.index]
        if precision == Precision.FLOAT:
            return None
        env = {n: Value(self._ref[n]) for n in layer.inputs}
        with torch.no_grad():
            out = self.engine.execute(layer, env, precision)
        return error_stats(self._ref[layer.name], out.dequantize())

    def _params(self, layer: Layer) -> dict[str, ParamValue]:
        params: dict[str, ParamValue] = {"count": 0}
        if layer.node.op == "call_module":
            module = self.engine.graph.module(layer)
            params["count"] = sum(p.numel() for p in module.parameters())
            if isinstance(module, nn.Conv2d):
                params.update(in_channels=module.in_channels, out_channels=module.out_channels,
                              kernel_size=list(module.kernel_size), stride=list(module.stride),
                              padding=module.padding if isinstance(module.padding, str) else list(module.padding),
                              dilation=list(module.dilation), groups=module.groups, bias=module.bias is not None)
            elif isinstance(module, nn.Linear):
                params.update(in_features=module.in_features, out_features=module.out_features,
                              bias=module.bias is not None)
            elif isinstance(module, nn.LeakyReLU):
                params["negative_slope"] = module.negative_slope
            elif isinstance(module, nn.Upsample):
                factor = module.scale_factor
                params.update(mode=module.mode, scale_factor=float(factor) if isinstance(factor, int | float)
                              else None)
        else:
            consts = [a for a in layer.node.args if isinstance(a, int | float | str | bool)]
            params["args"] = [float(a) if isinstance(a, float) else int(a) for a in consts
                              if isinstance(a, int | float)]
            for key, val in layer.node.kwargs.items():
                if isinstance(val, int | float | str | bool):
                    params[key] = val
        return params

    # ----------------------------------------------------------------------------------- edit and cross

    def edit_weights(self, index: int, *, values: torch.Tensor | np.ndarray | Sequence[Any] | None = None,
                     scale_channel: tuple[int, float] | None = None) -> EditResult:
        """Replace layer ``index``'s weights (``values``: same shape, float) or multiply output channel
        ``c`` by ``factor`` (``scale_channel=(c, factor)``); re-run the layer and report the change.

        The int8 weights and their scales are re-derived from the edited float weights. Later layers
        are invalidated (``position`` becomes ``index + 1``) and the float reference is recomputed.
        """
        layer = self._layer(index)
        if layer.kind not in WEIGHTED_KINDS:
            raise EditError(f"layer {index} ({layer.name}) is a {layer.op}: only Conv2d/Linear layers have weights")
        if (values is None) == (scale_channel is None):
            raise EditError("give exactly one of values=... or scale_channel=(channel, factor)")
        module = self.engine.graph.module(layer)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        if values is not None:
            new = _check_values(values, tuple(weight.shape), layer)
        else:
            assert scale_channel is not None
            new = _scaled_channel(weight.detach(), scale_channel, layer)
        self._advance_to(index)
        before = self._values[layer.name]
        with torch.no_grad():
            weight.copy_(new)
        self.engine.requantize_weights(index)
        self.edited.add(index)
        self._refresh_reference(index)
        self._invalidate(index)
        self._run_layer(layer)
        self.position = index + 1
        after = self._values[layer.name]
        old, now = before.dequantize(), after.dequantize()
        return EditResult(layer=self.inspect(index), before_output=_value_stats(before, self._threshold(layer.name)),
                          change=error_stats(old, now), changed_fraction=float((old != now).double().mean()),
                          position=self.position)

    def cross(self, index: int, to: str | Precision) -> SessionState:
        """CROSS: layers ``index``.. run in ``to`` (``float``/``hybrid``/``int8``); they re-run on the next step."""
        self._layer(index)
        target = parse_precision(to)
        for k in range(index, self.num_layers):
            self.precisions[k] = target
        self._invalidate(index)
        return self.state()

    def _invalidate(self, index: int) -> None:
        """Forget the values of layers ``index``.. (they must run again)."""
        for layer in self.engine.graph.layers[index:]:
            self._values.pop(layer.name, None)
        self.position = min(self.position, index)

    # -------------------------------------------------------------------------------------------- report

    def report(self) -> ModelReport:
        """Run the remaining layers and tabulate every layer's error against the float run."""
        self.run_all()
        rows: list[LayerError] = []
        for layer in self.engine.graph.layers:
            out = self._values[layer.name]
            rows.append(LayerError(
                index=layer.index, name=layer.name, op=layer.op, kind=layer.kind,
                precision=self.precisions[layer.index].value, output_shape=list(out.tensor.shape),
                error=error_stats(self._ref[layer.name], out.dequantize()),
                local_error=None if layer.kind in PASS_THROUGH_KINDS else self._local_error(layer),
                saturated_fraction=_value_stats(out, self._threshold(layer.name)).saturated_fraction))
        counts: dict[str, int] = {}
        for p in self.precisions:
            counts[p.value] = counts.get(p.value, 0) + 1
        ranked = sorted((r for r in rows if r.local_error is not None and r.local_error.sqnr_db is not None),
                        key=lambda r: r.local_error.sqnr_db if r.local_error and r.local_error.sqnr_db else 0.0)
        output = self.engine.graph.output_name
        return ModelReport(calibrator=self.engine.calibration.method, precisions=counts, layers=rows,
                           output_error=error_stats(self._ref[output], self._values[output].dequantize()),
                           worst_layers=[r.name for r in ranked[:5]])

    def tensor(self, name: str) -> torch.Tensor:
        """The session's current value of tensor ``name`` (dequantized float); it must have been computed."""
        if name not in self._values:
            raise SessionStateError(f"tensor {name!r} has not been computed yet (or was invalidated); run_to first")
        return self._values[name].dequantize()

    def reference(self, name: str) -> torch.Tensor:
        """The float reference run's value of tensor ``name`` (same image, same edited weights)."""
        if name not in self._ref:
            raise LayerIndexError(f"no tensor named {name!r}")
        return self._ref[name]

    def state(self) -> SessionState:
        return SessionState(session_id=self.session_id, position=self.position, num_layers=self.num_layers,
                            precisions=[p.value for p in self.precisions], edited_layers=sorted(self.edited),
                            image_shape=list(self.image.shape), bytes_reserved=self.bytes_reserved)

    def _estimate_bytes(self) -> int:
        """Upper bound of this session's memory: weights (float + int8) and two float runs of the image."""
        params = sum(p.numel() * (p.element_size() + 1) for p in self.engine.graph.graph_module.parameters())
        activations = sum(t.numel() * 4 for t in self._ref.values() if isinstance(t, torch.Tensor))
        return int(params + 2 * activations)


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[0] != 1):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise QuantizeError(f"image must be a 3xHxW (or 1x3xHxW) float tensor in [0, 1], got {shape}")
    if not image.is_floating_point():
        raise QuantizeError(f"image must be float in [0, 1], got dtype {image.dtype}")
    return (image[None] if image.ndim == 3 else image).float().contiguous()


def _value_stats(value: Value, threshold: float | None) -> TensorStats:
    if value.is_int8:
        return tensor_stats(value.tensor, scale=value.scale, int8=True)
    return tensor_stats(value.tensor, threshold=threshold)


def _check_values(values: torch.Tensor | np.ndarray | Sequence[Any], shape: tuple[int, ...],
                  layer: Layer) -> torch.Tensor:
    where = f"layer {layer.index} ({layer.name})"
    if isinstance(values, torch.Tensor | np.ndarray):
        tensor = torch.as_tensor(values)
        if not tensor.is_floating_point():
            raise EditError(f"{where}: weights must be a float tensor, got dtype {tensor.dtype}")
    else:
        try:
            tensor = torch.tensor(values, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EditError(f"{where}: weights must be a nested list of numbers of shape {list(shape)}: {exc}") from exc
    if tuple(tensor.shape) != shape:
        raise EditError(f"{where}: weights must have shape {list(shape)}, got {list(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise EditError(f"{where}: weights must be finite (no NaN or inf)")
    return tensor.float()


def _scaled_channel(weight: torch.Tensor, scale_channel: tuple[int, float], layer: Layer) -> torch.Tensor:
    try:
        channel, factor = scale_channel
    except (TypeError, ValueError):
        raise EditError(f"scale_channel must be (channel, factor), got {scale_channel!r}") from None
    channels = weight.shape[0]
    if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < channels:
        raise EditError(f"layer {layer.index} ({layer.name}): channel {channel!r} out of range 0 .. {channels - 1}")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not np.isfinite(factor):
        raise EditError(f"layer {layer.index} ({layer.name}): factor must be a finite number, got {factor!r}")
    new = weight.clone()
    new[channel] *= float(factor)
    return new
