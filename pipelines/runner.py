"""Compile pipelines, run them locally (kfp.local) or submit them to a Kubeflow Pipelines server."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from components.settings import Settings, get_settings
from pipelines.cluster_env import DEFAULT_ENV, ClusterEnv, for_cluster


class PipelineParamError(ValueError):
    """A pipeline name or ``--param key=value`` is unknown or has the wrong type."""


def pipelines() -> dict[str, Callable[..., Any]]:
    """Every pipeline by its KFP name."""
    from pipelines.demo_pipeline import demo
    from pipelines.detector_train import detector_train
    from pipelines.quantize import quantize
    from pipelines.segmenter_train import segmenter_train
    from pipelines.sweep import sweep

    return {"detector-train": detector_train, "sweep": sweep, "segmenter-train": segmenter_train, "demo": demo,
            "quantize": quantize}


def get_pipeline(name: str) -> Callable[..., Any]:
    found = pipelines()
    if name not in found:
        raise PipelineParamError(f"unknown pipeline {name!r}; available: {', '.join(sorted(found))}")
    return found[name]


def pipeline_parameters(name: str) -> dict[str, tuple[type, Any]]:
    """``{param: (type, default or inspect.Parameter.empty)}`` of a pipeline."""
    func = get_pipeline(name)
    signature = inspect.signature(getattr(func, "pipeline_func", func))
    return {p.name: (p.annotation if isinstance(p.annotation, type) else str, p.default)
            for p in signature.parameters.values()}


def _convert(name: str, key: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return lowered in {"true", "1", "yes"}
        if kind in (int, float):
            return kind(raw)
    except ValueError as exc:
        raise PipelineParamError(
            f"pipeline {name!r} parameter {key}={raw!r}: expected {kind.__name__}"
        ) from exc
    return raw


def parse_params(name: str, pairs: Sequence[str]) -> dict[str, Any]:
    """``["epochs=5", "source=/data"]`` -> typed keyword arguments; checks names and required ones."""
    spec = pipeline_parameters(name)
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PipelineParamError(f"--param {pair!r}: expected key=value")
        if key not in spec:
            raise PipelineParamError(
                f"pipeline {name!r} has no parameter {key!r}; allowed: {', '.join(sorted(spec))}"
            )
        values[key] = _convert(name, key, raw, spec[key][0])
    missing = [k for k, (_, default) in spec.items() if default is inspect.Parameter.empty and k not in values]
    if missing:
        raise PipelineParamError(f"pipeline {name!r} needs --param for: {', '.join(missing)}")
    return values


def cluster_pipeline(name: str, env: ClusterEnv | None = DEFAULT_ENV) -> Any:
    """The pipeline ``name`` for a cluster: every task's environment from ``env``'s ConfigMap and Secret
    (``None``: none, the pods rely on cluster defaults); see :mod:`pipelines.cluster_env`."""
    return for_cluster(get_pipeline(name), env)


def compile_pipeline(name: str, output: Path, *, env: ClusterEnv | None = DEFAULT_ENV) -> Path:
    """Write the pipeline's IR YAML to ``output``; task pods take their environment from ``env``."""
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(cluster_pipeline(name, env), str(output))
    return output


def run_local(name: str, params: dict[str, Any], *, settings: Settings | None = None) -> dict[str, Any]:
    """Run a pipeline on this machine with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Components run in this interpreter's environment; ``MODELCOMMONS_HOME`` is passed on so every
    step uses the same MLflow store. Returns the pipeline's outputs.
    """
    from kfp import local

    if name == "sweep" and "space" in params:
        # fail with the SearchSpaceError itself (CLI exit 2), not a failed-task traceback
        from components.train.sweep import load_search_space

        load_search_space(params["space"])
    settings = settings or get_settings()
    settings.ensure_dirs()
    os.environ["MODELCOMMONS_HOME"] = str(settings.home)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(settings.pipeline_root),
               raise_on_error=True)
    task = get_pipeline(name)(**params)
    return dict(task.outputs) if task is not None and task.outputs else {}


def kfp_client(host: str) -> Any:
    """A ``kfp.Client`` for the Kubeflow Pipelines API at ``host`` (``http(s)://...``).

    Raises :class:`PipelineParamError` for a malformed URL and ``RuntimeError`` when the API's
    ``/apis/v2beta1/healthz`` does not answer (kfp.Client retries it 5 times, 5 s apart).
    """
    import kfp

    if not host.startswith(("http://", "https://")):
        raise PipelineParamError(f"--host {host!r}: expected an http:// or https:// URL of the KFP API")
    try:
        return kfp.Client(host=host)
    except TimeoutError as exc:
        raise RuntimeError(f"Kubeflow Pipelines API at {host} is not answering: {exc}") from exc


def submit(name: str, params: dict[str, Any], *, host: str, experiment: str = "modelcommons",
           run_name: str | None = None, env: ClusterEnv | None = DEFAULT_ENV) -> str:
    """Submit a pipeline run to a Kubeflow Pipelines server through ``kfp.Client``; return the run id.

    Task pods take their environment from ``env`` (see :func:`cluster_pipeline`).
    """
    func = cluster_pipeline(name, env)
    client = kfp_client(host)
    result = client.create_run_from_pipeline_func(func, arguments=params, experiment_name=experiment,
                                                  run_name=run_name)
    return str(result.run_id)


def default_version_name() -> str:
    """``<modelcommons package version>-<git commit, 12 hex>``: the same code uploads under the same name."""
    from importlib.metadata import version

    from components.tracking.setup import git_commit

    commit = git_commit()
    short = commit.split("-")[0][:12] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{version('modelcommons')}-{short}"


def upload(*, host: str, name: str | None = None, version: str | None = None,
           env: ClusterEnv | None = DEFAULT_ENV) -> list[str]:
    """Compile every pipeline (or only ``name``), task environment from ``env``, and upload it to ``host``.

    A pipeline the server does not know yet is created; otherwise a version named ``version``
    (default :func:`default_version_name`) is added, unless a version of that name exists already,
    so re-running (e.g. the chart's upload Job on every ``helm upgrade``) changes nothing.
    Returns one report line per pipeline.
    """
    import json
    import tempfile

    names = [name] if name else sorted(pipelines())
    for each in names:
        get_pipeline(each)  # unknown name: fail before contacting the server
    version = version or default_version_name()
    client = kfp_client(host)
    lines = []
    with tempfile.TemporaryDirectory(prefix="mc-upload-") as tmp:
        for each in names:
            package = str(compile_pipeline(each, Path(tmp) / f"{each}.yaml", env=env))
            pipeline_id = client.get_pipeline_id(each)
            if pipeline_id is None:
                created = client.upload_pipeline(package, pipeline_name=each,
                                                 description=f"ModelCommons {each} ({version})")
                lines.append(f"{each}: created pipeline {created.pipeline_id}")
                continue
            same = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name",
                                               "stringValue": version}]})
            if client.list_pipeline_versions(pipeline_id, filter=same).pipeline_versions:
                lines.append(f"{each}: version {version} is already on pipeline {pipeline_id}; nothing uploaded")
                continue
            added = client.upload_pipeline_version(package, version, pipeline_id=pipeline_id)
            lines.append(f"{each}: added version {version} ({added.pipeline_version_id}) to pipeline {pipeline_id}")
    return lines
