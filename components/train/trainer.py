"""Training loop for the YOLO-style detector: deterministic on CPU, checkpointed, tracked in MLflow."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from components.data.format import Manifest
from components.data.loader import Sample, load_samples
from components.evaluate.coco import evaluate_detector
from components.models.detector import Detector, build_detector, detector_config
from components.models.weights import save_detector
from components.train.loss import detection_loss

CHECKPOINT_FILE = "checkpoint.pt"


class TrainConfigError(ValueError):
    """A training parameter is out of range; the message names it."""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a detector training run (logged to MLflow as the recipe)."""

    preset: str = "nano"
    epochs: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear LR warm-up, then cosine decay to 5% of lr
    seed: int = 0
    img_size: int = 160
    bf16: bool = False  # bfloat16 autocast (CPU or GPU)
    hflip: bool = True  # random horizontal flip, drawn from the seeded generator
    eval_every: int = 10  # validation mAP every N epochs (and after the last)
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", 1 <= self.batch_size <= 4096, "between 1 and 4096"),
            ("lr", 0 < self.lr <= 1, "in (0, 1]"),
            ("weight_decay", 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, "between 0 and epochs"),
            ("img_size", self.img_size >= 32 and self.img_size % 16 == 0, "a multiple of 16, >= 32"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("device", self.device == "cpu" or self.device.startswith("cuda"), "'cpu' or 'cuda[:N]'"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise TrainConfigError(f"train parameter {name}={getattr(self, name)!r} is invalid: must be {allowed}")
        try:
            detector_config(self.preset, num_classes=1, img_size=self.img_size)
        except ValueError as exc:
            raise TrainConfigError(f"train parameter preset/img_size: {exc}") from exc

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    model_dir: Path
    history: list[dict[str, float]]
    metrics: dict[str, float]
    run_id: str | None = None
    model_uri: str | None = None
    resumed_from_epoch: int = 0
    artifacts: list[Path] = field(default_factory=list)


@contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batches(samples: list[Sample], images: torch.Tensor, config: TrainConfig, gen: torch.Generator
             ) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
    order = torch.randperm(len(samples), generator=gen)
    flips = torch.rand(len(samples), generator=gen) < 0.5
    size = config.img_size
    for start in range(0, len(samples), config.batch_size):
        idx = order[start:start + config.batch_size]
        batch = images[idx].clone()
        targets = []
        for j, i in enumerate(idx.tolist()):
            boxes = samples[i].boxes.clone()
            if config.hflip and bool(flips[i]):
                batch[j] = batch[j].flip(-1)
                boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
            targets.append((boxes, samples[i].labels))
        yield batch, targets


def _save_checkpoint(path: Path, model: Detector, opt: torch.optim.Optimizer, epoch: int,
                     gen: torch.Generator, history: list[dict[str, float]], config: TrainConfig,
                     run_id: str | None) -> None:
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
        "history": json.dumps(history), "config": json.dumps(config.to_params(), sort_keys=True),
        "run_id": run_id or "",
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != json.dumps(config.to_params(), sort_keys=True):
        raise TrainConfigError(
            f"{path}: checkpoint was written with a different recipe; use a new output directory "
            "or the same parameters to resume"
        )
    return state


def train_detector(dataset_dir: Path, out_dir: Path, config: TrainConfig, *, track: bool = True,
                   run_name: str | None = None, progress: bool = True) -> TrainResult:
    """Train on the ``train`` split of a dataset artifact; write the model into ``out_dir/model``.

    Resumes from ``out_dir/checkpoint.pt`` when present (same recipe). With ``track``, logs params,
    per-epoch losses and metrics, sample predictions, curves and the model to MLflow.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    manifest, train_samples = load_samples(dataset_dir, "train", config.img_size)
    _, val_samples = load_samples(dataset_dir, "val", config.img_size)
    model_config = detector_config(config.preset, num_classes=len(manifest.classes),
                                   class_names=tuple(manifest.classes), img_size=config.img_size)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = build_detector(model_config).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(config.warmup_epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    start_epoch = 0
    ckpt_path = out_dir / CHECKPOINT_FILE
    run_id: str | None = None
    state = _load_checkpoint(ckpt_path, config)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        run_id = state["run_id"] or None

    tracker = _Tracker(track, run_name=run_name, run_id=run_id)
    with tracker, _deterministic():
        tracker.log_params(config, manifest, len(train_samples), len(val_samples))
        images = torch.stack([s.image for s in train_samples])
        height = width = config.img_size
        for epoch in range(start_epoch, config.epochs):
            model.train()
            sums = {"loss": 0.0, "loss_cls": 0.0, "loss_box": 0.0, "loss_ctr": 0.0}
            seen = 0
            started = time.perf_counter()
            bar = tqdm(total=len(train_samples), desc=f"epoch {epoch + 1}/{config.epochs}", unit="img",
                       disable=not progress, leave=False)
            for step_in_epoch, (batch, targets) in enumerate(_batches(train_samples, images, config, gen)):
                step = epoch * steps_per_epoch + step_in_epoch
                for group in opt.param_groups:
                    group["lr"] = config.lr * _lr_factor(step, total_steps, warmup_steps)
                autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.bf16 else nullcontext())
                with autocast:
                    raw = model(batch.to(device))
                parts = detection_loss(model, raw, [(b.to(device), lab.to(device)) for b, lab in targets],
                                       height, width)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
                opt.step()
                n = batch.shape[0]
                seen += n
                for key, value in (("loss", parts.total), ("loss_cls", parts.cls), ("loss_box", parts.box),
                                   ("loss_ctr", parts.ctr)):
                    sums[key] += float(value.detach()) * n
                bar.update(n)
                bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
            bar.close()
            row: dict[str, float] = {"epoch": float(epoch + 1), **{k: v / seen for k, v in sums.items()},
                                     "lr": opt.param_groups[0]["lr"],
                                     "epoch_time_s": time.perf_counter() - started}
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                result = evaluate_detector(model, dataset_dir, val_samples, latency=False)
                row.update({"val_map": result.metrics["map"], "val_map50": result.metrics["map50"]})
            history.append(row)
            tracker.log_epoch(row)
            if progress:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
                print(f"epoch {epoch + 1}/{config.epochs}: {shown}", flush=True)
            _save_checkpoint(ckpt_path, model, opt, epoch + 1, gen, history, config, tracker.run_id)

        model.eval()
        model_dir = save_detector(model, out_dir / "model")
        final = evaluate_detector(model, dataset_dir, val_samples, latency=False).metrics
        artifacts = _write_pictures(model, val_samples, manifest, history, out_dir)
        model_uri = tracker.finish(model_dir, artifacts, final)
    return TrainResult(model_dir=model_dir, history=history, metrics=final, run_id=tracker.run_id,
                       model_uri=model_uri, resumed_from_epoch=start_epoch, artifacts=artifacts)


def _write_pictures(model: Detector, samples: list[Sample], manifest: Manifest,
                    history: list[dict[str, float]], out_dir: Path) -> list[Path]:
    from components.evaluate.visualize import draw_detections, plot_history, save_grid

    shown = samples[:8]
    dets = model.predict(torch.stack([s.image for s in shown]))
    drawn = [draw_detections(s.image, d.boxes, d.labels, d.scores, manifest.classes)
             for s, d in zip(shown, dets, strict=True)]
    return [save_grid(drawn, out_dir / "sample_predictions.png"),
            plot_history(history, out_dir / "training_curves.png")]


class _Tracker:
    """MLflow logging for a training run; a no-op when tracking is off."""

    def __init__(self, enabled: bool, *, run_name: str | None, run_id: str | None) -> None:
        self.enabled = enabled
        self.run_name = run_name
        self.run_id = run_id

    def __enter__(self) -> _Tracker:
        if self.enabled:
            import mlflow

            from components.tracking.setup import configure_mlflow

            configure_mlflow()
            run = mlflow.start_run(run_id=self.run_id, run_name=None if self.run_id else self.run_name)
            self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.enabled:
            import mlflow

            mlflow.end_run(status="FAILED" if exc_type else "FINISHED")

    def log_params(self, config: TrainConfig, manifest: Manifest, n_train: int, n_val: int) -> None:
        if not self.enabled:
            return
        import mlflow

        from components.tracking.setup import git_commit

        mlflow.log_params({**config.to_params(), "num_classes": len(manifest.classes),
                           "classes": ",".join(manifest.classes), "train_images": n_train,
                           "val_images": n_val})
        mlflow.set_tags({"dataset_sha256": manifest.sha256, "dataset_name": manifest.name,
                         "git_commit": git_commit(), "task": "detection", "modelcommons.stage": "train"})

    def log_epoch(self, row: dict[str, float]) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def finish(self, model_dir: Path, artifacts: list[Path], final: dict[str, float]) -> str | None:
        if not self.enabled:
            return None
        import mlflow

        from components.tracking.model_logging import log_detector_model

        mlflow.log_metrics({f"final_val_{k}": v for k, v in final.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="pictures")
        info = log_detector_model(model_dir)
        mlflow.set_tag("model_uri", info)
        return info
