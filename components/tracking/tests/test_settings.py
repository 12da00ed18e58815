"""Settings: embedded defaults, environment overrides and S3 validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.settings import ConfigError, get_settings


def test_embedded_defaults_live_under_home(mc_home: Path) -> None:
    s = get_settings()
    assert s.home == mc_home
    assert s.effective_tracking_uri == f"sqlite:///{mc_home.resolve()}/mlflow.db"
    assert s.artifact_location == (mc_home / "mlartifacts").resolve().as_uri()
    assert s.pipeline_root == mc_home / "pipeline_root"
    assert not s.use_s3 and s.s3_environment() == {}


def test_mlflow_environment_wins(mc_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert get_settings().effective_tracking_uri == "http://mlflow.example:5000"


def test_s3_endpoint_switches_artifacts_to_s3(mc_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCOMMONS_S3_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("MODELCOMMONS_S3_ACCESS_KEY", "k")
    monkeypatch.setenv("MODELCOMMONS_S3_SECRET_KEY", "s")
    s = get_settings()
    assert s.s3_endpoint == "127.0.0.1:9000" and s.s3_url == "http://127.0.0.1:9000"
    assert s.artifact_location == "s3://modelcommons/mlflow"
    assert s.s3_environment()["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"


def test_s3_without_credentials_is_an_error_naming_them(mc_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCOMMONS_S3_ENDPOINT", "127.0.0.1:9000")
    with pytest.raises(ConfigError, match="MODELCOMMONS_S3_ACCESS_KEY"):
        get_settings()


def test_bad_value_names_the_setting(mc_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCOMMONS_SERVE_PORT", "70000")
    with pytest.raises(ConfigError, match="serve_port"):
        get_settings()
