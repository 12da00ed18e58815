"""KFP components ``quantize`` (wraps :func:`components.quantize.stage.run_quantize`) and ``fetch-model``.

``fetch-model`` turns a registered model URI (``models:/detector@champion``) into a model artifact plus
the version's name, number and run, so the standalone ``quantize`` pipeline can feed ``quantize``.
"""

from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def quantize_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    int8_model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Artifact],
    summary: dsl.Output[dsl.Markdown],
    calibrator: str = "kl",
    percentile: float = 99.99,
    per_channel: bool = True,
    calib_images: int = 64,
    run_id: str = "",
    float_version: str = "",
    model_name: str = "",
) -> NamedTuple("QuantizeOutputs", [("run_id", str), ("model_uri", str), ("version", str),  # type: ignore[valid-type]
                                    ("float_map50", float), ("int8_map50", float), ("deploy_map50", float)]):
    """Calibrate ``model`` on ``dataset``'s train split, compare float/hybrid/int8 mAP on its val split.

    ``model`` may be a detector or a segmenter (the stage dispatches on its ``config.json`` kind; for a
    segmenter the image encoder is quantized and mIoU compared, see :mod:`components.quantize.segment`).
    ``model_name`` "" means the model's kind. The ``*_map50`` outputs are -1.0 for a segmenter (it has no
    mAP; -1 rather than NaN, which JSON parameter passing on a cluster cannot carry); its
    ``{float,hybrid,int8,deploy}_{miou_point,miou_box}`` are in ``metrics``.

    ``int8_model`` gets the deployable int8 model directory; ``report`` gets calibration.json,
    metrics.json, report.json/.png and graph.json/.png. With ``float_version`` (a registered float
    version of ``model_name``), the int8 model is registered as a new version of ``model_name`` tagged
    ``precision=int8``, ``calibrator``, ``float_version`` and ``backend``; ``version`` is "" otherwise.
    """
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components.quantize.stage import run_quantize

    result = run_quantize(Path(model.path), Path(dataset.path), Path(report.path), calibrator=calibrator,
                          percentile=percentile, per_channel=per_channel, calib_images=calib_images,
                          int8_dir=Path(int8_model.path), run_id=run_id or None, register=bool(float_version),
                          model_name=model_name or None, float_version=float_version or None, progress=False)
    for key, value in result.metrics.items():
        metrics.log_metric(key, value)
    shutil.copyfile(result.files["summary"], summary.path)
    version = result.registration.version if result.registration else ""
    int8_model.metadata.update({"precision": "int8", "calibrator": calibrator, "backend": "x86",
                                "float_version": float_version, "run_id": result.run_id or "",
                                "model_uri": result.model_uri or "", "version": version})
    QuantizeOutputs = namedtuple("QuantizeOutputs", ["run_id", "model_uri", "version", "float_map50", "int8_map50",
                                                     "deploy_map50"])
    m = result.metrics  # a segmenter has mIoU, not mAP: -1.0
    return QuantizeOutputs(result.run_id or "", result.model_uri or "", version, m.get("float_map50", -1.0),
                           m.get("int8_map50", -1.0), m.get("deploy_map50", -1.0))


@dsl.component(base_image=BASE_IMAGE)
def fetch_model_component(
    model_uri: str,
    model: dsl.Output[dsl.Model],
) -> NamedTuple("FetchOutputs", [("name", str), ("version", str), ("run_id", str)]):  # type: ignore[valid-type]
    """Copy the float model at ``model_uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/``,
    ``s3://`` or a directory) into ``model``; ``name``/``version``/``run_id`` are "" when not registered."""
    import shutil
    from collections import namedtuple

    from components.tracking.resolve import resolve_model

    resolved = resolve_model(model_uri)
    if resolved.precision != "float":
        raise ValueError(f"{model_uri} is a {resolved.precision} version; quantize needs a float model")
    shutil.copytree(resolved.local_dir, model.path, dirs_exist_ok=True)
    model.metadata.update({"uri": model_uri, "name": resolved.name or "", "version": resolved.version or ""})
    FetchOutputs = namedtuple("FetchOutputs", ["name", "version", "run_id"])
    return FetchOutputs(resolved.name or "", resolved.version or "", resolved.run_id or "")
