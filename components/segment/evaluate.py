"""Evaluation of a promptable segmenter: mIoU for single-point prompts and for box prompts.

For every ground-truth instance of the split the model gets two independent prompts:

- ``point``: one foreground point, the instance's most interior pixel (as in the SAM paper's
  single-point evaluation); SAM's multimask output, keeping the mask with the highest predicted IoU;
- ``box``: the instance's tight box; SAM's single-mask output.

The predicted mask (logits upscaled to the original image, threshold 0) is compared with the
ground-truth mask at the original resolution. ``miou_point``/``miou_box`` are the means over instances.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from segment_anything.modeling import Sam

from components.segment.data import SegSample, center_points, load_seg_samples
from components.segment.predict import decode, encode_images, pick_masks, upscale_logits

# (sample, points Nx2 XY, boxes Nx4 XYXY; model-input pixels) -> (point masks, box masks), each NxHxW bool
MaskPredictor = Callable[[SegSample, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SegEvalResult:
    metrics: dict[str, float]  # miou_point, miou_box, instances, images
    iou_point: list[float] = field(default_factory=list)  # per instance, in sample order
    iou_box: list[float] = field(default_factory=list)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks NxHxW vs NxHxW -> N floats; two empty masks count as IoU 1."""
    pred, target = pred.flatten(1).bool(), target.flatten(1).bool()
    inter = (pred & target).sum(dim=1).float()
    union = (pred | target).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def sam_mask_predictor(model: Sam) -> MaskPredictor:
    """A :data:`MaskPredictor` running ``model`` (eval mode, no gradients) on one image at a time."""
    def predict(sample: SegSample, points: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            embedding = encode_images(model, [sample.input_image])
            n = points.shape[0]
            low_res, iou = decode(model, embedding, points=points[:, None, :],
                                  point_labels=torch.ones((n, 1), dtype=torch.int64), boxes=boxes)
            point_logits, _ = pick_masks(low_res[:n], iou[:n], multimask=True)
            box_logits, _ = pick_masks(low_res[n:], iou[n:], multimask=False)
            both = upscale_logits(model, torch.cat([point_logits, box_logits]), sample.input_size,
                                  sample.original_size) > model.mask_threshold
        return both[:n].cpu(), both[n:].cpu()

    return predict


def evaluate_prompts(samples: Sequence[SegSample], predict: MaskPredictor) -> SegEvalResult:
    """mIoU of ``predict`` over every instance of ``samples`` (see the module docstring for the prompts)."""
    iou_point: list[float] = []
    iou_box: list[float] = []
    for sample in samples:
        points = center_points(sample.input_masks)
        point_masks, box_masks = predict(sample, points, sample.boxes)
        for name, masks in (("point", point_masks), ("box", box_masks)):
            if masks.shape != sample.masks.shape:
                raise ValueError(f"{name} masks for image {sample.image_id} have shape {tuple(masks.shape)}, "
                                 f"expected {tuple(sample.masks.shape)}")
        iou_point += mask_iou(point_masks, sample.masks).tolist()
        iou_box += mask_iou(box_masks, sample.masks).tolist()
    count = max(len(iou_box), 1)
    metrics = {"miou_point": sum(iou_point) / count, "miou_box": sum(iou_box) / count,
               "instances": float(len(iou_box)), "images": float(len(samples))}
    return SegEvalResult(metrics=metrics, iou_point=iou_point, iou_box=iou_box)


def evaluate_segmenter(model: Sam, samples: Sequence[SegSample]) -> SegEvalResult:
    """mIoU of a ``Sam`` model; restores its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        return evaluate_prompts(samples, sam_mask_predictor(model))
    finally:
        model.train(was_training)


def draw_overlays(model: Sam, samples: Sequence[SegSample], path: Path, *, kind: Literal["point", "box"] = "box",
                  nrow: int = 4) -> Path:
    """A PNG grid: each sample with its predicted masks blended in, prompts drawn (points or boxes).

    Ground-truth outlines are not drawn; the picture shows what the model answers to the prompts.
    """
    from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

    from components.evaluate.visualize import PALETTE, save_grid

    predict = sam_mask_predictor(model)
    was_training = model.training
    model.eval()
    tiles: list[torch.Tensor] = []
    try:
        for sample in samples:
            points = center_points(sample.input_masks)
            point_masks, box_masks = predict(sample, points, sample.boxes)
            masks = point_masks if kind == "point" else box_masks
            colors = [PALETTE[i % len(PALETTE)] for i in range(masks.shape[0])]
            tile = draw_segmentation_masks(sample.image, masks, alpha=0.5, colors=colors)
            # Prompts were given in model-input pixels; draw them on the original image.
            scale_y = sample.original_size[0] / sample.input_size[0]
            scale_x = sample.original_size[1] / sample.input_size[1]
            scale = torch.tensor([scale_x, scale_y])
            if kind == "point":
                tile = draw_keypoints(tile, (points * scale)[None], colors="white", radius=2)
            else:
                tile = draw_bounding_boxes(tile, sample.boxes * scale.repeat(2), colors="white", width=1)
            tiles.append(tile)
    finally:
        model.train(was_training)
    same = [t for t in tiles if t.shape == tiles[0].shape]  # make_grid needs one size
    return save_grid(same, path, nrow=nrow)


def run_segmenter_evaluation(model_dir: Path, dataset_dir: Path, out_dir: Path, *, run_id: str | None = None,
                             split: str = "val") -> dict[str, float]:
    """Evaluate the segmenter in ``model_dir`` on ``split``; write ``metrics.json`` and overlay PNGs.

    With ``run_id`` the metrics are logged to that MLflow run as ``eval_*`` and the files under
    ``evaluation/``. Returns ``{"miou_point", "miou_box", "instances", "images"}``.
    """
    from components.segment.model import load_segmenter
    from components.tracking.resolve import find_model_dir

    if split not in ("train", "val", "all"):
        raise ValueError(f"split {split!r} unknown; allowed: train, val, all")
    model, config = load_segmenter(find_model_dir(Path(model_dir)))
    _, samples = load_seg_samples(Path(dataset_dir), split, config.img_size)  # type: ignore[arg-type]
    result = evaluate_segmenter(model, samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    pictures = [draw_overlays(model, samples[:8], out_dir / "eval_overlays_box.png", kind="box"),
                draw_overlays(model, samples[:8], out_dir / "eval_overlays_point.png", kind="point")]
    if run_id:
        import mlflow

        from components.tracking.setup import configure_mlflow

        configure_mlflow()
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"eval_{k}": v for k, v in result.metrics.items()})
            for path in (metrics_path, *pictures):
                mlflow.log_artifact(str(path), artifact_path="evaluation")
    return result.metrics
