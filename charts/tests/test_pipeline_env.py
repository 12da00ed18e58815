"""The chart's environment for Kubeflow Pipelines task pods matches what the compiled pipelines read.

pipelines/cluster_env.py compiles every task to read ConfigMap and Secret ``modelcommons-pipeline-env``
(keys = environment variable names); these tests render the chart with the real Helm binary and
check that it writes exactly those names and keys, with the values the chart's own MLflow/S3 clients
use, and that the keys are what ``components.settings.Settings`` reads.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from charts.render_serve_config import CHART_DIR
from charts.tests.conftest import NAMESPACE, by_kind, helm_template, one, parse_manifests, pod_specs
from components.settings import Settings
from pipelines.cluster_env import CONFIG_MAP_KEYS, DEFAULT_NAME, SECRET_KEYS


def pipeline_env(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in by_kind(manifests, kind)
            if m["metadata"]["labels"]["app.kubernetes.io/component"] == "pipeline-env"]


def plain_env(manifests: list[dict[str, Any]]) -> dict[str, str]:
    """{name: value} of the literal env of the project-image containers (MLflow, serving, jobs)."""
    return {e["name"]: e["value"] for m in manifests for _, spec in pod_specs(m) for c in spec["containers"]
            for e in c.get("env", []) if "value" in e}


def test_default_release_writes_the_names_and_keys_the_pipelines_read(rendered):
    manifests = rendered["default"]
    [config_map] = pipeline_env(manifests, "ConfigMap")
    [secret] = pipeline_env(manifests, "Secret")
    assert (config_map["metadata"]["name"], secret["metadata"]["name"]) == (DEFAULT_NAME, DEFAULT_NAME)
    assert config_map["metadata"]["namespace"] == secret["metadata"]["namespace"] == "kubeflow"
    assert tuple(config_map["data"]) == CONFIG_MAP_KEYS
    assert tuple(secret["data"]) == SECRET_KEYS
    assert config_map["data"] == {
        "MLFLOW_TRACKING_URI": f"http://mc-modelcommons-mlflow.{NAMESPACE}.svc:5000",
        "MODELCOMMONS_S3_ENDPOINT": f"mc-modelcommons-minio.{NAMESPACE}.svc:9000",
        "MODELCOMMONS_S3_SECURE": "false",
        "MODELCOMMONS_S3_REGION": "us-east-1",
        "MODELCOMMONS_S3_BUCKET": "modelcommons",
    }
    # The same values the chart gives its own MLflow/S3 clients (the RayService pods).
    env = plain_env(manifests)
    assert {k: env[k] for k in CONFIG_MAP_KEYS} == config_map["data"]


def test_the_keys_are_the_settings_a_task_reads(rendered, monkeypatch: pytest.MonkeyPatch):
    [config_map] = pipeline_env(rendered["default"], "ConfigMap")
    [secret] = pipeline_env(rendered["default"], "Secret")
    for key, value in config_map["data"].items():
        monkeypatch.setenv(key, value)
    for key, value in secret["data"].items():
        monkeypatch.setenv(key, base64.b64decode(value).decode())
    settings = Settings()
    assert settings.s3_url == f"http://mc-modelcommons-minio.{NAMESPACE}.svc:9000"
    assert settings.s3_bucket == "modelcommons" and settings.s3_region == "us-east-1"
    assert settings.s3_access_key is not None and len(settings.s3_access_key.get_secret_value()) == 32
    assert settings.effective_tracking_uri == f"http://mc-modelcommons-mlflow.{NAMESPACE}.svc:5000"


def test_external_s3_goes_into_the_configmap_and_the_secret_is_the_users(rendered):
    manifests = rendered["external-services"]
    [config_map] = pipeline_env(manifests, "ConfigMap")
    assert config_map["data"]["MODELCOMMONS_S3_ENDPOINT"] == "s3.eu-west-1.amazonaws.com:443"
    assert config_map["data"]["MODELCOMMONS_S3_SECURE"] == "true"
    assert config_map["data"]["MODELCOMMONS_S3_BUCKET"] == "acme-modelcommons"
    assert pipeline_env(manifests, "Secret") == []  # pipelineEnv.existingSecret: modelcommons-pipeline-s3


def test_an_existing_s3_secret_needs_an_existing_pipeline_secret():
    proc = helm_template([CHART_DIR / "values-production.yaml"],
                         ["--set", "s3.existingSecret=mc-s3", "--set", "postgresql.auth.existingSecret=mc-pg"])
    assert proc.returncode != 0
    assert ("pipelineEnv.existingSecret is required when s3.existingSecret is set (the chart does not copy a "
            "Secret it did not make): a Secret in namespace kubeflow with keys MODELCOMMONS_S3_ACCESS_KEY "
            "and MODELCOMMONS_S3_SECRET_KEY") in proc.stderr
    proc = helm_template([CHART_DIR / "values-production.yaml"],
                         ["--set", "s3.existingSecret=mc-s3", "--set", "postgresql.auth.existingSecret=mc-pg",
                          "--set", "pipelineEnv.enabled=false"])
    assert proc.returncode == 0, proc.stderr


def upload_command(manifests: list[dict[str, Any]]) -> list[str]:
    job = one(manifests, "Job", lambda m: m["metadata"]["name"].endswith("pipeline-upload"))
    return list(job["spec"]["template"]["spec"]["containers"][0]["command"])


def test_other_name_namespace_and_secret_reach_the_upload_job():
    flags = ["--set", "pipelineEnv.name=team-a-env", "--set", "pipelineEnv.namespace=",
             "--set", "pipelineEnv.existingSecret=team-a-s3"]
    proc = helm_template([CHART_DIR / "ci" / "full-values.yaml"], flags)
    assert proc.returncode == 0, proc.stderr
    manifests = parse_manifests(proc.stdout)
    [config_map] = pipeline_env(manifests, "ConfigMap")
    assert (config_map["metadata"]["name"], config_map["metadata"]["namespace"]) == ("team-a-env", NAMESPACE)
    assert pipeline_env(manifests, "Secret") == []
    assert upload_command(manifests)[-4:] == ["--env-from", "team-a-env", "--env-secret", "team-a-s3"]


def test_disabled_writes_nothing_and_uploads_without_env_sources():
    proc = helm_template([CHART_DIR / "ci" / "full-values.yaml"], ["--set", "pipelineEnv.enabled=false"])
    assert proc.returncode == 0, proc.stderr
    manifests = parse_manifests(proc.stdout)
    assert pipeline_env(manifests, "ConfigMap") == pipeline_env(manifests, "Secret") == []
    assert upload_command(manifests)[-2:] == ["--env-from", "none"]
