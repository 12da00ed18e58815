"""Turn a model URI into a local directory holding ``config.json`` + ``model.safetensors``.

Accepted URIs: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/PATH``,
``s3://BUCKET/PREFIX`` (through the minio SDK) and a local directory (or ``file://`` URI).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.models.files import find_dir
from components.models.weights import CONFIG_FILE, WEIGHTS_FILE
from components.settings import Settings, get_settings

_MODELS_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ModelNotFoundError(LookupError):
    """The URI names no model (unknown registered name, alias, version, run or path)."""


@dataclass(frozen=True)
class ResolvedModel:
    uri: str
    local_dir: Path
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    precision: str = "float"
    float_version: str | None = None  # an int8 version's float_version tag: the version it was quantized from

    @property
    def display_name(self) -> str:
        """The registered name; for a plain directory (no registry name) its folder name."""
        return self.name or self.local_dir.name


def is_model_dir(path: Path) -> bool:
    """True when ``path`` holds ``config.json`` and ``model.safetensors``."""
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def find_model_dir(root: Path) -> Path:
    """The directory under ``root`` holding ``config.json`` and ``model.safetensors``."""
    if (found := find_dir(root, CONFIG_FILE, is_model_dir)) is not None:
        return found
    raise ModelNotFoundError(f"{root}: no {CONFIG_FILE} with {WEIGHTS_FILE} beside it")


def _has_model(root: Path) -> bool:
    try:
        find_model_dir(root)
    except ModelNotFoundError:
        return False
    return True


def _download(artifact_uri: str, cache: Path) -> Path:
    import mlflow

    if cache.is_dir():
        try:
            return find_model_dir(cache)
        except ModelNotFoundError:
            shutil.rmtree(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".dl-"))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp))
        find_model_dir(tmp)
        tmp.replace(cache)  # atomic: concurrent replicas never see half a download
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        if not cache.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return find_model_dir(cache)


def resolve_model(uri: str, *, settings: Settings | None = None) -> ResolvedModel:
    """Download (with a cache under ``MODELCOMMONS_HOME/model_cache``) and locate a model."""
    settings = settings or get_settings()
    cache_root = settings.home / "model_cache"
    match = _MODELS_RE.match(uri)
    if match:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from components.tracking.setup import configure_mlflow

        configure_mlflow(settings)
        client = MlflowClient()
        name, alias = match["name"], match["alias"]
        try:
            mv = (client.get_model_version_by_alias(name, alias) if alias
                  else client.get_model_version(name, match["version"]))
        except MlflowException as exc:
            raise ModelNotFoundError(f"model {uri!r} not found in the registry: {exc.message}") from exc
        local = _download(f"models:/{name}/{mv.version}", cache_root / name / str(mv.version))
        aliases = list(getattr(mv, "aliases", None) or [])
        return ResolvedModel(uri=uri, local_dir=local, name=name, version=str(mv.version),
                             alias=alias or (aliases[0] if aliases else None),
                             run_id=mv.run_id, precision=mv.tags.get("precision", "float"),
                             float_version=mv.tags.get("float_version"))
    if uri.startswith("runs:/"):
        from mlflow.exceptions import MlflowException

        from components.tracking.setup import configure_mlflow

        configure_mlflow(settings)
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", uri[len("runs:/"):])
        try:
            local = _download(uri, cache_root / "runs" / safe)
        except MlflowException as exc:
            raise ModelNotFoundError(f"model {uri!r} not found: {exc.message}") from exc
        return ResolvedModel(uri=uri, local_dir=local, run_id=run_id)
    if uri.startswith("s3://"):
        from components.storage.s3 import download_prefix, minio_client

        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", uri[len("s3://"):])
        dest = cache_root / "s3" / safe
        try:
            return ResolvedModel(uri=uri, local_dir=find_model_dir(dest))
        except ModelNotFoundError:
            shutil.rmtree(dest, ignore_errors=True)  # absent, or a stale/partial download
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl-"))
        try:
            download_prefix(minio_client(settings), uri, tmp)
            find_model_dir(tmp)
        except ModelNotFoundError:
            raise ModelNotFoundError(
                f"model {uri!r}: no {CONFIG_FILE} with {WEIGHTS_FILE} under this prefix") from None
        finally:
            if not any(tmp.iterdir()) or not _has_model(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        tmp.replace(dest)
        return ResolvedModel(uri=uri, local_dir=find_model_dir(dest))
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"model {uri!r}: not a directory, and not a models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/ or s3:// URI"
        )
    return ResolvedModel(uri=uri, local_dir=find_model_dir(path))
