"""The ``sweep`` pipeline through the local KFP runner, and the ``bench sampler`` command (smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main

BASE = {"epochs": 1, "batch_size": 16, "img_size": 96}


def test_grid_sweep_runs_through_the_local_runner_and_registers_the_best(
        shapes_source_dir: Path, mc_home: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from components.tracking.setup import configure_mlflow
    from pipelines.runner import run_local

    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"method": "grid", "metric": "map50", "direction": "maximize",
                                 "parameters": {**BASE, "sampler": {"values": ["uniform", "recency_bias"]}}}))
    out = run_local("sweep", {"source": str(shapes_source_dir), "space": str(space)})
    assert out["trials"] == 2 and out["version"] == "1" and out["alias"] == "champion"
    configure_mlflow()
    client = MlflowClient()
    best = client.get_run(out["best_run_id"])
    parent_id = best.data.tags["mlflow.parentRunId"]
    children = client.search_runs([best.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    samplers = {c.data.params["sampler"] for c in children}
    assert samplers == {"uniform", "recency_bias"}
    values = {c.info.run_id: c.data.metrics["sweep_metric"] for c in children}
    assert out["best_value"] == pytest.approx(max(values.values()))
    assert values[out["best_run_id"]] == max(values.values())
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.best_run_id"] == out["best_run_id"]
    assert client.get_model_version_by_alias("detector", "champion").run_id == out["best_run_id"]



def test_bench_sampler_smoke_run_writes_json_png_and_logs_to_mlflow(mc_home: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "bench" / "sampler.json"
    code = main(["bench", "sampler", "--out", str(out), "--seeds", "1", "--digits-epochs", "2",
                 "--detector-epochs", "1", "--detector-images", "24", "--samplers", "uniform,recency_bias"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert {"digits", "detector", "verdict"} <= set(report)
    for task in ("digits", "detector"):
        assert set(report[task]) == {"uniform", "recency_bias"}
        for row in report[task].values():
            assert {"final_error_mean", "final_error_std", "time_to_uniform_acc_ratio", "epochs_to_uniform_acc",
                    "sampling_overhead_s_per_epoch"} <= set(row)
            assert 0.0 <= row["final_error_mean"] <= 1.0 and row["sampling_overhead_s_per_epoch"] >= 0
        assert report[task]["uniform"]["time_to_uniform_acc_ratio"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 1000
    artifacts = {f.path for f in MlflowClient().list_artifacts(report["mlflow_run_id"], "bench")}
    assert artifacts == {"bench/sampler.json", "bench/sampler.png"}


def test_bench_sampler_needs_uniform_as_the_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "sampler", "--out", str(tmp_path / "x.json"), "--samplers", "recency_bias"])
    assert code == 2
    assert "must include 'uniform'" in capsys.readouterr().err


def test_pipeline_run_sweep_with_a_bad_space_exits_2_naming_the_parameter(
        tmp_path: Path, mc_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("method: grid\nparameters:\n  learning_rate: {values: [0.1]}\n")
    code = main(["pipeline", "run", "sweep", "--param", f"source={tmp_path}", "--param", f"space={space}"])
    assert code == 2
    assert "unknown parameter 'learning_rate'" in capsys.readouterr().err
