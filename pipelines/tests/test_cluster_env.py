"""Every task of every compiled pipeline takes MLflow/S3 settings from the chart's ConfigMap and Secret.

The IR YAML is checked as a Kubeflow Pipelines server reads it: the second document (platform spec)
must name, for the executor of every task in every DAG (conditions and loops included), the
ConfigMap and Secret with each key mapped to the same-named environment variable. The chart side
(that it renders these names and keys) is in charts/tests/test_pipeline_env.py.
"""
# No `from __future__ import annotations`: KFP reads the components' annotations as types.

from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl, local

from pipelines.cli import main
from pipelines.cluster_env import (
    CONFIG_MAP_KEYS,
    DEFAULT_NAME,
    SECRET_KEYS,
    ClusterEnv,
    ClusterEnvError,
    env_from,
    using,
    with_cluster_env,
)
from pipelines.runner import compile_pipeline, pipelines


def load_ir(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, kubernetes executors of the platform spec, {} when there is none)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], executors


def task_executors(spec: dict[str, Any]) -> dict[str, str]:
    """{task name: executor label} of every container task, in the root DAG and every nested DAG."""
    components = spec["components"]
    dags = [spec["root"]["dag"]] + [c["dag"] for c in components.values() if "dag" in c]
    out = {}
    for dag in dags:
        for name, task in dag["tasks"].items():
            component = components[task["componentRef"]["name"]]
            if "executorLabel" in component:
                out[name] = component["executorLabel"]
    return out


def expected_config(config_map: str, secret: str) -> dict[str, Any]:
    """The kubernetes executor config with_cluster_env writes (kfp-kubernetes' JSON form)."""
    return {
        "configMapAsEnv": [{
            "configMapName": config_map,
            "configMapNameParameter": {"runtimeValue": {"constant": config_map}},
            "keyToEnv": [{"configMapKey": k, "envVar": k} for k in CONFIG_MAP_KEYS],
            "optional": False}],
        "secretAsEnv": [{
            "secretName": secret,
            "secretNameParameter": {"runtimeValue": {"constant": secret}},
            "keyToEnv": [{"secretKey": k, "envVar": k} for k in SECRET_KEYS],
            "optional": False}],
    }


@pytest.mark.parametrize("name", sorted(pipelines()))
def test_every_task_of_every_pipeline_reads_the_chart_configmap_and_secret(name: str, tmp_path: Path) -> None:
    spec, executors = load_ir(compile_pipeline(name, tmp_path / f"{name}.yaml"))
    tasks = task_executors(spec)
    assert len(tasks) >= 3
    assert set(executors) == set(tasks.values()) == set(spec["deploymentSpec"]["executors"])
    for task, label in tasks.items():
        assert executors[label] == expected_config(DEFAULT_NAME, DEFAULT_NAME), task


def test_tasks_inside_conditions_and_loops_are_covered(tmp_path: Path) -> None:
    def nested_tasks(spec: dict[str, Any]) -> set[str]:
        return {t for c in spec["components"].values() if "dag" in c for t in c["dag"]["tasks"]}

    detector, executors = load_ir(compile_pipeline("detector-train", tmp_path / "d.yaml"))
    assert {"deploy-component", "quantize-component"} <= nested_tasks(detector)  # under dsl.If
    assert {"exec-deploy-component", "exec-quantize-component"} <= set(executors)
    sweep, executors = load_ir(compile_pipeline("sweep", tmp_path / "s.yaml"))
    assert "sweep-trial-component" in nested_tasks(sweep)  # under dsl.ParallelFor
    assert executors["exec-sweep-trial-component"] == expected_config(DEFAULT_NAME, DEFAULT_NAME)


def test_other_names_or_none_at_compile_time_change_only_the_platform_spec(tmp_path: Path) -> None:
    default_spec, _ = load_ir(compile_pipeline("quantize", tmp_path / "default.yaml"))
    team = ClusterEnv(config_map="team-a-env", secret="team-a-s3")
    spec, executors = load_ir(compile_pipeline("quantize", tmp_path / "team.yaml", env=team))
    assert spec == default_spec
    assert set(executors) == {"exec-fetch-model-component", "exec-intake-component", "exec-quantize-component"}
    assert all(config == expected_config("team-a-env", "team-a-s3") for config in executors.values())
    spec, executors = load_ir(compile_pipeline("quantize", tmp_path / "none.yaml", env=None))
    assert spec == default_spec and executors == {}
    # The pipeline objects themselves keep the defaults: a rebuilt copy is compiled, not the original.
    _, executors = load_ir(compile_pipeline("quantize", tmp_path / "again.yaml"))
    assert executors["exec-intake-component"] == expected_config(DEFAULT_NAME, DEFAULT_NAME)


def test_cli_env_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "seg.yaml"
    argv = ["pipeline", "compile", "segmenter-train", "-o", str(out), "--env-from", "mc-pipeline-env",
            "--env-secret", "mc-pipeline-s3"]
    assert main(argv) == 0, capsys.readouterr().err
    spec, executors = load_ir(out)
    assert set(executors) == set(spec["deploymentSpec"]["executors"]) and len(executors) >= 4
    assert all(c == expected_config("mc-pipeline-env", "mc-pipeline-s3") for c in executors.values())
    assert main(["pipeline", "compile", "segmenter-train", "-o", str(out), "--env-from", "none"]) == 0
    assert load_ir(out)[1] == {}

    assert main(["pipeline", "compile", "sweep", "-o", str(out), "--env-from", "Team_A"]) == 2
    assert "config_map='Team_A': not a Kubernetes object name" in capsys.readouterr().err
    assert main(["pipeline", "compile", "sweep", "-o", str(out), "--env-from", "none", "--env-secret", "s"]) == 2
    assert "--env-secret 's' has no effect with --env-from none" in capsys.readouterr().err


def test_names_are_checked_and_defaults_follow_the_chart() -> None:
    assert env_from() == ClusterEnv(DEFAULT_NAME, DEFAULT_NAME) == ClusterEnv()
    assert env_from("x-env") == ClusterEnv("x-env", "x-env")
    assert env_from("x-env", "y.secret") == ClusterEnv("x-env", "y.secret")
    assert env_from("none") is None
    for bad in ("", "-a", "a-", "A", "a_b", "a" * 254):
        with pytest.raises(ClusterEnvError, match="not a Kubernetes object name"):
            ClusterEnv(config_map=bad)
    with pytest.raises(ClusterEnvError, match=r"secret='a/b'"):
        ClusterEnv(secret="a/b")


@dsl.component(base_image="python:3.11")
def read_bucket_env() -> str:
    import os

    return os.environ.get("MODELCOMMONS_S3_BUCKET", "unset")


@dsl.pipeline(name="env-probe")
def env_probe() -> str:
    return with_cluster_env(read_bucket_env()).output


def test_local_runner_ignores_the_platform_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kfp.local runs a task with env sources in this process' environment, as before."""
    assert env_probe.platform_spec.platforms["kubernetes"]  # the sources are there ...
    monkeypatch.setenv("MODELCOMMONS_S3_BUCKET", "local-bucket")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    assert env_probe().output == "local-bucket"  # ... and ignored locally


def test_with_cluster_env_applies_nothing_under_using_none() -> None:
    with using(None):
        @dsl.pipeline(name="bare")
        def bare() -> str:
            return with_cluster_env(read_bucket_env()).output

    assert "kubernetes" not in bare.platform_spec.platforms
