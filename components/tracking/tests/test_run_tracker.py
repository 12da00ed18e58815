"""RunTracker on a real sqlite MLflow store: what a training run logs, resume, nesting, failure, off."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components.data.format import Counts, Manifest, Split
from components.tracking.run_tracker import RunTracker

MANIFEST = Manifest(name="shapes", source="generated", classes=["circle", "square"], files={"a.png": "0" * 64},
                    sha256="ab" * 32, split=Split(train=[1, 2, 3], val=[4]),
                    counts=Counts(images=4, annotations=6, train_images=3, val_images=1, rejected=0))


def _log_model(model_dir: Path) -> str:
    """A real model logger: keeps the directory's config as an artifact and returns its URI."""
    mlflow.log_artifact(str(model_dir / "config.json"), artifact_path="model")
    run = mlflow.active_run()
    assert run is not None
    return f"runs:/{run.info.run_id}/model"


def _files(tmp_path: Path) -> tuple[Path, list[Path]]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"kind": "test"}')
    picture = tmp_path / "curves.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")
    return model_dir, [picture]


def test_run_logs_recipe_epochs_pictures_and_model(mc_home: Path, tmp_path: Path) -> None:
    model_dir, pictures = _files(tmp_path)
    tracker = RunTracker(True, task="segmentation", log_model=_log_model, run_name="seg-1")
    with tracker:
        tracker.log_recipe({"lr": 0.01, "img_size": 96}, MANIFEST, n_train=3, n_val=1, tags={"preset": "tiny"},
                           config_files={"arch.json": {"depth": 4}})
        tracker.log_epoch({"epoch": 1.0, "loss": 0.9})
        tracker.log_epoch({"epoch": 2.0, "loss": 0.4, "val_miou": 0.5})
        uri = tracker.finish(model_dir, pictures, {"miou_box": 0.75})
    assert tracker.run_id is not None and uri == f"runs:/{tracker.run_id}/model"
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "seg-1"
    assert run.data.params == {"lr": "0.01", "img_size": "96", "train_images": "3", "val_images": "1",
                               "classes": "circle,square"}
    tags = run.data.tags
    assert (tags["task"], tags["modelcommons.stage"], tags["preset"]) == ("segmentation", "train", "tiny")
    assert (tags["dataset_sha256"], tags["dataset_name"], tags["model_uri"]) == ("ab" * 32, "shapes", uri)
    assert tags["git_commit"]
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(1, 0.9), (2, 0.4)]
    assert "epoch" not in run.data.metrics and run.data.metrics["final_val_miou_box"] == 0.75
    artifacts = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert {"arch.json", "pictures", "model"} <= artifacts
    assert [f.path for f in client.list_artifacts(tracker.run_id, "pictures")] == ["pictures/curves.png"]
    assert mlflow.artifacts.load_dict(f"runs:/{tracker.run_id}/arch.json") == {"depth": 4}


def test_run_id_resumes_the_same_run_and_parent_nests_a_new_one(mc_home: Path) -> None:
    first = RunTracker(True, task="detection", log_model=_log_model, run_name="det")
    with first:
        first.log_epoch({"epoch": 1.0, "loss": 1.0})
    resumed = RunTracker(True, task="detection", log_model=_log_model, run_name="ignored", run_id=first.run_id,
                         parent_run_id="ignored-too")
    with resumed:
        resumed.log_epoch({"epoch": 2.0, "loss": 0.5})
    assert resumed.run_id == first.run_id
    client = MlflowClient()
    assert [m.step for m in client.get_metric_history(first.run_id or "", "loss")] == [1, 2]
    assert client.get_run(first.run_id or "").info.run_name == "det"

    # as in a sweep: the parent run was created by another step; the trial starts a child of it
    with mlflow.start_run(run_name="sweep") as parent:
        pass
    child = RunTracker(True, task="detection", log_model=_log_model, run_name="trial-0",
                       parent_run_id=parent.info.run_id)
    with child:
        pass
    assert child.run_id not in (None, parent.info.run_id)
    child_run = client.get_run(child.run_id or "")
    assert child_run.data.tags["mlflow.parentRunId"] == parent.info.run_id and child_run.info.run_name == "trial-0"


def test_a_failing_block_marks_the_run_failed(mc_home: Path) -> None:
    tracker = RunTracker(True, task="detection", log_model=_log_model)
    with pytest.raises(RuntimeError, match="boom"), tracker:
        raise RuntimeError("boom")
    assert MlflowClient().get_run(tracker.run_id or "").info.status == "FAILED"
    assert mlflow.active_run() is None


def test_disabled_tracker_logs_nothing_and_never_calls_the_model_logger(mc_home: Path, tmp_path: Path) -> None:
    model_dir, pictures = _files(tmp_path)
    calls: list[Path] = []

    def log_model(path: Path) -> str:
        calls.append(path)
        return "never"

    tracker = RunTracker(False, task="detection", log_model=log_model, run_name="off")
    with tracker:
        tracker.log_recipe({"lr": 0.01}, MANIFEST, n_train=3, n_val=1)
        tracker.log_epoch({"epoch": 1.0, "loss": 0.9})
        assert tracker.finish(model_dir, pictures, {"map": 0.5}) is None
    assert tracker.run_id is None and calls == [] and mlflow.active_run() is None
    assert not mc_home.exists()  # configure_mlflow (which creates the store) never ran
