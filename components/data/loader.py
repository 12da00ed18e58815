"""Load a split of a canonical dataset artifact into memory as model-ready tensors."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torchvision.io import ImageReadMode, decode_image

from components.data.format import IMAGES_DIR, DatasetError, Manifest, read_coco, read_manifest
from components.models.preprocess import Letterbox, letterbox


@dataclass
class Sample:
    """One image ready for the detector."""

    image_id: int
    file_name: str
    image: torch.Tensor  # 3 x S x S float in [0, 1], letterboxed
    boxes: torch.Tensor  # N x 4 XYXY in model-input pixels
    labels: torch.Tensor  # N int64, 0-based class index
    letterbox: Letterbox


def load_samples(root: Path, split: Literal["train", "val", "all"], img_size: int) -> tuple[Manifest, list[Sample]]:
    """Read ``split`` of the dataset artifact at ``root``; images letterboxed to ``img_size``."""
    root = Path(root)
    manifest = read_manifest(root)
    coco = read_coco(root)
    wanted = set(manifest.split.train + manifest.split.val if split == "all" else getattr(manifest.split, split))
    anns: dict[int, list[dict]] = defaultdict(list)
    for ann in coco.get("annotations", []):
        anns[int(ann["image_id"])].append(ann)
    num_classes = len(manifest.classes)
    samples: list[Sample] = []
    for info in sorted(coco["images"], key=lambda i: int(i["id"])):
        image_id = int(info["id"])
        if image_id not in wanted:
            continue
        path = root / IMAGES_DIR / Path(info["file_name"]).name
        try:
            raw = decode_image(str(path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as exc:
            raise DatasetError(f"{path}: cannot decode image listed in annotations.json: {exc}") from exc
        image, lb = letterbox(raw, img_size)
        xywh = [a["bbox"] for a in anns[image_id]]
        boxes = torch.tensor(xywh, dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([int(a["category_id"]) - 1 for a in anns[image_id]], dtype=torch.int64)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(
                f"{root / 'annotations.json'}: image {image_id} has a category_id outside 1..{num_classes}")
        samples.append(Sample(image_id=image_id, file_name=str(info["file_name"]), image=image,
                              boxes=lb.boxes_to_model(boxes), labels=labels, letterbox=lb))
    if not samples:
        raise DatasetError(f"{root}: split {split!r} has no images")
    return manifest, samples
