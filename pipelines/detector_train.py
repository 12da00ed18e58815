"""Pipeline ``detector-train``: intake -> train -> evaluate -> register [-> quantize], with typed artifacts.

With ``quantize=True`` the registered float version is also quantized (``calibrator``) and the int8
model registered as a new version of ``model_name`` tagged ``float_version=<that version>``.
"""

from typing import NamedTuple

from kfp import dsl

from components.data.component import intake_component
from components.deploy.component import deploy_component
from components.evaluate.component import evaluate_component
from components.tracking.component import register_component
from components.train.component import train_component
from pipelines.cluster_env import with_cluster_env
from pipelines.quantize import quantize_registered


@dsl.pipeline(name="detector-train",
              description="Import a COCO/YOLO dataset, train the YOLO-style detector, evaluate with COCO "
                          "mAP, register it in MLflow (champion/challenger); optionally quantize it to int8.")
def detector_train(
    source: str,
    fmt: str = "auto",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    max_error_fraction: float = 0.05,
    augment: bool = False,
    preset: str = "nano",
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 0.003,
    seed: int = 0,
    img_size: int = 160,
    bf16: bool = False,
    model_name: str = "detector",
    deploy_rayservice: str = "",
    deploy_namespace: str = "modelcommons",
    deploy_model: str = "detector@champion",
    quantize: bool = False,
    calibrator: str = "kl",
    calib_images: int = 64,
) -> NamedTuple("Outputs", [("run_id", str), ("version", str), ("alias", str), ("map", float),  # type: ignore[valid-type]
                            ("map50", float)]):
    intake = intake_component(source=source, fmt=fmt, val_fraction=val_fraction, seed=split_seed,
                              max_error_fraction=max_error_fraction, augment=augment)
    with_cluster_env(intake).set_display_name("intake")
    train = train_component(dataset=intake.outputs["dataset"], preset=preset, epochs=epochs,
                            batch_size=batch_size, lr=lr, seed=seed, img_size=img_size, bf16=bf16)
    with_cluster_env(train).set_display_name("train")
    evaluate = evaluate_component(dataset=intake.outputs["dataset"], model=train.outputs["model"],
                                  run_id=train.outputs["run_id"])
    with_cluster_env(evaluate).set_display_name("evaluate")
    register = register_component(dataset=intake.outputs["dataset"], model=train.outputs["model"],
                                  run_id=train.outputs["run_id"], model_uri=train.outputs["model_uri"],
                                  map=evaluate.outputs["map"], map50=evaluate.outputs["map50"],
                                  model_name=model_name)
    with_cluster_env(register).set_display_name("register")
    # Optional roll-out (cluster runs): point a RayService at the champion once registration is done.
    with dsl.If(deploy_rayservice != "", name="deploy-requested"):
        deploy = deploy_component(model=deploy_model, namespace=deploy_namespace,
                                  rayservice=deploy_rayservice).after(register)
        with_cluster_env(deploy).set_display_name("deploy")
    # Optional int8: quantize the version just registered; its int8 version is tagged float_version.
    quantize_registered(quantize=quantize, dataset=intake.outputs["dataset"], model=train.outputs["model"],
                        run_id=train.outputs["run_id"], version=register.outputs["version"], calibrator=calibrator,
                        calib_images=calib_images, model_name=model_name, display_name="quantize")
    Outputs = NamedTuple("Outputs", [("run_id", str), ("version", str), ("alias", str), ("map", float),  # noqa: UP014
                                     ("map50", float)])
    return Outputs(train.outputs["run_id"], register.outputs["version"], register.outputs["alias"],
                   evaluate.outputs["map"], evaluate.outputs["map50"])
