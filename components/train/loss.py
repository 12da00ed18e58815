"""FCOS-style target assignment and loss for the YOLO-style detector.

A ground-truth box is assigned to the pyramid level that fits its size, and there to every cell whose
center lies inside the box and within ``radius`` strides of the box center. A cell inside several boxes
takes the smallest. Loss = sigmoid focal (classes) + GIoU (boxes, weighted by centerness) + BCE
(centerness).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from components.models.detector import Detector

# Boxes whose longer side is <= this many strides go to that level (levels overlap a little).
LEVEL_MAX_SIDE_IN_STRIDES = 6.0
LEVEL_MIN_SIDE_IN_STRIDES = 2.0


@dataclass
class LossParts:
    total: torch.Tensor
    cls: torch.Tensor
    box: torch.Tensor
    ctr: torch.Tensor
    # B detached per-image losses (focal/own positives + 2*GIoU + centerness BCE): Online Batch's ranking key
    per_image: torch.Tensor | None = None


def assign(centers: torch.Tensor, strides: torch.Tensor, boxes: torch.Tensor, *, radius: float = 1.5
           ) -> torch.Tensor:
    """Index of the assigned box per cell (N,), -1 for background.

    centers: Nx2 pixel cell centers; strides: N; boxes: Mx4 XYXY pixels.
    """
    n = centers.shape[0]
    if boxes.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long)
    cx, cy = centers[:, 0:1], centers[:, 1:2]  # (N, 1)
    x1, y1, x2, y2 = boxes.T  # each (M,)
    inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)  # (N, M)
    gcx, gcy = (x1 + x2) / 2, (y1 + y2) / 2
    r = radius * strides[:, None]
    near_center = ((cx - gcx).abs() < r) & ((cy - gcy).abs() < r)
    side = torch.maximum(x2 - x1, y2 - y1)[None, :]  # (1, M)
    smallest_level = float(strides.min())
    largest_level = float(strides.max())
    fits = ((side <= LEVEL_MAX_SIDE_IN_STRIDES * strides[:, None]) | (strides[:, None] == largest_level)) & (
        (side >= LEVEL_MIN_SIDE_IN_STRIDES * strides[:, None]) | (strides[:, None] == smallest_level))
    candidate = inside & near_center & fits
    # Boxes too small to contain a cell center on their level: take the cell nearest their center.
    empty = ~candidate.any(dim=0)
    if empty.any():
        dist = (cx - gcx) ** 2 + (cy - gcy) ** 2 + (~fits) * 1e12
        nearest = dist[:, empty].argmin(dim=0)
        candidate[nearest, empty.nonzero().squeeze(1)] = True
    area = ((x2 - x1) * (y2 - y1))[None, :].expand(n, -1)
    area = torch.where(candidate, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(dim=1)
    return torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))


def detection_loss(model: Detector, raw: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]],
                   height: int, width: int) -> LossParts:
    """raw: BxNx(5+K) from ``model(images)``; targets: per image (boxes Mx4 XYXY pixels, labels M)."""
    raw = raw.float()
    centers, strides = model.grid(height, width, raw.device)
    pred_boxes = model.decode_boxes(raw, height, width)  # (B, N, 4)
    cls_target = torch.zeros_like(raw[..., 5:])
    pos_pred, pos_gt, pos_idx = [], [], []
    for b, (boxes, labels) in enumerate(targets):
        idx = assign(centers, strides, boxes)
        pos = (idx >= 0).nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        matched = idx[pos]
        cls_target[b, pos, labels[matched]] = 1.0
        pos_pred.append(pred_boxes[b, pos])
        pos_gt.append(boxes[matched])
        pos_idx.append((torch.full_like(pos, b), pos))
    num_pos = max(sum(p.shape[0] for p in pos_pred), 1)
    focal = sigmoid_focal_loss(raw[..., 5:], cls_target, reduction="none")  # (B, N, K)
    cls_loss = focal.sum() / num_pos
    batch = raw.shape[0]
    pos_per_image = torch.zeros(batch, device=raw.device)
    for bi_, ci_ in pos_idx:
        pos_per_image[bi_[0]] = ci_.numel()
    per_image = focal.detach().sum(dim=(1, 2)) / pos_per_image.clamp(min=1)
    if not pos_pred:
        zero = raw.sum() * 0.0
        return LossParts(total=cls_loss + zero, cls=cls_loss, box=zero, ctr=zero, per_image=per_image)
    pred = torch.cat(pos_pred)
    gt = torch.cat(pos_gt)
    bi = torch.cat([p[0] for p in pos_idx])
    ci = torch.cat([p[1] for p in pos_idx])
    c = centers[ci]
    lt = c - gt[:, :2]
    rb = gt[:, 2:] - c
    ltrb = torch.cat([lt, rb], dim=1).clamp(min=1e-3)
    centerness = torch.sqrt(
        (torch.minimum(ltrb[:, 0], ltrb[:, 2]) / torch.maximum(ltrb[:, 0], ltrb[:, 2]))
        * (torch.minimum(ltrb[:, 1], ltrb[:, 3]) / torch.maximum(ltrb[:, 1], ltrb[:, 3]))
    )
    giou = generalized_box_iou_loss(pred, gt, reduction="none")
    box_loss = (giou * centerness).sum() / centerness.sum().clamp(min=1e-6)
    ctr_loss = F.binary_cross_entropy_with_logits(raw[bi, ci, 4], centerness, reduction="mean")
    total = cls_loss + 2.0 * box_loss + ctr_loss
    with torch.no_grad():  # per-image box and centerness terms, each normalised by the image's own cells
        counts = torch.zeros(batch, device=raw.device).index_add_(0, bi, torch.ones_like(centerness))
        ctr_w = torch.zeros(batch, device=raw.device).index_add_(0, bi, centerness)
        box_img = torch.zeros(batch, device=raw.device).index_add_(0, bi, giou * centerness) / ctr_w.clamp(min=1e-6)
        bce = F.binary_cross_entropy_with_logits(raw[bi, ci, 4], centerness, reduction="none")
        ctr_img = torch.zeros(batch, device=raw.device).index_add_(0, bi, bce) / counts.clamp(min=1)
        per_image = per_image + 2.0 * box_img.detach() + ctr_img.detach()
    return LossParts(total=total, cls=cls_loss.detach(), box=box_loss.detach(), ctr=ctr_loss.detach(),
                     per_image=per_image)


# Up to this many classes the predicted label is the detected class set (k = 2**K labels); beyond it,
# the top class (k = K + 1), so label ids stay small and meaningful.
MAX_CLASS_SET_CLASSES = 10


def feedback_label_count(num_classes: int) -> int:
    """k, the number of distinct predicted labels :func:`image_feedback` can return."""
    return 2**num_classes if num_classes <= MAX_CLASS_SET_CLASSES else num_classes + 1


def image_feedback(raw: torch.Tensor, targets: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                   *, score_threshold: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image "predicted label" and true-label probability for adaptive batch selection.

    raw: BxNx(5+K) from the training forward pass; targets as in :func:`detection_loss`.
    The image-level score of class c is the highest detection score ``sqrt(sigmoid(cls_c) *
    sigmoid(ctr))`` over all cells (the score :meth:`Detector.postprocess` thresholds). The predicted
    label is the *class set* ``{c : score_c > score_threshold}`` encoded as a bitmask (an id in
    ``[0, 2**K)``, so k = 2**K labels) for K <= 10 classes; for more classes it is ``1 + argmax_c
    score_c``, or 0 when no class passes the threshold (k = K + 1). The true-label probability is the
    mean over classes of ``score_c`` for classes present in the image and ``1 - score_c`` for absent ones.
    Returns ``(predicted B int64, true_prob B float)`` on CPU.
    """
    with torch.no_grad():
        raw = raw.detach().float()
        scores = torch.sqrt(raw[..., 5:].sigmoid() * raw[..., 4:5].sigmoid()).amax(dim=1)  # (B, K)
        detected = scores > score_threshold
        if num_classes <= MAX_CLASS_SET_CLASSES:
            bits = 2 ** torch.arange(num_classes, device=raw.device)
            predicted = (detected.long() * bits).sum(dim=1)
        else:
            top, top_class = scores.max(dim=1)
            predicted = torch.where(top > score_threshold, top_class + 1, torch.zeros_like(top_class))
        present = torch.zeros_like(scores)
        for b, (_, labels) in enumerate(targets):
            if labels.numel():
                present[b, labels.long()] = 1.0
        true_prob = (present * scores + (1 - present) * (1 - scores)).mean(dim=1)
    return predicted.cpu(), true_prob.cpu()
