"""COCO evaluation against ground truth, and the evaluation stage's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.data.format import read_coco, read_manifest
from components.evaluate.coco import coco_map
from components.evaluate.stage import run_evaluation
from components.models.detector import build_detector, detector_config
from components.models.weights import save_detector


def _ground_truth_as_predictions(dataset: Path, ids: list[int], shift: float = 0.0) -> list[dict]:
    coco = read_coco(dataset)
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": [a["bbox"][0] + shift, a["bbox"][1], a["bbox"][2], a["bbox"][3]], "score": 0.9}
            for a in coco["annotations"] if a["image_id"] in ids]


def test_perfect_predictions_score_one(tiny_dataset: Path) -> None:
    ids = read_manifest(tiny_dataset).split.val
    metrics = coco_map(tiny_dataset, ids, _ground_truth_as_predictions(tiny_dataset, ids))
    assert metrics == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})


def test_shifted_boxes_lose_strict_iou_but_keep_map50(tiny_dataset: Path) -> None:
    ids = read_manifest(tiny_dataset).split.val
    # boxes are >= 16 px wide: a 2 px shift keeps IoU >= 0.77 (> .5 and > .75), but not >= .95
    metrics = coco_map(tiny_dataset, ids, _ground_truth_as_predictions(tiny_dataset, ids, shift=2.0))
    assert metrics["map50"] == pytest.approx(1.0)
    assert 0.3 < metrics["map"] < 0.95


def test_no_predictions_score_zero(tiny_dataset: Path) -> None:
    ids = read_manifest(tiny_dataset).split.val
    assert coco_map(tiny_dataset, ids, []) == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_stage_writes_metrics_json_and_png(tiny_dataset: Path, tmp_path: Path) -> None:
    model_dir = save_detector(build_detector(detector_config(
        "nano", num_classes=3, class_names=("circle", "rectangle", "triangle"), img_size=96)), tmp_path / "m")
    metrics = run_evaluation(model_dir, tiny_dataset, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved == metrics
    assert set(metrics) == {"map", "map50", "map75", "latency_p50_ms", "latency_p95_ms", "images"}
    assert 0 < metrics["latency_p50_ms"] <= metrics["latency_p95_ms"]
    assert metrics["images"] == len(read_manifest(tiny_dataset).split.val)
    assert (tmp_path / "out" / "eval_predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_rejects_unknown_split(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split 'test' unknown"):
        run_evaluation(tmp_path, tiny_dataset, tmp_path, split="test")
