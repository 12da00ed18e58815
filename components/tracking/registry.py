"""MLflow model registry: register a version with its recipe, and move ``champion`` only on improvement.

Rule: the new version becomes ``champion`` when there is none or when its metric beats the current
champion's (higher is better for mAP); otherwise it becomes ``challenger``. The metric and the full
recipe live in version tags, so the decision is reproducible from the registry alone.

Int8 versions (version tag ``precision=int8``, written by the ``quantize`` stage) are registered under the
same name but stay outside that contest: they never take ``champion``/``challenger``, and a champion alias
pointing at one (set by hand) is ignored when the next float version is ranked. Serving finds the int8
version of a float version by its tags ``precision=int8`` and ``float_version=<float version number>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
CHALLENGER = "challenger"
INT8 = "int8"


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str  # "champion" or "challenger"; "" for an int8 version (outside the contest)
    metric: str
    value: float
    previous_champion: str | None
    previous_value: float | None


def _champion(client: MlflowClient, name: str, metric: str) -> tuple[str | None, float | None]:
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    if mv.tags.get("precision") == INT8:  # not comparable with float versions
        return None, None
    raw = mv.tags.get(f"metric.{metric}")
    return str(mv.version), (float(raw) if raw is not None else None)


def register_model(model_uri: str, *, name: str, run_id: str, metric: str, value: float,
                   tags: dict[str, Any], higher_is_better: bool = True) -> Registration:
    """Register ``model_uri`` as a new version of ``name`` and set its alias by the champion rule.

    ``tags`` (dataset sha256, git commit, recipe, other metrics...) are stored on the version; values
    that are not strings are JSON-encoded. With ``tags["precision"] == "int8"`` no alias is set
    (``Registration.alias == ""``): int8 versions stay outside the float champion contest.
    """
    if not name or "/" in name or "@" in name:
        raise ValueError(f"registered model name {name!r} is invalid: no '/' or '@', not empty")
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"ModelCommons {name}; aliases: champion, challenger")
    previous, previous_value = _champion(client, name, metric)
    version_tags = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in tags.items()}
    version_tags[f"metric.{metric}"] = repr(float(value))
    mv = mlflow.register_model(model_uri, name, tags=version_tags)
    if mv.run_id and mv.run_id != run_id:
        raise ValueError(f"model {model_uri!r} belongs to run {mv.run_id}, not {run_id}")
    if version_tags.get("precision") == INT8:
        return Registration(name=name, version=str(mv.version), alias="", metric=metric, value=float(value),
                            previous_champion=previous, previous_value=previous_value)
    better = previous_value is None or (value > previous_value if higher_is_better else value < previous_value)
    alias = CHAMPION if better else CHALLENGER
    client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, "alias_at_registration", alias)
    return Registration(name=name, version=str(mv.version), alias=alias, metric=metric, value=float(value),
                        previous_champion=previous, previous_value=previous_value)


def find_int8_version(name: str, float_version: str) -> ModelVersion | None:
    """The newest version of registered model ``name`` tagged ``precision=int8`` and
    ``float_version=<float_version>`` (the quantize stage's convention), or None when there is none.

    MLflow must be configured (:func:`components.tracking.setup.configure_mlflow`).
    """
    # Tags are filtered here, not in the filter string: a name is quoted once, values need no escaping.
    escaped = name.replace("'", "\\'")
    versions = [mv for mv in MlflowClient().search_model_versions(f"name = '{escaped}'")
                if mv.name == name and (mv.tags or {}).get("precision") == "int8"
                and str((mv.tags or {}).get("float_version")) == str(float_version)]
    return max(versions, key=lambda mv: int(mv.version), default=None)
