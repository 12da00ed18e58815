"""KFP component ``train``: thin wrapper over :func:`components.train.trainer.train_detector`."""

from typing import NamedTuple

from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE)
def train_component(
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    preset: str = "nano",
    epochs: int = 40,
    batch_size: int = 32,
    lr: float = 0.003,
    weight_decay: float = 0.0005,
    seed: int = 0,
    img_size: int = 160,
    bf16: bool = False,
    run_name: str = "detector-train",
) -> NamedTuple("TrainOutputs", [("run_id", str), ("model_uri", str)]):  # type: ignore[valid-type]
    """Train the detector on ``dataset``; write config.json + model.safetensors under ``model.path``."""
    from collections import namedtuple
    from pathlib import Path

    from components.train.trainer import TrainConfig, train_detector

    config = TrainConfig(preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, img_size=img_size, bf16=bf16)
    result = train_detector(Path(dataset.path), Path(model.path), config, run_name=run_name)
    model.metadata.update({"run_id": result.run_id or "", "model_uri": result.model_uri or "",
                           "preset": preset, **{f"val_{k}": v for k, v in result.metrics.items()}})
    TrainOutputs = namedtuple("TrainOutputs", ["run_id", "model_uri"])
    return TrainOutputs(result.run_id or "", result.model_uri or "")
