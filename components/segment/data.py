"""Instance masks of a dataset artifact, resized for a segmenter, and the prompts sampled from them.

Images go through ``segment_anything``'s own ``ResizeLongestSide`` (longest side -> ``img_size``), the
same transform ``SamPredictor`` applies at serving time, so training and serving see the same pixels.

Coordinates: points are XY and boxes XYXY, in pixels of the resized (model-input) image. A box is the
COCO box of its mask, ``[min_col, min_row, max_col + 1, max_row + 1]``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.utils.transforms import ResizeLongestSide

from components.data.format import IMAGES_DIR, DatasetError, Manifest, read_coco, read_manifest


@dataclass
class SegSample:
    """One image with its instance masks, ready for a segmenter with input side ``img_size``."""

    image_id: int
    file_name: str
    image: torch.Tensor  # 3xHxW uint8, the original pixels (for pictures)
    input_image: torch.Tensor  # 3xhxw float in [0, 255], resized so max(h, w) == img_size (not padded)
    masks: torch.Tensor  # NxHxW bool, original resolution (what IoU is measured on)
    input_masks: torch.Tensor  # NxSxS bool, model-input resolution, zero-padded to S = img_size
    boxes: torch.Tensor  # Nx4 float XYXY, model-input pixels (tight boxes of input_masks)
    labels: torch.Tensor  # N int64, 0-based class index

    @property
    def original_size(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.input_image.shape[1]), int(self.input_image.shape[2])


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> HxW uint8 {0, 1} via pycocotools."""
    if isinstance(segmentation, list):  # polygons
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        rle = {"size": segmentation["size"], "counts": segmentation["counts"]}
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"segmentation of type {type(segmentation).__name__} is not polygons or RLE")
    decoded = mask_utils.decode(rle)
    return np.asarray(decoded, dtype=np.uint8).reshape(height, width)


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """NxHxW bool -> Nx4 float XYXY with exclusive right/bottom edges (COCO ``x + w``); empty -> zeros."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, mask in enumerate(masks):
        rows = torch.nonzero(mask.any(dim=1)).flatten()
        cols = torch.nonzero(mask.any(dim=0)).flatten()
        if rows.numel():
            boxes[i] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
    return boxes


def load_seg_samples(root: Path, split: Literal["train", "val", "all"], img_size: int
                     ) -> tuple[Manifest, list[SegSample]]:
    """Read ``split`` of the dataset artifact at ``root`` with every annotation's mask decoded.

    Annotations without ``segmentation`` are skipped (they cannot supervise a mask); images left with
    no mask are dropped. Raises :class:`DatasetError` naming the file when nothing usable remains.
    """
    root = Path(root)
    manifest = read_manifest(root)
    coco = read_coco(root)
    wanted = set(manifest.split.train + manifest.split.val if split == "all" else getattr(manifest.split, split))
    anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        if ann.get("segmentation"):
            anns[int(ann["image_id"])].append(ann)
    resize = ResizeLongestSide(img_size)
    samples: list[SegSample] = []
    for info in sorted(coco["images"], key=lambda i: int(i["id"])):
        image_id = int(info["id"])
        if image_id not in wanted or not anns[image_id]:
            continue
        path = root / IMAGES_DIR / Path(info["file_name"]).name
        try:
            with Image.open(path) as img:
                pixels = np.array(img.convert("RGB"))  # a writable copy
        except OSError as exc:
            raise DatasetError(f"{path}: cannot decode image listed in annotations.json: {exc}") from exc
        height, width = pixels.shape[:2]
        try:
            masks_np = np.stack([decode_segmentation(a["segmentation"], height, width) for a in anns[image_id]])
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{root / 'annotations.json'}: image {image_id}: bad segmentation: {exc}") from exc
        masks = torch.from_numpy(masks_np).bool()
        resized = resize.apply_image(pixels)  # hxwx3 uint8, PIL bilinear as SamPredictor does
        h, w = resized.shape[:2]
        # Masks follow the image through the same size change; bilinear + 0.5 keeps thin parts fair.
        small = F.interpolate(masks[None].float(), size=(h, w), mode="bilinear", align_corners=False)[0] > 0.5
        input_masks = torch.zeros((masks.shape[0], img_size, img_size), dtype=torch.bool)
        input_masks[:, :h, :w] = small
        keep = input_masks.flatten(1).any(dim=1)  # an instance smaller than a pixel after resizing
        labels = torch.tensor([int(a["category_id"]) - 1 for a in anns[image_id]], dtype=torch.int64)
        if not bool(keep.any()):
            continue
        samples.append(SegSample(
            image_id=image_id, file_name=str(info["file_name"]),
            image=torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
            input_image=torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float(),
            masks=masks[keep], input_masks=input_masks[keep], boxes=masks_to_boxes_xyxy(input_masks[keep]),
            labels=labels[keep]))
    if not samples:
        raise DatasetError(f"{root}: split {split!r} has no image with a segmentation mask "
                           "(the segmenter needs COCO 'segmentation' polygons or RLE)")
    return manifest, samples


def random_points(masks: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One uniformly random pixel inside each mask: NxSxS bool -> Nx2 float XY (pixel coordinates)."""
    points = torch.zeros((masks.shape[0], 2), dtype=torch.float32)
    for i, mask in enumerate(masks):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        j = int(torch.randint(len(ys), (1,), generator=gen))
        points[i, 0], points[i, 1] = xs[j], ys[j]
    return points


def center_points(masks: torch.Tensor) -> torch.Tensor:
    """The most interior pixel of each mask (deterministic evaluation prompt): NxHxW bool -> Nx2 XY.

    Erodes with a 3x3 min-pool until the next step would empty the mask (the pixels farthest from the
    boundary in chessboard distance), then takes the one nearest their centroid. As in the SAM paper's
    evaluation, the first point sits far from the object boundary.
    """
    points = torch.zeros((masks.shape[0], 2), dtype=torch.float32)
    for i, mask in enumerate(masks):
        core = mask.float()[None, None]
        while True:
            eroded = -F.max_pool2d(-core, 3, stride=1, padding=1)
            if not bool(eroded.any()):
                break
            core = eroded
        ys, xs = torch.nonzero(core[0, 0] > 0, as_tuple=True)
        cy, cx = ys.float().mean(), xs.float().mean()
        j = int(torch.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        points[i, 0], points[i, 1] = xs[j], ys[j]
    return points


def jitter_boxes(boxes: torch.Tensor, gen: torch.Generator, *, size: tuple[int, int],
                 scale: float = 0.1, max_px: float = 20.0) -> torch.Tensor:
    """Move each XYXY edge by N(0, scale * side), at most ``max_px`` pixels, clipped to ``size`` (h, w).

    SAM's training recipe (noise of 10% of the box side, up to 20 px).
    """
    if not len(boxes):
        return boxes.clone()
    sides = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]] * 2, dim=1)
    noise = (torch.randn(boxes.shape, generator=gen) * scale * sides).clamp(-max_px, max_px)
    out = boxes + noise
    h, w = size
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    # Keep at least one pixel of width and height, so a box never collapses.
    out[:, 2] = torch.maximum(out[:, 2], out[:, 0] + 1)
    out[:, 3] = torch.maximum(out[:, 3], out[:, 1] + 1)
    return out
