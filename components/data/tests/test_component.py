from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp import local

from components.data.component import intake_component
from components.data.format import verify_dataset


def test_intake_component_runs_locally(
    shapes_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("MODELCOMMONS_S3_ENDPOINT", "MODELCOMMONS_S3_ACCESS_KEY", "MODELCOMMONS_S3_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELCOMMONS_HOME", str(tmp_path / "home"))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    task = intake_component(
        source=str(shapes_source),
        fmt="coco",
        val_fraction=0.25,
        seed=1,
        max_error_fraction=0.0,
        augment=False,
    )
    dataset = task.outputs["dataset"]
    manifest = verify_dataset(Path(dataset.path))
    assert manifest.counts.images == 12 and manifest.counts.val_images == 3
    assert dataset.metadata["sha256"] == manifest.sha256
    assert dataset.metadata["images"] == 12
    assert dataset.metadata["classes"] == ["circle", "rectangle", "triangle"]
    assert dataset.metadata["rejected"] == 0
    assert "s3_uri" not in dataset.metadata
    assert json.loads(Path(task.outputs["rejections"].path).read_text()) == []
