"""Data-parallel detector training on Ray Train (``TorchTrainer``, DDP), on a laptop or a Ray cluster.

Every worker runs the same loop as :func:`components.train.trainer.train_detector`. All workers draw
the same mini-batch (same seeded generator, same sampler state) and worker ``r`` trains on
``batch[r::num_workers]``; DDP averages the gradients. Per-sample feedback is all-gathered, so every
worker's sampler (recency bias histories, losses...) stays identical to the single-process one.

- Locally (no ``RAY_ADDRESS``): a local Ray with this machine's CPUs; 1-2 CPU workers (gloo).
- On a cluster: ``RAY_ADDRESS`` (e.g. ``ray://head:10001`` or ``auto``) points at the cluster's Ray,
  ``use_gpu=True`` puts one GPU under each worker (NCCL), with bf16 or fp16 autocast (fp16 uses
  a GradScaler).
- Outputs are the same as single-process training: ``out_dir/model`` with ``config.json`` +
  ``model.safetensors``, the per-epoch checkpoint (rank 0 writes it to the same
  :class:`~components.train.checkpoints.CheckpointStore`, so a rerun resumes), and the MLflow run
  (logged by the driver from the history the workers report).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from components.train.trainer import TrainConfig, TrainConfigError, TrainResult


def available_resources() -> dict[str, float]:
    """CPUs and GPUs of the Ray cluster this process uses (starting a local Ray if none is running)."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        if address:  # the cluster's Ray
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))}


def check_resources(num_workers: int, *, use_gpu: bool, cpus_per_worker: float,
                    resources: dict[str, float]) -> None:
    """TrainConfigError naming ``num_workers`` when the cluster cannot hold that many workers."""
    if num_workers < 1:
        raise TrainConfigError(f"train parameter num_workers={num_workers} is invalid: must be >= 1")
    if cpus_per_worker <= 0:
        raise TrainConfigError(f"train parameter cpus_per_worker={cpus_per_worker} is invalid: must be > 0")
    need_cpu = num_workers * cpus_per_worker
    if need_cpu > resources["CPU"] + 1e-9:
        raise TrainConfigError(
            f"train parameter num_workers={num_workers} is larger than the available resources: "
            f"{num_workers} workers x {cpus_per_worker:g} CPU = {need_cpu:g} CPUs, the Ray cluster has "
            f"{resources['CPU']:g}; lower num_workers or cpus_per_worker")
    if use_gpu and num_workers > resources["GPU"] + 1e-9:
        raise TrainConfigError(
            f"train parameter num_workers={num_workers} is larger than the available resources: use_gpu "
            f"needs one GPU per worker and the Ray cluster has {resources['GPU']:g} GPUs")


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Body of each Ray Train worker (the driver passes plain JSON-able values)."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from components.data.loader import load_samples
    from components.evaluate.coco import evaluate_detector
    from components.models.weights import save_detector
    from components.settings import Settings
    from components.train.checkpoints import CheckpointStore
    from components.train.trainer import build_loop, check_checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    config = TrainConfig(**{**cfg["config"], "device": str(device) if device.type == "cuda" else "cpu"})
    dataset_dir = Path(cfg["dataset_dir"])
    manifest, train_samples = load_samples(dataset_dir, "train", config.img_size)
    _, val_samples = load_samples(dataset_dir, "val", config.img_size) if rank == 0 else (None, [])

    def gather(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        # all_gather needs equal shapes: pad every shard to the largest, then trim by the known sizes
        width, rows = local.shape[1], max(sizes)
        padded = torch.zeros(rows, width, dtype=local.dtype, device=device)
        padded[: local.shape[0]] = local.to(device)
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).cpu()

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device).clone()
        dist.all_reduce(t)
        return t.cpu()

    loop = build_loop(train_samples, manifest, config, device, wrap=ray.train.torch.prepare_model,
                      rank=rank, world=world, gather=gather, all_reduce=all_reduce)
    store = CheckpointStore(Path(cfg["out_dir"]), run_key=cfg["run_key"], settings=Settings(home=cfg["home"]))
    history: list[dict[str, float]] = []
    start_epoch = 0
    state = check_checkpoint(store.load(), config, store.location)
    if state is not None:
        start_epoch, history, _ = loop.restore(state)
    for epoch in range(start_epoch, config.epochs):
        row = loop.run_epoch(epoch, progress=False)
        if rank == 0:
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                result = evaluate_detector(loop.detector, dataset_dir, val_samples, latency=False)
                row.update({"val_map": result.metrics["map"], "val_map50": result.metrics["map50"]})
            history.append(row)
            store.save(loop.checkpoint_state(epoch + 1, history, cfg["run_id"]))
        ray.train.report({"epoch": epoch + 1})  # every rank reports: also a barrier after the checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            loop.detector.eval()
            save_detector(loop.detector, Path(tmp) / "model")
            (Path(tmp) / "history.json").write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"epoch": config.epochs, "done": 1}, checkpoint=checkpoint)


def train_detector_distributed(dataset_dir: Path, out_dir: Path, config: TrainConfig, *, num_workers: int = 2,
                               use_gpu: bool = False, cpus_per_worker: float = 1.0, track: bool = True,
                               run_name: str | None = None, run_key: str | None = None) -> TrainResult:
    """Train like :func:`~components.train.trainer.train_detector`, data-parallel on ``num_workers``.

    ``use_gpu`` gives each worker one GPU (and ``config.device`` becomes that GPU). Raises
    :class:`TrainConfigError` when the Ray cluster has fewer CPUs/GPUs than the workers need.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from components.data.loader import load_samples
    from components.evaluate.coco import evaluate_detector
    from components.models.weights import load_detector
    from components.settings import get_settings
    from components.train.checkpoints import CheckpointStore
    from components.train.trainer import _Tracker, _write_pictures, check_checkpoint

    if use_gpu and not config.device.startswith("cuda"):
        config = dataclasses.replace(config, device="cuda")
    check_resources(num_workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                    resources=available_resources())
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    store = CheckpointStore(out_dir, run_key=run_key, settings=settings)
    state = check_checkpoint(store.load(), config, store.location)
    start_epoch = int(state["epoch"]) if state is not None else 0
    run_id = (state["run_id"] or None) if state is not None else None
    manifest, train_samples = load_samples(dataset_dir, "train", config.img_size)
    _, val_samples = load_samples(dataset_dir, "val", config.img_size)

    tracker = _Tracker(track, run_name=run_name, run_id=run_id)
    with tracker:
        tracker.log_params(config, manifest, len(train_samples), len(val_samples))
        if track:
            import mlflow

            mlflow.log_params({"num_workers": num_workers, "use_gpu": use_gpu})
        trainer = TorchTrainer(
            _worker_loop,
            train_loop_config={"config": config.to_params(), "dataset_dir": str(Path(dataset_dir).resolve()),
                               "out_dir": str(out_dir), "run_key": run_key, "home": str(settings.home),
                               "run_id": tracker.run_id or ""},
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(name=f"train-{run_key or 'detector'}",
                                           storage_path=str(out_dir / "ray_results")),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"distributed training failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("distributed training finished without reporting the model checkpoint")
        model_dir = out_dir / "model"
        with result.checkpoint.as_directory() as ckpt:
            if model_dir.exists():
                shutil.rmtree(model_dir)
            shutil.copytree(Path(ckpt) / "model", model_dir)
            history: list[dict[str, float]] = json.loads((Path(ckpt) / "history.json").read_text())
        for row in history[start_epoch:]:
            tracker.log_epoch(row)
        model = load_detector(model_dir)
        final = evaluate_detector(model, dataset_dir, val_samples, latency=False).metrics
        artifacts = _write_pictures(model, val_samples, manifest, history, out_dir)
        model_uri = tracker.finish(model_dir, artifacts, final)
    return TrainResult(model_dir=model_dir, history=history, metrics=final, run_id=tracker.run_id,
                       model_uri=model_uri, resumed_from_epoch=start_epoch, artifacts=artifacts)
