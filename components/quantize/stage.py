"""Quantize stage: calibrate a trained detector, compare float / hybrid / int8 mAP, write and register int8.

:func:`run_quantize` dispatches on the model directory's ``config.json`` ``kind``: a ``"detector"`` is
handled here; a ``"segmenter"`` by :func:`components.quantize.segment.run_segmenter_quantize` (its image
encoder is quantized; metrics are ``{float,hybrid,int8,deploy}_{miou_point,miou_box}`` and
``miou_box_drop``; see that module). Any other kind is a :class:`QuantizeError`.

Steps of :func:`run_quantize`:

1. calibrate (``minmax``, ``percentile``, ``kl`` or ``log2``) on images drawn from the dataset artifact's
   ``train`` split;
2. COCO mAP on the ``val`` split for our engine in ``float``, ``hybrid`` and ``int8``, and for the
   deployable int8 model (:mod:`components.quantize.deploy`, PyTorch x86 quantized kernels);
3. the per-layer report (inspector, first validation image) and the model graph, as JSON and PNG;
4. the deployable int8 model directory;
5. with tracking: an MLflow run (child of the float training run when known) with params, metrics,
   artifacts and the int8 model as a pickle-free pyfunc; with ``register``: a new version of the same
   registered model, tagged ``precision=int8``, ``calibrator``, ``float_version``, ``backend`` (no alias:
   int8 versions stay out of the float champion contest, see :mod:`components.tracking.registry`).

Output directory::

    out_dir/
      int8_model/            config.json, model.safetensors, quantization.json (unless int8_dir is given)
      calibration.json       the calibrated ranges
      metrics.json           {float,hybrid,int8,deploy}_{map,map50,map75}, map50_drop, report_output_sqnr_db
      report.json report.png per-layer float-vs-int8 error (ModelReport) and its chart
      graph.json graph.png   model graph (ModelGraph) and its picture
      summary.md             a Markdown table of the above
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from components.data.format import DatasetError, Manifest, read_manifest
from components.data.loader import Sample, load_samples
from components.models.detector import Detector
from components.models.files import CONFIG_FILE, read_config_doc
from components.models.weights import load_detector
from components.quantize.calibrate import (
    Calibration,
    calibrate,
    calibration_batches,
    check_method,
    save_calibration,
)
from components.quantize.deploy import (
    Int8Detector,
    check_backend,
    is_int8_model_dir,
    load_int8_model,
    save_int8_model,
)
from components.quantize.engine import QuantEngine
from components.quantize.errors import CalibrationError, QuantizeError
from components.quantize.evaluate import map_by_precision
from components.quantize.graph import QuantGraph
from components.quantize.inspector import InspectorSession, ModelReport
from components.quantize.visualize import ModelGraph, model_graph, plot_report, render_graph
from components.tracking.resolve import find_model_dir

if TYPE_CHECKING:
    from components.tracking.registry import Registration

ENGINE_PRECISIONS = ("float", "hybrid", "int8")
DEPLOY = "deploy"  # metric prefix of the deployable int8 model (real int8 kernels)


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`run_quantize` wrote and recorded."""

    model_dir: Path  # the deployable int8 model directory
    out_dir: Path
    calibration: Calibration
    metrics: dict[str, float]  # see the module docstring
    report: ModelReport
    files: dict[str, Path] = field(default_factory=dict)  # calibration, metrics, report_json, ... -> path
    run_id: str | None = None  # the MLflow run of this quantization
    model_uri: str | None = None  # the int8 pyfunc model in that run
    registration: Registration | None = None  # the registered int8 version


def run_quantize(model_dir: Path, dataset_dir: Path, out_dir: Path, *, calibrator: str = "kl",
                 percentile: float = 99.99, per_channel: bool = True, calib_images: int = 64,
                 img_size: int | None = None, backend: str = "x86", int8_dir: Path | None = None,
                 track: bool = True, run_id: str | None = None, register: bool = False,
                 model_name: str | None = None, float_version: str | None = None, seed: int = 0,
                 progress: bool = True) -> QuantizeResult:
    """Quantize the float detector (or segmenter, see the module docstring) in ``model_dir``.

    ``model_name`` (default: the model's kind, ``"detector"`` or ``"segmenter"``) is the registered model
    the float version belongs to and the int8 version is added to.

    ``calib_images`` images (seeded choice) of the train split calibrate; ``img_size`` (default: the
    model's) is the letterboxed side of calibration and evaluation images. ``per_channel=False`` quantizes
    weights per tensor. ``run_id`` is the float training run the MLflow run is nested under; with
    ``register`` and a ``float_version`` of ``model_name``, the int8 model is registered (and ``run_id``
    defaults to that version's run).

    Raises :class:`CalibrationError` for an unknown calibrator, a bad ``percentile``/``calib_images`` or
    a dataset without train images; :class:`~components.models.weights.ModelFileError` /
    :class:`~components.tracking.resolve.ModelNotFoundError` when ``model_dir`` holds no float detector;
    :class:`QuantizeError` for an int8 input model, classes that differ from the dataset's, or bad
    registration arguments.
    """
    check_arguments(calibrator=calibrator, percentile=percentile, calib_images=calib_images, backend=backend,
                    register=register, track=track, float_version=float_version)
    model_dir, dataset_dir, out_dir = Path(model_dir), Path(dataset_dir), Path(out_dir)
    if is_int8_model_dir(model_dir):
        raise QuantizeError(f"{model_dir}: already an int8 model; quantize its float model instead")
    model_dir = find_model_dir(model_dir)
    kind = model_kind(model_dir)
    if kind == "segmenter":
        from components.quantize.segment import run_segmenter_quantize

        if img_size is not None:
            raise QuantizeError(f"img_size={img_size}: a segmenter is quantized at its own input size; leave it unset")
        return run_segmenter_quantize(
            model_dir, dataset_dir, out_dir, calibrator=calibrator, percentile=percentile, per_channel=per_channel,
            calib_images=calib_images, backend=backend, int8_dir=int8_dir, track=track, run_id=run_id,
            register=register, model_name=model_name or kind, float_version=float_version, seed=seed,
            progress=progress)
    model_name = model_name or kind
    model = load_detector(model_dir).eval()
    manifest = _check_dataset(dataset_dir, model)
    size = img_size or model.config.img_size
    parent_run_id = parent_run(run_id, register=register, model_name=model_name, float_version=float_version)

    out_dir.mkdir(parents=True, exist_ok=True)
    batches = calibration_batches(dataset_dir, img_size=size, split="train", count=calib_images, seed=seed)
    graph = QuantGraph(model)
    calibration = calibrate_graph(graph, batches, calibrator=calibrator, percentile=percentile,
                                  per_channel=per_channel, progress=progress)
    engine = QuantEngine(graph, calibration)
    int8_path = save_int8_model(model_dir, calibration, Path(int8_dir) if int8_dir else out_dir / "int8_model",
                                backend=backend, per_channel=per_channel, calibrator=calibrator,
                                percentile=percentile)

    _, val = load_samples(dataset_dir, "val", size)
    metrics = _evaluate(model, engine, load_int8_model(int8_path), dataset_dir, val, progress=progress)
    report = InspectorSession(engine, val[0].image, "int8").report()
    if report.output_error is not None and report.output_error.sqnr_db is not None:
        metrics["report_output_sqnr_db"] = float(report.output_error.sqnr_db)
    files = write_files(out_dir, calibration, report, metrics, model_graph(engine, val[0].image[None], "int8"),
                        summary_markdown(calibration, metrics, report))

    result = QuantizeResult(model_dir=int8_path, out_dir=out_dir, calibration=calibration, metrics=metrics,
                            report=report, files=files)
    if not track:
        return result
    params = {"calibrator": calibrator, "percentile": percentile, "per_channel": per_channel,
              "calib_images": calibration.images, "img_size": size, "backend": backend, "seed": seed}
    return track_quantize(result, manifest, params, parent_run_id=parent_run_id, register=register,
                          model_name=model_name, float_version=float_version, task="detection",
                          log_model=_log_int8_detector, metric="map")


QUANTIZABLE_KINDS = ("detector", "segmenter")


def model_kind(model_dir: Path) -> str:
    """The ``kind`` in ``<model_dir>/config.json`` (``"detector"`` or ``"segmenter"``).

    Raises :class:`ModelFileError` when the file is missing or not JSON, :class:`QuantizeError` naming
    the file and value for any other kind.
    """
    path = Path(model_dir) / CONFIG_FILE
    doc = read_config_doc(model_dir)
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in QUANTIZABLE_KINDS:
        raise QuantizeError(f"{path}: field 'kind' is {kind!r}; quantize supports {list(QUANTIZABLE_KINDS)}")
    return str(kind)


def check_arguments(*, calibrator: str, percentile: float, calib_images: int, backend: str, register: bool,
                    track: bool, float_version: str | None) -> None:
    """The argument checks every quantize flow (detector, segmenter) starts with; see :func:`run_quantize`."""
    check_method(calibrator, percentile)
    if calib_images < 1:
        raise CalibrationError(f"calib_images must be >= 1, got {calib_images}")
    check_backend(backend)
    if register and not (track and float_version):
        raise QuantizeError("register=True needs track=True and the registered float_version it was quantized "
                            f"from (got track={track}, float_version={float_version!r})")


def check_splits(dataset_dir: Path) -> Manifest:
    """The dataset's manifest; :class:`CalibrationError` / :class:`DatasetError` when train / val is empty."""
    manifest = read_manifest(dataset_dir)
    if not manifest.split.train:
        raise CalibrationError(f"calibration data is empty: dataset {dataset_dir} ({manifest.name!r}) has no "
                               "images in its train split")
    if not manifest.split.val:
        raise DatasetError(f"{dataset_dir}: the val split is empty; quantization is evaluated on it")
    return manifest


def calibrate_graph(graph: QuantGraph, batches: Sequence[torch.Tensor], *, calibrator: str, percentile: float,
                    per_channel: bool, progress: bool) -> Calibration:
    """Calibrate ``graph`` on ``batches`` (each Bx3xSxS, the graph's input) with a progress bar."""
    return calibrate(
        graph, lambda: tqdm(batches, desc=f"calibrate ({calibrator})", unit="batch", leave=False,
                            disable=not progress),
        method=calibrator, percentile=percentile, weight_granularity="per_channel" if per_channel else "per_tensor")


def _check_dataset(dataset_dir: Path, model: Detector) -> Manifest:
    manifest = check_splits(dataset_dir)
    if len(manifest.classes) != model.config.num_classes:
        raise QuantizeError(f"dataset {dataset_dir} has {len(manifest.classes)} classes {manifest.classes}, the "
                            f"model predicts {model.config.num_classes}: evaluate on the dataset it was trained on")
    return manifest


def parent_run(run_id: str | None, *, register: bool, model_name: str, float_version: str | None) -> str | None:
    """The run the quantize run nests under: ``run_id``, or with ``register`` the checked float version's run."""
    if not register:
        return run_id
    assert float_version is not None  # check_arguments: register needs a float_version
    return _check_float_version(model_name, float_version, run_id)


def _check_float_version(name: str, version: str, run_id: str | None) -> str | None:
    """The float version must exist and be float; returns the run to nest under (``run_id`` or its run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from components.tracking.setup import configure_mlflow

    configure_mlflow()
    try:
        mv = MlflowClient().get_model_version(name, version)
    except MlflowException as exc:
        raise QuantizeError(f"float_version {version!r} of registered model {name!r} not found: {exc.message}"
                            ) from exc
    if mv.tags.get("precision", "float") != "float":
        raise QuantizeError(f"version {version} of {name!r} has precision={mv.tags['precision']!r}; "
                            "float_version must name a float version")
    if run_id and mv.run_id and run_id != mv.run_id:
        raise QuantizeError(f"run_id {run_id} is not the run of {name!r} version {version} ({mv.run_id}): "
                            "pass the float version's own training run, or no run_id")
    return run_id or mv.run_id or None


def _evaluate(model: Detector, engine: QuantEngine, deployed: Int8Detector, dataset_dir: Path, val: list[Sample], *,
              progress: bool) -> dict[str, float]:
    """``{float,hybrid,int8,deploy}_{map,map50,map75}`` and ``map50_drop`` (float - deploy, in points)."""
    metrics: dict[str, float] = {}
    with tqdm(total=len(ENGINE_PRECISIONS) + 1, desc="evaluate mAP", unit="model", leave=False,
              disable=not progress) as bar:
        for precision in (*ENGINE_PRECISIONS, DEPLOY):
            bar.set_postfix_str(precision)
            values = map_by_precision(model, engine, dataset_dir, val, precisions=(precision,),
                                      deployed=deployed)[precision]
            metrics.update({f"{precision}_{k}": v for k, v in values.items()})
            bar.update()
    metrics["map50_drop"] = 100.0 * (metrics["float_map50"] - metrics[f"{DEPLOY}_map50"])
    return metrics


def write_files(out_dir: Path, calibration: Calibration, report: ModelReport, metrics: dict[str, float],
                graph: ModelGraph, summary: str) -> dict[str, Path]:
    """Write the output files of the module docstring but ``int8_model/``; returns ``{key: path}``
    (keys ``calibration``, ``metrics``, ``report_json``, ``report_png``, ``graph_json``, ``graph_png``,
    ``summary``; ``summary`` is the Markdown text of ``summary.md``)."""
    files = {"calibration": save_calibration(calibration, out_dir / "calibration.json"),
             "metrics": out_dir / "metrics.json", "report_json": out_dir / "report.json",
             "graph_json": out_dir / "graph.json", "summary": out_dir / "summary.md"}
    files["metrics"].write_text(json.dumps(metrics, indent=2, sort_keys=True))
    files["report_json"].write_text(report.model_dump_json(indent=2))
    files["graph_json"].write_text(graph.model_dump_json(indent=2))
    files["report_png"] = plot_report(report, out_dir / "report.png")
    files["graph_png"] = render_graph(graph, out_dir / "graph.png")
    files["summary"].write_text(summary)
    return files


def summary_markdown(calibration: Calibration, metrics: dict[str, float], report: ModelReport) -> str:
    """A short Markdown page: mAP per precision, calibration, worst layers."""

    def fmt(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.4f}"

    lines = [f"# Quantization ({calibration.method}, {calibration.weight_granularity} weights, "
             f"{calibration.images} calibration images)", "",
             "| model | mAP | mAP@.5 | mAP@.75 |", "|---|---|---|---|"]
    labels = {"float": "float", "hybrid": "hybrid (engine)", "int8": "int8 (engine)",
              DEPLOY: "int8 (deployable, x86 kernels)"}
    for key, label in labels.items():
        lines.append(f"| {label} | {fmt(metrics.get(f'{key}_map'))} | {fmt(metrics.get(f'{key}_map50'))} | "
                     f"{fmt(metrics.get(f'{key}_map75'))} |")
    out = report.output_error.sqnr_db if report.output_error else None
    lines += ["", f"mAP@.5 drop, float to deployable int8: {metrics['map50_drop']:.2f} points.",
              f"Output SQNR (int8 engine, one validation image): {'exact' if out is None else f'{out:.1f} dB'}.",
              "", "Layers with the lowest local SQNR: " + (", ".join(report.worst_layers) or "none") + "."]
    return "\n".join(lines) + "\n"


def _log_int8_detector(model_dir: Path) -> str:
    """Log the int8 detector directory as a pickle-free pyfunc (the detector's, which loads it as int8)."""
    from components.tracking.model_logging import log_detector_model

    return log_detector_model(model_dir)


def track_quantize(result: QuantizeResult, manifest: Manifest, params: dict[str, Any], *,
                   parent_run_id: str | None, register: bool, model_name: str, float_version: str | None,
                   task: str, log_model: Callable[[Path], str], metric: str,
                   extra_tags: Mapping[str, str] | None = None) -> QuantizeResult:
    """Log the run (nested under the float run) and register the int8 version; returns ``result`` with
    ``run_id``, ``model_uri`` and ``registration`` set.

    ``task`` (``"detection"``, ``"segmentation"``) is a run and version tag; ``log_model`` logs
    ``result.model_dir`` in the active run and returns the model URI; ``metric`` names the registry metric,
    taken from the deployable model (``deploy_<metric>``); the deployable model's other metrics and the
    non-deploy metrics become ``metric.<name>`` version tags. ``extra_tags`` are added to the version's tags.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.tracking.registry import register_model
    from components.tracking.setup import configure_mlflow, git_commit
    from components.tracking.stage import dataset_recipe

    configure_mlflow()
    client = MlflowClient()
    float_params = dict(client.get_run(parent_run_id).data.params) if parent_run_id else {}
    run_tags = {"modelcommons.stage": "quantize", "task": task, "precision": "int8",
                "calibrator": str(params["calibrator"]), "backend": str(params["backend"]),
                "dataset_sha256": manifest.sha256, "git_commit": git_commit(),
                "float_run_id": parent_run_id or "", "float_version": float_version or ""}
    with mlflow.start_run(run_name=f"quantize-{params['calibrator']}", parent_run_id=parent_run_id) as run:
        mlflow.set_tags(run_tags)
        mlflow.log_params(params)
        mlflow.log_metrics(result.metrics)
        for key in ("report_json", "report_png", "graph_json", "graph_png", "calibration", "metrics", "summary"):
            mlflow.log_artifact(str(result.files[key]))
        model_uri = log_model(result.model_dir)
        mlflow.set_tag("model_uri", model_uri)
    quant_run_id = run.info.run_id
    registration = None
    if register:
        deploy = {k[len(DEPLOY) + 1:]: v for k, v in result.metrics.items() if k.startswith(f"{DEPLOY}_")}
        tags = {"precision": "int8", "calibrator": params["calibrator"], "float_version": str(float_version),
                "backend": params["backend"], "task": task, **(extra_tags or {}), "dataset_sha256": manifest.sha256,
                "git_commit": run_tags["git_commit"], "float_run_id": parent_run_id or "",
                "recipe": {"train": float_params, "quantize": params, "dataset": dataset_recipe(manifest)},
                # metric.<metric> (the registry metric) and the other metric.* of the deployable model
                **{f"metric.{k}": repr(float(v)) for k, v in deploy.items() if k != metric},
                **{f"metric.{k}": repr(float(v)) for k, v in result.metrics.items()
                   if not k.startswith(f"{DEPLOY}_")}}
        registration = register_model(model_uri, name=model_name, run_id=quant_run_id, metric=metric,
                                      value=deploy[metric], tags=tags)
        client.set_tag(quant_run_id, "registered_model", model_name)
        client.set_tag(quant_run_id, "registered_version", registration.version)
    return replace(result, run_id=quant_run_id, model_uri=model_uri, registration=registration)
