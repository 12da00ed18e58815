"""``detector-train`` with its optional quantize step, then the standalone ``quantize`` pipeline, via kfp.local."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from components.tracking.setup import configure_mlflow
from pipelines.runner import PipelineParamError, compile_pipeline, parse_params, run_local


def test_quantize_step_is_optional_and_standalone_pipeline_takes_a_model_uri(tmp_path: Path) -> None:
    ir = next(yaml.safe_load_all(compile_pipeline("detector-train", tmp_path / "dt.yaml").read_text()))
    tasks = ir["root"]["dag"]["tasks"]
    conditions = {t["triggerPolicy"]["condition"] for name, t in tasks.items() if name.startswith("condition")}
    assert "inputs.parameter_values['pipelinechannel--quantize'] == true" in conditions
    assert ir["root"]["inputDefinitions"]["parameters"]["quantize"]["defaultValue"] is False
    standalone = next(yaml.safe_load_all(compile_pipeline("quantize", tmp_path / "q.yaml").read_text()))
    assert set(standalone["root"]["dag"]["tasks"]) == {"fetch-model-component", "intake-component",
                                                       "quantize-component"}
    assert parse_params("quantize", ["model_uri=models:/detector@champion", "source=/d", "calibrator=log2",
                                     "per_channel=false"]) == {
        "model_uri": "models:/detector@champion", "source": "/d", "calibrator": "log2", "per_channel": False}
    with pytest.raises(PipelineParamError, match="needs --param for: model_uri, source"):
        parse_params("quantize", [])


def test_detector_train_quantizes_then_standalone_pipeline_quantizes_the_champion(
        shapes_source_dir: Path, mc_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Components run in subprocesses: on a shared 2-core machine one torch thread is several times faster
    # for these tiny tensors (measured: quantize step 11 s with 1 thread, 40 s with 2 under load).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    trained = run_local("detector-train", {"source": str(shapes_source_dir), "epochs": 1, "img_size": 96,
                                           "batch_size": 16, "quantize": True, "calibrator": "minmax",
                                           "calib_images": 8})
    assert (trained["version"], trained["alias"]) == ("1", "champion")
    configure_mlflow()
    client = MlflowClient()
    int8 = client.get_model_version("detector", "2")
    assert (int8.tags["precision"], int8.tags["calibrator"], int8.tags["float_version"], int8.tags["backend"]) == (
        "int8", "minmax", "1", "x86")
    assert int8.tags["dataset_sha256"] == client.get_model_version("detector", "1").tags["dataset_sha256"]
    assert json.loads(int8.tags["recipe"])["train"]["epochs"] == "1"
    assert int8.run_id
    quant_run = client.get_run(int8.run_id)
    assert quant_run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert {"float_map50", "hybrid_map50", "int8_map50", "deploy_map50"} <= set(quant_run.data.metrics)
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "1"

    out = run_local("quantize", {"model_uri": "models:/detector@champion", "source": str(shapes_source_dir),
                                 "calibrator": "log2", "calib_images": 8})
    assert (out["version"], out["float_version"]) == ("3", "1")
    assert 0.0 <= out["deploy_map50"] <= 1.0
    tags = client.get_model_version("detector", "3").tags
    assert (tags["precision"], tags["calibrator"], tags["float_version"]) == ("int8", "log2", "1")
    assert client.get_run(out["run_id"]).data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "1"
