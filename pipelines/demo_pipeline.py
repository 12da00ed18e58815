"""Pipeline ``demo``: one intake fans out to the detector (train -> evaluate -> register) and the
segmenter (train-segmenter -> evaluate-segmenter -> register-segmenter).

Both branches read the same dataset artifact, so the two registered models share one dataset sha256.
"""

from typing import NamedTuple

from kfp import dsl

from components.data.component import intake_component
from components.evaluate.component import evaluate_component
from components.segment.component import (
    evaluate_segmenter_component,
    register_segmenter_component,
    train_segmenter_component,
)
from components.tracking.component import register_component
from components.train.component import train_component
from pipelines.cluster_env import with_cluster_env


@dsl.pipeline(name="demo",
              description="Import one dataset, then train, evaluate and register both the YOLO-style detector "
                          "(champion rule on mAP) and the SAM-style segmenter (champion rule on miou_box).")
def demo(
    source: str,
    fmt: str = "auto",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_error_fraction: float = 0.05,
    seed: int = 0,
    detector_preset: str = "nano",
    detector_epochs: int = 40,
    detector_batch_size: int = 32,
    detector_img_size: int = 160,
    segmenter_preset: str = "tiny",
    segmenter_epochs: int = 16,
    segmenter_batch_size: int = 8,
    segmenter_img_size: int = 0,
) -> NamedTuple("Outputs", [  # type: ignore[valid-type]
    ("detector_run_id", str), ("detector_version", str), ("detector_alias", str), ("map", float), ("map50", float),
    ("segmenter_run_id", str), ("segmenter_version", str), ("segmenter_alias", str), ("miou_point", float),
    ("miou_box", float)]):
    intake = intake_component(source=source, fmt=fmt, val_fraction=val_fraction, seed=split_seed,
                              max_error_fraction=max_error_fraction)
    with_cluster_env(intake).set_display_name("intake")
    dataset = intake.outputs["dataset"]

    train = train_component(dataset=dataset, preset=detector_preset, epochs=detector_epochs,
                            batch_size=detector_batch_size, seed=seed, img_size=detector_img_size)
    with_cluster_env(train).set_display_name("train")
    evaluate = evaluate_component(dataset=dataset, model=train.outputs["model"], run_id=train.outputs["run_id"])
    with_cluster_env(evaluate).set_display_name("evaluate")
    register = register_component(dataset=dataset, model=train.outputs["model"], run_id=train.outputs["run_id"],
                                  model_uri=train.outputs["model_uri"], map=evaluate.outputs["map"],
                                  map50=evaluate.outputs["map50"], model_name="detector")
    with_cluster_env(register).set_display_name("register")

    seg_train = train_segmenter_component(dataset=dataset, preset=segmenter_preset, img_size=segmenter_img_size,
                                          epochs=segmenter_epochs, batch_size=segmenter_batch_size, seed=seed)
    with_cluster_env(seg_train).set_display_name("train-segmenter")
    seg_evaluate = evaluate_segmenter_component(dataset=dataset, model=seg_train.outputs["model"],
                                                run_id=seg_train.outputs["run_id"])
    with_cluster_env(seg_evaluate).set_display_name("evaluate-segmenter")
    seg_register = register_segmenter_component(
        dataset=dataset, model=seg_train.outputs["model"], run_id=seg_train.outputs["run_id"],
        model_uri=seg_train.outputs["model_uri"], miou_point=seg_evaluate.outputs["miou_point"],
        miou_box=seg_evaluate.outputs["miou_box"], model_name="segmenter")
    with_cluster_env(seg_register).set_display_name("register-segmenter")

    Outputs = NamedTuple("Outputs", [  # noqa: UP014
        ("detector_run_id", str), ("detector_version", str), ("detector_alias", str), ("map", float),
        ("map50", float), ("segmenter_run_id", str), ("segmenter_version", str), ("segmenter_alias", str),
        ("miou_point", float), ("miou_box", float)])
    return Outputs(train.outputs["run_id"], register.outputs["version"], register.outputs["alias"],
                   evaluate.outputs["map"], evaluate.outputs["map50"], seg_train.outputs["run_id"],
                   seg_register.outputs["version"], seg_register.outputs["alias"],
                   seg_evaluate.outputs["miou_point"], seg_evaluate.outputs["miou_box"])
