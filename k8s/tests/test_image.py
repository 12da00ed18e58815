"""The container image definition, checked statically: no Docker engine exists here, so the image is
never built in these tests. hadolint and checkov lint the Dockerfile; the rest checks the contracts
the cluster relies on (non-root uid, kfp version, what goes into the build context)."""

from __future__ import annotations

import re
from pathlib import Path

from k8s import generate
from k8s.tests.checkers import ROOT, run, tool
from k8s.tests.test_manifests import _checkov

DOCKERFILE = ROOT / "Dockerfile"


def test_hadolint_passes_and_does_lint(tmp_path: Path) -> None:
    result = run([tool("hadolint"), DOCKERFILE])
    assert result.returncode == 0, result.stdout + result.stderr
    # hadolint really checks: an unpinned base and apt install without --no-install-recommends fail.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install -y curl\n")
    result = run([tool("hadolint"), bad])
    assert result.returncode == 1 and "DL3006" in result.stdout and "DL3015" in result.stdout, result.stdout


def test_checkov_dockerfile_has_no_failures_and_skips_give_reasons() -> None:
    report = _checkov(DOCKERFILE, "dockerfile")
    assert report["failed"] == [] and report["passed"] > 50, report
    for skipped in report["skipped"]:
        assert len(skipped["check_result"].get("suppress_comment", "")) > 20, skipped


def test_image_contract() -> None:
    import kfp

    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, flags=re.MULTILINE)
    assert [name for _, name in stages] == ["uv", "builder", "runtime"]  # multi-stage; runtime is last
    # Non-root with the uid the manifests run as (runAsUser in k8s/examples).
    assert re.search(r"^USER \$\{APP_UID\}:\$\{APP_UID\}$", text, flags=re.MULTILINE)
    assert f"ARG APP_UID={generate.RUN_AS}" in text
    # A lightweight KFP component's launcher runs `pip install kfp==<compiling SDK>`: the image must hold it.
    assert f"ARG KFP_VERSION={kfp.__version__}" in text
    # CPU variant by default, CUDA base documented for the GPU variant; torch pinned by constraints.txt.
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "nvidia/cuda:" in text and "-c constraints.txt" in text
    # wget: KubeRay's injected probes call it.
    assert "wget" in text


def test_build_context_holds_only_the_packages() -> None:
    rules = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert rules[0] == "*"  # allow-list: nothing enters the context unless named
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), flags=re.MULTILINE))
    copied_paths = {p for line in copied for p in line.split()}
    assert copied_paths <= allowed, copied_paths - allowed
    assert {"components", "pipelines", "serving", "pyproject.toml", "constraints.txt"} <= allowed
