"""Registration stage: register a trained run's model with its recipe and move the aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.data.format import Manifest, read_manifest
from components.tracking.registry import Registration, register_model
from components.tracking.setup import configure_mlflow, git_commit


def dataset_recipe(manifest: Manifest) -> dict[str, Any]:
    """The dataset part of a version's ``recipe`` tag: identity, source, classes and intake parameters."""
    return {"name": manifest.name, "source": manifest.source, "sha256": manifest.sha256,
            "classes": manifest.classes, "augmentations": manifest.augmentations,
            "intake": manifest.params, "counts": manifest.counts.model_dump()}


def run_registration(*, model_uri: str, run_id: str, dataset_dir: Path, metrics: dict[str, float],
                     name: str = "detector", metric: str = "map", task: str = "detection",
                     precision: str = "float") -> Registration:
    """Register ``model_uri`` under ``name``; tags carry dataset sha256, git commit and full recipe."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if metric not in metrics:
        raise ValueError(f"metric {metric!r} not among the evaluation metrics {sorted(metrics)}")
    configure_mlflow()
    manifest = read_manifest(Path(dataset_dir))
    run = MlflowClient().get_run(run_id)
    recipe = {"train": dict(run.data.params), "dataset": dataset_recipe(manifest)}
    tags = {"dataset_sha256": manifest.sha256, "git_commit": run.data.tags.get("git_commit", git_commit()),
            "recipe": recipe, "task": task, "precision": precision,
            **{f"metric.{k}": repr(float(v)) for k, v in metrics.items() if k != metric}}
    registration = register_model(model_uri, name=name, run_id=run_id, metric=metric, value=metrics[metric],
                                  tags=tags)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags({"registered_model": name, "registered_version": registration.version,
                         "registered_alias": registration.alias})
    return registration
