"""Render the chart with the real Helm binary and check what a cluster would receive.

No cluster runs here. What is checked, and with what:
- every rendered manifest against Kubernetes' OpenAPI schemas (kubernetes-validate, strict, 1.30);
  the RayService's head and worker pod templates too, as PodTemplates. The RayService, ServiceMonitor
  and PodMonitor themselves are CRDs with no schema available offline: their fields are asserted here;
- a security scan of every manifest (checkov): no failed check; accepted findings carry a
  ``checkov.io/skipN`` annotation with the reason in the template;
- ``serveConfigV2`` equals ``serving.app.serve_config(ServeArgs(**values.serving.app))`` and parses
  with Ray's own ``ray.serve.schema.ServeDeploySchema``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from charts.render_serve_config import CHART_DIR, serve_config_for_values
from charts.tests.conftest import (
    HELM,
    KUBERNETES_VERSION,
    NAMESPACE,
    SCENARIOS,
    TOOLS_BIN,
    by_kind,
    helm_template,
    one,
    pod_specs,
    run_tools_python,
    tool,
)
from serving.server import HIGH_THROUGHPUT_ENV

SCENARIO_VALUES = {sc.name: sc.values() for sc in SCENARIOS}
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}

VALIDATE_CODE = """
import json, sys
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError
docs, version = json.load(sys.stdin)
out = []
for where, doc in docs:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        out.append([where, None])
    except SchemaNotFoundError as exc:
        out.append([where, "no schema: " + str(exc)])
    except kubernetes_validate.ValidationError as exc:
        out.append([where, exc.message + " at " + ".".join(map(str, exc.path))])
print(json.dumps(out))
"""


def name_of(m: dict[str, Any]) -> str:
    return f"{m['kind']}/{m['metadata']['name']}"


def test_production_profile_refuses_to_render_without_existing_secrets():
    proc = helm_template([CHART_DIR / "values-production.yaml"])
    assert proc.returncode != 0
    assert "s3.existingSecret is required when secrets.requireExisting is true" in proc.stderr
    proc = helm_template([CHART_DIR / "values-production.yaml"], ["--set", "s3.existingSecret=mc-s3"])
    assert "postgresql.auth.existingSecret is required" in proc.stderr
    proc = helm_template([CHART_DIR / "values-production.yaml"],
                         ["--set", "s3.existingSecret=a", "--set", "postgresql.auth.existingSecret=b",
                          "--set", "postgresql.auth.password=plain"])
    assert proc.returncode != 0
    assert "postgresql.auth.password must be empty when secrets.requireExisting is true" in proc.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "serving.worker.gpu.enabled=false"],
     "serving.app.num_gpus is 1 but serving.worker.gpu.enabled is false"),
    (["--set", "minio.enabled=false"], "s3.endpoint (host:port) is required when minio.enabled is false"),
    (["--set", "postgresql.enabled=false"], "externalDatabase.host is required"),
    (["--set", "pipelineUpload.enabled=true"], "pipelineUpload.host (the Kubeflow Pipelines API URL) is required"),
])
def test_inconsistent_values_fail_with_a_message_naming_the_value(flags, message):
    proc = helm_template([], flags)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_production_renders_no_secret_and_no_credential(rendered):
    for scenario in ("production", "external-services"):
        manifests = rendered[scenario]
        assert by_kind(manifests, "Secret") == []
        text = yaml.safe_dump_all(manifests)
        assert "password" not in {e.get("name", "").lower() for m in manifests for _, spec in pod_specs(m)
                                  for c in spec["containers"] for e in c.get("env", []) if "value" in e}
        assert "PASSWORD=" not in text


def test_development_profile_generates_credentials_into_secrets(rendered):
    secrets = {m["metadata"]["name"]: m for m in by_kind(rendered["default"], "Secret")}
    assert set(secrets) == {"mc-modelcommons-s3", "mc-modelcommons-postgresql", "modelcommons-pipeline-env"}
    assert set(secrets["mc-modelcommons-s3"]["data"]) == {"access-key", "secret-key"}
    # The pipeline task pods' copy holds the same generated keys (one value, rendered twice).
    s3, copy = secrets["mc-modelcommons-s3"]["data"], secrets["modelcommons-pipeline-env"]["data"]
    assert copy == {"MODELCOMMONS_S3_ACCESS_KEY": s3["access-key"], "MODELCOMMONS_S3_SECRET_KEY": s3["secret-key"]}
    assert len(secrets["mc-modelcommons-postgresql"]["data"]["password"]) == 44  # 32 random chars, base64


def test_every_manifest_is_valid_against_the_kubernetes_openapi_schemas(rendered):
    docs: list[tuple[str, dict[str, Any]]] = []
    for scenario, manifests in rendered.items():
        for m in manifests:
            where = f"{scenario}:{name_of(m)}"
            if m["kind"] == "RayService":  # a CRD: validate the pods it creates as PodTemplates
                cluster = m["spec"]["rayClusterConfig"]
                groups = [("head", cluster["headGroupSpec"])]
                groups += [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
                for group, spec in groups:
                    docs.append((f"{where}:{group}", {"apiVersion": "v1", "kind": "PodTemplate",
                                                      "metadata": {"name": group}, "template": spec["template"]}))
            elif m["kind"] not in CRD_KINDS:
                docs.append((where, m))
    results = run_tools_python(VALIDATE_CODE, [docs, KUBERNETES_VERSION])
    assert len(results) == len(docs) > 60
    assert [r for r in results if r[1] is not None] == []


def test_checkov_finds_nothing_unexplained(rendered, tmp_path: Path):
    for scenario, manifests in rendered.items():
        (tmp_path / f"{scenario}.yaml").write_text(yaml.safe_dump_all(manifests))
    checkov = tool(TOOLS_BIN / "checkov", "run `make tools`")
    proc = subprocess.run([str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--output", "json",
                           "--quiet", "--skip-download"], capture_output=True, text=True, timeout=120, check=False)
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"].get("failed_checks", [])]
    assert failed == [], failed
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] > 50
    # Every accepted finding is a skip annotation with a reason, for a known reason.
    skipped = report["results"].get("skipped_checks", [])
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_43", "CKV_K8S_35", "CKV_K8S_8", "CKV_K8S_9"}
    assert all(len(c["check_result"].get("suppress_comment", "")) > 20 for c in skipped)


@pytest.mark.parametrize("scenario", [sc.name for sc in SCENARIOS])
def test_serve_config_v2_is_the_serve_config_of_the_same_serve_args(rendered, scenario):
    rayservice = one(rendered[scenario], "RayService")
    rendered_cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert rendered_cfg == serve_config_for_values(SCENARIO_VALUES[scenario])
    parsed = ServeDeploySchema.model_validate(rendered_cfg)
    (app,) = parsed.applications
    assert app.import_path == "serving.app:app_builder"
    assert app.args["model_uri"] == SCENARIO_VALUES[scenario]["serving"]["app"]["model_uri"]
    assert parsed.http_options.host == "0.0.0.0"
    # Integers stay integers (no 2.097152e+07 from Helm's float64 values).
    assert isinstance(app.args["max_image_bytes"], int)


def test_gpu_worker_group_has_gpu_limits_node_selector_and_tolerations(rendered):
    cluster = one(rendered["full"], "RayService")["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("gpu", 2, 1, 8)
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "registry.example.com/modelcommons:0.1.0-cuda"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_ray_pods_run_serve_in_high_throughput_mode_unless_switched_off(rendered):
    wanted = HIGH_THROUGHPUT_ENV  # what `modelcommons serve` sets locally, minus the local-only drain
    for scenario in ("default", "full"):
        for where, spec in pod_specs(one(rendered[scenario], "RayService")):
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert {k: env.get(k) for k in wanted} == wanted, (scenario, where)
    off = helm_template([], ["--set", "serving.highThroughput=false"])
    assert off.returncode == 0, off.stderr
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in off.stdout and "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in off.stdout


def test_cpu_only_option_requests_no_gpu(rendered):
    cluster = one(rendered["cpu-only"], "RayService")["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] == "cpu"
    assert "nvidia.com/gpu" not in json.dumps(group)
    assert "tolerations" not in group["template"]["spec"]
    assert yaml.safe_load(one(rendered["cpu-only"], "RayService")["spec"]["serveConfigV2"])[
        "applications"][0]["args"]["num_gpus"] == 0


@pytest.mark.parametrize("scenario", [sc.name for sc in SCENARIOS])
def test_every_pod_meets_pod_security_restricted_and_has_resources(rendered, scenario):
    pods = [(name_of(m), where, spec) for m in rendered[scenario] for where, spec in pod_specs(m)]
    assert len(pods) >= 4
    for name, where, spec in pods:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            label = f"{name} {where} {c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            assert sc["readOnlyRootFilesystem"] is True, label
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"]), label
            assert not any(v.get("hostPath") for v in spec.get("volumes", [])), label


def test_mlflow_uses_postgres_proxied_s3_and_allows_the_ingress_host(rendered):
    deployment = one(rendered["full"], "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    assert "--serve-artifacts" in c["args"]
    assert args["artifacts-destination"] == "s3://modelcommons/mlflow"
    allowed = args["allowed-hosts"].split(",")
    assert "mlflow.example.com" in allowed and "*.corp.example.com" in allowed
    assert f"mc-modelcommons-mlflow.{NAMESPACE}.svc:*" in allowed
    assert args["cors-allowed-origins"] == "https://mlflow.example.com"
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        f"postgresql+psycopg2://mlflow:$(DB_PASSWORD)@mc-modelcommons-postgresql.{NAMESPACE}.svc:5432/mlflow")
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == f"http://mc-modelcommons-minio.{NAMESPACE}.svc:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mc-modelcommons-s3",
                                                                         "key": "secret-key"}
    # Without an ingress only in-cluster names and localhost are allowed.
    c0 = one(rendered["default"], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert not any("example.com" in a for a in c0["args"])


def test_external_services_are_wired_from_existing_secrets(rendered):
    manifests = rendered["external-services"]
    assert by_kind(manifests, "StatefulSet") == []  # no bundled PostgreSQL or MinIO
    c = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].endswith("@pg.databases.svc:5432/mlflow?sslmode=require")
    assert env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "modelcommons-db", "key": "password"}
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "https://s3.eu-west-1.amazonaws.com:443"
    head = one(manifests, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    head_env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert head_env["MODELCOMMONS_S3_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "modelcommons-s3"
    assert head_env["MODELCOMMONS_S3_SECURE"]["value"] == "true"
    assert head_env["MLFLOW_TRACKING_URI"]["value"] == f"http://mc-modelcommons-mlflow.{NAMESPACE}.svc:5000"


def test_helm_test_hook_calls_serving_healthz_and_mlflow_health(rendered):
    pod = one(rendered["default"], "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env == {"MLFLOW_HEALTH_URL": f"http://mc-modelcommons-mlflow.{NAMESPACE}.svc:5000/health",
                   "SERVING_HEALTH_URL": f"http://mc-modelcommons-serving-serve-svc.{NAMESPACE}.svc:8000/healthz"}


def test_pipeline_upload_job_is_a_hook_running_modelcommons_pipeline_upload(rendered):
    job = one(rendered["full"], "Job", lambda m: m["metadata"]["name"].endswith("pipeline-upload"))
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["modelcommons", "pipeline", "upload", "--host", "http://ml-pipeline.kubeflow.svc:8888",
                            "--env-from", "modelcommons-pipeline-env", "--env-secret", "modelcommons-pipeline-env"]
    token = job["spec"]["template"]["spec"]["volumes"][1]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"
    assert not [m for m in rendered["default"] if m["metadata"]["name"].endswith("pipeline-upload")]


def test_optional_parts_ingress_monitors_and_network_policies(rendered):
    full, default = rendered["full"], rendered["default"]
    for kind in ("Ingress", "ServiceMonitor", "PodMonitor", "NetworkPolicy"):
        assert by_kind(default, kind) == [], kind
    ingress = one(full, "Ingress")
    assert [r["host"] for r in ingress["spec"]["rules"]] == ["mlflow.example.com", "detect.example.com"]
    backend = ingress["spec"]["rules"][1]["http"]["paths"][0]["backend"]
    assert backend["service"]["name"] == "mc-modelcommons-serving-serve-svc"
    assert {t["secretName"] for t in ingress["spec"]["tls"]} == {"mlflow-tls", "detect-tls"}
    sm = one(full, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"] == {"ray.io/serve": "mc-modelcommons-serving-serve"}
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and sm["metadata"]["labels"]["release"] == "prometheus"
    assert one(full, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"

    policies = {m["metadata"]["name"]: m["spec"] for m in by_kind(full, "NetworkPolicy")}
    deny = policies["mc-modelcommons-default-deny"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "modelcommons",
                                                  "app.kubernetes.io/instance": "mc"}
    pg = policies["mc-modelcommons-postgresql"]["ingress"]
    assert pg == [{"from": [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "modelcommons", "app.kubernetes.io/instance": "mc",
        "app.kubernetes.io/component": "mlflow"}}}], "ports": [{"port": 5432, "protocol": "TCP"}]}]
    upload = policies["mc-modelcommons-pipeline-upload"]["egress"]
    assert upload[0]["ports"] == [{"port": 8888, "protocol": "TCP"}]
    # Every component with pods has a policy beyond the default deny.
    selected = {p["podSelector"]["matchLabels"].get("app.kubernetes.io/component") for p in policies.values()}
    assert {"mlflow", "postgresql", "minio", "serving", "create-bucket", "pipeline-upload", "test"} <= selected


def test_every_resource_has_the_standard_labels_and_the_release_namespace(rendered):
    for m in rendered["full"]:
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "mc", name_of(m)
        assert labels["app.kubernetes.io/part-of"] == "modelcommons", name_of(m)
        assert labels["app.kubernetes.io/managed-by"] == "Helm", name_of(m)
        assert labels["team"] == "vision", name_of(m)
        # The pipeline task pods' ConfigMap/Secret live where Kubeflow Pipelines runs them.
        pipeline_env = m["metadata"]["labels"]["app.kubernetes.io/component"] == "pipeline-env"
        assert m["metadata"]["namespace"] == ("kubeflow" if pipeline_env else NAMESPACE), name_of(m)


def test_notes_tell_how_to_reach_mlflow_and_serving():
    helm = tool(HELM, "run charts/tools/install-helm.sh")
    proc = subprocess.run([str(helm), "install", "mc", str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward svc/mc-modelcommons-mlflow 5000:5000" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/mc-modelcommons-serving-serve-svc 8000:8000" in notes
    assert "helm test mc" in notes
