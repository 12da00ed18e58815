"""Environment of KFP task pods on a cluster: MLflow and S3 settings from the Helm chart's ConfigMap and Secret.

On Kubeflow Pipelines a task pod gets only the environment its executor's Kubernetes config names.
The Helm chart (``charts/modelcommons``, values ``pipelineEnv.*``) writes, into the namespace where
task pods run, a ConfigMap and a Secret both named ``pipelineEnv.name`` (default
``modelcommons-pipeline-env``):

- ConfigMap keys :data:`CONFIG_MAP_KEYS`: ``MLFLOW_TRACKING_URI`` and ``MODELCOMMONS_S3_ENDPOINT``,
  ``_SECURE``, ``_REGION``, ``_BUCKET``;
- Secret keys :data:`SECRET_KEYS`: ``MODELCOMMONS_S3_ACCESS_KEY``, ``MODELCOMMONS_S3_SECRET_KEY``.

Each key becomes the environment variable of the same name (what :mod:`components.settings` reads).
:func:`with_cluster_env` adds both sources to one task through kfp-kubernetes; every task of every
pipeline is wrapped in it. Neither source is optional: a missing ConfigMap or Secret stops the pod
with ``CreateContainerConfigError`` naming it, instead of a run that silently tracks nowhere.
``kfp.local`` ignores platform config, so local runs keep this process' environment.

``@dsl.pipeline`` builds the graph when the module is imported, with the names of :func:`current`
(default :data:`DEFAULT_ENV`). :func:`for_cluster` rebuilds a pipeline with other names, or with no
environment sources at all (``modelcommons pipeline compile|submit|upload --env-from NAME|none``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfp.dsl import PipelineTask
    from kfp.dsl.graph_component import GraphComponent

#: Keys of the chart's pipeline ConfigMap; each is set as the environment variable of the same name.
CONFIG_MAP_KEYS: tuple[str, ...] = (
    "MLFLOW_TRACKING_URI",
    "MODELCOMMONS_S3_ENDPOINT",
    "MODELCOMMONS_S3_SECURE",
    "MODELCOMMONS_S3_REGION",
    "MODELCOMMONS_S3_BUCKET",
)
#: Keys of the pipeline Secret (the chart's copy of the S3 keys, or ``pipelineEnv.existingSecret``).
SECRET_KEYS: tuple[str, ...] = ("MODELCOMMONS_S3_ACCESS_KEY", "MODELCOMMONS_S3_SECRET_KEY")
#: ``pipelineEnv.name`` in the chart's values.yaml: the ConfigMap's and the Secret's name by default.
DEFAULT_NAME = "modelcommons-pipeline-env"
#: ``--env-from`` value that compiles without any environment source (pods rely on cluster defaults).
NO_ENV = "none"

# ConfigMap and Secret names are DNS-1123 subdomains.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ClusterEnvError(ValueError):
    """A ConfigMap or Secret name that Kubernetes would refuse."""


@dataclass(frozen=True)
class ClusterEnv:
    """Names of the ConfigMap and Secret the task pods take their environment from.

    Both must exist in the namespace the pods run in (``kubeflow`` for standalone Kubeflow
    Pipelines, the profile namespace in multi-user Kubeflow).
    """

    config_map: str = DEFAULT_NAME
    secret: str = DEFAULT_NAME

    def __post_init__(self) -> None:
        for field, value in (("config_map", self.config_map), ("secret", self.secret)):
            if len(value) > 253 or not _NAME.match(value):
                raise ClusterEnvError(
                    f"cluster env {field}={value!r}: not a Kubernetes object name (lowercase letters, digits, "
                    "'-' and '.', starting and ending alphanumeric, at most 253 characters)")


DEFAULT_ENV = ClusterEnv()
_current: ContextVar[ClusterEnv | None] = ContextVar("modelcommons_cluster_env", default=DEFAULT_ENV)


def current() -> ClusterEnv | None:
    """The names :func:`with_cluster_env` applies now (``None``: it applies nothing)."""
    return _current.get()


@contextmanager
def using(env: ClusterEnv | None) -> Iterator[None]:
    """Within the block, pipelines built (``@dsl.pipeline``) take their environment from ``env``."""
    token = _current.set(env)
    try:
        yield
    finally:
        _current.reset(token)


def env_from(name: str | None = None, secret: str | None = None) -> ClusterEnv | None:
    """The env sources for CLI options ``--env-from NAME`` and ``--env-secret NAME``.

    ``name`` is the ConfigMap (default :data:`DEFAULT_NAME`), :data:`NO_ENV` for none; ``secret``
    defaults to ``name`` (the chart gives both one name unless ``pipelineEnv.existingSecret`` is set).
    Raises :class:`ClusterEnvError` for an invalid name, or a secret given with ``none``.
    """
    name = name or DEFAULT_NAME
    if name == NO_ENV:
        if secret:
            raise ClusterEnvError(f"--env-secret {secret!r} has no effect with --env-from {NO_ENV}")
        return None
    return ClusterEnv(config_map=name, secret=secret or name)


def with_cluster_env(task: PipelineTask) -> PipelineTask:
    """Add the ConfigMap and Secret of :func:`current` to ``task``'s Kubernetes executor config.

    Each key of :data:`CONFIG_MAP_KEYS` and :data:`SECRET_KEYS` is set as the same-named
    environment variable. Returns ``task`` (chainable); with ``current() is None`` it is unchanged.
    """
    env = current()
    if env is None:
        return task
    from kfp import kubernetes

    kubernetes.use_config_map_as_env(task, env.config_map, {key: key for key in CONFIG_MAP_KEYS})
    kubernetes.use_secret_as_env(task, env.secret, {key: key for key in SECRET_KEYS})
    return task


def for_cluster(pipeline: GraphComponent, env: ClusterEnv | None) -> GraphComponent:
    """``pipeline`` with its tasks' environment taken from ``env`` (``None``: no sources).

    A pipeline's graph is built once, at import, with :data:`DEFAULT_ENV`; other names need the
    pipeline function run again, which this does with the same name, description and config.
    """
    if env == DEFAULT_ENV:
        return pipeline
    from kfp import dsl

    spec = pipeline.pipeline_spec
    display_name = spec.pipeline_info.display_name or None
    with using(env):
        rebuilt: GraphComponent = dsl.pipeline(
            name=pipeline.name, description=pipeline.description, display_name=display_name,
            pipeline_root=spec.default_pipeline_root or None, pipeline_config=pipeline.pipeline_config,
        )(pipeline.pipeline_func)
    return rebuilt
