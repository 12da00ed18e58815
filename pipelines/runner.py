"""Compile pipelines, run them locally (kfp.local) or submit them to a Kubeflow Pipelines server."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from components.settings import Settings, get_settings


class PipelineParamError(ValueError):
    """A pipeline name or ``--param key=value`` is unknown or has the wrong type."""


def pipelines() -> dict[str, Callable[..., Any]]:
    """Every pipeline by its KFP name."""
    from pipelines.detector_train import detector_train

    return {"detector-train": detector_train}


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


def compile_pipeline(name: str, output: Path) -> Path:
    """Write the pipeline's IR YAML to ``output``."""
    from kfp import compiler

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(get_pipeline(name), str(output))
    return output


def run_local(name: str, params: dict[str, Any], *, settings: Settings | None = None) -> dict[str, Any]:
    """Run a pipeline on this machine with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Components run in this interpreter's environment; ``MODELCOMMONS_HOME`` is passed on so every
    step uses the same MLflow store. Returns the pipeline's outputs.
    """
    from kfp import local

    settings = settings or get_settings()
    settings.ensure_dirs()
    os.environ["MODELCOMMONS_HOME"] = str(settings.home)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(settings.pipeline_root),
               raise_on_error=True)
    task = get_pipeline(name)(**params)
    return dict(task.outputs) if task is not None and task.outputs else {}


def submit(name: str, params: dict[str, Any], *, host: str, experiment: str = "modelcommons",
           run_name: str | None = None) -> str:
    """Submit a pipeline run to a Kubeflow Pipelines server; return the run id."""
    import kfp

    client = kfp.Client(host=host)
    result = client.create_run_from_pipeline_func(get_pipeline(name), arguments=params,
                                                  experiment_name=experiment, run_name=run_name)
    return str(result.run_id)
