"""Training loop for the YOLO-style detector: deterministic on CPU, checkpointed, tracked in MLflow."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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
from components.tracking.run_tracker import RunTracker
from components.train.checkpoints import CHECKPOINT_FILE, CheckpointStore
from components.train.loss import detection_loss, feedback_label_count, image_feedback
from components.train.samplers import (
    BatchSelector,
    Feedback,
    SamplerConfigError,
    build_sampler,
    validate_sampler_params,
)
from components.train.schedule import WarmupCosine, adamw, deterministic_algorithms

__all__ = ["CHECKPOINT_FILE", "TrainConfig", "TrainConfigError", "TrainResult", "train_detector"]


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
    fp16: bool = False  # float16 autocast + GradScaler (CUDA only: fp16 on CPU is slow and underflows)
    hflip: bool = True  # random horizontal flip, drawn from the seeded generator
    eval_every: int = 10  # validation mAP every N epochs (and after the last)
    device: str = "cpu"
    # Mini-batch selection (components/train/samplers.py): uniform, recency_bias, online_batch, active_bias.
    sampler: str = "uniform"
    sampler_q: int = 10  # history window (recency_bias, active_bias); paper default
    sampler_s_e0: float = 100.0  # initial selection pressure (recency_bias, online_batch); paper default
    sampler_warmup_epochs: int | None = None  # uniform epochs first; None: min(15, round(0.15 * epochs))

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
            ("fp16", not self.fp16 or (self.device.startswith("cuda") and not self.bf16),
             "false on CPU (use bf16) and not combined with bf16"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise TrainConfigError(f"train parameter {name}={getattr(self, name)!r} is invalid: must be {allowed}")
        try:
            validate_sampler_params(self.sampler, q=self.sampler_q, s_e0=self.sampler_s_e0,
                                    warmup_epochs=self.sampler_warmup_epochs, epochs=self.epochs)
        except SamplerConfigError as exc:
            # name the TrainConfig field (sampler_q, sampler_s_e0, ...) the user actually set
            message = str(exc).replace("sampler parameter ", "train parameter sampler_")
            raise TrainConfigError(message.replace("unknown sampler", "train parameter sampler: unknown sampler")
                                   ) from exc
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


Gather = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass
class _Loop:
    """Everything one epoch of training needs; shared by the single-process and the Ray Train workers.

    ``rank``/``world`` shard every selected batch (rank r trains on ``batch[r::world]``); ``gather``
    all-gathers per-sample feedback so every rank's sampler sees the whole batch and stays identical.
    """

    model: torch.nn.Module  # the Detector, or a DDP wrapper around it
    detector: Detector
    opt: torch.optim.Optimizer
    sampler: BatchSelector
    samples: list[Sample]
    images: torch.Tensor  # Nx3xSxS
    config: TrainConfig
    gen: torch.Generator
    device: torch.device
    scaler: torch.amp.GradScaler
    rank: int = 0
    world: int = 1
    gather: Gather | None = None
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def _batch(self, idx: list[int], flips: torch.Tensor
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        size = self.config.img_size
        batch = self.images[idx].clone()
        targets = []
        for j, i in enumerate(idx):
            boxes = self.samples[i].boxes.clone()
            if self.config.hflip and bool(flips[i]):
                batch[j] = batch[j].flip(-1)
                boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], dim=1)
            targets.append((boxes, self.samples[i].labels))
        return batch, targets

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.config.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.config.fp16:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return nullcontext()

    def run_epoch(self, epoch: int, *, progress: bool) -> dict[str, float]:
        config = self.config
        self.model.train()
        self.sampler.set_epoch(epoch)
        schedule = WarmupCosine(base_lr=config.lr, steps_per_epoch=self.steps_per_epoch, epochs=config.epochs,
                                warmup_epochs=config.warmup_epochs)
        height = width = config.img_size
        num_classes = self.detector.config.num_classes
        sums = torch.zeros(5, dtype=torch.float64)  # loss, cls, box, ctr (each x n), n
        sampling_s = 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        flips = torch.rand(len(self.samples), generator=self.gen) < 0.5
        bar = tqdm(total=len(self.samples), desc=f"epoch {epoch + 1}/{config.epochs}", unit="img",
                   disable=not progress or self.rank != 0, leave=False)
        batches = iter(self.sampler)
        for step_in_epoch in range(self.steps_per_epoch):
            t0 = time.perf_counter()
            idx = next(batches)
            sampling_s += time.perf_counter() - t0
            # Tiny last batches (fewer samples than workers) run whole on every rank; rank 0 reports them.
            shard = idx[self.rank::self.world] if len(idx) >= self.world else idx
            step = epoch * self.steps_per_epoch + step_in_epoch
            schedule.apply(self.opt, step)
            batch, targets = self._batch(shard, flips)
            with self._autocast():
                raw = self.model(batch.to(self.device))
            dev_targets = [(b.to(self.device), lab.to(self.device)) for b, lab in targets]
            parts = detection_loss(self.detector, raw, dev_targets, height, width)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(parts.total).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.scaler.step(self.opt)
            self.scaler.update()
            t0 = time.perf_counter()
            predicted, true_prob = image_feedback(raw, dev_targets, num_classes)
            assert parts.per_image is not None
            local = torch.stack([torch.tensor(shard, dtype=torch.float64), predicted.double(),
                                 true_prob.double(), parts.per_image.detach().double().cpu()], dim=1)
            if self.gather is not None:
                sizes = ([len(idx[r::self.world]) for r in range(self.world)] if len(idx) >= self.world
                         else [len(idx)] + [0] * (self.world - 1))
                mine = local if sizes[self.rank] else local[:0]
                local = self.gather(mine, sizes)
            self.sampler.observe(Feedback(indices=local[:, 0].long(), predicted=local[:, 1].long(),
                                          true_prob=local[:, 2].float(), loss=local[:, 3].float()))
            sampling_s += time.perf_counter() - t0
            n = len(shard) if (len(idx) >= self.world or self.rank == 0) else 0
            sums += torch.tensor([float(parts.total.detach()) * n, float(parts.cls) * n, float(parts.box) * n,
                                  float(parts.ctr) * n, n], dtype=torch.float64)
            bar.update(len(idx))
            bar.set_postfix(loss=f"{float(sums[0] / max(float(sums[4]), 1)):.3f}")
        bar.close()
        if self.all_reduce is not None:
            sums = self.all_reduce(sums)
        seen = max(float(sums[4]), 1.0)
        return {"epoch": float(epoch + 1), "loss": float(sums[0]) / seen, "loss_cls": float(sums[1]) / seen,
                "loss_box": float(sums[2]) / seen, "loss_ctr": float(sums[3]) / seen,
                "lr": self.opt.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - started,
                "epoch_cpu_s": time.process_time() - cpu_started, "sampling_time_s": sampling_s}

    def checkpoint_state(self, epoch: int, history: list[dict[str, float]], run_id: str | None) -> dict[str, Any]:
        return {
            "model": self.detector.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
            "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "sampler": self.sampler.state_dict(), "scaler": self.scaler.state_dict(),
            "history": json.dumps(history), "config": _recipe(self.config), "run_id": run_id or "",
        }

    def restore(self, state: dict[str, Any]) -> tuple[int, list[dict[str, float]], str | None]:
        self.detector.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.sampler.load_state_dict(state.get("sampler", {}))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return int(state["epoch"]), json.loads(state["history"]), (state["run_id"] or None)


def _recipe(config: TrainConfig) -> str:
    # The device does not change the recipe: a run checkpointed on one device may resume on another.
    return json.dumps({k: v for k, v in config.to_params().items() if k != "device"}, sort_keys=True)


def check_checkpoint(state: dict[str, Any] | None, config: TrainConfig, location: str) -> dict[str, Any] | None:
    """``state`` if it was written with ``config``'s recipe; TrainConfigError otherwise."""
    if state is not None and state.get("config") != _recipe(config):
        raise TrainConfigError(
            f"{location}: checkpoint was written with a different recipe; use a new output directory "
            "(or run key) or the same parameters to resume"
        )
    return state


def build_loop(train_samples: list[Sample], manifest: Manifest, config: TrainConfig, device: torch.device,
               *, wrap: Callable[[Detector], torch.nn.Module] | None = None, rank: int = 0, world: int = 1,
               gather: Gather | None = None, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
               ) -> _Loop:
    """Seeded model, optimiser, sampler and data for a run (``wrap`` e.g. puts the model in DDP)."""
    model_config = detector_config(config.preset, num_classes=len(manifest.classes),
                                   class_names=tuple(manifest.classes), img_size=config.img_size)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    detector = build_detector(model_config).to(device)
    opt = adamw(detector.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # k for recency bias: how many distinct labels loss.image_feedback can give (class sets for K <= 10)
    sampler = build_sampler(config.sampler, num_samples=len(train_samples), batch_size=config.batch_size,
                            epochs=config.epochs, num_labels=feedback_label_count(len(manifest.classes)),
                            generator=gen,
                            q=config.sampler_q, s_e0=config.sampler_s_e0,
                            warmup_epochs=config.sampler_warmup_epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=config.fp16 and device.type == "cuda")
    model = wrap(detector) if wrap is not None else detector
    return _Loop(model=model, detector=detector, opt=opt, sampler=sampler, samples=train_samples,
                 images=torch.stack([s.image for s in train_samples]), config=config, gen=gen, device=device,
                 scaler=scaler, rank=rank, world=world, gather=gather, all_reduce=all_reduce)


def train_detector(dataset_dir: Path, out_dir: Path, config: TrainConfig, *, track: bool = True,
                   run_name: str | None = None, progress: bool = True, run_key: str | None = None,
                   parent_run_id: str | None = None,
                   on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train on the ``train`` split of a dataset artifact; write the model into ``out_dir/model``.

    A checkpoint is written after every epoch (see :mod:`components.train.checkpoints`): in
    ``out_dir`` by default, or in the artifact store under ``run_key`` (the run identity), and a rerun
    with the same recipe resumes there. With ``track``, logs params, per-epoch losses and metrics,
    sample predictions, curves and the model to MLflow (the resumed run continues the same MLflow run).
    ``parent_run_id`` nests the MLflow run under that (running) run, e.g. a sweep's.
    ``on_epoch_end`` receives each epoch's history row (e.g. to report to Ray Tune).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    manifest, train_samples = load_samples(dataset_dir, "train", config.img_size)
    _, val_samples = load_samples(dataset_dir, "val", config.img_size)
    loop = build_loop(train_samples, manifest, config, device)
    store = CheckpointStore(out_dir, run_key=run_key)
    history: list[dict[str, float]] = []
    start_epoch = 0
    run_id: str | None = None
    state = check_checkpoint(store.load(), config, store.location)
    if state is not None:
        start_epoch, history, run_id = loop.restore(state)

    tracker = _Tracker(track, run_name=run_name, run_id=run_id, parent_run_id=parent_run_id)
    model = loop.detector
    with tracker, deterministic_algorithms():
        tracker.log_params(config, manifest, len(train_samples), len(val_samples))
        for epoch in range(start_epoch, config.epochs):
            row = loop.run_epoch(epoch, progress=progress)
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                result = evaluate_detector(model, dataset_dir, val_samples, latency=False)
                row.update({"val_map": result.metrics["map"], "val_map50": result.metrics["map50"]})
            history.append(row)
            tracker.log_epoch(row)
            if progress:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
                print(f"epoch {epoch + 1}/{config.epochs}: {shown}", flush=True)
            store.save(loop.checkpoint_state(epoch + 1, history, tracker.run_id))
            if on_epoch_end is not None:
                on_epoch_end(row)

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


def _log_detector_model(model_dir: Path) -> str:
    from components.tracking.model_logging import log_detector_model  # imports mlflow: only when tracking

    return log_detector_model(model_dir)


class _Tracker(RunTracker):
    """The detector's :class:`RunTracker` (also used by :mod:`components.train.distributed`)."""

    def __init__(self, enabled: bool, *, run_name: str | None, run_id: str | None,
                 parent_run_id: str | None = None) -> None:
        super().__init__(enabled, task="detection", log_model=_log_detector_model, run_name=run_name,
                         run_id=run_id, parent_run_id=parent_run_id)

    def log_params(self, config: TrainConfig, manifest: Manifest, n_train: int, n_val: int) -> None:
        self.log_recipe({**config.to_params(), "num_classes": len(manifest.classes)}, manifest,
                        n_train=n_train, n_val=n_val)
