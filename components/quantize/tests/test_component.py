"""KFP components ``quantize`` and ``fetch-model`` through ``kfp.local.SubprocessRunner`` on a real MLflow store."""

# No ``from __future__ import annotations``: KFP reads the real annotation objects.

import json
from pathlib import Path
from typing import NamedTuple

import mlflow
import pytest
from kfp import dsl, local
from mlflow.tracking import MlflowClient

from components.quantize.component import fetch_model_component, quantize_component
from components.quantize.deploy import QUANT_FILE, read_int8_spec
from components.tracking.model_logging import log_detector_model
from components.tracking.setup import configure_mlflow
from components.tracking.stage import run_registration


@dsl.pipeline(name="quantize-imported")
def quantize_imported(model_dir: str, dataset_dir: str, float_version: str = "", run_id: str = ""
                      ) -> NamedTuple("Outputs", [("version", str), ("run_id", str), ("float_map50", float),  # type: ignore[valid-type]
                                                  ("deploy_map50", float)]):
    """The component alone, fed with a model and a dataset directory already on disk."""
    model = dsl.importer(artifact_uri=model_dir, artifact_class=dsl.Model)
    dataset = dsl.importer(artifact_uri=dataset_dir, artifact_class=dsl.Dataset)
    quant = quantize_component(dataset=dataset.output, model=model.output, calibrator="minmax", calib_images=8,
                               float_version=float_version, run_id=run_id)
    Outputs = NamedTuple("Outputs", [("version", str), ("run_id", str), ("float_map50", float),  # noqa: UP014
                                     ("deploy_map50", float)])
    return Outputs(quant.outputs["version"], quant.outputs["run_id"], quant.outputs["float_map50"],
                   quant.outputs["deploy_map50"])


@pytest.fixture
def kfp_local(mc_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Components run in subprocesses: on a shared 2-core machine one torch thread is several times faster
    # for these tiny tensors (measured: quantize step 11 s with 1 thread, 40 s with 2 under load).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def test_quantize_component_registers_int8_and_fetch_model_refuses_it(
        trained_model_dir: Path, tiny_dataset: Path, kfp_local: Path) -> None:
    configure_mlflow()
    with mlflow.start_run() as run:
        uri = log_detector_model(trained_model_dir)
    run_registration(model_uri=uri, run_id=run.info.run_id, dataset_dir=tiny_dataset,
                     metrics={"map": 0.06, "map50": 0.14})

    fetched = fetch_model_component(model_uri="models:/detector@champion")
    assert (fetched.outputs["name"], fetched.outputs["version"], fetched.outputs["run_id"]) == (
        "detector", "1", run.info.run_id)
    assert (Path(fetched.outputs["model"].path) / "model.safetensors").is_file()

    task = quantize_imported(model_dir=str(trained_model_dir), dataset_dir=str(tiny_dataset), float_version="1",
                             run_id=run.info.run_id)
    assert task.outputs["version"] == "2"
    assert 0.0 <= task.outputs["deploy_map50"] <= 1.0 and task.outputs["float_map50"] > 0.1
    client = MlflowClient()
    tags = client.get_model_version("detector", "2").tags
    assert (tags["precision"], tags["calibrator"], tags["float_version"], tags["backend"]) == (
        "int8", "minmax", "1", "x86")
    quant_run = client.get_run(task.outputs["run_id"])
    assert quant_run.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "1"

    # the component's own artifacts: int8 model dir, KFP metrics, report dir, Markdown summary
    outputs = sorted(kfp_local.rglob("executor_output.json"))
    quant_outputs = [p for p in outputs if "quantize-component" in str(p)]
    assert quant_outputs, outputs
    artifacts = json.loads(quant_outputs[0].read_text())["artifacts"]
    int8_dir = Path(artifacts["int8_model"]["artifacts"][0]["uri"])
    assert (int8_dir / QUANT_FILE).is_file() and read_int8_spec(int8_dir).calibrator == "minmax"
    metadata = artifacts["int8_model"]["artifacts"][0]["metadata"]
    assert (metadata["precision"], metadata["float_version"], metadata["version"]) == ("int8", "1", "2")
    assert artifacts["metrics"]["artifacts"][0]["metadata"]["int8_map50"] >= 0.0
    report_dir = Path(artifacts["report"]["artifacts"][0]["uri"])
    assert {"report.json", "report.png", "graph.json", "graph.png", "calibration.json"} <= {
        p.name for p in report_dir.iterdir()}
    assert "# Quantization (minmax" in Path(artifacts["summary"]["artifacts"][0]["uri"]).read_text()

    # an int8 version is not something to quantize again
    with pytest.raises(RuntimeError, match="fetch-model-component"):
        fetch_model_component(model_uri="models:/detector/2")
