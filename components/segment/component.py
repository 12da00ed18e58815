"""KFP components of the segmenter: ``train-segmenter``, ``evaluate-segmenter``, ``register-segmenter``.

Top-level imports are stdlib + ``kfp`` only; each body imports the stage logic, so the same function
runs under ``kfp.local.SubprocessRunner(use_venv=False)`` and in the project image on a cluster.
"""

# No ``from __future__ import annotations``: KFP reads the real annotation objects.
from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def train_segmenter_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    pictures: dsl.Output[dsl.Artifact],
    preset: str = "tiny",
    img_size: int = 0,
    epochs: int = 16,
    batch_size: int = 8,
    lr: float = 0.003,
    seed: int = 0,
    freeze_encoder: bool = False,
    init_checkpoint: str = "",
    run_name: str = "segmenter-train",
) -> NamedTuple("SegTrainOutputs", [("run_id", str), ("model_uri", str)]):  # type: ignore[valid-type]
    """Train the segmenter on ``dataset``; ``model.path`` gets config.json + model.safetensors.

    ``pictures.path`` becomes a folder with the sample overlays and the training curves.
    """
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from components.segment.train import SegTrainConfig, train_segmenter

    config = SegTrainConfig(preset=preset, img_size=img_size, epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=seed, freeze_encoder=freeze_encoder, init_checkpoint=init_checkpoint)
    work = Path(model.path).with_name(Path(model.path).name + "-work")
    result = train_segmenter(Path(dataset.path), work, config, run_name=run_name)
    shutil.copytree(result.model_dir, model.path, dirs_exist_ok=True)
    Path(pictures.path).mkdir(parents=True, exist_ok=True)
    for path in result.artifacts:
        shutil.copy2(path, Path(pictures.path) / path.name)
    model.metadata.update({"run_id": result.run_id or "", "model_uri": result.model_uri or "", "preset": preset,
                           "img_size": result.config.img_size,
                           **{f"val_{k}": v for k, v in result.metrics.items()}})
    SegTrainOutputs = namedtuple("SegTrainOutputs", ["run_id", "model_uri"])
    return SegTrainOutputs(result.run_id or "", result.model_uri or "")


@dsl.component(base_image=BASE_IMAGE)
def evaluate_segmenter_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Artifact],
    run_id: str = "",
) -> NamedTuple("SegEvalOutputs", [("miou_point", float), ("miou_box", float)]):  # type: ignore[valid-type]
    """mIoU for single-point and box prompts on the validation split; ``report`` gets JSON + overlays."""
    from collections import namedtuple
    from pathlib import Path

    from components.segment.evaluate import run_segmenter_evaluation

    values = run_segmenter_evaluation(Path(model.path), Path(dataset.path), Path(report.path),
                                      run_id=run_id or None)
    for key, value in values.items():
        metrics.log_metric(key, value)
    SegEvalOutputs = namedtuple("SegEvalOutputs", ["miou_point", "miou_box"])
    return SegEvalOutputs(values["miou_point"], values["miou_box"])


@dsl.component(base_image=BASE_IMAGE)
def register_segmenter_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Input[dsl.Model],
    run_id: str,
    model_uri: str,
    miou_point: float,
    miou_box: float,
    model_name: str = "segmenter",
) -> NamedTuple("SegRegisterOutputs", [("name", str), ("version", str), ("alias", str)]):  # type: ignore[valid-type]
    """Register the segmenter; ``champion`` moves only when miou_box beats the current champion's."""
    from collections import namedtuple
    from pathlib import Path

    from components.tracking.stage import run_registration

    reg = run_registration(model_uri=model_uri, run_id=run_id, dataset_dir=Path(dataset.path),
                           metrics={"miou_box": miou_box, "miou_point": miou_point}, name=model_name,
                           metric="miou_box", task="segmentation")
    SegRegisterOutputs = namedtuple("SegRegisterOutputs", ["name", "version", "alias"])
    return SegRegisterOutputs(reg.name, reg.version, reg.alias)
