"""Pipeline ``segmenter-train``: intake -> train-segmenter -> evaluate-segmenter -> register ``segmenter``.

With ``quantize=True`` the registered float version's image encoder is also quantized (``calibrator``)
and the int8 model registered as a new version of ``model_name`` tagged ``float_version=<that version>``.
"""

from typing import NamedTuple

from kfp import dsl

from components.data.component import intake_component
from components.segment.component import (
    evaluate_segmenter_component,
    register_segmenter_component,
    train_segmenter_component,
)
from pipelines.cluster_env import with_cluster_env
from pipelines.quantize import quantize_registered


@dsl.pipeline(name="segmenter-train",
              description="Import a COCO dataset with instance masks, train the SAM-style promptable segmenter, "
                          "evaluate mIoU for point and box prompts, register it in MLflow (champion/challenger "
                          "on miou_box).")
def segmenter_train(
    source: str,
    fmt: str = "auto",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_error_fraction: float = 0.05,
    augment: bool = False,
    preset: str = "tiny",
    img_size: int = 0,
    epochs: int = 16,
    batch_size: int = 8,
    lr: float = 0.003,
    seed: int = 0,
    freeze_encoder: bool = False,
    init_checkpoint: str = "",
    model_name: str = "segmenter",
    quantize: bool = False,
    calibrator: str = "percentile",
    calib_images: int = 64,
) -> NamedTuple("Outputs", [("run_id", str), ("version", str), ("alias", str),  # type: ignore[valid-type]
                            ("miou_point", float), ("miou_box", float)]):
    intake = intake_component(source=source, fmt=fmt, val_fraction=val_fraction, seed=split_seed,
                              max_error_fraction=max_error_fraction, augment=augment)
    with_cluster_env(intake).set_display_name("intake")
    train = train_segmenter_component(dataset=intake.outputs["dataset"], preset=preset, img_size=img_size,
                                      epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                      freeze_encoder=freeze_encoder, init_checkpoint=init_checkpoint)
    with_cluster_env(train).set_display_name("train-segmenter")
    evaluate = evaluate_segmenter_component(dataset=intake.outputs["dataset"], model=train.outputs["model"],
                                            run_id=train.outputs["run_id"])
    with_cluster_env(evaluate).set_display_name("evaluate-segmenter")
    register = register_segmenter_component(dataset=intake.outputs["dataset"], model=train.outputs["model"],
                                            run_id=train.outputs["run_id"], model_uri=train.outputs["model_uri"],
                                            miou_point=evaluate.outputs["miou_point"],
                                            miou_box=evaluate.outputs["miou_box"], model_name=model_name)
    with_cluster_env(register).set_display_name("register-segmenter")
    # Optional int8: quantize the version just registered; its int8 version is tagged float_version.
    quantize_registered(quantize=quantize, dataset=intake.outputs["dataset"], model=train.outputs["model"],
                        run_id=train.outputs["run_id"], version=register.outputs["version"], calibrator=calibrator,
                        calib_images=calib_images, model_name=model_name, display_name="quantize-segmenter")
    Outputs = NamedTuple("Outputs", [("run_id", str), ("version", str), ("alias", str),  # noqa: UP014
                                     ("miou_point", float), ("miou_box", float)])
    return Outputs(train.outputs["run_id"], register.outputs["version"], register.outputs["alias"],
                   evaluate.outputs["miou_point"], evaluate.outputs["miou_box"])
