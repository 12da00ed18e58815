"""Fixtures shared by every test suite: an isolated MODELCOMMONS_HOME and a tiny trained dataset."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

TINY_IMAGE_SIZE = 96


@pytest.fixture
def mc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh MODELCOMMONS_HOME (sqlite MLflow store, local artifacts); MLflow env vars cleared."""
    import mlflow

    home = tmp_path / "mchome"
    monkeypatch.setenv("MODELCOMMONS_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL",
                "MODELCOMMONS_S3_ENDPOINT", "MODELCOMMONS_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    yield home
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def shapes_source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-image COCO shapes source folder at 96 px (generated once per session)."""
    from components.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("shapes-src") / "src", count=48,
                           image_size=TINY_IMAGE_SIZE, max_size=40, seed=3, progress=False)


@pytest.fixture(scope="session")
def tiny_dataset(shapes_source_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The canonical dataset artifact of ``shapes_source_dir`` (read-only: copy before changing)."""
    from components.data.intake import intake
    from components.settings import Settings

    out = tmp_path_factory.mktemp("tiny-dataset") / "ds"
    intake(shapes_source_dir, out, settings=Settings(home=out.parent / "home", s3_endpoint=None), progress=False)
    return out
