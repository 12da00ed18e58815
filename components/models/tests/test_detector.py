"""The detector: shapes, NMS output, BatchNorm folding and pickle-free weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.models.detector import DetectorConfig, build_detector, detector_config
from components.models.preprocess import letterbox
from components.models.weights import ModelFileError, load_detector, save_detector


def _model(**kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(detector_config("nano", num_classes=3, class_names=("a", "b", "c"), **kw))  # type: ignore[arg-type]


def test_forward_shape_counts_cells_of_both_levels() -> None:
    model = _model().eval()
    raw = model(torch.rand(2, 3, 160, 160))
    assert raw.shape == (2, 20 * 20 + 10 * 10, 5 + 3)


def test_predict_returns_xyxy_inside_image_with_scores_and_labels() -> None:
    model = _model().eval()
    with torch.no_grad():  # make every cell confident so NMS has work to do
        model.head_p3.cls_pred.bias.fill_(5.0)
        model.head_p4.cls_pred.bias.fill_(5.0)
        model.head_p3.reg_pred.bias[4] = 5.0
        model.head_p4.reg_pred.bias[4] = 5.0
    dets = model.predict(torch.rand(1, 3, 128, 96), max_detections=50)
    d = dets[0]
    assert 0 < d.boxes.shape[0] <= 50
    assert d.boxes.shape[1] == 4 and d.scores.shape == d.labels.shape == (d.boxes.shape[0],)
    assert (d.boxes[:, 2] >= d.boxes[:, 0]).all() and (d.boxes[:, 3] >= d.boxes[:, 1]).all()
    assert d.boxes[:, 0::2].max() <= 96 and d.boxes[:, 1::2].max() <= 128 and d.boxes.min() >= 0
    assert ((d.scores > 0.25) & (d.scores <= 1)).all()
    assert set(d.labels.tolist()) <= {0, 1, 2}


def test_fuse_folds_batchnorm_without_changing_outputs() -> None:
    model = _model().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 96, 96)
    before = model(x)
    model.fuse()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)


def test_weights_roundtrip_is_exact_and_pickle_free(tmp_path: Path) -> None:
    model = _model()
    save_detector(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_detector(tmp_path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_rejects_mismatched_keys_and_names_them(tmp_path: Path) -> None:
    save_detector(_model(), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["config"]["depths"] = [2, 1, 1]  # one more bottleneck than the weights have
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=r"missing=.*stage2\.2"):
        load_detector(tmp_path)


def test_load_rejects_corrupt_weights_and_bad_config(tmp_path: Path) -> None:
    save_detector(_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00not safetensors")
    with pytest.raises(ModelFileError, match=r"model\.safetensors"):
        load_detector(tmp_path)
    (tmp_path / "config.json").write_text('{"kind": "segmenter", "format_version": 1, "config": {}}')
    with pytest.raises(ModelFileError, match="'kind' must be 'detector'"):
        load_detector(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2, "class_names": ("a",)}, "class_names"),
    ({"num_classes": 2, "img_size": 100}, "multiple of 16"),
    ({"num_classes": 2, "activation": "gelu"}, "activation"),
])
def test_config_validation_names_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DetectorConfig(**kwargs)


def test_unknown_preset_lists_allowed() -> None:
    with pytest.raises(ValueError, match="nano"):
        detector_config("huge", num_classes=1)


def test_letterbox_keeps_aspect_and_maps_boxes_back() -> None:
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    out, lb = letterbox(image, 160)
    assert out.shape == (3, 160, 160)
    assert lb.scale == 1.6 and (lb.pad_x, lb.pad_y) == (0, 40)
    boxes = torch.tensor([[10.0, 5.0, 60.0, 45.0]])
    torch.testing.assert_close(lb.boxes_to_image(lb.boxes_to_model(boxes)), boxes)
