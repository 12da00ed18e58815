"""Quantize stage on a quickly trained detector with a real sqlite MLflow store: files, run, registry, errors.

Measured here (nano, 15 epochs on the 96 px tiny dataset, 16 percentile calibration images, 10 validation
images): mAP@.5 float 0.143, hybrid 0.143, int8 engine 0.141, deployable int8 0.172 (one detection moves
mAP@.5 by about 0.02 on 10 images, hence the 0.05 tolerance).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from components.data.format import DatasetError, read_manifest
from components.models.weights import ModelFileError
from components.quantize.deploy import QUANT_FILE, load_int8_model, read_int8_spec
from components.quantize.errors import CalibrationError, QuantizeError
from components.quantize.inspector import ModelReport
from components.quantize.stage import run_quantize
from components.quantize.visualize import ModelGraph
from components.tracking.model_logging import log_detector_model
from components.tracking.registry import register_model
from components.tracking.resolve import ModelNotFoundError
from components.tracking.setup import configure_mlflow
from components.tracking.stage import run_registration

PRECISIONS = ("float", "hybrid", "int8", "deploy")


def _register_float(model_dir: Path, dataset: Path, map_value: float) -> tuple[str, str]:
    """Log ``model_dir`` in a run with train params and register it as a float version: (run_id, version)."""
    configure_mlflow()
    with mlflow.start_run(run_name="float") as run:
        mlflow.log_params({"preset": "nano", "epochs": 15})
        uri = log_detector_model(model_dir)
    reg = run_registration(model_uri=uri, run_id=run.info.run_id, dataset_dir=dataset,
                           metrics={"map": map_value, "map50": 2 * map_value})
    return run.info.run_id, reg.version


def test_quantize_logs_run_registers_int8_version_and_leaves_champion_alone(
        trained_model_dir: Path, tiny_dataset: Path, mc_home: Path, tmp_path: Path) -> None:
    float_run, float_version = _register_float(trained_model_dir, tiny_dataset, 0.06)
    assert float_version == "1"

    result = run_quantize(trained_model_dir, tiny_dataset, tmp_path / "out", calibrator="percentile",
                          calib_images=16, register=True, float_version="1", progress=False)

    m = result.metrics
    assert {f"{p}_{k}" for p in PRECISIONS for k in ("map", "map50", "map75")} <= set(m)
    assert m["float_map50"] > 0.1  # the model learned something, so the comparison means something
    for p in ("hybrid", "int8", "deploy"):
        assert abs(m[f"{p}_map50"] - m["float_map50"]) <= 0.05, m
    assert m["map50_drop"] == pytest.approx(100 * (m["float_map50"] - m["deploy_map50"]))
    assert m["report_output_sqnr_db"] > 24.0
    assert result.calibration.method == "percentile" and result.calibration.images == 16

    # files: the int8 model dir loads on real int8 kernels; reports parse back into their models
    assert (result.model_dir / QUANT_FILE).is_file() and read_int8_spec(result.model_dir).calibrator == "percentile"
    assert load_int8_model(result.model_dir).class_names == ("circle", "rectangle", "triangle")
    for key in ("calibration", "metrics", "report_json", "report_png", "graph_json", "graph_png", "summary"):
        assert result.files[key].stat().st_size > 0, key
    report = ModelReport.model_validate_json(result.files["report_json"].read_text())
    graph = ModelGraph.model_validate_json(result.files["graph_json"].read_text())
    assert len(report.layers) == len(graph.nodes) - 1 > 20 and report.calibrator == "percentile"
    assert {n.precision for n in graph.nodes[1:]} == {"int8"}
    assert json.loads(result.files["metrics"].read_text()) == pytest.approx(m)
    assert result.files["report_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| int8 (deployable, x86 kernels) |" in result.files["summary"].read_text()

    # the MLflow run: nested under the float run, params, metrics, artifacts
    client = MlflowClient()
    assert result.run_id is not None
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == float_run
    assert run.data.tags["precision"] == "int8" and run.data.tags["float_version"] == "1"
    assert run.data.params["calibrator"] == "percentile" and run.data.params["calib_images"] == "16"
    assert run.data.params["per_channel"] == "True" and run.data.params["percentile"] == "99.99"
    assert run.data.metrics["deploy_map50"] == pytest.approx(m["deploy_map50"])
    assert run.data.metrics["float_map50"] == pytest.approx(m["float_map50"])
    sizes = {a.path: a.file_size or 0 for a in client.list_artifacts(result.run_id)}
    for name in ("report.json", "report.png", "graph.json", "graph.png", "calibration.json", "metrics.json"):
        assert sizes.get(name, 0) > 0, (name, sizes)

    # the registry: a new version of the same name, tagged, without an alias
    assert result.registration is not None
    assert (result.registration.name, result.registration.version, result.registration.alias) == ("detector", "2", "")
    version = client.get_model_version("detector", "2")
    tags = version.tags
    assert (tags["precision"], tags["calibrator"], tags["float_version"], tags["backend"]) == (
        "int8", "percentile", "1", "x86")
    assert tags["dataset_sha256"] == read_manifest(tiny_dataset).sha256 and tags["float_run_id"] == float_run
    assert float(tags["metric.map"]) == pytest.approx(m["deploy_map"])
    assert float(tags["metric.map50"]) == pytest.approx(m["deploy_map50"])
    assert float(tags["metric.float_map50"]) == pytest.approx(m["float_map50"])
    recipe = json.loads(tags["recipe"])
    assert recipe["quantize"]["calibrator"] == "percentile" and recipe["train"]["epochs"] == "15"
    assert recipe["dataset"]["sha256"] == tags["dataset_sha256"]
    assert version.run_id == result.run_id and not list(version.aliases)
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "1"

    # the int8 version loads through MLflow (models from code, no pickle) and detects
    pyfunc = mlflow.pyfunc.load_model("models:/detector/2")
    from components.data.loader import load_samples

    _, val = load_samples(tiny_dataset, "val", 96)
    frame = pyfunc.predict({"images": val[0].image[None].numpy()})
    assert list(frame.columns)[:6] == ["image_index", "x1", "y1", "x2", "y2", "score"] and len(frame) > 0

    # the float contest ignores int8: the next float version is ranked against version 1 only
    _, next_version = _register_float(trained_model_dir, tiny_dataset, 0.05)
    assert next_version == "3"
    assert client.get_model_version("detector", "3").tags["alias_at_registration"] == "challenger"


def test_champion_alias_on_an_int8_version_is_ignored_by_the_float_contest(
        trained_model_dir: Path, tiny_dataset: Path, mc_home: Path) -> None:
    # Someone points champion at an int8 version by hand: the next float version must not be compared with it.
    configure_mlflow()
    with mlflow.start_run() as run:
        uri = log_detector_model(trained_model_dir)
    int8 = register_model(uri, name="detector", run_id=run.info.run_id, metric="map", value=0.9,
                          tags={"precision": "int8"})
    assert int8.alias == ""
    MlflowClient().set_registered_model_alias("detector", "champion", int8.version)
    with mlflow.start_run() as run:
        uri = log_detector_model(trained_model_dir)
    float_reg = register_model(uri, name="detector", run_id=run.info.run_id, metric="map", value=0.1,
                               tags={"precision": "float"})
    assert (float_reg.version, float_reg.alias, float_reg.previous_champion) == ("2", "champion", None)


def test_untracked_log2_per_tensor_writes_everything_without_mlflow(
        trained_model_dir: Path, tiny_dataset: Path, tmp_path: Path, mc_home: Path) -> None:
    result = run_quantize(trained_model_dir, tiny_dataset, tmp_path / "out", calibrator="log2", per_channel=False,
                          calib_images=8, track=False, progress=False)
    assert result.run_id is None and result.model_uri is None and result.registration is None
    assert result.model_dir == tmp_path / "out" / "int8_model"
    spec = read_int8_spec(result.model_dir)
    assert (spec.calibrator, spec.per_channel, spec.power_of_two, spec.calibration_images) == ("log2", False, True, 8)
    assert result.calibration.weight_granularity == "per_tensor"
    assert not (mc_home / "mlflow.db").exists()  # nothing was tracked
    assert 0.0 <= result.metrics["deploy_map50"] <= 1.0


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, error, match", [
    ({"calibrator": "entropy"}, CalibrationError, r"unknown calibrator 'entropy'; allowed: \['minmax'"),
    ({"calibrator": "percentile", "percentile": 20.0}, CalibrationError, "percentile must be in"),
    ({"calib_images": 0}, CalibrationError, "calib_images must be >= 1, got 0"),
    ({"backend": "arm"}, QuantizeError, r"unknown int8 backend 'arm'; allowed: \['x86'"),
    ({"register": True}, QuantizeError, "needs track=True and the registered float_version"),
    ({"register": True, "track": False, "float_version": "1"}, QuantizeError, "needs track=True"),
])
def test_bad_arguments_fail_before_any_work(trained_model_dir: Path, tiny_dataset: Path, tmp_path: Path,
                                            kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        run_quantize(trained_model_dir, tiny_dataset, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_empty_calibration_data_names_the_dataset(trained_model_dir: Path, tiny_dataset: Path,
                                                  tmp_path: Path) -> None:
    dataset = tmp_path / "no-train"
    shutil.copytree(tiny_dataset, dataset)
    manifest = read_manifest(dataset)
    manifest.split.train = []
    (dataset / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    with pytest.raises(CalibrationError, match=f"calibration data is empty: dataset {dataset} .*train split"):
        run_quantize(trained_model_dir, dataset, tmp_path / "out", track=False, progress=False)


def test_model_dir_must_hold_a_float_detector_for_this_dataset(trained_model_dir: Path, tiny_dataset: Path,
                                                               tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no config\.json with model\.safetensors"):
        run_quantize(tmp_path, tiny_dataset, tmp_path / "out", track=False, progress=False)
    segmenter = tmp_path / "segmenter"
    shutil.copytree(trained_model_dir, segmenter)
    (segmenter / "config.json").write_text(json.dumps({"kind": "segmenter", "format_version": 1, "config": {}}))
    # a segmenter config is quantized as a segmenter (see test_segment_quant.py): detector weights don't fit it
    with pytest.raises(ModelFileError, match=r"keys do not match a 'tiny' segmenter: .* unexpected \[fuse_p3"):
        run_quantize(segmenter, tiny_dataset, tmp_path / "out", track=False, progress=False)
    int8 = tmp_path / "int8"
    shutil.copytree(trained_model_dir, int8)
    (int8 / QUANT_FILE).write_text("{}")
    with pytest.raises(QuantizeError, match="already an int8 model"):
        run_quantize(int8, tiny_dataset, tmp_path / "out", track=False, progress=False)
    other = tmp_path / "two-classes"
    shutil.copytree(tiny_dataset, other)
    manifest = read_manifest(other)
    manifest.classes = manifest.classes[:2]
    (other / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    with pytest.raises(QuantizeError, match=r"has 2 classes .* the model predicts 3"):
        run_quantize(trained_model_dir, other, tmp_path / "out", track=False, progress=False)
    with pytest.raises(DatasetError, match="not a dataset artifact"):
        run_quantize(trained_model_dir, tmp_path / "nowhere", tmp_path / "out", track=False, progress=False)


def test_float_version_must_exist_and_be_float(trained_model_dir: Path, tiny_dataset: Path, tmp_path: Path,
                                               mc_home: Path) -> None:
    configure_mlflow()
    with pytest.raises(QuantizeError, match="float_version '7' of registered model 'detector' not found"):
        run_quantize(trained_model_dir, tiny_dataset, tmp_path / "out", register=True, float_version="7",
                     progress=False)
    with mlflow.start_run() as run:
        uri = log_detector_model(trained_model_dir)
    register_model(uri, name="detector", run_id=run.info.run_id, metric="map", value=0.1,
                   tags={"precision": "int8"})
    with pytest.raises(QuantizeError, match="has precision='int8'; float_version must name a float version"):
        run_quantize(trained_model_dir, tiny_dataset, tmp_path / "out", register=True, float_version="1",
                     progress=False)
    float_run, float_version = _register_float(trained_model_dir, tiny_dataset, 0.06)
    with pytest.raises(QuantizeError, match=f"run_id nope is not the run of 'detector' version 2 \\({float_run}\\)"):
        run_quantize(trained_model_dir, tiny_dataset, tmp_path / "out", register=True, float_version=float_version,
                     run_id="nope", progress=False)
