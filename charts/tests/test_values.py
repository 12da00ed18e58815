"""values.yaml, values.schema.json and helm lint: documented, strict, and bad values rejected by name.

Lint runs twice: through helm-sdkpy (Helm v4's Go library; it returns severities without message
texts) and through the real Helm binary, whose message names the offending key. The same values are
also checked with ``jsonschema`` here, which gives the key's path in Python.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from charts.render_serve_config import CHART_DIR, SCHEMA_PATH, _merge, load_values, serve_args_schema
from charts.tests.conftest import HELM, SCENARIOS, run_tools_python, tool
from serving.app import ServeArgs

SCHEMA: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
# Values that are raw Kubernetes objects or maps: their inner keys follow the Kubernetes API and are
# documented by the `# --` line of the key that holds them.
RAW_KEYS = {"podSecurityContext", "containerSecurityContext", "resources", "tolerations", "nodeSelector",
            "rayStartParams", "dnsNamespaceSelector", "ingressControllerNamespaceSelector",
            "kuberayNamespaceSelector", "prometheusNamespaceSelector", "namespaceSelector", "externalTo",
            "servingFrom", "jobResources", "annotations", "labels", "commonLabels"}

BAD_VALUES = [
    # (override, key path the errors must name)
    ({"minio": {"enabeld": True}}, "enabeld"),
    ({"serving": {"app": {"replicas": "two"}}}, "replicas"),
    ({"serving": {"app": {"score_threshold": 1.5}}}, "score_threshold"),
    ({"serving": {"app": {"max_batch_sise": 4}}}, "max_batch_sise"),
    ({"s3": {"bucket": "Bad_Bucket"}}, "bucket"),
    ({"mlflow": {"resources": {"requests": {"cpu": "lots"}}}}, "cpu"),
    ({"ingress": {"mlflow": {"host": "https://mlflow.example.com"}}}, "host"),
]

LINT_CODE = """
import asyncio, json, sys, helm_sdkpy
paths = json.load(sys.stdin)
lint = helm_sdkpy.Lint(helm_sdkpy.Configuration())
print(json.dumps({p: asyncio.run(lint.run(p)) for p in paths}))
"""


def chart_copy(tmp: Path, name: str, values: dict[str, Any]) -> Path:
    """A copy of the chart whose values.yaml is ``values`` (helm-sdkpy lints a chart's own values)."""
    dest = tmp / name / "modelcommons"
    shutil.copytree(CHART_DIR, dest)
    (dest / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return dest


def max_severity(result: dict[str, Any]) -> int:
    return max((m["Severity"] for m in result["Messages"] or []), default=0)


@pytest.fixture(scope="module")
def sdk_lint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """helm-sdkpy lint results for every scenario and every bad-values case, in one tools process."""
    tmp = tmp_path_factory.mktemp("lint")
    paths: dict[str, str] = {}
    for sc in SCENARIOS:
        values = sc.values()
        if sc.name == "production":  # the flags of the scenario, as values
            values = _merge(values, {"s3": {"existingSecret": "mc-s3"},
                                     "postgresql": {"auth": {"existingSecret": "mc-postgresql"}}})
        paths[sc.name] = str(chart_copy(tmp, sc.name, values))
    for i, (override, _) in enumerate(BAD_VALUES):
        paths[f"bad{i}"] = str(chart_copy(tmp, f"bad{i}", _merge(load_values(), override)))
    results = run_tools_python(LINT_CODE, list(paths.values()))
    return {name: results[path] for name, path in paths.items()}


@pytest.mark.parametrize("scenario", [sc.name for sc in SCENARIOS])
def test_helm_sdkpy_lint_passes_for_defaults_and_every_ci_values_file(sdk_lint, scenario):
    result = sdk_lint[scenario]
    assert result["TotalChartsLinted"] == 1
    assert max_severity(result) < 3, result


@pytest.mark.parametrize(("case", "key"), [(i, key) for i, (_, key) in enumerate(BAD_VALUES)])
def test_invalid_values_fail_lint_through_the_schema_naming_the_key(sdk_lint, tmp_path, case, key):
    override = BAD_VALUES[case][0]
    # helm-sdkpy: an error (severity 3) on values.yaml, where schema violations are reported.
    result = sdk_lint[f"bad{case}"]
    assert {"Severity": 3, "Path": "values.yaml", "Err": {}} in result["Messages"], result

    # The real Helm binary says which key is wrong.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(override))
    proc = subprocess.run([str(tool(HELM, "run charts/tools/install-helm.sh")), "lint", str(CHART_DIR), "-f", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stdout + proc.stderr
    assert key in proc.stdout + proc.stderr

    # jsonschema in Python names it too.
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(_merge(load_values(), override)))
    assert errors, override
    assert any(key in e.message or key in map(str, e.absolute_path) for e in errors), [e.message for e in errors]


def test_every_scenario_is_valid_against_the_schema():
    for sc in SCENARIOS:
        jsonschema.Draft7Validator(SCHEMA).validate(sc.values())


def test_schema_is_strict_every_object_forbids_unknown_keys():
    def walk(node: Any, path: str) -> list[str]:
        loose: list[str] = []
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                loose.append(path)
            for k, v in node.items():
                loose += walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                loose += walk(v, f"{path}/{i}")
        return loose

    assert walk(SCHEMA, "") == []
    # Maps (labels, selectors, resources) constrain their values' type instead.
    assert SCHEMA["properties"]["commonLabels"]["additionalProperties"] == {"type": "string"}


def test_schema_covers_every_value_and_nothing_else():
    """Each key of values.yaml has a schema entry (or is inside a map/raw object), and vice versa."""
    def keys(values: Any, schema: dict[str, Any], path: str) -> list[str]:
        missing = []
        if isinstance(values, dict) and "properties" in schema:
            for k, v in values.items():
                if k not in schema["properties"]:
                    missing.append(f"{path}.{k}")
                else:
                    missing += keys(v, schema["properties"][k], f"{path}.{k}")
        return missing

    assert keys(load_values(), SCHEMA, "") == []
    top_level_in_values = set(load_values())
    assert set(SCHEMA["properties"]) - {"global"} == top_level_in_values


def test_every_value_is_documented_with_a_helm_docs_comment():
    """helm-docs style: a `# --` comment directly above each key, except inside raw Kubernetes objects."""
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    for n, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.\-/]+):", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_raw = any(k in RAW_KEYS for _, k in stack)
        stack.append((indent, key))
        if inside_raw:
            continue
        above = n - 1
        while above >= 0 and lines[above].strip().startswith("#") and not lines[above].strip().startswith("# --"):
            above -= 1  # a `# --` comment may continue on following lines
        documented = above >= 0 and lines[above].strip().startswith("# --")
        is_section = not line.split(":", 1)[1].strip() and n + 1 < len(lines) and \
            len(lines[n + 1]) - len(lines[n + 1].lstrip()) > indent and not lines[n + 1].lstrip().startswith("-")
        if not documented and not (is_section and key not in RAW_KEYS):
            undocumented.append(f"line {n + 1}: {'.'.join(k for _, k in stack)}")
    assert undocumented == []


def test_serving_app_values_are_exactly_the_serve_args_fields():
    app = load_values()["serving"]["app"]
    assert set(app) == set(ServeArgs.model_fields)
    ServeArgs.model_validate(app)  # the defaults are valid ServeArgs
    assert SCHEMA["properties"]["serving"]["properties"]["app"] == serve_args_schema(), \
        "values.schema.json is stale: python -m charts.render_serve_config --write-schema"


def test_ray_version_matches_the_installed_ray():
    # The image installs the same ray as the project; KubeRay needs to know which.
    assert load_values()["serving"]["rayVersion"] == ray.__version__


def test_chart_readme_lists_every_value():
    readme = (CHART_DIR / "README.md").read_text()

    def leaves(values: Any, path: str) -> list[str]:
        if isinstance(values, dict) and values and path.rsplit(".", 1)[-1] not in RAW_KEYS:
            return [p for k, v in values.items() for p in leaves(v, f"{path}.{k}" if path else k)]
        return [path]

    missing = [p for p in leaves(load_values(), "") if f"| `{p}` |" not in readme]
    assert missing == []
