"""COCO evaluation of a detector on a dataset split with pycocotools, plus per-image latency."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.data.format import read_coco
from components.data.loader import Sample
from components.models.detector import Detector


@dataclass
class EvalResult:
    metrics: dict[str, float]  # map, map50, map75, latency_p50_ms, latency_p95_ms, images
    predictions: list[dict[str, Any]]  # COCO results: image_id, category_id, bbox xywh, score


def predict_coco(model: Detector, samples: Sequence[Sample], *, score_threshold: float = 0.001,
                 max_detections: int = 100, batch_size: int = 16) -> list[dict[str, Any]]:
    """Detections as COCO result dicts in original-image pixels (category_id = class index + 1)."""
    model.eval()
    results: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            dets = model.predict(torch.stack([s.image for s in chunk]), score_threshold=score_threshold,
                                 max_detections=max_detections)
            for sample, det in zip(chunk, dets, strict=True):
                boxes = sample.letterbox.boxes_to_image(det.boxes)
                for box, score, label in zip(boxes.tolist(), det.scores.tolist(), det.labels.tolist(),
                                             strict=True):
                    w, h = box[2] - box[0], box[3] - box[1]
                    if w <= 0 or h <= 0:
                        continue
                    results.append({"image_id": sample.image_id, "category_id": int(label) + 1,
                                    "bbox": [box[0], box[1], w, h], "score": float(score)})
    return results


def coco_map(dataset_dir: Path, image_ids: Sequence[int], predictions: list[dict[str, Any]]) -> dict[str, float]:
    """mAP@[.5:.95], mAP@.5 and mAP@.75 of ``predictions`` on ``image_ids`` of the dataset artifact."""
    gt = read_coco(dataset_dir)
    ids = set(image_ids)
    gt = {**gt, "images": [i for i in gt["images"] if int(i["id"]) in ids],
          "annotations": [dict(a, iscrowd=a.get("iscrowd", 0), area=a.get("area", a["bbox"][2] * a["bbox"][3]))
                          for a in gt["annotations"] if int(a["image_id"]) in ids]}
    gt.setdefault("info", {})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if not predictions:
            return {"map": 0.0, "map50": 0.0, "map75": 0.0}
        coco_dt = coco_gt.loadRes(predictions)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = sorted(ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) for s in ev.stats[:3]]  # -1 means "no ground truth": report 0
    return {"map": stats[0], "map50": stats[1], "map75": stats[2]}


def measure_latency(model: Detector, samples: Sequence[Sample], *, repeats: int = 1, warmup: int = 3
                    ) -> dict[str, float]:
    """p50/p95 milliseconds per image at batch 1: forward + NMS on a letterboxed image."""
    model.eval()
    times: list[float] = []
    with torch.inference_mode():
        for i, sample in enumerate(list(samples[:warmup]) + list(samples) * repeats):
            start = time.perf_counter()
            model.predict(sample.image[None])
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    arr = np.asarray(times or [float("nan")])
    return {"latency_p50_ms": float(np.percentile(arr, 50)), "latency_p95_ms": float(np.percentile(arr, 95))}


def evaluate_detector(model: Detector, dataset_dir: Path, samples: Sequence[Sample], *,
                      latency: bool = True) -> EvalResult:
    """COCO metrics (and latency) of ``model`` on ``samples`` drawn from ``dataset_dir``."""
    predictions = predict_coco(model, samples)
    metrics = coco_map(dataset_dir, [s.image_id for s in samples], predictions)
    if latency:
        metrics.update(measure_latency(model, samples))
    metrics["images"] = float(len(samples))
    return EvalResult(metrics=metrics, predictions=predictions)
