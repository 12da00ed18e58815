"""The ``segmenter-train`` pipeline through the KFP local runner, registration and model resolution."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from components.segment.model import load_segmenter
from components.tracking.resolve import resolve_model
from components.tracking.setup import configure_mlflow


def test_segmenter_train_runs_locally_registers_and_resolves_by_alias(shapes_source_dir: Path,
                                                                      mc_home: Path) -> None:
    from components.tracking.stage import run_registration
    from pipelines.runner import run_local

    params = {"source": str(shapes_source_dir), "epochs": 1, "img_size": 96, "batch_size": 8}
    first = run_local("segmenter-train", params)
    assert (first["version"], first["alias"]) == ("1", "champion")
    assert 0.0 <= first["miou_point"] <= 1.0 and 0.0 <= first["miou_box"] <= 1.0
    configure_mlflow()
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.data.params["preset"] == "tiny" and run.data.params["img_size"] == "96"
    assert run.data.tags["task"] == "segmentation" and run.data.tags["registered_model"] == "segmenter"
    assert {"loss", "loss_focal", "loss_dice", "loss_iou", "val_miou_box", "eval_miou_point",
            "eval_miou_box"} <= set(run.data.metrics)
    pictures = {a.path for a in client.list_artifacts(first["run_id"], "pictures")}
    assert {"pictures/sample_overlays_box.png", "pictures/sample_overlays_point.png",
            "pictures/training_curves.png"} <= pictures
    version = client.get_model_version("segmenter", "1")
    assert version.tags["task"] == "segmentation" and version.tags["metric.miou_box"] == repr(first["miou_box"])
    # what serving does: models:/segmenter@champion -> a directory with config.json + model.safetensors
    resolved = resolve_model("models:/segmenter@champion")
    _, config = load_segmenter(resolved.local_dir)
    dataset = next(mc_home.rglob("intake-component/dataset/manifest.json")).parent
    assert (resolved.version, resolved.alias) == ("1", "champion") and config.img_size == 96
    # Champion rule on miou_box (a second pipeline run would cost minutes: register the run's model again)
    same = run_registration(model_uri=run.data.tags["model_uri"], run_id=first["run_id"], dataset_dir=dataset,
                            metrics={"miou_box": first["miou_box"], "miou_point": 1.0}, name="segmenter",
                            metric="miou_box", task="segmentation")
    assert (same.version, same.alias) == ("2", "challenger")
    better = run_registration(model_uri=run.data.tags["model_uri"], run_id=first["run_id"], dataset_dir=dataset,
                              metrics={"miou_box": first["miou_box"] + 0.1, "miou_point": 0.0}, name="segmenter",
                              metric="miou_box", task="segmentation")
    assert (better.version, better.alias, better.previous_champion) == ("3", "champion", "1")
