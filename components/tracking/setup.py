"""Point MLflow at the configured store: sqlite + local artifacts by default, S3/MinIO when set."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from components.settings import Settings, get_settings

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def configure_mlflow(settings: Settings | None = None, *, experiment: str | None = None) -> str:
    """Set the tracking URI and experiment; return the experiment id.

    ``MLFLOW_TRACKING_URI`` wins over the embedded sqlite default. With S3 configured, MLflow's own
    S3 client gets the endpoint and credentials through ``MLFLOW_S3_ENDPOINT_URL``/``AWS_*``.
    """
    settings = settings or get_settings()
    settings.ensure_dirs()
    for key, value in settings.s3_environment().items():
        os.environ[key] = value
    mlflow.set_tracking_uri(settings.effective_tracking_uri)
    name = experiment or settings.experiment
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        experiment_id = client.create_experiment(name, artifact_location=settings.artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return str(experiment_id)


def git_commit() -> str:
    """Commit of the running code: ``MODELCOMMONS_GIT_COMMIT`` (set in images) or ``git rev-parse``."""
    env = os.environ.get("MODELCOMMONS_GIT_COMMIT")
    if env:
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
