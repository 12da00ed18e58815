"""Pipeline ``quantize``: fetch a registered float model, import a dataset, quantize and register int8.

``model_uri`` names the float model (``models:/detector@champion``, ``models:/detector/3``, a ``runs:/``
URI, an ``s3://`` prefix or a directory); ``source`` the dataset folder or ``s3://`` prefix, imported by
``intake`` exactly as in ``detector-train`` (same ``val_fraction``/``split_seed`` give the same split).
A registered model is quantized into a new int8 version of the same name, tagged ``precision=int8``,
``calibrator``, ``float_version`` and ``backend``; a URI outside the registry is quantized and tracked
but not registered.
"""

from typing import Any, NamedTuple

from kfp import dsl

from components.data.component import intake_component
from components.quantize.component import fetch_model_component, quantize_component
from pipelines.cluster_env import with_cluster_env


@dsl.pipeline(name="quantize",
              description="Quantize a registered float detector to int8 (minmax, percentile, kl or log2 "
                          "calibration), compare float/hybrid/int8 mAP, register the int8 version.")
def quantize(
    model_uri: str,
    source: str,
    fmt: str = "auto",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_error_fraction: float = 0.05,
    calibrator: str = "kl",
    percentile: float = 99.99,
    per_channel: bool = True,
    calib_images: int = 64,
) -> NamedTuple("Outputs", [("run_id", str), ("version", str), ("float_version", str),  # type: ignore[valid-type]
                            ("float_map50", float), ("int8_map50", float), ("deploy_map50", float)]):
    fetch = fetch_model_component(model_uri=model_uri)
    with_cluster_env(fetch).set_display_name("fetch-model")
    intake = intake_component(source=source, fmt=fmt, val_fraction=val_fraction, seed=split_seed,
                              max_error_fraction=max_error_fraction, augment=False)
    with_cluster_env(intake).set_display_name("intake")
    quant = quantize_component(dataset=intake.outputs["dataset"], model=fetch.outputs["model"],
                               calibrator=calibrator, percentile=percentile, per_channel=per_channel,
                               calib_images=calib_images, run_id=fetch.outputs["run_id"],
                               float_version=fetch.outputs["version"], model_name=fetch.outputs["name"])
    with_cluster_env(quant).set_display_name("quantize")
    Outputs = NamedTuple("Outputs", [("run_id", str), ("version", str), ("float_version", str),  # noqa: UP014
                                     ("float_map50", float), ("int8_map50", float), ("deploy_map50", float)])
    return Outputs(quant.outputs["run_id"], quant.outputs["version"], fetch.outputs["version"],
                   quant.outputs["float_map50"], quant.outputs["int8_map50"], quant.outputs["deploy_map50"])


def quantize_registered(*, quantize: Any, dataset: Any, model: Any, run_id: Any, version: Any, calibrator: Any,
                        calib_images: Any, model_name: Any, display_name: str) -> None:
    """The optional last step of a training pipeline, added to the pipeline being defined: when the
    pipeline parameter ``quantize`` is true, quantize the float ``version`` just registered (from the
    training ``model`` artifact, calibrated on ``dataset``); its int8 version is tagged
    ``float_version=<version>``. The arguments are the caller's pipeline parameters and task outputs.
    """
    with dsl.If(quantize == True, name="quantize-requested"):  # noqa: E712  # a KFP condition, not a Python test
        quant = quantize_component(dataset=dataset, model=model, calibrator=calibrator, calib_images=calib_images,
                                   run_id=run_id, float_version=version, model_name=model_name)
        with_cluster_env(quant).set_display_name(display_name)
