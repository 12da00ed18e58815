"""Training: assignment, determinism, bf16, checkpoint/resume, recipe validation, MLflow logging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.train.loss import assign
from components.train.trainer import TrainConfig, TrainConfigError, train_detector

TINY = {"epochs": 2, "batch_size": 16, "img_size": 96, "eval_every": 1}


def test_assign_picks_cells_inside_box_and_smallest_box_wins() -> None:
    # a 4x4 grid of stride-8 cells: centers at 4, 12, 20, 28
    xs = torch.tensor([4.0, 12.0, 20.0, 28.0])
    centers = torch.cartesian_prod(xs, xs).flip(1)  # (x, y) rows
    strides = torch.full((16,), 8.0)
    big = [0.0, 0.0, 32.0, 32.0]
    small = [8.0, 8.0, 24.0, 24.0]  # holds the 4 central cells
    idx = assign(centers, strides, torch.tensor([big, small]))
    grid = idx.reshape(4, 4)
    assert grid[1:3, 1:3].eq(1).all()  # the smaller box takes the cells both contain
    # the big box's border cells lie 12 px (1.5 strides) from its center: outside center sampling
    assert (grid[0] == -1).all() and (grid[:, 0] == -1).all()
    big_only = assign(centers, strides, torch.tensor([big])).reshape(4, 4)
    assert big_only[1:3, 1:3].eq(0).all()


def test_assign_tiny_box_still_gets_its_nearest_cell() -> None:
    centers = torch.tensor([[4.0, 4.0], [12.0, 4.0]])
    idx = assign(centers, torch.tensor([8.0, 8.0]), torch.tensor([[9.0, 1.0, 11.0, 3.0]]))
    assert idx.tolist() == [-1, 0]


def test_assign_without_boxes_is_all_background() -> None:
    idx = assign(torch.zeros(5, 2), torch.full((5,), 8.0), torch.zeros(0, 4))
    assert idx.tolist() == [-1] * 5


def test_same_seed_reproduces_the_same_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    config = TrainConfig(**TINY)  # type: ignore[arg-type]
    a = train_detector(tiny_dataset, tmp_path / "a", config, track=False, progress=False)
    b = train_detector(tiny_dataset, tmp_path / "b", config, track=False, progress=False)
    wa = load_file(str(a.model_dir / "model.safetensors"))
    wb = load_file(str(b.model_dir / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert len(a.history) == 2 and a.history[1]["loss"] < a.history[0]["loss"]
    assert {"val_map", "val_map50"} <= set(a.history[-1])
    assert {p.name for p in a.artifacts} == {"sample_predictions.png", "training_curves.png"}


def test_rerun_resumes_from_checkpoint_and_rejects_another_recipe(tiny_dataset: Path, tmp_path: Path) -> None:
    config = TrainConfig(**{**TINY, "epochs": 1})  # type: ignore[arg-type]
    first = train_detector(tiny_dataset, tmp_path, config, track=False, progress=False)
    assert first.resumed_from_epoch == 0
    again = train_detector(tiny_dataset, tmp_path, config, track=False, progress=False)
    assert again.resumed_from_epoch == 1 and len(again.history) == 1
    with pytest.raises(TrainConfigError, match="different recipe"):
        train_detector(tiny_dataset, tmp_path, TrainConfig(**{**TINY, "epochs": 1, "lr": 0.01}),  # type: ignore[arg-type]
                       track=False, progress=False)


def test_bf16_autocast_trains_with_finite_loss(tiny_dataset: Path, tmp_path: Path) -> None:
    result = train_detector(tiny_dataset, tmp_path, TrainConfig(**{**TINY, "epochs": 1, "bf16": True}),  # type: ignore[arg-type]
                            track=False, progress=False)
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", 0.0), ("batch_size", 0), ("img_size", 100),
                                          ("preset", "huge"), ("device", "tpu")])
def test_bad_recipe_names_the_parameter(field: str, value: object) -> None:
    with pytest.raises(TrainConfigError, match=field.split("_")[0]):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_tracked_run_logs_params_metrics_pictures_and_model(tiny_dataset: Path, tmp_path: Path,
                                                            mc_home: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    result = train_detector(tiny_dataset, tmp_path, TrainConfig(**{**TINY, "epochs": 1}),  # type: ignore[arg-type]
                            progress=False)
    assert result.run_id and result.model_uri
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["epochs"] == "1" and run.data.params["preset"] == "nano"
    assert "loss" in run.data.metrics and "final_val_map50" in run.data.metrics
    assert len(run.data.tags["dataset_sha256"]) == 64
    pictures = {f.path for f in MlflowClient().list_artifacts(result.run_id, "pictures")}
    assert pictures == {"pictures/sample_predictions.png", "pictures/training_curves.png"}
    info = mlflow.models.get_model_info(result.model_uri)
    assert info.signature is not None and "image_index" in str(info.signature.outputs)
    assert str(mc_home) in mlflow.get_tracking_uri()
