"""A local HTTP stand-in of the Kubernetes API for one RayService, for tests (no cluster runs here).

It serves ``GET`` and ``PATCH`` (JSON merge patch, as the kubernetes client sends) of
``/apis/ray.io/v1/namespaces/{ns}/rayservices/{name}`` on 127.0.0.1, checks the bearer token, answers
409 on a stale ``metadata.resourceVersion``, bumps ``metadata.generation`` on a spec change, and plays
the KubeRay operator: ``polls_to_settle`` GETs after a patch it writes the status that ``after_patch``
names (``"running"``, ``"failed"`` = DEPLOY_FAILED, ``"never"`` = stays DEPLOYING)::

    with RayServiceStandIn(obj, after_patch="running") as api:
        api.write_kubeconfig(tmp_path / "kubeconfig")
        ...
        api.requests   # [("GET", path), ("PATCH", path), ...]
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

TOKEN = "modelcommons-test-token"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def running_status(app_name: str, generation: int, status: str = "RUNNING", message: str = "") -> dict[str, Any]:
    """A KubeRay v1 RayService status with ``app_name`` in state ``status`` on the active cluster."""
    return {"observedGeneration": generation, "serviceStatus": "Running" if status == "RUNNING" else "",
            "activeServiceStatus": {"rayClusterName": "modelcommons-raycluster-abcde", "applicationStatuses": {
                app_name: {"status": status, "message": message,
                           "serveDeploymentStatuses": {"Detector": {"status": "HEALTHY"}}}}},
            "pendingServiceStatus": {}}


class RayServiceStandIn:
    """Threaded HTTP server holding one RayService object (see the module docstring)."""

    def __init__(self, obj: dict[str, Any], *, app_name: str = "modelcommons", after_patch: str = "running",
                 polls_to_settle: int = 2) -> None:
        if after_patch not in {"running", "failed", "never"}:
            raise ValueError(f"after_patch={after_patch!r}: use running, failed or never")
        self.obj = copy.deepcopy(obj)
        self.obj.setdefault("metadata", {}).setdefault("generation", 1)
        self.obj["metadata"].setdefault("resourceVersion", "1000")
        self.obj.setdefault("status", running_status(app_name, self.obj["metadata"]["generation"]))
        self.app_name, self.after_patch, self.polls_to_settle = app_name, after_patch, polls_to_settle
        self.requests: list[tuple[str, str]] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []  # (content type, body)
        self._gets_since_patch: int | None = None
        self._lock = threading.Lock()
        ns, name = self.obj["metadata"]["namespace"], self.obj["metadata"]["name"]
        self.path = f"/apis/ray.io/v1/namespaces/{ns}/rayservices/{name}"
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def serve_config(self) -> dict[str, Any]:
        """The current ``spec.serveConfigV2``, parsed."""
        return dict(yaml.safe_load(self.obj["spec"]["serveConfigV2"]))

    def write_kubeconfig(self, path: Path, *, server: str | None = None) -> Path:
        """A kubeconfig whose current context points at this server (or at ``server``) with the test token."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
                  "clusters": [{"name": "standin", "cluster": {"server": server or self.url}}],
                  "users": [{"name": "standin", "user": {"token": TOKEN}}],
                  "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}]}
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> RayServiceStandIn:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- the operator's part ----
    def _settle(self) -> None:
        generation = self.obj["metadata"]["generation"]
        if self._gets_since_patch is None:
            return
        self._gets_since_patch += 1
        if self._gets_since_patch == 1:  # the operator saw the new spec; Ray is deploying it
            self.obj["status"] = running_status(self.app_name, generation, "DEPLOYING")
        if self._gets_since_patch < self.polls_to_settle:
            return
        if self.after_patch == "running":
            self.obj["status"] = running_status(self.app_name, generation)
        elif self.after_patch == "failed":
            self.obj["status"] = running_status(
                self.app_name, generation, "DEPLOY_FAILED",
                "The deployment failed to start: ModelNotFoundError: model 'models:/detector/9' not found")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "reason": reason, "code": code})

            def _guard(self) -> bool:
                with standin._lock:
                    standin.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._status(401, "Unauthorized", "Unauthorized")
                    return False
                if self.path.split("?")[0] != standin.path:
                    self._status(404, "NotFound", f"{self.path} not found")
                    return False
                return True

            def do_GET(self) -> None:
                if not self._guard():
                    return
                with standin._lock:
                    standin._settle()
                    body = copy.deepcopy(standin.obj)
                self._send(200, body)

            def do_PATCH(self) -> None:
                if not self._guard():
                    return
                content_type = self.headers.get("Content-Type", "")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                with standin._lock:
                    standin.patches.append((content_type, body))
                    if content_type != "application/merge-patch+json":
                        self._status(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
                        return
                    meta = body.get("metadata") or {}
                    current = standin.obj["metadata"]["resourceVersion"]
                    if meta.get("resourceVersion") not in (None, current):
                        self._status(409, "Conflict", "the object has been modified; please apply your changes "
                                                      "to the latest version and try again")
                        return
                    patched = merge_patch(standin.obj, {k: v for k, v in body.items() if k != "metadata"})
                    if patched.get("spec") != standin.obj.get("spec"):
                        patched["metadata"]["generation"] += 1
                        standin._gets_since_patch = 0
                    patched["metadata"]["resourceVersion"] = str(int(current) + 1)
                    standin.obj = patched
                    answer = copy.deepcopy(patched)
                self._send(200, answer)

        return Handler
