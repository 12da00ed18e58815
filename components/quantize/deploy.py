"""Deployable int8: the detector converted to PyTorch's quantized CPU kernels, fed with OUR calibrated ranges.

The float model is BN-folded and traced exactly as for the workbench (:class:`~.graph.QuantGraph`), then
``torch.ao`` FX graph-mode quantization (``prepare_fx`` / ``convert_fx``) turns it into a GraphModule of
quantized modules (``torch.ao.nn.quantized.Conv2d`` on fbgemm/oneDNN for ``x86``, QNNPACK for
``qnnpack``). No data is run through torch's observers: every observer is replaced by one that returns
fixed quantization parameters taken from a :class:`~.calibrate.Calibration`:

- activations: quint8 in [0, 255], ``scale = threshold / 127`` (the calibration's own ``scale``) and
  ``zero_point = 128``. ``q_u8 = q_s8 + 128``, so this is exactly the engine's symmetric int8 grid
  ``[-128, 127] * scale`` shifted by 128 (full 0..255 range, no ``reduce_range``: this CPU has VNNI; on
  AVX2-only CPUs fbgemm's int16 pair sums can saturate with full-range activations).
- weights: qint8, symmetric, per output channel (or per tensor), ``scale = max|w| / 127`` and values in
  [-127, 127]; power-of-two scales when the calibration is ``log2`` - the same scales as the engine's
  :func:`~.engine.quantize_weight`.

Each observer is mapped to the tensor of the QuantGraph it observes (fx node names are kept by
``prepare_fx``; pass-through ops such as nearest upsample, flatten, transpose resolve to their source
tensor as in :meth:`.QuantEngine.tensor_scale`). ``torch.cat`` is re-declared "output uses a different
observer than its inputs" (torch's default shares one observer across a cat's inputs and output, which
would force e.g. the P3 feature map onto the cat's range); each input is then requantized to the cat's
range, as in the engine. Fixed-range ops (sigmoid, hardsigmoid, tanh, softmax) keep torch's fixed
output qparams (e.g. sigmoid: scale 1/256, zero point 0 - the whole [0, 1) range), a documented fallback
listed in :attr:`Int8Export.fixed_range`. Any other observer that cannot be mapped is an error.

Where the exported model differs from the engine's integer-only mode: fbgemm requantizes with a float
multiplier (the engine: fixed point), adds the float bias after the int32 accumulation (the engine: int32
bias), and LeakyReLU/add requantize in float; results agree within about one LSB per layer.

FX graph-mode quantization is deprecated in favour of torchao's pt2e flow, which is not installed here;
FX works in torch 2.14 and its deprecation warnings are filtered around the calls that emit them only.

An int8 model directory holds the float model files (``config.json`` + ``model.safetensors`` as
:func:`components.models.weights.save_detector` writes them) and ``quantization.json``
(:class:`Int8Spec`). Nothing is pickled: the quantized model is rebuilt deterministically at load time.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import fx, nn

from components.data.format import sha256_file
from components.models.detector import Detections, Detector, DetectorConfig
from components.models.files import find_dir
from components.models.weights import CONFIG_FILE, WEIGHTS_FILE, ModelFileError, load_detector
from components.quantize.calibrate import CALIBRATORS, Calibration, TensorRange
from components.quantize.engine import quantize_weight
from components.quantize.errors import CalibrationError, QuantizeError, UnsupportedLayerError
from components.quantize.graph import PASS_THROUGH_KINDS, QuantGraph, is_declared_leaf

QUANT_FILE = "quantization.json"
FORMAT_VERSION = 1
BACKENDS = ("x86", "fbgemm", "qnnpack")
ACT_ZERO_POINT = 128  # quint8 zero point of a symmetric range: q_u8 = q_s8 + 128
ACT_QMAX_S8 = 127  # scale = threshold / 127, as in components.quantize.calibrate
W_QMAX = 127
Backend = Literal["x86", "fbgemm", "qnnpack"]
Int8Kind = Literal["int8_detector", "int8_segmenter"]
T = TypeVar("T")


class Int8ModelError(QuantizeError, ModelFileError):
    """An int8 model directory is missing files, or its ``quantization.json`` is invalid or does not match."""


# --------------------------------------------------------------------------------------------- spec


class Int8Spec(BaseModel):
    """``quantization.json``: how to rebuild the int8 model from the float weights next to it."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = 1
    kind: Int8Kind = Field(
        default="int8_detector", description="int8_segmenter: a segmenter, image encoder in int8 (see .segment)")
    backend: Backend = Field(description="torch.backends.quantized engine the model is built for")
    calibrator: Literal["minmax", "percentile", "kl", "log2"]
    percentile: float | None = Field(default=None, ge=50.0, le=100.0, description="only for 'percentile'")
    per_channel: bool = Field(description="weights symmetric per output channel (else one scale per tensor)")
    power_of_two: bool = Field(default=False, description="weight scales are powers of two (log2)")
    activation_scheme: Literal["symmetric_quint8_zp128"] = "symmetric_quint8_zp128"
    activations: dict[str, TensorRange] = Field(description="tensor (fx node) name -> calibrated range")
    unclipped: list[str] = Field(default_factory=list, description="tensors kept at max |x| by the calibrator")
    calibration_images: int = Field(ge=1)
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the float weights file")
    img_size: int = Field(ge=32, description="input side the model was calibrated for (letterboxed square)")
    fixed_range: list[str] = Field(default_factory=list,
                                   description="tensors using torch's fixed output range (sigmoid, tanh...)")
    created_by: str = "modelcommons"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    torch_version: str = Field(default_factory=lambda: torch.__version__)

    def calibration(self) -> Calibration:
        """The :class:`Calibration` these ranges came from (enough to rebuild the exported model)."""
        return Calibration(method=self.calibrator, percentile=self.percentile, images=self.calibration_images,
                           weight_granularity="per_channel" if self.per_channel else "per_tensor",
                           power_of_two=self.power_of_two, activations=self.activations,
                           unclipped=self.unclipped)


# ---------------------------------------------------------------------------------------- observers


class CalibratedActivationObserver(torch.ao.quantization.ObserverBase):
    """An activation 'observer' that observes nothing: its qparams are assigned from a Calibration.

    quint8, ``zero_point = 128``, ``scale = threshold / 127`` (see module docstring). ``calculate_qparams``
    before :meth:`set_range` is an error, so an observer left unmapped cannot slip through convert.
    """

    def __init__(self, dtype: torch.dtype = torch.quint8, **_: Any) -> None:
        super().__init__(dtype=torch.quint8)
        self.qscheme = torch.per_tensor_affine
        self.quant_min, self.quant_max = 0, 255
        self.is_dynamic = False
        self.tensor_name: str | None = None
        self.scale: float | None = None

    def set_range(self, tensor_name: str, scale: float) -> None:
        self.tensor_name, self.scale = tensor_name, float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self.scale is None:
            raise UnsupportedLayerError("an activation observer was not mapped to a calibrated tensor")
        return (torch.tensor([self.scale], dtype=torch.float32),
                torch.tensor([ACT_ZERO_POINT], dtype=torch.int32))

    def extra_repr(self) -> str:
        return f"tensor={self.tensor_name}, scale={self.scale}, zero_point={ACT_ZERO_POINT}"


class CalibratedWeightObserver(torch.ao.quantization.ObserverBase):
    """Weight observer giving the engine's scales (:func:`~.engine.quantize_weight`): qint8 in [-127, 127]."""

    def __init__(self, dtype: torch.dtype = torch.qint8, *, per_channel: bool = True, power_of_two: bool = False,
                 **_: Any) -> None:
        super().__init__(dtype=torch.qint8)
        self.per_channel, self.power_of_two = per_channel, power_of_two
        self.qscheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        self.ch_axis = 0
        self.quant_min, self.quant_max = -W_QMAX, W_QMAX
        self.is_dynamic = False
        self.weight: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.weight = w.detach()
        return w

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if self.weight is None:
            raise RuntimeError("weight observer called before it saw the weight")
        scale = quantize_weight(self.weight, None, per_channel=self.per_channel, power_of_two=self.power_of_two).scale
        if self.per_channel:
            return scale.float(), torch.zeros(scale.shape, dtype=torch.int64)
        return scale[0].float(), torch.zeros((), dtype=torch.int64)  # every channel holds the tensor's scale


# ------------------------------------------------------------------------------------------- export


@dataclass
class Int8Export:
    """What :func:`export_int8_with_report` built: the quantized module and how each observer was fed."""

    module: fx.GraphModule
    scales: dict[str, float] = field(default_factory=dict)  # calibrated tensor name -> activation scale used
    fixed_range: list[str] = field(default_factory=list)  # tensors kept at torch's fixed qparams


@contextmanager
def _quiet_fx_deprecation() -> Iterator[None]:
    # FX graph-mode quantization warns that it is deprecated (torchao pt2e replaces it; torchao is not
    # installed here); only those warnings are silenced, only around our calls.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*")  # weight packing
        yield


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown int8 backend {backend!r}; allowed: {list(BACKENDS)}")
    if backend not in torch.backends.quantized.supported_engines:
        raise QuantizeError(f"int8 backend {backend!r} is not available in this torch build "
                            f"(available: {torch.backends.quantized.supported_engines})")
    return backend


def use_backend(backend: str) -> None:
    """Select ``backend`` as torch's quantized engine (a process-wide setting; packed weights need it)."""
    if torch.backends.quantized.engine != backend:
        torch.backends.quantized.engine = backend


def _backend_config(backend: str) -> Any:
    from torch.ao.quantization.backend_config import (
        BackendConfig,
        get_fbgemm_backend_config,
        get_qnnpack_backend_config,
    )
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config  # not re-exported

    config = {"x86": get_x86_backend_config, "fbgemm": get_fbgemm_backend_config,
              "qnnpack": get_qnnpack_backend_config}[backend]()
    # torch.cat is left out, so it runs in float between a dequantize and the consumer's quantize at the
    # cat's calibrated range (see module docstring): torch's quantized cat needs equal input qparams.
    without_cat = BackendConfig(config.name)
    without_cat.set_backend_pattern_configs([c for c in config.configs if c.pattern is not torch.cat])
    return without_cat


def _qconfig_mapping(backend: str, *, per_channel: bool, power_of_two: bool) -> Any:
    from torch.ao.quantization import QConfig, get_default_qconfig_mapping
    from torch.ao.quantization.observer import FixedQParamsObserver, ReuseInputObserver

    weight = CalibratedWeightObserver.with_args(per_channel=per_channel, power_of_two=power_of_two)
    ours = QConfig(activation=CalibratedActivationObserver.with_args(), weight=weight)
    per_tensor = QConfig(activation=CalibratedActivationObserver.with_args(),
                         weight=CalibratedWeightObserver.with_args(per_channel=False, power_of_two=power_of_two))
    mapping = get_default_qconfig_mapping(backend)
    mapping.set_global(ours)
    for object_type, qconfig in list(mapping.object_type_qconfigs.items()):
        if qconfig is None:  # explicitly not quantized
            continue
        observer_cls = qconfig.activation  # a class, or a with_args() wrapper around functools.partial
        observer_cls = getattr(getattr(observer_cls, "p", None), "func", observer_cls)
        if isinstance(observer_cls, type) and issubclass(observer_cls, FixedQParamsObserver | ReuseInputObserver):
            continue  # fixed-range ops (documented fallback) and reshape (reuses its input's observer)
        transposed = isinstance(object_type, type) and issubclass(object_type, nn.modules.conv._ConvTransposeNd)
        mapping.set_object_type(object_type, per_tensor if transposed else ours)  # fbgemm: per-tensor only
    return mapping


def _source_tensor(graph: QuantGraph, name: str) -> str:
    """The calibrated tensor behind ``name``: pass-through layers keep their input's range."""
    while name != graph.input_name:
        layer = graph.by_name(name)
        if layer.kind not in PASS_THROUGH_KINDS:
            break
        name = layer.inputs[0]
    return name


def _feed_observers(prepared: fx.GraphModule, graph: QuantGraph, calibration: Calibration) -> Int8Export:
    """Assign every activation observer of ``prepared`` the calibrated scale of the tensor it observes."""
    from torch.ao.quantization.observer import FixedQParamsObserver, NoopObserver, ReuseInputObserver

    known = {graph.input_name} | {layer.name for layer in graph.layers}
    result = Int8Export(module=prepared)
    assigned: dict[int, str] = {}  # id(observer) -> source tensor (shared observers must agree)
    for node in prepared.graph.nodes:
        if node.op != "call_module":
            continue
        observer = prepared.get_submodule(str(node.target))
        if not isinstance(observer, torch.ao.quantization.ObserverBase):
            continue
        observed = node.args[0]
        observed_name = observed.name if isinstance(observed, fx.Node) else None
        # Chains of observers (an output observer, then a consumer's input observer) observe the same tensor.
        while isinstance(observed, fx.Node) and observed.op == "call_module" and isinstance(
                prepared.get_submodule(str(observed.target)), torch.ao.quantization.ObserverBase):
            observed = observed.args[0]
            observed_name = observed.name if isinstance(observed, fx.Node) else None
        if isinstance(observer, FixedQParamsObserver):
            result.fixed_range.append(str(observed_name))
            continue
        if isinstance(observer, ReuseInputObserver | NoopObserver):
            continue
        if not isinstance(observer, CalibratedActivationObserver):
            raise UnsupportedLayerError(f"observer {node.name} ({type(observer).__name__}) on tensor "
                                        f"{observed_name!r} has no mapping to a calibrated range")
        if observed_name not in known:
            raise UnsupportedLayerError(f"observer {node.name} observes {observed_name!r}, which is not a tensor "
                                        f"of the traced model; cannot feed it a calibrated range")
        source = _source_tensor(graph, observed_name)
        if source not in calibration.activations:
            raise CalibrationError(f"calibration has no range for tensor {source!r} (observed by {node.name}); "
                                   f"was it made for this model?")
        previous = assigned.get(id(observer))
        if previous is not None and previous != source:
            raise UnsupportedLayerError(
                f"torch shares one observer between tensors {previous!r} and {source!r} (observer {node.name}), "
                f"but they have different calibrated ranges; this layer pattern is not supported for export")
        assigned[id(observer)] = source
        observer.set_range(source, calibration.activations[source].scale)
        result.scales[source] = calibration.activations[source].scale
    result.fixed_range = sorted(set(result.fixed_range))
    return result


def export_int8_with_report(model: Detector, calibration: Calibration, *, backend: str = "x86",
                            per_channel: bool = True) -> Int8Export:
    """:func:`export_int8` plus which calibrated scale each tensor got and which kept a fixed range."""
    return export_module_int8(model, calibration, example=torch.zeros(1, 3, model.config.img_size,
                                                                      model.config.img_size),
                              backend=backend, per_channel=per_channel)


def export_module_int8(model: nn.Module, calibration: Calibration, *, example: torch.Tensor, backend: str = "x86",
                       per_channel: bool = True, float_types: Sequence[type[nn.Module]] = ()) -> Int8Export:
    """:func:`export_int8_with_report` for any single-input, single-output model ``QuantGraph`` can trace.

    Modules of ``float_types`` (e.g. ``nn.LayerNorm``, ``nn.GELU``) and the graph's declared leaves
    (modules with a ``quant_kind``, see :mod:`.graph`) get no qconfig: they run in float between a
    dequantize and the next quantized consumer's quantize (at that tensor's calibrated range).
    """
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    check_backend(backend)
    use_backend(backend)
    graph = QuantGraph(model)  # deep copy, eval, BN folded, identities removed, activations not in place
    gm = copy.deepcopy(graph.graph_module)

    backend_config = _backend_config(backend)
    mapping = _qconfig_mapping(backend, per_channel=per_channel, power_of_two=calibration.power_of_two)
    leaves = list(dict.fromkeys(type(m) for m in gm.modules() if is_declared_leaf(m)))
    for module_type in (*leaves, *float_types):
        mapping.set_object_type(module_type, None)
    # torch's tracer would trace into the declared leaves (they are not torch.nn classes): keep them whole.
    custom = PrepareCustomConfig().set_non_traceable_module_classes(leaves)
    with _quiet_fx_deprecation():
        prepared = prepare_fx(gm, mapping, example_inputs=(example,), prepare_custom_config=custom,
                              backend_config=backend_config)
        report = _feed_observers(prepared, graph, calibration)
        converted = convert_fx(prepared, backend_config=backend_config)
    _inline_qparams(converted)
    report.module = converted.eval()
    return report


def _inline_qparams(gm: fx.GraphModule) -> None:
    """Pass scales and zero points as Python numbers instead of 0-dim tensor attributes, in place.

    convert_fx stores them as tensors (quantize_per_tensor, quantized add, quantized LeakyReLU's buffers),
    which every call converts back with ``.item()``: about 50 scalar reads per detector forward, a
    measurable share of a batch-1 int8 forward. The values are the same (float32 scale widened to double,
    as the kernels do), so outputs are bit-identical.
    """
    from torch.ao.nn.quantized import LeakyReLU as QLeakyReLU

    def literal(arg: Any) -> Any:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = getattr(gm, str(arg.target))
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                return value.item()
        return arg

    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.ops.quantized.add):
            node.args = tuple(literal(a) for a in node.args)
        elif node.op == "call_module" and isinstance(module := gm.get_submodule(str(node.target)), QLeakyReLU):
            with gm.graph.inserting_after(node):
                scale, zero_point = cast(torch.Tensor, module.scale), cast(torch.Tensor, module.zero_point)
                call = gm.graph.call_function(torch.ops.quantized.leaky_relu, (
                    node.args[0], float(module.negative_slope), False, float(scale), int(zero_point)))
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def export_int8(model: Detector, calibration: Calibration, *, backend: str = "x86",
                per_channel: bool = True) -> fx.GraphModule:
    """A quantized copy of ``model`` on torch's int8 kernels; forward: Bx3xHxW float -> raw BxNx(5+K) float.

    Activation qparams come from ``calibration`` (see module docstring), weights are int8 per channel
    (``per_channel=True``) or per tensor. ``model`` is not modified. Sets the process-wide
    ``torch.backends.quantized.engine`` to ``backend``.
    """
    return export_int8_with_report(model, calibration, backend=backend, per_channel=per_channel).module


# -------------------------------------------------------------------------------------------- model


def freeze_int8(quantized: fx.GraphModule, *, backend: str = "x86", img_size: int = 160) -> torch.jit.ScriptModule:
    """``quantized`` traced and frozen with TorchScript, in memory only (never saved, so never unpickled).

    At batch 1 the GraphModule's Python dispatch of ~100 small int8 ops costs about a quarter of the
    forward; the frozen graph runs them from C++. Outputs are bit-identical to ``quantized`` for any
    batch size and any H, W that are multiples of 16 (the detector's forward has no shape-dependent
    Python control flow; tested).
    """
    use_backend(backend)
    example = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad():
        traced = torch.jit.trace(quantized, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


class Int8Detector:
    """A detector whose raw outputs come from the exported int8 GraphModule; decoding and NMS are the float model's.

    Same contract as :class:`Detector`'s ``predict`` (``images`` Bx3xHxW float in [0, 1], H and W multiples
    of 16 -> one :class:`Detections` per image, pixel XYXY). CPU only (quantized kernels).
    """

    precision = "int8"

    def __init__(self, float_model: Detector, quantized: fx.GraphModule, *, backend: str = "x86",
                 spec: Int8Spec | None = None) -> None:
        self.float_model = float_model.eval()  # postprocess (grid, decode, NMS) only
        self.quantized = quantized.eval()
        self.backend = backend
        self.spec = spec
        self.runner = freeze_int8(self.quantized, backend=backend, img_size=float_model.config.img_size)

    @property
    def config(self) -> DetectorConfig:
        return self.float_model.config

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.config.class_names

    def eval(self) -> Int8Detector:
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images Bx3xHxW float in [0, 1] -> raw BxNx(5+K) float, as :meth:`Detector.forward`."""
        use_backend(self.backend)  # packed int8 weights run on the engine they were packed for
        return cast(torch.Tensor, self.runner(images.float().cpu()))

    __call__ = forward

    @torch.no_grad()
    def predict(self, images: torch.Tensor, **kwargs: Any) -> list[Detections]:
        """images Bx3xHxW in [0, 1] -> detections, as :meth:`Detector.predict` (same keyword options)."""
        return self.float_model.postprocess(self.forward(images), images.shape[-2], images.shape[-1], **kwargs)


# --------------------------------------------------------------------------------------------- files


def is_int8_model_dir(path: Path) -> bool:
    """True when ``path`` holds ``quantization.json`` next to the float model files."""
    path = Path(path)
    return all((path / name).is_file() for name in (QUANT_FILE, CONFIG_FILE, WEIGHTS_FILE))


def find_int8_dir(root: Path) -> Path:
    """The int8 model directory (``quantization.json`` with its model files) at or under ``root``."""
    if (found := find_dir(root, QUANT_FILE, is_int8_model_dir)) is None:
        raise Int8ModelError(f"{root}: no int8 model directory ({QUANT_FILE} with its model files) under it")
    return found


# Which function rebuilds each kind of int8 directory (named in the error when the wrong one is used).
INT8_LOADERS: dict[str, str] = {"int8_detector": "components.quantize.deploy.load_int8_model",
                                "int8_segmenter": "components.quantize.segment.load_int8_segmenter"}


def check_calibrator(calibrator: str, calibration: Calibration) -> None:
    """``calibrator`` must be a known method and the one ``calibration`` was made with."""
    if calibrator not in CALIBRATORS:
        raise CalibrationError(f"unknown calibrator {calibrator!r}; allowed: {list(CALIBRATORS)}")
    if calibrator != calibration.method:
        raise CalibrationError(f"calibrator {calibrator!r} does not match the calibration's method "
                               f"{calibration.method!r}")


def write_int8_dir(model_dir: Path, out_dir: Path, calibration: Calibration, *, kind: Int8Kind, backend: str,
                   per_channel: bool, calibrator: str, percentile: float, img_size: int,
                   fixed_range: Sequence[str] = ()) -> Path:
    """Copy the float ``config.json`` and weights of ``model_dir`` into ``out_dir`` and write
    ``quantization.json`` beside them (ranges, backend, weight granularity, sha256 of the copied weights).

    The int8 directory format of detectors and segmenters alike; the caller has checked the arguments
    and run the export once, so a model that cannot be exported never gets a directory.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if (model_dir / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(model_dir / name, out_dir / name)
    spec = Int8Spec(
        kind=kind, backend=cast(Backend, backend), calibrator=calibration.method,
        percentile=calibration.percentile if calibration.percentile is not None
        else (percentile if calibrator == "percentile" else None),
        per_channel=per_channel, power_of_two=calibration.power_of_two, activations=calibration.activations,
        unclipped=calibration.unclipped, calibration_images=calibration.images,
        weights_sha256=sha256_file(out_dir / WEIGHTS_FILE), img_size=img_size, fixed_range=list(fixed_range))
    (out_dir / QUANT_FILE).write_text(spec.model_dump_json(indent=2))
    return out_dir


def save_int8_model(model_dir: Path, calibration: Calibration, out_dir: Path, *, backend: str = "x86",
                    per_channel: bool = True, calibrator: str, percentile: float = 99.99) -> Path:
    """Write a self-contained int8 model directory ``out_dir``; returns it.

    ``model_dir`` is a float detector directory (``config.json`` + ``model.safetensors``); both files are
    copied and ``quantization.json`` records ``calibration``'s ranges, the backend, the weight granularity
    and the sha256 of the copied weights (:func:`write_int8_dir`). The export is run once here so an
    unmappable model fails now, not at load time. ``calibrator`` must be ``calibration.method``;
    ``percentile`` is recorded for ``percentile`` calibrations that do not carry one.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_backend(backend)
    check_calibrator(calibrator, calibration)
    model = load_detector(model_dir)
    export = export_int8_with_report(model, calibration, backend=backend, per_channel=per_channel)
    return write_int8_dir(model_dir, out_dir, calibration, kind="int8_detector", backend=backend,
                          per_channel=per_channel, calibrator=calibrator, percentile=percentile,
                          img_size=model.config.img_size, fixed_range=export.fixed_range)


def read_int8_spec(path: Path) -> Int8Spec:
    """Parse and validate ``<path>/quantization.json``; :class:`Int8ModelError` naming the file and field."""
    file = Path(path) / QUANT_FILE
    try:
        text = file.read_text()
    except FileNotFoundError as exc:
        raise Int8ModelError(f"{file}: missing; an int8 model directory needs {QUANT_FILE}, {CONFIG_FILE} "
                             f"and {WEIGHTS_FILE}") from exc
    try:
        return Int8Spec.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] not in ("missing", "json_invalid") else "")
            for err in exc.errors())
        raise Int8ModelError(f"{file}: invalid: {problems}") from exc


def check_int8_dir(path: Path, kind: Int8Kind) -> Int8Spec:
    """The validated ``quantization.json`` of the int8 directory ``path``, after the checks every loader
    needs: the right kind, the float weights present with the recorded sha256, a known backend.

    Raises :class:`Int8ModelError` naming the file and field.
    """
    spec = read_int8_spec(path)
    if spec.kind != kind:
        raise Int8ModelError(f"{path / QUANT_FILE}: field kind is {spec.kind!r}, not {kind!r}; load it with "
                             f"{INT8_LOADERS[spec.kind]}")
    if spec.weights_file != WEIGHTS_FILE:
        raise Int8ModelError(f"{path / QUANT_FILE}: field weights_file must be {WEIGHTS_FILE!r}, "
                             f"got {spec.weights_file!r}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise Int8ModelError(f"{weights}: missing; the int8 model is rebuilt from the float weights")
    actual = sha256_file(weights)
    if actual != spec.weights_sha256:
        raise Int8ModelError(f"{path / QUANT_FILE}: field weights_sha256 {spec.weights_sha256} does not match "
                             f"{weights} (sha256 {actual}); the ranges were calibrated for other weights")
    try:
        check_backend(spec.backend)
    except QuantizeError as exc:
        raise Int8ModelError(f"{path / QUANT_FILE}: field backend: {exc}") from exc
    return spec


def rebuild_int8(path: Path, export: Callable[[], T]) -> T:
    """Run ``export`` (the float model exported with the recorded ranges); a range that does not fit the
    model becomes :class:`Int8ModelError` naming ``quantization.json`` and ``config.json``."""
    try:
        return export()
    except QuantizeError as exc:
        raise Int8ModelError(f"{path / QUANT_FILE}: field activations does not fit {path / CONFIG_FILE}: "
                             f"{exc}") from exc


def load_int8_model(path: Path, *, device: torch.device | None = None) -> Int8Detector:
    """Rebuild the int8 detector stored in ``path`` (see :func:`save_int8_model`).

    Validates ``quantization.json``, checks the float weights' sha256 against it (:func:`check_int8_dir`),
    loads the float model and exports it again with the recorded ranges (deterministic: same outputs as
    when it was saved). Quantized kernels run on the CPU only: ``device`` must be None or a CPU device.
    """
    path = Path(path)
    if device is not None and torch.device(device).type != "cpu":
        raise Int8ModelError(f"{path}: int8 models run on the CPU only, got device {device}")
    spec = check_int8_dir(path, "int8_detector")
    model = load_detector(path)
    quantized = rebuild_int8(path, lambda: export_int8(model, spec.calibration(), backend=spec.backend,
                                                       per_channel=spec.per_channel))
    return Int8Detector(model, quantized, backend=spec.backend, spec=spec)
