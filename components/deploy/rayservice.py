"""Point a KubeRay ``RayService`` at another registered model: check, patch ``serveConfigV2``, wait, report.

:func:`deploy_model` is what ``modelcommons deploy`` and the KFP ``deploy`` component run:

1. Look the model up in the MLflow registry (``NAME@ALIAS``, ``NAME/VERSION`` or ``models:/...``). An
   unknown model, alias or version stops here, before the Kubernetes API is contacted.
2. GET the RayService (group ``ray.io``, version ``v1``) and parse its ``spec.serveConfigV2``.
3. Replace ``args.model_uri`` of one Serve application (default ``modelcommons``) and nothing else, so
   the replicas, GPUs and bind address that the chart or ``k8s/generate.py`` wrote (both through
   ``serving.app.serve_config``) stay as they are. The result is checked with Ray's own schema
   (``ray.serve.schema.ServeDeploySchema``) before anything is written.
4. JSON merge-PATCH ``spec.serveConfigV2``, carrying ``metadata.resourceVersion``: a RayService that
   someone changed since step 2 gives 409 and is left alone.
5. Poll the status until the operator has observed the new generation and the application is
   ``RUNNING``. ``DEPLOY_FAILED`` fails at once; otherwise the wait ends at ``timeout_s``.

By default an alias is pinned to the version it names now (``detector@champion`` is deployed as
``models:/detector/3``). The detector reloads only when ``model_uri`` changes, so deploying the alias
URI itself would never pick up a moved champion; a pinned version also records what is served.

Status fields read (KubeRay v1 API): ``status.observedGeneration``, ``status.serviceStatus``
(``Running``; deprecated in newer KubeRay and then empty), ``status.conditions`` (``UpgradeInProgress``),
``status.{active,pending}ServiceStatus.applicationStatuses[APP].{status,message}``. Ray reports an
application as ``DEPLOYING`` once it receives a new config; a status read in the instant between the
operator observing the new generation and Ray switching to ``DEPLOYING`` may still show the old
``RUNNING``, which is an accepted limitation of polling the CR.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from components.settings import Settings, get_settings
from components.tracking.resolve import ModelNotFoundError

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayservices"
# Equal to serving.app.APP_NAME (components may not import serving; a test checks the two agree).
DEFAULT_APP_NAME = "modelcommons"
DEFAULT_NAMESPACE = "modelcommons"
DEFAULT_RAYSERVICE = "modelcommons"
# (connect, read) seconds for every API call: an unreachable server fails in seconds, not minutes.
_REQUEST_TIMEOUT = (5.0, 30.0)

_REF_RE = re.compile(r"^(?:models:/)?(?P<name>[^/@\s]+)(?:@(?P<alias>[^/@\s]+)|/(?P<version>\d+))$")


class DeployConfigError(ValueError):
    """The request cannot be carried out as given: bad model reference, no such RayService or
    application, a serveConfigV2 that is not a Serve config, or no Kubernetes credentials."""


class DeployError(RuntimeError):
    """The rollout did not complete: API server unreachable or refusing, DEPLOY_FAILED, or timeout."""


@dataclass(frozen=True)
class RegistryModel:
    """A model version found in the MLflow registry."""

    name: str
    version: str
    alias: str | None
    run_id: str | None

    @property
    def version_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RolloutState:
    """What a RayService status says about one Serve application."""

    phase: str  # "running" | "pending" | "failed"
    detail: str


@dataclass(frozen=True)
class DeployResult:
    """Outcome of :func:`deploy_model` (``to_dict`` for JSON reports)."""

    namespace: str
    rayservice: str
    app_name: str
    model_uri: str  # what serveConfigV2 now holds
    previous_model_uri: str | None
    model_name: str
    model_version: str
    model_alias: str | None
    changed: bool  # False when the RayService already held this model_uri (nothing was patched)
    generation: int | None
    state: str
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- model registry ------------------------------------------------------------------------------


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``"detector@champion"`` -> ``("detector", "champion", None)``; ``"models:/detector/3"`` ->
    ``("detector", None, "3")``. Raises :class:`DeployConfigError` for anything else."""
    match = _REF_RE.match(ref.strip())
    if not match:
        raise DeployConfigError(
            f"model {ref!r}: expected a registered model as NAME@ALIAS, NAME/VERSION, models:/NAME@ALIAS "
            "or models:/NAME/VERSION (e.g. detector@champion)")
    return match["name"], match["alias"], match["version"]


def lookup_registry_model(ref: str, *, settings: Settings | None = None) -> RegistryModel:
    """Find ``ref`` in the MLflow registry of ``settings`` (tracking URI; ``MLFLOW_REGISTRY_URI`` wins).

    Raises :class:`~components.tracking.resolve.ModelNotFoundError` naming the model and what exists.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_model_ref(ref)
    settings = settings or get_settings()
    client = MlflowClient(tracking_uri=settings.effective_tracking_uri)
    try:
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, str(version)))
    except MlflowException as exc:
        raise ModelNotFoundError(
            f"model {ref!r} is not in the registry at {settings.effective_tracking_uri}: {exc.message}; "
            "nothing was deployed") from exc
    return RegistryModel(name=name, version=str(mv.version), alias=alias, run_id=mv.run_id)


# ---- serve config --------------------------------------------------------------------------------


def parse_serve_config(text: str, *, where: str) -> dict[str, Any]:
    """Parse a serveConfigV2 string (YAML or JSON) into a mapping; ``where`` names it in errors."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeployConfigError(f"{where}: serveConfigV2 is not YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise DeployConfigError(f"{where}: serveConfigV2 is {type(config).__name__}, expected a mapping")
    return config


def _find_app(config: dict[str, Any], app_name: str, where: str) -> dict[str, Any]:
    apps = config.get("applications")
    if not isinstance(apps, list):
        raise DeployConfigError(f"{where}: serveConfigV2 has no 'applications' list")
    for app in apps:
        if isinstance(app, dict) and app.get("name") == app_name:
            if not isinstance(app.get("args"), dict) or "model_uri" not in app["args"]:
                raise DeployConfigError(f"{where}: application {app_name!r} has no args.model_uri; "
                                        "is it a ModelCommons application (serving.app:app_builder)?")
            return app
    names = [a.get("name") for a in apps if isinstance(a, dict)]
    raise DeployConfigError(f"{where}: serveConfigV2 has no application {app_name!r}; it has {names}")


def with_model_uri(config: dict[str, Any], *, app_name: str, model_uri: str,
                   where: str = "serveConfigV2") -> dict[str, Any]:
    """A copy of ``config`` whose application ``app_name`` loads ``model_uri``; all else unchanged."""
    new = copy.deepcopy(config)
    _find_app(new, app_name, where)["args"]["model_uri"] = model_uri
    return new


def validate_serve_config(config: dict[str, Any], *, where: str = "serveConfigV2") -> None:
    """Check ``config`` against Ray's own multi-application schema (``ServeDeploySchema``)."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise DeployConfigError(f"{where}: not a valid Ray Serve config: {exc}") from exc


# ---- RayService status ---------------------------------------------------------------------------


def rollout_state(obj: dict[str, Any], *, app_name: str, generation: int | None) -> RolloutState:
    """Read a RayService object's status for application ``app_name`` after ``generation`` was written."""
    status = obj.get("status") or {}
    observed = status.get("observedGeneration")
    if generation is not None and isinstance(observed, int) and observed < generation:
        return RolloutState("pending", f"operator has not observed generation {generation} yet (at {observed})")
    active = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    pending_svc = status.get("pendingServiceStatus") or {}
    pending = pending_svc.get("applicationStatuses") or {}
    for where, apps in (("pending cluster", pending), ("active cluster", active)):
        app = apps.get(app_name) or {}
        if app.get("status") == "DEPLOY_FAILED":
            return RolloutState("failed", f"application {app_name!r} is DEPLOY_FAILED on the {where}: "
                                          f"{app.get('message') or '(no message)'}")
    if pending or pending_svc.get("rayClusterName"):
        return RolloutState("pending", "a new RayCluster is being prepared (zero-downtime upgrade)")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "UpgradeInProgress" and cond.get("status") == "True":
            return RolloutState("pending", f"upgrade in progress: {cond.get('message') or cond.get('reason')}")
    app = active.get(app_name)
    if not app:
        return RolloutState("pending", f"application {app_name!r} not reported yet (reported: {sorted(active)})")
    if app.get("status") != "RUNNING":
        message = f": {app['message']}" if app.get("message") else ""
        return RolloutState("pending", f"application {app_name!r} is {app.get('status')}{message}")
    service_status = status.get("serviceStatus")
    if service_status not in (None, "", "Running"):
        return RolloutState("pending", f"serviceStatus is {service_status}")
    return RolloutState("running", f"application {app_name!r} is RUNNING")


# ---- Kubernetes API --------------------------------------------------------------------------------


@contextmanager
def kube_api_client(kubeconfig: str | os.PathLike[str] | None = None,
                    context: str | None = None) -> Iterator[Any]:
    """A ``kubernetes.client.ApiClient``: ``kubeconfig`` if given; in a pod, its service account;
    else ``$KUBECONFIG`` or ``~/.kube/config``."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    source = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG")
    try:
        if source is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        else:
            source = source or str(Path("~/.kube/config").expanduser())
            api_client = config.new_client_from_config(config_file=source, context=context)
    except (ConfigException, OSError) as exc:
        raise DeployConfigError(
            f"no usable Kubernetes credentials (kubeconfig {source or 'in-cluster'}): {exc}") from exc
    try:
        yield api_client
    finally:
        api_client.close()


class _RayServices:
    """GET/PATCH one RayService, turning transport and API errors into actionable messages."""

    def __init__(self, api_client: Any, namespace: str, name: str) -> None:
        from kubernetes import client

        self._api = client.CustomObjectsApi(api_client)
        self.host = str(api_client.configuration.host)
        self.namespace, self.name = namespace, name
        self.where = f"RayService {namespace}/{name}"

    def _call(self, action: str, fn: Callable[[], Any]) -> dict[str, Any]:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            result = fn()
        except ApiException as exc:
            if exc.status == 404:
                raise DeployConfigError(
                    f"{self.where} not found on {self.host}; create it first (k8s/examples/ or the Helm chart)"
                ) from exc
            if exc.status in (401, 403):
                raise DeployError(
                    f"{action} {self.where}: {exc.status} {exc.reason}; the identity in use needs get/patch on "
                    f"rayservices.ray.io in namespace {self.namespace} (k8s/base/rbac.yaml)") from exc
            if exc.status == 409:
                raise DeployError(f"{action} {self.where}: changed by someone else meanwhile (409 Conflict); "
                                  "nothing was written, run the deploy again") from exc
            raise DeployError(f"{action} {self.where}: API server answered {exc.status} {exc.reason}: "
                              f"{(exc.body or '')[:500]}") from exc
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise DeployError(f"cannot reach the Kubernetes API server at {self.host} ({action} {self.where}): "
                              f"{reason}") from exc
        return dict(result)

    def get(self) -> dict[str, Any]:
        return self._call("get", lambda: self._api.get_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, self.name, _request_timeout=_REQUEST_TIMEOUT))

    def patch(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("patch", lambda: self._api.patch_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, self.namespace, RAY_PLURAL, self.name, body,
            field_manager="modelcommons-deploy", _request_timeout=_REQUEST_TIMEOUT))


# ---- the rollout ---------------------------------------------------------------------------------


def deploy_model(model: str, *, namespace: str = DEFAULT_NAMESPACE, name: str = DEFAULT_RAYSERVICE,
                 app_name: str = DEFAULT_APP_NAME, timeout_s: float = 600.0, poll_interval_s: float = 5.0,
                 pin_version: bool = True, kubeconfig: str | os.PathLike[str] | None = None,
                 context: str | None = None, settings: Settings | None = None,
                 check_config: Callable[[dict[str, Any]], None] | None = None,
                 progress: Callable[[str], None] | None = None) -> DeployResult:
    """Serve registered ``model`` (``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...``) from RayService
    ``namespace/name``, application ``app_name``; wait until it runs (see the module docstring).

    ``check_config`` gets the new serve config before it is written and may raise ``ValueError``
    (the CLI checks the application's args against ``serving.app.ServeArgs``). ``progress`` receives
    a line whenever the observed state changes.

    Raises :class:`ModelNotFoundError` (unknown model/alias/version; the cluster is not contacted),
    :class:`DeployConfigError` (bad reference, RayService or application not found, invalid config;
    nothing written) or :class:`DeployError` (unreachable or refusing API server: nothing written;
    DEPLOY_FAILED or timeout after the patch: the message names the model to roll back to).
    """
    if timeout_s <= 0 or poll_interval_s <= 0:
        raise DeployConfigError(f"timeout_s={timeout_s} and poll_interval_s={poll_interval_s} must be > 0")
    started = time.monotonic()
    say = progress or (lambda _line: None)
    registered = lookup_registry_model(model, settings=settings)
    _, alias, _ = parse_model_ref(model)
    target_uri = registered.version_uri if pin_version or alias is None else f"models:/{registered.name}@{alias}"
    say(f"{model}: registry version {registered.version} -> {target_uri}")

    with kube_api_client(kubeconfig, context) as api_client:
        services = _RayServices(api_client, namespace, name)
        obj = services.get()
        metadata = obj.get("metadata") or {}
        text = (obj.get("spec") or {}).get("serveConfigV2")
        if not isinstance(text, str) or not text.strip():
            raise DeployConfigError(f"{services.where} has no spec.serveConfigV2 to update")
        current = parse_serve_config(text, where=services.where)
        previous_uri = str(_find_app(current, app_name, services.where)["args"]["model_uri"])
        new = with_model_uri(current, app_name=app_name, model_uri=target_uri, where=services.where)
        validate_serve_config(new, where=services.where)
        if check_config is not None:
            check_config(new)
        generation = metadata.get("generation")
        changed = new != current
        if changed:
            body: dict[str, Any] = {"spec": {"serveConfigV2": yaml.safe_dump(new, sort_keys=False)}}
            if metadata.get("resourceVersion"):
                body["metadata"] = {"resourceVersion": metadata["resourceVersion"]}
            patched = services.patch(body)
            generation = (patched.get("metadata") or {}).get("generation", generation)
            say(f"patched {services.where} (generation {generation}): {previous_uri} -> {target_uri}")
        else:
            say(f"{services.where} already serves {target_uri}; checking that it runs")
        state = _wait_running(services, app_name=app_name, generation=generation, started=started,
                              timeout_s=timeout_s, poll_interval_s=poll_interval_s, say=say,
                              target_uri=target_uri, previous_uri=previous_uri)
    return DeployResult(namespace=namespace, rayservice=name, app_name=app_name, model_uri=target_uri,
                        previous_model_uri=previous_uri, model_name=registered.name,
                        model_version=registered.version, model_alias=alias, changed=changed,
                        generation=generation, state=state.detail,
                        elapsed_s=round(time.monotonic() - started, 3))


def _wait_running(services: _RayServices, *, app_name: str, generation: int | None, started: float,
                  timeout_s: float, poll_interval_s: float, say: Callable[[str], None], target_uri: str,
                  previous_uri: str) -> RolloutState:
    deadline = started + timeout_s
    rollback = f"to go back, run: modelcommons deploy --model {previous_uri} --namespace {services.namespace} " \
               f"--name {services.name}"
    last: RolloutState | None = None
    while True:
        state = rollout_state(services.get(), app_name=app_name, generation=generation)
        if state != last:
            say(f"{state.phase}: {state.detail}")
            last = state
        if state.phase == "running":
            return state
        if state.phase == "failed":
            raise DeployError(f"{services.where}: {target_uri} did not deploy: {state.detail}; {rollback}")
        now = time.monotonic()
        if now >= deadline:
            raise DeployError(f"{services.where}: {target_uri} not running after {timeout_s:g} s; last state: "
                              f"{state.detail}. serveConfigV2 holds the new model; {rollback}")
        time.sleep(min(poll_interval_s, deadline - now))
