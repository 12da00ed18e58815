"""Deployable int8: PyTorch's quantized kernels fed with our calibrated ranges.

Tolerances, and why: fbgemm requantizes a conv's int32 accumulator with a float multiplier and adds the
float bias after accumulation, where our engine uses an int32 bias and gemmlowp fixed point. Both round
the same real value, so one layer fed the same int8 input differs by at most 1 LSB (ties and the last
bits of the multiplier). Through a whole network those 1-LSB differences propagate; the raw output then
stays within a few output LSBs, and almost all of it within one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.ao.nn import quantized as nnq

from components.data.loader import load_samples
from components.evaluate.coco import coco_map, predict_coco
from components.models.detector import Detector
from components.models.weights import load_detector, save_detector
from components.quantize.calibrate import Calibration, calibrate, calibration_batches
from components.quantize.deploy import (
    ACT_ZERO_POINT,
    QUANT_FILE,
    Int8Detector,
    Int8ModelError,
    Int8Spec,
    export_int8,
    export_int8_with_report,
    is_int8_model_dir,
    load_int8_model,
    save_int8_model,
)
from components.quantize.engine import QuantEngine, Value, quantize_weight
from components.quantize.errors import QuantizeError
from components.quantize.graph import QuantGraph
from components.quantize.metrics import error_stats


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _to_quint8(value: Value) -> torch.Tensor:
    """The engine's symmetric int8 value as torch's quint8 with zero point 128 (same grid)."""
    assert value.scale is not None
    u8 = (value.tensor.to(torch.int16) + ACT_ZERO_POINT).to(torch.uint8)
    return torch._make_per_tensor_quantized_tensor(u8, value.scale, ACT_ZERO_POINT)


@pytest.fixture(scope="module")
def exported(detector: Detector, calibration: Calibration) -> torch.fx.GraphModule:
    return export_int8(detector, calibration)


def test_every_quantized_conv_matches_engine_int8_within_one_lsb(exported, engine: QuantEngine,
                                                                   images: list[torch.Tensor]) -> None:
    values: dict[str, Value] = {}
    engine.run(images[0], "int8", on_value=lambda layer, value: values.__setitem__(layer.name, value))
    graph = engine.graph
    checked = 0
    for layer in graph.layers:
        if layer.kind != "conv2d":
            continue
        name = layer.inputs[0]
        x = values[name] if name in values else Value(
            torch.clamp(torch.round(images[0] / engine.tensor_scale(name)), -128, 127).to(torch.int8),
            engine.tensor_scale(name))
        qconv = exported.get_submodule(layer.target)
        assert isinstance(qconv, nnq.Conv2d)
        theirs = qconv(_to_quint8(x)).int_repr().to(torch.int16) - ACT_ZERO_POINT
        ours = values[layer.name].tensor.to(torch.int16)
        diff = (theirs - ours).abs()
        assert int(diff.max()) <= 1, (layer.name, int(diff.max()))
        assert float((diff > 0).float().mean()) < 0.02, layer.name  # and nearly always identical
        checked += 1
    assert checked == sum(layer.kind == "conv2d" for layer in graph.layers) == 22


def test_scales_inside_the_converted_model_are_our_calibration(exported, detector: Detector,
                                                               calibration: Calibration, graph: QuantGraph) -> None:
    # The image is quantized with the input tensor's calibrated range: scale = threshold / 127, zero point 128.
    first = next(n for n in exported.graph.nodes if n.target is torch.quantize_per_tensor)
    assert first.args[1:] == (_f32(calibration.activations["images"].threshold / 127), ACT_ZERO_POINT, torch.quint8)
    for layer in graph.layers:
        if layer.kind != "conv2d":
            continue
        module = exported.get_submodule(layer.target)
        assert module.scale == _f32(calibration.scale(layer.name)), layer.name
        assert module.zero_point == ACT_ZERO_POINT
        if layer.kind == "conv2d":  # weights: symmetric int8 per output channel, the engine's scales
            float_conv = graph.module(layer)
            assert isinstance(float_conv, torch.nn.Conv2d)
            qw = quantize_weight(float_conv.weight, None, per_channel=True)
            weight = module.weight()
            assert torch.equal(weight.q_per_channel_scales(), qw.scale.float().double()), layer.name
            assert torch.equal(weight.q_per_channel_zero_points(), torch.zeros_like(qw.scale, dtype=torch.int64))
            assert int(weight.int_repr().abs().max()) <= 127
            assert (weight.int_repr().to(torch.int16) - qw.q.to(torch.int16)).abs().max() <= 1
    # LeakyReLUs and residual adds requantize to their own calibrated ranges (graph order; the qparams are
    # inlined as Python numbers, the float32 value widened).
    calls = [n for n in exported.graph.nodes if n.op == "call_function"]
    leaky = [(n.args[3], n.args[4]) for n in calls if n.target is torch.ops.quantized.leaky_relu]
    assert leaky == [(_f32(calibration.scale(layer.name)), ACT_ZERO_POINT)
                     for layer in graph.layers if layer.kind == "leaky_relu"]
    adds = [(n.args[2], n.args[3]) for n in calls if n.target is torch.ops.quantized.add]
    assert adds == [(_f32(calibration.scale(name)), ACT_ZERO_POINT) for name in ("add", "add_1", "add_2")]


def test_export_report_maps_every_quantized_tensor(detector: Detector, calibration: Calibration,
                                                   graph: QuantGraph) -> None:
    report = export_int8_with_report(detector, calibration)
    assert report.fixed_range == []
    # Every tensor gets its own range except the pass-through views and the final cat, whose output
    # leaves the model in float (cats run in float, see deploy's docstring).
    expected = {graph.input_name} | {layer.name for layer in graph.layers
                                     if layer.kind not in ("upsample", "flatten", "transpose")} - {"cat_3"}
    assert set(report.scales) == expected
    assert all(report.scales[name] == calibration.scale(name) for name in expected)


def test_exported_model_tracks_engine_int8_and_float(exported, detector: Detector, engine: QuantEngine,
                                                     calibration: Calibration, images: list[torch.Tensor]) -> None:
    x = torch.cat(images)
    ours, theirs, ref = engine.run(x, "int8"), exported(x), detector(x)
    lsb = (theirs - ours).abs() / calibration.scale("cat_3")
    assert float(lsb.max()) <= 3.0
    assert float((lsb > 1.0).float().mean()) < 0.01
    deployed, engine_err = error_stats(ref, theirs), error_stats(ref, ours)
    assert deployed.sqnr_db is not None and engine_err.sqnr_db is not None
    assert deployed.sqnr_db > 40.0 and deployed.sqnr_db > engine_err.sqnr_db - 1.0


def test_per_tensor_weights_and_fbgemm_backend(detector: Detector, calibration: Calibration,
                                               images: list[torch.Tensor]) -> None:
    model = export_int8(detector, calibration.model_copy(update={"weight_granularity": "per_tensor"}),
                        backend="fbgemm", per_channel=False)
    qconv = model.get_submodule("stem.conv")
    assert isinstance(qconv, nnq.Conv2d)
    weight = qconv.weight()
    assert weight.qscheme() == torch.per_tensor_affine and weight.q_zero_point() == 0  # symmetric: zp 0
    folded = QuantGraph(detector).graph_module.get_submodule("stem.conv")  # BN folded
    assert isinstance(folded, torch.nn.Conv2d)
    assert weight.q_scale() == _f32(float(folded.weight.abs().max().double() / 127))
    out, ref = model(images[0]), detector(images[0])
    stats = error_stats(ref, out)
    assert stats.sqnr_db is not None and stats.sqnr_db > 30.0
    torch.backends.quantized.engine = "x86"


def test_unknown_backend_and_gpu_device_are_refused(detector: Detector, calibration: Calibration,
                                                    tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match=r"unknown int8 backend 'tpu'.*'x86', 'fbgemm', 'qnnpack'"):
        export_int8(detector, calibration, backend="tpu")
    with pytest.raises(Int8ModelError, match="CPU only"):
        load_int8_model(tmp_path, device=torch.device("cuda"))


def test_a_calibration_for_another_model_is_an_error(detector: Detector, calibration: Calibration) -> None:
    partial = calibration.model_copy(update={"activations": {
        k: v for k, v in calibration.activations.items() if k != "stage3_0_act"}})
    with pytest.raises(QuantizeError, match="stage3_0_act"):
        export_int8(detector, partial)


# ----------------------------------------------------------------------------------- files, trained model


@pytest.fixture(scope="module")
def trained(trained_model_dir: Path, tiny_dataset: Path) -> tuple[Detector, Calibration]:
    model = load_detector(trained_model_dir).eval()
    batches = calibration_batches(tiny_dataset, img_size=96, split="train", count=16, batch_size=8)
    return model, calibrate(model, batches, method="percentile")


@pytest.fixture(scope="module")
def int8_dir(trained, trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, calibration = trained
    return save_int8_model(trained_model_dir, calibration, tmp_path_factory.mktemp("int8") / "model",
                           calibrator="percentile")


def test_save_and_load_round_trip_is_bit_identical(trained, int8_dir: Path, trained_model_dir: Path,
                                                   tiny_dataset: Path) -> None:
    model, calibration = trained
    assert sorted(p.name for p in int8_dir.iterdir()) == ["config.json", "model.safetensors", QUANT_FILE]
    assert is_int8_model_dir(int8_dir) and not is_int8_model_dir(trained_model_dir)
    spec = Int8Spec.model_validate_json((int8_dir / QUANT_FILE).read_text())
    assert (spec.backend, spec.calibrator, spec.percentile, spec.per_channel) == ("x86", "percentile", 99.99, True)
    assert spec.img_size == 96 and spec.activations == calibration.activations
    loaded = load_int8_model(int8_dir)
    assert isinstance(loaded, Int8Detector) and loaded.precision == "int8"
    assert loaded.config == model.config and loaded.eval() is loaded
    _, val = load_samples(tiny_dataset, "val", 96)
    x = torch.stack([s.image for s in val[:4]])
    assert torch.equal(loaded(x), export_int8(model, calibration)(x))


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (5, 3, 96, 96), (2, 3, 64, 128), (1, 3, 160, 96)])
def test_frozen_runner_is_bit_identical_to_the_graph_module_for_any_batch_and_size(
        trained, int8_dir: Path, shape: tuple[int, int, int, int]) -> None:
    # Traced once at 1x3x96x96: other batch sizes and sides must not be baked into the frozen graph.
    loaded = load_int8_model(int8_dir)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    out = loaded(x)
    assert out.shape[0] == shape[0] and torch.equal(out, loaded.quantized(x))


def test_int8_predictions_agree_with_float(trained, int8_dir: Path, tiny_dataset: Path) -> None:
    from torchvision.ops import box_iou

    model, _ = trained
    int8 = load_int8_model(int8_dir)
    _, val = load_samples(tiny_dataset, "val", 96)
    x = torch.stack([s.image for s in val])
    matched = total = 0
    for fdet, qdet in zip(model.predict(x, score_threshold=0.3), int8.predict(x, score_threshold=0.2), strict=True):
        for box, label in zip(fdet.boxes, fdet.labels, strict=True):
            total += 1
            same = qdet.labels == label
            if same.any() and float(box_iou(box[None], qdet.boxes[same]).max()) > 0.8:
                matched += 1
    assert total >= 5 and matched / total >= 0.9, (matched, total)
    ids = [s.image_id for s in val]
    float_map = coco_map(tiny_dataset, ids, predict_coco(model, val))["map50"]
    int8_map = coco_map(tiny_dataset, ids, predict_coco(int8, val))["map50"]  # type: ignore[arg-type]
    assert float_map > 0.1 and abs(int8_map - float_map) <= 0.05


@pytest.mark.parametrize(("edit", "field"), [
    (lambda d: d.pop("backend"), "backend"),
    (lambda d: d.update(backend="tpu"), "backend"),
    (lambda d: d.update(calibrator="median"), "calibrator"),
    (lambda d: d.update(weights_sha256="0" * 64), "weights_sha256"),
    (lambda d: d.update(extra_field=1), "extra_field"),
    (lambda d: d["activations"].pop("stem_conv"), "activations"),
])
def test_bad_quantization_file_names_file_and_field(int8_dir: Path, tmp_path: Path, edit, field: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bad / name).write_bytes((int8_dir / name).read_bytes())
    doc = json.loads((int8_dir / QUANT_FILE).read_text())
    edit(doc)
    (bad / QUANT_FILE).write_text(json.dumps(doc))
    with pytest.raises(Int8ModelError) as info:
        load_int8_model(bad)
    message = str(info.value)
    assert str(bad / QUANT_FILE) in message and field in message, message
    if field == "backend" and "tpu" in message:
        assert "'x86', 'fbgemm' or 'qnnpack'" in message


def test_missing_quantization_file_and_changed_weights(int8_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(Int8ModelError, match=f"{QUANT_FILE}: missing"):
        load_int8_model(tmp_path)
    changed = tmp_path / "changed"
    model = load_detector(int8_dir)
    with torch.no_grad():
        model.stem.conv.weight.mul_(1.01)
    save_detector(model, changed)
    (changed / QUANT_FILE).write_text((int8_dir / QUANT_FILE).read_text())
    with pytest.raises(Int8ModelError, match="weights_sha256"):
        load_int8_model(changed)


class _SigmoidNet(torch.nn.Module):
    """conv -> sigmoid -> conv: sigmoid is one of torch's fixed-range quantized ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)
        self.gate = torch.nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.gate(self.conv1(x)))


def test_fixed_range_ops_keep_torchs_range_and_say_so(images: list[torch.Tensor]) -> None:
    from components.quantize.deploy import export_module_int8

    torch.manual_seed(0)
    model = _SigmoidNet().eval()
    calibration = calibrate(model, images, method="minmax")
    report = export_module_int8(model, calibration, example=images[0][:1])
    assert report.fixed_range == ["gate"]  # documented fallback: [0, 1) at scale 1/256, zero point 0
    assert set(report.scales) == {"x", "conv1", "conv2"}  # the input placeholder of this model is "x"
    assert report.scales["conv1"] == calibration.scale("conv1")
    stats = error_stats(model(images[0]), report.module(images[0]))
    assert stats.sqnr_db is not None and stats.sqnr_db > 30.0
