"""One MLflow run per training stage: params and tags, per-epoch metrics, pictures and the model.

Both trainers (detector, segmenter) log the same way; what differs is passed in: the ``task`` tag,
the function that logs the model directory, the extra params, tags and config files. Every method is
a no-op when tracking is off, so a trainer calls them unconditionally.

What a run holds:

- params: the recipe (``params``), then ``train_images``, ``val_images`` and ``classes`` (comma-joined);
- tags: ``dataset_sha256``, ``dataset_name``, ``git_commit``, ``task``, ``modelcommons.stage``, any extras,
  and ``model_uri`` once the model is logged;
- metrics: each epoch row (minus ``epoch``, which is the step), then ``final_val_<name>``;
- artifacts: the pictures under ``pictures/``, the model as the task's pyfunc.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from components.data.format import Manifest

__all__ = ["ModelLogger", "RunTracker"]

ModelLogger = Callable[[Path], str]
"""Logs a model directory in the active MLflow run and returns its model URI."""


class RunTracker:
    """MLflow logging for one training run, used as a context manager around the epochs.

    ``run_id`` continues that run (a resumed training); otherwise a new run named ``run_name`` starts,
    nested under ``parent_run_id`` when given (e.g. a sweep's parent run). The run ends FINISHED, or
    FAILED when the block raises. MLflow is imported only when tracking is on.
    """

    def __init__(self, enabled: bool, *, task: str, log_model: ModelLogger, run_name: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None, stage: str = "train") -> None:
        self.enabled = enabled
        self.task = task
        self.stage = stage
        self.log_model = log_model
        self.run_name = run_name
        self.run_id = run_id
        self.parent_run_id = parent_run_id

    def __enter__(self) -> RunTracker:
        if self.enabled:
            import mlflow

            from components.tracking.setup import configure_mlflow

            configure_mlflow()
            # A resumed run keeps its name and place; only a new run can be nested under a parent.
            if self.run_id or not self.parent_run_id:
                run = mlflow.start_run(run_id=self.run_id, run_name=None if self.run_id else self.run_name)
            else:
                run = mlflow.start_run(run_name=self.run_name, parent_run_id=self.parent_run_id)
            self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    def log_recipe(self, params: Mapping[str, Any], manifest: Manifest, *, n_train: int, n_val: int,
                   tags: Mapping[str, str] | None = None,
                   config_files: Mapping[str, dict[str, Any]] | None = None) -> None:
        """Log the recipe ``params`` with the dataset's sizes and classes, and tag the dataset identity.

        ``tags`` are added to the standard tags; ``config_files`` maps artifact file names (``.json``)
        to dicts logged with ``mlflow.log_dict``, e.g. the model architecture.
        """
        if not self.enabled:
            return
        import mlflow

        from components.tracking.setup import git_commit

        mlflow.log_params({**params, "train_images": n_train, "val_images": n_val,
                           "classes": ",".join(manifest.classes)})
        for name, doc in (config_files or {}).items():
            mlflow.log_dict(doc, name)
        mlflow.set_tags({"dataset_sha256": manifest.sha256, "dataset_name": manifest.name,
                         "git_commit": git_commit(), "task": self.task, "modelcommons.stage": self.stage,
                         **(tags or {})})

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """Log one epoch's history row; its ``epoch`` value (1-based) is the MLflow step."""
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def finish(self, model_dir: Path, artifacts: list[Path], final: Mapping[str, float]) -> str | None:
        """Log ``final`` validation metrics (as ``final_val_<name>``), the pictures and the model.

        Returns the logged model's URI (also set as the ``model_uri`` tag), or None when tracking is off.
        """
        if not self.enabled:
            return None
        import mlflow

        mlflow.log_metrics({f"final_val_{k}": v for k, v in final.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="pictures")
        uri = self.log_model(model_dir)
        mlflow.set_tag("model_uri", uri)
        return uri
