"""KFP component ``train``: thin wrapper over :func:`components.train.trainer.train_detector`.

``num_workers >= 1`` trains data-parallel through Ray Train instead
(:func:`components.train.distributed.train_detector_distributed`); the outputs are the same.
"""

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
    sampler: str = "uniform",
    sampler_q: int = 10,
    sampler_s_e0: float = 100.0,
    sampler_warmup_epochs: int = -1,
    run_key: str = "",
    num_workers: int = 0,
    use_gpu: bool = False,
    fp16: bool = False,
) -> NamedTuple("TrainOutputs", [("run_id", str), ("model_uri", str)]):  # type: ignore[valid-type]
    """Train the detector on ``dataset``; write config.json + model.safetensors under ``model.path``.

    ``sampler_warmup_epochs=-1`` means the default warm-up (min(15, round(0.15 * epochs))).
    ``run_key`` (the run identity) keeps checkpoints in the artifact store so a rerun resumes.
    ``num_workers=0`` trains in this process; ``>= 1`` uses Ray Train with that many workers.
    """
    from collections import namedtuple
    from pathlib import Path

    from components.train.trainer import TrainConfig, train_detector

    config = TrainConfig(preset=preset, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed, img_size=img_size, bf16=bf16, fp16=fp16,
                         device="cuda" if use_gpu else "cpu", sampler=sampler, sampler_q=sampler_q,
                         sampler_s_e0=sampler_s_e0,
                         sampler_warmup_epochs=None if sampler_warmup_epochs < 0 else sampler_warmup_epochs)
    if num_workers >= 1:
        from components.train.distributed import train_detector_distributed

        result = train_detector_distributed(Path(dataset.path), Path(model.path), config, num_workers=num_workers,
                                            use_gpu=use_gpu, run_name=run_name, run_key=run_key or None)
    else:
        result = train_detector(Path(dataset.path), Path(model.path), config, run_name=run_name,
                                run_key=run_key or None)
    model.metadata.update({"run_id": result.run_id or "", "model_uri": result.model_uri or "",
                           "preset": preset, "sampler": sampler,
                           **{f"val_{k}": v for k, v in result.metrics.items()}})
    TrainOutputs = namedtuple("TrainOutputs", ["run_id", "model_uri"])
    return TrainOutputs(result.run_id or "", result.model_uri or "")
