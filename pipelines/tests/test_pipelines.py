"""Pipelines compile to IR YAML that loads back, run through the KFP local runner, and validate params."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.tracking.setup import configure_mlflow
from pipelines.runner import PipelineParamError, compile_pipeline, parse_params, pipelines, run_local


@pytest.mark.parametrize("name", sorted(pipelines()))
def test_every_pipeline_compiles_and_loads_back(name: str, tmp_path: Path) -> None:
    from kfp.components import load_component_from_file

    path = compile_pipeline(name, tmp_path / f"{name}.yaml")
    ir = next(yaml.safe_load_all(path.read_text()))  # then the platform spec (task env sources)
    assert ir["pipelineInfo"]["name"] == name
    assert load_component_from_file(str(path)).name == name
    if name == "detector-train":
        tasks = ir["root"]["dag"]["tasks"]
        assert {"intake-component", "train-component", "evaluate-component", "register-component"} < set(tasks)
        branch = next(t for name, t in tasks.items() if name.startswith("condition"))
        condition = branch["triggerPolicy"]["condition"]
        assert condition == "inputs.parameter_values['pipelinechannel--deploy_rayservice'] != ''"
        assert tasks["train-component"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"] == {
            "outputArtifactKey": "dataset", "producerTask": "intake-component"}


def test_params_are_typed_and_checked() -> None:
    assert parse_params("detector-train", ["source=/d", "epochs=3", "bf16=true", "lr=0.01"]) == {
        "source": "/d", "epochs": 3, "bf16": True, "lr": 0.01}
    with pytest.raises(PipelineParamError, match="epochs='three': expected int"):
        parse_params("detector-train", ["source=/d", "epochs=three"])
    with pytest.raises(PipelineParamError, match=r"no parameter 'epoch'; allowed: .*epochs"):
        parse_params("detector-train", ["source=/d", "epoch=3"])
    with pytest.raises(PipelineParamError, match="needs --param for: source"):
        parse_params("detector-train", [])
    with pytest.raises(PipelineParamError, match=r"unknown pipeline 'nope'; available: .*detector-train"):
        parse_params("nope", [])


def test_detector_train_runs_locally_and_registers_champion_then_challenger(
        shapes_source_dir: Path, mc_home: Path) -> None:
    params = {"source": str(shapes_source_dir), "epochs": 1, "img_size": 96, "batch_size": 16}
    first = run_local("detector-train", params)
    assert (first["version"], first["alias"]) == ("1", "champion")
    assert 0.0 <= first["map"] <= first["map50"] <= 1.0
    configure_mlflow()
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.data.tags["registered_version"] == "1"
    assert {"eval_map", "eval_map50", "eval_latency_p50_ms", "eval_latency_p95_ms"} <= set(run.data.metrics)
    version = client.get_model_version("detector", "1")
    assert len(version.tags["dataset_sha256"]) == 64 and version.tags["git_commit"]
    assert '"epochs": "1"' in version.tags["recipe"] and str(shapes_source_dir) in version.tags["recipe"]
    # same recipe, same seed -> same weights -> same mAP: not better, so it must not take the champion alias
    second = run_local("detector-train", params)
    assert (second["version"], second["alias"]) == ("2", "challenger")
    assert second["map"] == first["map"]
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "1"
