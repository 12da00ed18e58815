"""Registry rule, model resolution and the pickle-free pyfunc, on a real sqlite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from components.models.detector import build_detector, detector_config
from components.models.weights import save_detector
from components.tracking.model_logging import log_detector_model
from components.tracking.registry import register_model
from components.tracking.resolve import ModelNotFoundError, resolve_model
from components.tracking.setup import configure_mlflow


def _logged_model(tmp_path: Path, tag: str) -> tuple[str, str]:
    model_dir = save_detector(build_detector(detector_config("nano", num_classes=2, class_names=("a", "b"))),
                              tmp_path / tag)
    configure_mlflow()
    with mlflow.start_run() as run:
        uri = log_detector_model(model_dir)
    return run.info.run_id, uri


def test_champion_moves_only_on_improvement(mc_home: Path, tmp_path: Path) -> None:
    results = []
    for i, value in enumerate([0.5, 0.4, 0.6, 0.6]):
        run_id, uri = _logged_model(tmp_path, f"m{i}")
        results.append(register_model(uri, name="detector", run_id=run_id, metric="map", value=value,
                                      tags={"recipe": {"lr": 0.01}, "dataset_sha256": "ab" * 32}))
    assert [(r.version, r.alias) for r in results] == [
        ("1", "champion"), ("2", "challenger"), ("3", "champion"), ("4", "challenger")]  # a tie keeps the champion
    assert results[2].previous_champion == "1" and results[2].previous_value == 0.5
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("detector", "challenger").version) == "4"
    tags = client.get_model_version("detector", "3").tags
    assert json.loads(tags["recipe"]) == {"lr": 0.01}
    assert tags["metric.map"] == "0.6" and tags["dataset_sha256"] == "ab" * 32


def test_resolve_registered_alias_and_version_then_load(mc_home: Path, tmp_path: Path) -> None:
    from components.models.weights import load_detector

    run_id, uri = _logged_model(tmp_path, "m")
    register_model(uri, name="detector", run_id=run_id, metric="map", value=0.3, tags={"precision": "float"})
    by_alias = resolve_model("models:/detector@champion")
    assert (by_alias.name, by_alias.version, by_alias.alias, by_alias.run_id) == ("detector", "1", "champion", run_id)
    assert by_alias.precision == "float"
    assert load_detector(by_alias.local_dir).config.class_names == ("a", "b")
    assert resolve_model("models:/detector/1").local_dir == by_alias.local_dir  # cached download reused


@pytest.mark.parametrize("uri, match", [
    ("models:/detector@nobody", "not found in the registry"),
    ("models:/ghost/3", "not found in the registry"),
    ("/no/such/dir", "not a directory"),
])
def test_resolve_unknown_models_says_so(mc_home: Path, tmp_path: Path, uri: str, match: str) -> None:
    run_id, model_uri = _logged_model(tmp_path, "m")
    register_model(model_uri, name="detector", run_id=run_id, metric="map", value=0.3, tags={})
    with pytest.raises(ModelNotFoundError, match=match):
        resolve_model(uri)


def test_pyfunc_loads_without_pickle_and_honours_signature(mc_home: Path, tmp_path: Path) -> None:
    _, uri = _logged_model(tmp_path, "m")
    model_dir = Path(mlflow.artifacts.download_artifacts(uri))
    assert not list(model_dir.rglob("*.pkl")) and not list(model_dir.rglob("*.pt"))
    pyfunc = mlflow.pyfunc.load_model(uri)
    frame = pyfunc.predict(np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32))
    assert list(frame.columns) == ["image_index", "x1", "y1", "x2", "y2", "score", "class_id", "class_name"]


def test_register_rejects_bad_names(mc_home: Path) -> None:
    with pytest.raises(ValueError, match="name"):
        register_model("models:/x", name="a/b", run_id="r", metric="map", value=1.0, tags={})
