"""Fixtures for the data stage: small synthetic sources and the shared moto S3 server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from components.data.shapes import generate_shapes
from components.settings import Settings
from components.storage.tests.conftest import moto_s3  # noqa: F401  (re-exported fixture)


@pytest.fixture(scope="session")
def shapes_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-image COCO shapes source, generated once; copy it before changing anything."""
    return generate_shapes(
        tmp_path_factory.mktemp("shapes") / "src",
        count=12,
        image_size=96,
        max_size=40,
        seed=7,
        progress=False,
    )


@pytest.fixture
def coco_source(shapes_source: Path, tmp_path: Path) -> Path:
    """A private, writable copy of ``shapes_source``."""
    return Path(shutil.copytree(shapes_source, tmp_path / "coco"))


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    """Settings with S3 off, whatever the environment says."""
    return Settings(home=tmp_path / "home", s3_endpoint=None)
