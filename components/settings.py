"""One typed settings object for every ModelCommons process.

Values come from the environment (prefix ``MODELCOMMONS_``), so the same code runs on a laptop with
embedded defaults (sqlite MLflow store, local artifacts under ``MODELCOMMONS_HOME``) and in a
cluster pod whose environment points at PostgreSQL-backed MLflow and MinIO/S3.

MLflow's own variables (``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI``, ``MLFLOW_S3_ENDPOINT_URL``)
win over the embedded defaults, because platform teams set those first.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the setting."""


class Settings(BaseSettings):
    """Runtime settings. Every field maps to ``MODELCOMMONS_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="MODELCOMMONS_", extra="ignore", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path.home() / ".modelcommons",
        description="Root of the embedded defaults: MLflow sqlite store, artifacts, pipeline root.",
    )

    # --- S3 / MinIO: set the endpoint plus credentials to move datasets and artifacts off local disk.
    s3_endpoint: str | None = Field(
        default=None, description="host:port of an S3-compatible server, e.g. minio.mc.svc:9000."
    )
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = Field(default=False, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str = "us-east-1"
    s3_bucket: str = Field(default="modelcommons", description="Bucket for datasets and artifacts.")

    # --- MLflow (overridden by MLFLOW_TRACKING_URI when that is set).
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI.")
    experiment: str = Field(default="modelcommons", description="MLflow experiment name.")

    # --- Serving.
    serve_host: str = "127.0.0.1"
    serve_port: int = Field(default=8000, ge=1, le=65535)
    detector_model_uri: str = Field(
        default="models:/detector@champion", description="Model the detector deployment loads."
    )
    segmenter_model_uri: str = Field(
        default="", description="Model the segmenter deployment loads, e.g. models:/segmenter@champion; "
                                "empty = no segmenter (detector-only serving).")
    embedding_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0,
                                       description="Bound of the segmenter's image-embedding cache, bytes.")
    serve_num_cpus: float = Field(default=0.5, ge=0.0, description="CPUs per model replica.")
    serve_num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per model replica.")
    serve_replicas: int = Field(default=1, ge=1)
    serve_max_batch_size: int = Field(default=16, ge=1, le=256)
    serve_batch_wait_timeout_s: float = Field(default=0.01, ge=0.0, le=1.0)
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=64 * 64)
    detector_int8_model_uri: str = Field(
        default="", description="Int8 model the detector serves beside its float model (precision=int8), for "
                                "setups without a registry; empty = the registry's int8 version, if any.")
    inspector_max_sessions: int = Field(default=4, ge=0, description="Open quantization inspector sessions "
                                                                     "at most; 0 = no inspector.")
    inspector_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1,
                                     description="Memory all inspector sessions may hold together, bytes.")
    inspector_ttl_s: float = Field(default=900.0, gt=0.0, description="Inspector session expiry after this "
                                                                      "many seconds unused.")

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_has_no_scheme(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if "://" in value:
            # The minio SDK wants host:port; accept a URL and derive both parts.
            scheme, _, rest = value.partition("://")
            if scheme not in {"http", "https"}:
                raise ConfigError(
                    f"MODELCOMMONS_S3_ENDPOINT={value!r}: scheme must be http or https, or give host:port"
                )
            return rest.rstrip("/")
        return value

    @model_validator(mode="after")
    def _s3_credentials_complete(self) -> Settings:
        if self.s3_endpoint and (self.s3_access_key is None or self.s3_secret_key is None):
            raise ConfigError(
                "MODELCOMMONS_S3_ENDPOINT is set but MODELCOMMONS_S3_ACCESS_KEY and "
                "MODELCOMMONS_S3_SECRET_KEY are not both set"
            )
        return self

    # ---- derived locations -------------------------------------------------------------------
    @property
    def use_s3(self) -> bool:
        return self.s3_endpoint is not None

    @property
    def s3_url(self) -> str:
        """Endpoint as a URL (for MLflow/boto3, which want a scheme)."""
        if not self.s3_endpoint:
            raise ConfigError("MODELCOMMONS_S3_ENDPOINT is not set")
        return f"{'https' if self.s3_secure else 'http'}://{self.s3_endpoint}"

    @property
    def data_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def pipeline_root(self) -> Path:
        return self.home / "pipeline_root"

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def effective_tracking_uri(self) -> str:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking_uri:
            return self.tracking_uri
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str:
        """Where new MLflow experiments keep artifacts: S3 when configured, else local disk."""
        if self.use_s3:
            return f"s3://{self.s3_bucket}/mlflow"
        return (self.home / "mlartifacts").resolve().as_uri()

    @cached_property
    def _ensure_dirs(self) -> bool:
        for path in (self.home, self.data_dir, self.pipeline_root, self.outputs_dir):
            path.mkdir(parents=True, exist_ok=True)
        return True

    def ensure_dirs(self) -> None:
        """Create the local directories of the embedded defaults."""
        _ = self._ensure_dirs

    def s3_environment(self) -> dict[str, str]:
        """Environment MLflow and boto3 need to use the configured S3 endpoint."""
        if not self.use_s3:
            return {}
        assert self.s3_access_key is not None and self.s3_secret_key is not None
        return {
            "MLFLOW_S3_ENDPOINT_URL": os.environ.get("MLFLOW_S3_ENDPOINT_URL", self.s3_url),
            "AWS_ACCESS_KEY_ID": self.s3_access_key.get_secret_value(),
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key.get_secret_value(),
            "AWS_DEFAULT_REGION": self.s3_region,
        }


def get_settings() -> Settings:
    """Read settings from the current environment (not cached: tests and components change it)."""
    try:
        return Settings()
    except ConfigError:
        raise
    except ValueError as exc:  # pydantic ValidationError names the field; keep it readable
        raise ConfigError(f"invalid ModelCommons settings: {exc}") from exc
