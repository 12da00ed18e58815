"""Training of the SAM-style segmenter: prompts from ground-truth masks, SAM's loss, checkpointed, tracked.

Every step takes ``batch_size`` images. For each instance (up to ``max_instances`` per image) it draws
two prompts: one random point inside the ground-truth mask, and the mask's box with SAM's jitter (10%
of the side, at most 20 px). The decoder returns its four mask tokens; the loss is SAM's:

- masks: ``focal_weight * focal + dice_weight * dice`` (20:1 in the paper), on logits upsampled to
  the model input. SAM's single-mask token (0) is supervised for every prompt, and of the three
  multimask tokens (1..3) only the best one gets the mask loss, so they can specialise on ambiguity;
- IoU head: mean squared error between each token's predicted IoU and its actual IoU.

``freeze_encoder`` (the fine-tune mode for the official presets) keeps the image encoder fixed and
trains the prompt encoder and mask decoder; combine it with ``init_checkpoint``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torchvision.ops import sigmoid_focal_loss
from tqdm import tqdm

from components.segment.data import SegSample, jitter_boxes, load_seg_samples, masks_to_boxes_xyxy, random_points
from components.segment.evaluate import draw_overlays, evaluate_segmenter
from components.segment.model import (
    SegmenterConfig,
    build_segmenter,
    load_sam_checkpoint,
    load_segmenter,
    save_segmenter,
    segmenter_config,
)
from components.segment.predict import decode, encode_images, input_res_logits
from components.tracking.run_tracker import RunTracker
from components.train.checkpoints import CheckpointStore
from components.train.schedule import WarmupCosine, adamw, deterministic_algorithms


class SegTrainConfigError(ValueError):
    """A segmenter training parameter is out of range; the message names it."""


@dataclass(frozen=True)
class SegTrainConfig:
    """Every knob of a segmenter training run (logged to MLflow as the recipe)."""

    preset: str = "tiny"
    img_size: int = 0  # 0: the preset's own input side (tiny 128, official 1024)
    epochs: int = 16
    batch_size: int = 8  # images per step; every instance in them yields a point and a box prompt
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0  # linear LR warm-up, then cosine decay to 5% of lr
    seed: int = 0
    freeze_encoder: bool = False  # fine-tune mode: train prompt encoder + mask decoder only
    init_checkpoint: str = ""  # official SAM checkpoint (path or s3:// URI), or a segmenter model dir
    max_instances: int = 8  # per image and step, drawn at random when an image has more
    prompts_per_instance: int = 1  # random points and jittered boxes drawn per instance and step (each)
    # SAM fine-tunes with focal:dice = 20:1. From scratch that ratio first drives every mask to background
    # (measured on shapes: dice loss still 0.94 after 100 steps, against 0.78 at 1:1), so tiny uses 1:1.
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    hflip: bool = True  # random horizontal flip of image and masks
    # Mask loss on the decoder's low-res logits against area-downsampled (soft) targets: 4x cheaper than
    # upsampling logits to the input, and the upsampled boundary still follows the soft targets.
    loss_at_input_res: bool = False
    eval_every: int = 0  # validation mIoU every N epochs (and after the last); 0: only after the last
    device: str = "cpu"

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("epochs", self.epochs >= 1, ">= 1"),
            ("batch_size", 1 <= self.batch_size <= 1024, "between 1 and 1024"),
            ("lr", 0 < self.lr <= 1, "in (0, 1]"),
            ("weight_decay", 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, "between 0 and epochs"),
            ("max_instances", self.max_instances >= 1, ">= 1"),
            ("prompts_per_instance", 1 <= self.prompts_per_instance <= 64, "between 1 and 64"),
            ("focal_weight", self.focal_weight >= 0, ">= 0"),
            ("dice_weight", self.dice_weight >= 0, ">= 0"),
            ("iou_weight", self.iou_weight >= 0, ">= 0"),
            ("eval_every", self.eval_every >= 0, ">= 0"),
            ("device", self.device == "cpu" or self.device.startswith("cuda"), "'cpu' or 'cuda[:N]'"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise SegTrainConfigError(
                    f"train parameter {name}={getattr(self, name)!r} is invalid: must be {allowed}")
        try:
            self.model_config()
        except ValueError as exc:
            raise SegTrainConfigError(f"train parameter preset/img_size: {exc}") from exc
        if self.init_checkpoint.startswith(("http://", "https://")):
            raise SegTrainConfigError(
                f"train parameter init_checkpoint={self.init_checkpoint!r}: weights are never downloaded; "
                "give a local path or an s3:// URI")

    def model_config(self) -> SegmenterConfig:
        return segmenter_config(self.preset, img_size=self.img_size or None)

    def to_params(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SegTrainResult:
    model_dir: Path
    config: SegmenterConfig
    history: list[dict[str, float]]
    metrics: dict[str, float]  # miou_point, miou_box, instances, images on the val split
    run_id: str | None = None
    model_uri: str | None = None
    resumed_from_epoch: int = 0
    artifacts: list[Path] = field(default_factory=list)


@dataclass
class LossParts:
    total: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou: torch.Tensor


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask soft dice loss: logits ...xHxW, targets same shape in {0, 1} -> ... (one value per mask)."""
    probs = logits.sigmoid().flatten(-2)
    t = targets.flatten(-2)
    return 1 - (2 * (probs * t).sum(-1) + 1) / (probs.sum(-1) + t.sum(-1) + 1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask sigmoid focal loss (alpha 0.25, gamma 2, torchvision), mean over pixels -> ..."""
    return sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none").flatten(-2).mean(-1)


def sam_loss(low_res: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, config: SegTrainConfig,
             img_size: int) -> LossParts:
    """SAM's loss for P prompts: ``low_res`` Px4xLxL logits, ``iou_pred`` Px4, ``targets`` PxSxS bool.

    Computed at L (soft targets) or, with ``loss_at_input_res``, on logits upsampled to S.

    Token 0 always gets the mask loss; among tokens 1..3 the one with the lowest mask loss does.
    Every token's IoU prediction regresses its actual IoU (of the thresholded mask, no gradient).
    """
    if config.loss_at_input_res:
        logits = input_res_logits(low_res, img_size)  # Px4xSxS
        t = targets[:, None].float().expand_as(logits)
    else:
        logits = low_res  # Px4xLxL
        t = F.interpolate(targets[:, None].float(), size=low_res.shape[-2:], mode="area").expand_as(logits)
    focal = focal_loss(logits, t)  # Px4
    dice = dice_loss(logits, t)
    per_token = config.focal_weight * focal + config.dice_weight * dice
    best = per_token[:, 1:].argmin(dim=1) + 1
    rows = torch.arange(per_token.shape[0])
    mask_loss = (per_token[:, 0] + per_token[rows, best]).mean()
    with torch.no_grad():
        pred, gt = logits > 0, t > 0.5
        inter = (pred & gt).flatten(-2).sum(-1).float()
        union = (pred | gt).flatten(-2).sum(-1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou = F.mse_loss(iou_pred, actual)
    chosen_focal = (focal[:, 0] + focal[rows, best]).mean() / 2
    chosen_dice = (dice[:, 0] + dice[rows, best]).mean() / 2
    return LossParts(total=mask_loss + config.iou_weight * iou, focal=chosen_focal.detach(),
                     dice=chosen_dice.detach(), iou=iou.detach())


def _batches(samples: list[SegSample], config: SegTrainConfig, gen: torch.Generator
             ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Yield lists of (input_image, masks, points, boxes) per image, after flip and prompt sampling.

    Every random draw comes from ``gen`` in a fixed order, so a seed fixes the whole run.
    """
    order = torch.randperm(len(samples), generator=gen).tolist()
    for start in range(0, len(order), config.batch_size):
        items = []
        for i in order[start:start + config.batch_size]:
            sample = samples[i]
            image, masks = sample.input_image, sample.input_masks
            flip = bool(torch.rand((), generator=gen) < 0.5)
            if masks.shape[0] > config.max_instances:
                keep = torch.randperm(masks.shape[0], generator=gen)[:config.max_instances]
                masks = masks[keep]
            if config.hflip and flip:
                # Flip within the valid (unpadded) width so the padding stays bottom/right.
                w = image.shape[-1]
                image = image.flip(-1)
                masks = torch.cat([masks[..., :w].flip(-1), masks[..., w:]], dim=-1)
            # k draws per instance: the decoder is cheap next to the encoder, so more prompts per
            # encoded image give the prompt-to-location attention more signal per step.
            k = config.prompts_per_instance
            tight = masks_to_boxes_xyxy(masks)
            boxes = torch.cat([jitter_boxes(tight, gen, size=(image.shape[1], image.shape[2])) for _ in range(k)])
            points = torch.cat([random_points(masks, gen) for _ in range(k)])
            items.append((image, masks.repeat(k, 1, 1), points, boxes))
        yield items


def _initial_model(config: SegTrainConfig) -> Sam:
    model_config = config.model_config()
    source = config.init_checkpoint
    if not source:
        return build_segmenter(model_config)
    if Path(source).is_dir():
        model, loaded = load_segmenter(Path(source))
        if loaded != model_config:
            raise SegTrainConfigError(
                f"train parameter init_checkpoint={source!r}: model is {loaded.preset} at {loaded.img_size} px, "
                f"but training asks for {model_config.preset} at {model_config.img_size} px")
        return model
    return load_sam_checkpoint(source, config.preset)


def train_segmenter(dataset_dir: Path, out_dir: Path, config: SegTrainConfig, *, track: bool = True,
                    run_name: str | None = None, progress: bool = True, run_key: str | None = None
                    ) -> SegTrainResult:
    """Train on the ``train`` split of a dataset artifact; write the model into ``out_dir/model``.

    Resumes from the latest checkpoint (``out_dir/checkpoint.pt``, or the ``run_key`` location of
    :class:`components.train.checkpoints.CheckpointStore`) when it was written with the same recipe.
    With ``track``, logs params, per-epoch losses and metrics, overlay pictures and the model to MLflow.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    model_config = config.model_config()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = _initial_model(config).to(device)  # first: a bad init_checkpoint fails before data loading
    manifest, train_samples = load_seg_samples(dataset_dir, "train", model_config.img_size)
    _, val_samples = load_seg_samples(dataset_dir, "val", model_config.img_size)
    if config.freeze_encoder:
        model.image_encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_samples) / config.batch_size)
    schedule = WarmupCosine(base_lr=config.lr, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                            warmup_epochs=config.warmup_epochs)
    recipe = json.dumps(config.to_params(), sort_keys=True)
    store = CheckpointStore(out_dir, run_key=run_key)
    history: list[dict[str, float]] = []
    start_epoch = 0
    run_id: str | None = None
    state = store.load()
    if state is not None:
        if state.get("config") != recipe:
            raise SegTrainConfigError(
                f"{store.location}: checkpoint was written with a different recipe; use a new output "
                "directory or the same parameters to resume")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        run_id = state["run_id"] or None

    tracker = RunTracker(track, task="segmentation", log_model=_log_segmenter_model, run_name=run_name,
                         run_id=run_id)
    # Deterministic kernels: the decoder's per-prompt embedding gather backpropagates through index_put
    # with accumulation, whose multi-threaded CPU kernel is not reproducible otherwise.
    with tracker, deterministic_algorithms():
        # img_size: the resolved input side (the recipe's 0 means the preset's own)
        tracker.log_recipe({**config.to_params(), "img_size": model_config.img_size}, manifest,
                           n_train=len(train_samples), n_val=len(val_samples), tags={"preset": config.preset},
                           config_files={"segmenter_config.json": model_config.to_dict()})
        for epoch in range(start_epoch, config.epochs):
            model.train()
            if config.freeze_encoder:
                model.image_encoder.eval()
            sums = {"loss": 0.0, "loss_focal": 0.0, "loss_dice": 0.0, "loss_iou": 0.0}
            prompts_seen = 0
            started = time.perf_counter()
            bar = tqdm(total=len(train_samples), desc=f"segmenter epoch {epoch + 1}/{config.epochs}", unit="img",
                       disable=not progress, leave=False)
            for step_in_epoch, items in enumerate(_batches(train_samples, config, gen)):
                step = epoch * steps_per_epoch + step_in_epoch
                schedule.apply(opt, step)
                if config.freeze_encoder:
                    with torch.no_grad():
                        embeddings = encode_images(model, [image for image, *_ in items])
                else:
                    embeddings = encode_images(model, [image for image, *_ in items])
                # Rows: every instance's point prompt, then its box prompt, for all images of the step.
                counts = [masks.shape[0] for _, masks, _, _ in items]
                index = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts))
                points = torch.cat([p for _, _, p, _ in items])
                boxes = torch.cat([b for _, _, _, b in items])
                targets = torch.cat([m for _, m, _, _ in items]).to(device)
                low_res, iou_pred = decode(model, embeddings, image_index=torch.cat([index, index]),
                                           points=points[:, None, :],
                                           point_labels=torch.ones((len(points), 1), dtype=torch.int64),
                                           boxes=boxes)
                parts = sam_loss(low_res, iou_pred, torch.cat([targets, targets]), config, model_config.img_size)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                prompts = 2 * len(points)
                prompts_seen += prompts
                for key, value in (("loss", parts.total), ("loss_focal", parts.focal), ("loss_dice", parts.dice),
                                   ("loss_iou", parts.iou)):
                    sums[key] += float(value.detach()) * prompts
                bar.update(len(items))
                bar.set_postfix(loss=f"{sums['loss'] / prompts_seen:.3f}")
            bar.close()
            row: dict[str, float] = {"epoch": float(epoch + 1),
                                     **{k: v / max(prompts_seen, 1) for k, v in sums.items()},
                                     "lr": opt.param_groups[0]["lr"],
                                     "epoch_time_s": time.perf_counter() - started}
            last = epoch + 1 == config.epochs
            if last or (config.eval_every and (epoch + 1) % config.eval_every == 0):
                result = evaluate_segmenter(model, val_samples)
                row.update({"val_miou_point": result.metrics["miou_point"],
                            "val_miou_box": result.metrics["miou_box"]})
            history.append(row)
            tracker.log_epoch(row)
            if progress:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
                print(f"segmenter epoch {epoch + 1}/{config.epochs}: {shown}", flush=True)
            store.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                        "history": json.dumps(history), "config": recipe, "run_id": tracker.run_id or ""})

        model.eval()
        model_dir = save_segmenter(model, model_config, out_dir / "model")
        if history and "val_miou_box" in history[-1]:
            final = {"miou_point": history[-1]["val_miou_point"], "miou_box": history[-1]["val_miou_box"]}
        else:  # resumed after the last epoch: nothing was evaluated in this call
            final = {k: v for k, v in evaluate_segmenter(model, val_samples).metrics.items()
                     if k in ("miou_point", "miou_box")}
        artifacts = _write_pictures(model, val_samples, history, out_dir)
        model_uri = tracker.finish(model_dir, artifacts, final)
    return SegTrainResult(model_dir=model_dir, config=model_config, history=history, metrics=final,
                          run_id=tracker.run_id, model_uri=model_uri, resumed_from_epoch=start_epoch,
                          artifacts=artifacts)


def _write_pictures(model: Sam, samples: list[SegSample], history: list[dict[str, float]],
                    out_dir: Path) -> list[Path]:
    from components.evaluate.visualize import plot_history

    shown = samples[:8]
    return [draw_overlays(model, shown, out_dir / "sample_overlays_box.png", kind="box"),
            draw_overlays(model, shown, out_dir / "sample_overlays_point.png", kind="point"),
            plot_history(history, out_dir / "training_curves.png")]


def _log_segmenter_model(model_dir: Path) -> str:
    from components.segment.model_logging import log_segmenter_model  # imports mlflow: only when tracking

    return log_segmenter_model(model_dir)
