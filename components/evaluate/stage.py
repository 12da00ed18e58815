"""Evaluation stage: COCO mAP and latency of a trained detector, logged to MLflow and to JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from components.data.loader import load_samples
from components.evaluate.coco import evaluate_detector
from components.evaluate.visualize import draw_detections, save_grid
from components.models.weights import load_detector
from components.tracking.resolve import find_model_dir


def run_evaluation(model_dir: Path, dataset_dir: Path, out_dir: Path, *, run_id: str | None = None,
                   split: str = "val") -> dict[str, float]:
    """Evaluate the model in ``model_dir`` on ``split``; write ``metrics.json`` and a PNG into ``out_dir``.

    Metrics: map (mAP@[.5:.95]), map50, map75, latency_p50_ms, latency_p95_ms (batch 1, CPU threads
    of this process), images. With ``run_id``, they are logged to that MLflow run as ``eval_*``.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split {split!r} unknown; allowed: train, val, all")
    model = load_detector(find_model_dir(Path(model_dir)))
    _, samples = load_samples(Path(dataset_dir), split, model.config.img_size)  # type: ignore[arg-type]
    result = evaluate_detector(model, Path(dataset_dir), samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    (out_dir / "predictions.json").write_text(json.dumps(result.predictions))
    shown = samples[:8]
    with torch.inference_mode():
        dets = model.predict(torch.stack([s.image for s in shown]))
    picture = save_grid([draw_detections(s.image, d.boxes, d.labels, d.scores, model.config.class_names)
                         for s, d in zip(shown, dets, strict=True)], out_dir / "eval_predictions.png")
    if run_id:
        import mlflow

        from components.tracking.setup import configure_mlflow

        configure_mlflow()
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"eval_{k}": v for k, v in result.metrics.items()})
            mlflow.log_artifact(str(out_dir / "metrics.json"), artifact_path="evaluation")
            mlflow.log_artifact(str(picture), artifact_path="evaluation")
    return result.metrics
