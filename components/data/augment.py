"""Offline augmentation: rotate, blur, flip and flop, so one image becomes five.

Names follow ImageMagick: ``flip`` mirrors top-bottom (vertical), ``flop`` mirrors left-right
(horizontal). ``rotate`` turns the image by a seeded angle of 5..15 degrees either way about its
centre (same canvas, corners filled black); ``blur`` is a Gaussian blur (kernel 5, sigma 1.5).

Images, boxes and masks go through ``torchvision.transforms.v2`` together as ``tv_tensors``. With
instance masks, boxes are recomputed from the transformed masks (``torchvision.ops.masks_to_boxes``),
so a rotated object keeps a tight box; without masks a rotated box is the enclosing box of the
rotated corners. An instance that leaves the canvas is dropped and reported in ``dropped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as tvf

AUGMENTATIONS: tuple[str, ...] = ("rotate", "blur", "flip", "flop")
ROTATE_MIN_DEGREES = 5.0  # smaller angles barely change the image
ROTATE_MAX_DEGREES = 15.0
BLUR_KERNEL = 5
BLUR_SIGMA = 1.5


@dataclass
class AugmentedImage:
    """One augmented copy.

    ``boxes`` are COCO [x, y, w, h] in pixels, ``labels`` carried over from the input, ``masks`` an
    (N, H, W) bool array when masks were given, ``kept[i]`` the input index of output instance ``i``,
    ``dropped`` the input indices that left the image.
    """

    op: str
    image: Image.Image
    boxes: list[tuple[float, float, float, float]]
    labels: list[int]
    masks: np.ndarray | None
    kept: list[int]
    dropped: list[int]


def rotation_angle(seed: int) -> float:
    """The rotation (degrees, counter-clockwise) used for ``seed``: 5..15 in magnitude, either sign."""
    rng = np.random.default_rng(seed)
    magnitude = float(rng.uniform(ROTATE_MIN_DEGREES, ROTATE_MAX_DEGREES))
    return magnitude if rng.random() < 0.5 else -magnitude


def build_transform(op: str, *, angle: float = ROTATE_MAX_DEGREES) -> v2.Transform:
    """The torchvision v2 transform behind ``op`` (one of :data:`AUGMENTATIONS`)."""
    if op == "rotate":
        return v2.RandomRotation(
            degrees=(angle, angle),
            interpolation=v2.InterpolationMode.BILINEAR,  # masks are always resampled NEAREST by v2
            fill={tv_tensors.Image: 0, tv_tensors.Mask: 0},
        )
    if op == "blur":
        return v2.GaussianBlur(kernel_size=BLUR_KERNEL, sigma=BLUR_SIGMA)
    if op == "flip":
        return v2.RandomVerticalFlip(p=1.0)
    if op == "flop":
        return v2.RandomHorizontalFlip(p=1.0)
    raise ValueError(f"unknown augmentation {op!r}; allowed: {list(AUGMENTATIONS)}")


def augment_image(
    image: Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    masks: np.ndarray | None = None,
    *,
    seed: int = 0,
    ops: Sequence[str] = AUGMENTATIONS,
) -> list[AugmentedImage]:
    """Apply each of ``ops`` to ``image`` separately; returns one :class:`AugmentedImage` per op.

    ``boxes`` are COCO [x, y, w, h] pixels, ``masks`` an optional (N, H, W) bool/uint8 array aligned
    with ``boxes``. ``seed`` fixes the rotation angle (see :func:`rotation_angle`).
    """
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    rgb = image.convert("RGB")
    width, height = rgb.size
    if masks is not None and tuple(masks.shape) != (len(boxes), height, width):
        raise ValueError(f"masks shape {tuple(masks.shape)} != (N={len(boxes)}, H={height}, W={width})")

    sample: dict[str, Any] = {
        "image": tv_tensors.Image(tvf.pil_to_tensor(rgb)),  # (3, H, W) uint8
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32).reshape(-1, 4),
            format="XYXY",
            canvas_size=(height, width),
        ),
    }
    if masks is not None:
        sample["masks"] = tv_tensors.Mask(torch.from_numpy(np.asarray(masks, dtype=np.uint8)))
    angle = rotation_angle(seed)
    return [_apply(op, build_transform(op, angle=angle), sample, list(labels)) for op in ops]


def _apply(op: str, transform: v2.Transform, sample: dict[str, Any], labels: list[int]) -> AugmentedImage:
    out = transform(sample)
    pixels = out["image"]
    if "masks" in out:
        masks = out["masks"].bool()  # (N, H, W)
        present = masks.flatten(1).any(dim=1) if len(masks) else torch.zeros(0, dtype=torch.bool)
        kept = [int(i) for i in torch.nonzero(present).flatten()]
        xyxy = masks_to_boxes(masks[present]) if kept else torch.zeros(0, 4)
        # masks_to_boxes gives inclusive pixel indices; COCO boxes span pixel edges, hence +1.
        xywh = [(x1, y1, x2 - x1 + 1, y2 - y1 + 1) for x1, y1, x2, y2 in xyxy.tolist()]
        out_masks: np.ndarray | None = masks[present].numpy()
    else:
        clamped = v2.ClampBoundingBoxes()(out["boxes"])
        present = ((clamped[:, 2] - clamped[:, 0]) >= 1) & ((clamped[:, 3] - clamped[:, 1]) >= 1)
        kept = [int(i) for i in torch.nonzero(present).flatten()]
        xywh = [(x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in clamped[present].tolist()]
        out_masks = None
    return AugmentedImage(
        op=op,
        image=tvf.to_pil_image(pixels),
        boxes=[tuple(float(v) for v in box) for box in xywh],  # type: ignore[misc]
        labels=[labels[i] for i in kept],
        masks=out_masks,
        kept=kept,
        dropped=[i for i in range(len(labels)) if i not in set(kept)],
    )
