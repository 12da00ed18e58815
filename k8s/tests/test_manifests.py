"""Every manifest under k8s/ checked with real tools, offline (no cluster and no Docker engine exist here).

- Kubernetes objects: ``kubernetes-validate --strict`` against the Kubernetes 1.30 OpenAPI schemas.
- RayService (a CRD, which kubernetes-validate has no schema for): the structure against
  ``k8s/schemas/rayservice.schema.json`` (hand-written from the KubeRay v1 API reference, since the
  CRD's own schema cannot be downloaded here); every pod template inside it as a core/v1
  ``PodTemplate`` with kubernetes-validate; ``serveConfigV2`` with Ray's ``ServeDeploySchema`` and
  the serving app's ``ServeArgs``.
- ``k8s/base`` builds with ``kubectl kustomize``; the operator kustomizations pin their releases
  (their remote bases cannot be fetched here, so only their references are checked).
- checkov scans k8s/ and the RayService pod templates; every failed check must be one explained below.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from k8s import generate
from k8s.tests.checkers import ROOT, run, tool

K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.30.0"
KUBERAY_REF = "v1.5.1"
KFP_REF = "2.14.3"

# checkov has no severities offline (they come from Prisma Cloud), so every failed check counts as high
# unless it is listed here with the reason it does not apply. The same reasons are in k8s/README.md.
EXPLAINED_POD_FINDINGS = {
    "CKV_K8S_8": "liveness probe: KubeRay injects its own wget probes into Ray containers of a RayService",
    "CKV_K8S_9": "readiness probe: as CKV_K8S_8, injected by KubeRay",
    "CKV_K8S_43": "image digest: the example's registry is a placeholder; pin your image by digest",
}


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and "tests" not in p.parts)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayservices() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in _manifests() for d in _docs(p) if d.get("kind") == "RayService"]


def _pod_templates(tmp_path: Path) -> Path:
    """Every Ray pod template of every RayService, as core/v1 PodTemplate objects in one file."""
    docs = []
    for path, obj in _rayservices():
        cluster = obj["spec"]["rayClusterConfig"]
        groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
        for group, spec in groups:
            docs.append({"apiVersion": "v1", "kind": "PodTemplate",
                         "metadata": {"name": f"{path.stem}-{group}", "namespace": obj["metadata"]["namespace"]},
                         "template": spec["template"]})
    out = tmp_path / "pod-templates.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    return out


def _validate(files: list[Path]) -> tuple[int, str]:
    result = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, *files])
    return result.returncode, result.stdout + result.stderr


def test_examples_are_exactly_what_the_generator_writes() -> None:
    for path, text in generate.targets().items():
        assert path.is_file(), f"{path} missing: run .venv/bin/python k8s/generate.py"
        assert path.read_text() == text, f"{path} is stale: run .venv/bin/python k8s/generate.py"
    assert generate.main(["--check"]) == 0


def test_serve_config_passes_rays_schema_and_equals_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.app import APP_NAME, ServeArgs, serve_config

    assert len(_rayservices()) == 2
    for path, obj in _rayservices():
        config = yaml.safe_load(obj["spec"]["serveConfigV2"])
        parsed = ServeDeploySchema.model_validate(config)
        assert [app.name for app in parsed.applications] == [APP_NAME]
        assert parsed.applications[0].import_path == "serving.app:app_builder"
        assert parsed.http_options.host == "0.0.0.0" and parsed.http_options.port == 8000
        args = ServeArgs.model_validate({**config["applications"][0]["args"], "host": "0.0.0.0", "port": 8000})
        assert serve_config(args) == config, path
        cluster = obj["spec"]["rayClusterConfig"]
        workers = cluster["workerGroupSpecs"]
        limits = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        if path.stem.endswith("gpu"):
            assert args.num_gpus == 1.0 and limits["nvidia.com/gpu"] == 1
            assert workers[0]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert args.num_gpus == 0.0 and "nvidia.com/gpu" not in limits
        import ray

        assert cluster["rayVersion"] == ray.__version__


def test_rayservice_structure_matches_the_kuberay_v1_api() -> None:
    schema = json.loads((K8S / "schemas" / "rayservice.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    for path, obj in _rayservices():
        errors = [e.message for e in validator.iter_errors(obj)]
        assert errors == [], f"{path}: {errors}"
    # The schema is strict: a misspelt field and a numeric rayStartParams value are refused.
    _, obj = _rayservices()[0]
    bad = json.loads(json.dumps(obj))
    bad["spec"]["rayClusterConfig"]["workerGroupSpec"] = bad["spec"]["rayClusterConfig"].pop("workerGroupSpecs")
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert any("'workerGroupSpec' was unexpected" in m for m in messages), messages
    assert any("0 is not of type 'string'" in m for m in messages), messages


def test_every_manifest_validates_against_kubernetes_schemas(tmp_path: Path) -> None:
    built = tmp_path / "base-built.yaml"
    kustomize = run(["kubectl", "kustomize", K8S / "base"])
    assert kustomize.returncode == 0, kustomize.stderr
    built.write_text(kustomize.stdout)
    core = [p for p in _manifests() if all(d.get("kind") != "RayService" for d in _docs(p))]
    files = [*core, built, _pod_templates(tmp_path)]
    code, out = _validate(files)
    assert code == 0, out
    assert "Couldn't find schema" not in out, out
    expected = sum(len(_docs(p)) for p in files)
    assert out.count(" passed for resource ") == expected, out
    # The validator does reject what Kubernetes would: a misspelt container field.
    broken = tmp_path / "broken.yaml"
    template = yaml.safe_load(_pod_templates(tmp_path).read_text().split("---")[0])
    template["template"]["spec"]["containers"][0]["resource"] = {}
    broken.write_text(yaml.safe_dump(template))
    code, out = _validate([broken])
    assert code == 1 and "'resource' was unexpected" in out, out


def test_base_kustomization_builds_the_prerequisites() -> None:
    result = run(["kubectl", "kustomize", K8S / "base"])
    assert result.returncode == 0, result.stderr
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout))
    assert kinds == [("LimitRange", "modelcommons-defaults"), ("Namespace", "modelcommons"),
                     ("ResourceQuota", "modelcommons"), ("Role", "rayservice-deployer"),
                     ("RoleBinding", "rayservice-deployer"), ("ServiceAccount", "modelcommons-pipeline-runner")]
    docs = {d["kind"]: d for d in yaml.safe_load_all(result.stdout)}
    assert docs["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert "requests.nvidia.com/gpu" in docs["ResourceQuota"]["spec"]["hard"]
    # Exactly what `modelcommons deploy` needs (components/deploy/rayservice.py): get + patch on rayservices.
    rules = docs["Role"]["rules"]
    assert {"get", "patch"} <= set(rules[0]["verbs"]) and rules[0]["resources"] == ["rayservices"]
    assert all(r["apiGroups"] == ["ray.io"] for r in rules)
    subjects = {(s["namespace"], s["name"]) for s in docs["RoleBinding"]["subjects"]}
    assert subjects == {("modelcommons", "modelcommons-pipeline-runner"), ("kubeflow", "pipeline-runner")}


def test_operator_kustomizations_pin_their_releases() -> None:
    remote = []
    for path in sorted((K8S / "operators").rglob("kustomization.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "Kustomization", path
        for resource in doc["resources"]:
            if resource.startswith("https://"):
                remote.append(resource)
            else:
                assert (path.parent / resource).exists(), f"{path}: {resource} does not exist"
    refs = {re.sub(r"\?ref=.*", "", r): r.rsplit("?ref=", 1)[-1] for r in remote}
    assert len(refs) == len(remote) == 4, remote
    for url, ref in refs.items():
        assert ref == (KUBERAY_REF if "ray-project/kuberay" in url else KFP_REF), url
    readme = (K8S / "README.md").read_text()
    assert KUBERAY_REF in readme and KFP_REF in readme


def _checkov(target: Path, framework: str) -> dict[str, Any]:
    result = run([tool("checkov"), "-d" if target.is_dir() else "-f", target, "--framework", framework,
                  "--skip-download", "--compact", "--quiet", "-o", "json"])
    assert result.stdout.strip(), result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    assert reports and all(r.get("summary", {}).get("parsing_errors", 0) == 0 for r in reports), result.stdout
    return {"failed": [(c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]],
            "skipped": [c for r in reports for c in r["results"].get("skipped_checks", [])],
            "passed": sum(r["summary"]["passed"] for r in reports)}


def test_checkov_finds_nothing_unexplained(tmp_path: Path) -> None:
    manifests = _checkov(K8S, "kubernetes")
    assert manifests["failed"] == [] and manifests["passed"] > 0, manifests
    pods = _checkov(_pod_templates(tmp_path).parent, "kubernetes")
    assert pods["passed"] > 50, pods  # the container checks ran (privileges, capabilities, root, ...)
    unexplained = [f for f in pods["failed"] if f[0] not in EXPLAINED_POD_FINDINGS]
    assert unexplained == [], unexplained
    readme = (K8S / "README.md").read_text()
    assert all(check in readme for check in EXPLAINED_POD_FINDINGS)
