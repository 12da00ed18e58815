"""The S3 path end to end (issue 2, item 3) against a real S3-compatible server on 127.0.0.1.

Setting ``MODELCOMMONS_S3_ENDPOINT`` plus credentials must move dataset and artifact storage to S3:
the ``detector-train`` pipeline (kfp.local subprocesses, which inherit this process's environment)
reads its source from an ``s3://`` prefix, uploads the canonical dataset to
``s3://<bucket>/datasets/<sha256>/``, and MLflow keeps run and model artifacts under
``s3://<bucket>/mlflow/`` rather than ``MODELCOMMONS_HOME/mlartifacts``. The registered champion then
resolves back through MLflow's S3 client, and a model prefix resolves through the minio SDK.

The server is moto's ``ThreadedMotoServer`` (the session ``moto_s3`` fixture); every assertion on
what is stored lists or reads objects with the minio SDK, independently of the product's helpers.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import torch
from minio import Minio
from mlflow.tracking import MlflowClient

from components.data.format import DatasetError, Manifest
from components.models.weights import CONFIG_FILE, WEIGHTS_FILE, load_detector
from components.settings import ConfigError, Settings, get_settings
from components.storage import StorageError, upload_directory
from components.storage.testing import MotoS3
from components.tracking.resolve import resolve_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCE_IMAGES = 48  # shapes_source_dir in the root conftest

# Variables that would point MLflow or boto3 somewhere else, or that configure_mlflow writes into
# os.environ: cleared here so the product must derive them from MODELCOMMONS_S3_* alone, and
# restored when the module ends (monkeypatch remembers what they were).
_FOREIGN_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL", "MODELCOMMONS_TRACKING_URI",
    "MODELCOMMONS_EXPERIMENT", "MODELCOMMONS_S3_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)


@dataclass(frozen=True)
class S3Env:
    """A fresh MODELCOMMONS_HOME with S3 switched on through the environment only."""

    home: Path
    bucket: str
    client: Minio  # independent minio client for assertions

    def keys(self, prefix: str) -> list[str]:
        """Every object key under ``prefix`` in the bucket, sorted."""
        return sorted(str(o.object_name) for o in self.client.list_objects(self.bucket, prefix=prefix,
                                                                             recursive=True))

    def read(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()


@dataclass(frozen=True)
class PipelineRun:
    env: S3Env
    settings: Settings
    outputs: dict[str, Any]

    def mlflow(self) -> MlflowClient:
        """A client on the run's store (explicit URI: never MLflow's default ./mlflow.db)."""
        return MlflowClient(tracking_uri=self.settings.effective_tracking_uri,
                            registry_uri=self.settings.effective_tracking_uri)


@pytest.fixture(scope="module")
def s3_env(moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Env]:
    import mlflow

    bucket = f"mc-s3-path-{uuid.uuid4().hex[:10]}"  # unique: the moto server is shared by the session
    home = tmp_path_factory.mktemp("s3-path") / "mchome"
    with pytest.MonkeyPatch.context() as mp:
        for var in _FOREIGN_ENV:
            mp.delenv(var, raising=False)
        mp.setenv("MODELCOMMONS_HOME", str(home))  # run_local also writes it: restored at the end
        for key, value in moto_s3.environ(bucket).items():
            mp.setenv(key, value)
        client = Minio(moto_s3.endpoint, access_key=moto_s3.access_key, secret_key=moto_s3.secret_key,
                       secure=False)
        client.make_bucket(bucket)
        try:
            yield S3Env(home=home, bucket=bucket, client=client)
        finally:
            if mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pipeline_run(s3_env: S3Env, shapes_source_dir: Path) -> PipelineRun:
    """Upload the shapes source to S3 and run ``detector-train`` on it (one epoch, 96 px)."""
    from pipelines.runner import run_local

    settings = get_settings()
    assert settings.use_s3 and settings.s3_bucket == s3_env.bucket and settings.home == s3_env.home
    written = upload_directory(s3_env.client, shapes_source_dir, f"s3://{s3_env.bucket}/raw/shapes")
    assert written == SOURCE_IMAGES + 1  # the images and annotations.json
    outputs = run_local("detector-train", {"source": f"s3://{s3_env.bucket}/raw/shapes", "epochs": 1,
                                           "img_size": 96, "batch_size": 16}, settings=settings)
    return PipelineRun(env=s3_env, settings=settings, outputs=outputs)


def _model_dirs(keys: list[str]) -> list[str]:
    """Prefixes (ending in ``/``) of the keys holding model.safetensors with config.json beside it."""
    present = set(keys)
    dirs = [key[: -len(WEIGHTS_FILE)] for key in keys if PurePosixPath(key).name == WEIGHTS_FILE]
    return [d for d in dirs if d + CONFIG_FILE in present]


def test_pipeline_trains_from_an_s3_source_and_registers_the_champion(pipeline_run: PipelineRun) -> None:
    outputs = pipeline_run.outputs
    assert outputs["version"] == "1"
    assert outputs["alias"] == "champion"  # the first version of "detector" has no champion to beat
    assert re.fullmatch(r"[0-9a-f]{32}", outputs["run_id"]), outputs
    assert 0.0 <= outputs["map"] <= outputs["map50"] <= 1.0


def test_canonical_dataset_is_uploaded_under_its_sha256(pipeline_run: PipelineRun) -> None:
    env = pipeline_run.env
    keys = env.keys("datasets/")
    digests = {key.split("/")[1] for key in keys}
    assert len(digests) == 1, keys
    (sha,) = digests
    prefix = f"datasets/{sha}/"
    manifest = Manifest.model_validate_json(env.read(prefix + "manifest.json"))
    assert manifest.sha256 == sha
    assert manifest.source == f"s3://{env.bucket}/raw/shapes" and manifest.name == "shapes"
    assert manifest.counts.images == SOURCE_IMAGES and manifest.counts.rejected == 0
    # Every file the manifest lists is stored, plus the manifest and the (empty) rejection report.
    assert [k[len(prefix):] for k in keys] == sorted([*manifest.files, "manifest.json", "rejections.json"])
    assert sum(k.startswith(prefix + "images/") for k in keys) == SOURCE_IMAGES
    coco = json.loads(env.read(prefix + "annotations.json"))
    assert len(coco["images"]) == SOURCE_IMAGES
    assert [c["name"] for c in coco["categories"]] == manifest.classes
    assert json.loads(env.read(prefix + "rejections.json")) == []
    # The registered version points at the same dataset identity.
    version = pipeline_run.mlflow().get_model_version("detector", "1")
    assert version.tags["dataset_sha256"] == sha


def test_mlflow_artifacts_live_in_s3_not_on_local_disk(pipeline_run: PipelineRun) -> None:
    env, run_id = pipeline_run.env, pipeline_run.outputs["run_id"]
    run = pipeline_run.mlflow().get_run(run_id)
    assert run.info.artifact_uri == f"s3://{env.bucket}/mlflow/{run_id}/artifacts"

    keys = env.keys("mlflow/")
    pictures = f"mlflow/{run_id}/artifacts/pictures/"
    assert {k[len(pictures):] for k in keys if k.startswith(pictures)} == {
        "sample_predictions.png", "training_curves.png"}
    assert env.read(pictures + "sample_predictions.png").startswith(PNG_MAGIC)

    model_dirs = _model_dirs(keys)
    assert len(model_dirs) == 1, keys  # the logged model's detector directory, exactly once
    config = json.loads(env.read(model_dirs[0] + CONFIG_FILE))
    assert config["kind"] == "detector" and config["config"]["img_size"] == 96
    assert any(PurePosixPath(k).name == "MLmodel" for k in keys)  # the pyfunc model itself

    local_artifacts = pipeline_run.settings.home / "mlartifacts"
    stray = sorted(p for p in local_artifacts.rglob("*") if p.is_file()) if local_artifacts.exists() else []
    assert stray == [], f"artifacts written to local disk although S3 is configured: {stray[:5]}"


def test_champion_and_s3_prefix_resolve_to_the_same_detector(pipeline_run: PipelineRun) -> None:
    env, run_id = pipeline_run.env, pipeline_run.outputs["run_id"]

    # models:/ goes through the registry and MLflow's own S3 client (boto3 against the moto server).
    champion = resolve_model("models:/detector@champion")
    assert (champion.name, champion.version, champion.alias, champion.run_id) == (
        "detector", "1", "champion", run_id)
    assert champion.local_dir.is_relative_to(env.home / "model_cache")
    from_registry = load_detector(champion.local_dir)

    # s3:// goes through the minio SDK.
    (model_dir,) = _model_dirs(env.keys("mlflow/"))
    by_prefix = resolve_model(f"s3://{env.bucket}/{model_dir.rstrip('/')}")
    assert by_prefix.local_dir.is_relative_to(env.home / "model_cache")
    from_s3 = load_detector(by_prefix.local_dir)

    assert (by_prefix.local_dir / WEIGHTS_FILE).read_bytes() == env.read(model_dir + WEIGHTS_FILE)
    assert (champion.local_dir / WEIGHTS_FILE).read_bytes() == env.read(model_dir + WEIGHTS_FILE)
    a, b = from_registry.state_dict(), from_s3.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    manifest_key = next(k for k in env.keys("datasets/") if k.endswith("/manifest.json"))
    classes = Manifest.model_validate_json(env.read(manifest_key)).classes
    assert list(from_registry.config.class_names) == classes
    # The loaded model runs: one detection list per image, boxes xyxy inside the 96 px input.
    from_registry.eval()
    (dets,) = from_registry.predict(torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0)))
    assert dets.boxes.shape[1:] == (4,) and dets.boxes.shape[0] == dets.scores.shape[0]
    if dets.boxes.numel():
        assert float(dets.boxes.min()) >= 0.0 and float(dets.boxes.max()) <= 96.0


def test_bad_s3_locations_give_errors_naming_the_uri(
    s3_env: S3Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.data.intake import intake

    missing_prefix = f"s3://{s3_env.bucket}/does-not-exist"
    with pytest.raises(DatasetError, match=re.escape(missing_prefix) + r".*no objects under this prefix"):
        intake(missing_prefix, tmp_path / "a", progress=False)

    missing_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/raw"
    with pytest.raises(DatasetError, match=re.escape(missing_bucket) + r".*does not exist"):
        intake(missing_bucket, tmp_path / "b", progress=False)

    missing_model = f"s3://{s3_env.bucket}/models/nothing-here"
    with pytest.raises(StorageError, match=re.escape(missing_model) + r".*no objects under this prefix"):
        resolve_model(missing_model)

    # An endpoint without complete credentials is a configuration error naming the variables.
    monkeypatch.delenv("MODELCOMMONS_S3_SECRET_KEY")
    with pytest.raises(ConfigError, match="MODELCOMMONS_S3_SECRET_KEY"):
        intake(f"s3://{s3_env.bucket}/raw/shapes", tmp_path / "c", progress=False)


def test_s3_prefix_without_a_model_names_the_uri(pipeline_run: PipelineRun) -> None:
    """A prefix that holds data but no model is refused with the URI the user gave, and not cached."""
    from components.tracking.resolve import ModelNotFoundError

    uri = f"s3://{pipeline_run.env.bucket}/raw/shapes"
    for _ in range(2):  # the second call must not be answered from a half-useful cache either
        with pytest.raises(ModelNotFoundError, match=re.escape(uri)):
            resolve_model(uri)


def test_source_uploaded_through_the_minio_sdk_is_readable(pipeline_run: PipelineRun,
                                                           shapes_source_dir: Path) -> None:
    env = pipeline_run.env
    keys = env.keys("raw/shapes/")
    local = sorted(p.relative_to(shapes_source_dir).as_posix() for p in shapes_source_dir.rglob("*")
                   if p.is_file())
    assert [k[len("raw/shapes/"):] for k in keys] == local
    first = next(p for p in local if p != "annotations.json")
    assert env.read("raw/shapes/" + first) == (shapes_source_dir / first).read_bytes()
    assert json.loads(env.read("raw/shapes/annotations.json")) == json.loads(
        (shapes_source_dir / "annotations.json").read_text())
