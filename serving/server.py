"""Start and stop the serving application on a local Ray (the embedded default of ``modelcommons serve``).

On Kubernetes the same application runs under a KubeRay RayService built from
``serving.app.serve_config``; this module is only for one machine.
"""

from __future__ import annotations

import logging
import os
import time

import httpx
import ray
from ray import serve

from serving.app import APP_NAME, ServeArgs, build_app

log = logging.getLogger(__name__)

_state = {"started_ray": False}


class ServeStartError(RuntimeError):
    """The application did not deploy or did not become healthy; the message says why."""


def _base_url(host: str, port: int, route_prefix: str) -> str:
    # A wildcard bind address is reachable on loopback.
    reachable = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
    return f"http://{reachable}:{port}{route_prefix.rstrip('/')}"


def _http_address(args: ServeArgs) -> tuple[str, int]:
    """Host and port the running Serve proxies listen on (an already running Serve keeps its own)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return args.host, args.port
        config = client.http_config
        return str(config.host), int(config.port)
    except Exception:  # private API: fall back to what was asked for
        return args.host, args.port


def _deployment_messages(app_name: str) -> str:
    """Why each deployment of ``app_name`` is unhealthy (Serve keeps the replica's exception text)."""
    try:
        app = serve.status().applications[app_name]
    except Exception:
        return ""
    return " ".join(f"[{name}: {d.message.strip()}]" for name, d in app.deployments.items() if d.message)


def wait_healthy(base_url: str, *, timeout_s: float = 60.0) -> None:
    """Poll ``GET {base_url}/healthz`` until it answers 200; raise :class:`ServeStartError` on timeout."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            try:
                r = client.get(f"{base_url}/healthz")
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise ServeStartError(f"{base_url}/healthz did not answer 200 within {timeout_s:.0f} s (last: {last})")


def run_server(args: ServeArgs, *, blocking: bool, app_name: str = APP_NAME, route_prefix: str = "/",
               num_cpus: int | None = None, timeout_s: float = 120.0) -> str:
    """Deploy the application on a local Ray Serve and return its base URL (``http://host:port[/prefix]``).

    Starts Ray (``num_cpus`` logical CPUs, default: all cores, at least 2) unless it is already
    initialised, and Serve's HTTP proxy on ``args.host:args.port`` unless Serve is already running.
    Deploying again under the same ``app_name`` updates it in place: a change of only the batching or
    threshold settings reaches the replicas through ``reconfigure`` without restarting them.
    With ``blocking=True`` it serves until Ctrl-C, then shuts down.
    """
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                 configure_logging=False)
        _state["started_ray"] = True
    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        serve.run(build_app(args), name=app_name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as exc:
        reasons = _deployment_messages(app_name)
        serve.delete(app_name)  # do not leave Serve retrying a replica that cannot start
        raise ServeStartError(
            f"application {app_name!r} failed to deploy with model {args.model_uri!r}: {exc} {reasons}"
        ) from exc
    host, port = _http_address(args)
    url = _base_url(host, port, route_prefix)
    wait_healthy(url, timeout_s=timeout_s)
    log.info("serving %s at %s", args.model_uri, url)
    if blocking:
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            log.info("Ctrl-C: shutting down")
        finally:
            shutdown_server()
    return url


def shutdown_server() -> None:
    """Stop Serve, and Ray too when :func:`run_server` started it."""
    if ray.is_initialized():
        serve.shutdown()
        if _state["started_ray"]:
            ray.shutdown()
            _state["started_ray"] = False
