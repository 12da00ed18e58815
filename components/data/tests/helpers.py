"""Builders for hand-made test sources (COCO edits and YOLO folders)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml


def load_coco(root: Path) -> dict[str, Any]:
    return json.loads((root / "annotations.json").read_text())


def save_coco(root: Path, coco: dict[str, Any]) -> None:
    (root / "annotations.json").write_text(json.dumps(coco))


def coco_to_yolo(coco_root: Path, yolo_root: Path, *, names_in: str = "classes.txt") -> Path:
    """Write a YOLO source (images/, labels/*.txt, classes.txt or data.yaml) from a COCO source."""
    coco = load_coco(coco_root)
    (yolo_root / "images").mkdir(parents=True)
    (yolo_root / "labels").mkdir()
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    if names_in == "classes.txt":
        (yolo_root / "classes.txt").write_text("\n".join(names) + "\n")
    else:  # the Ultralytics style {index: name} mapping
        (yolo_root / "data.yaml").write_text(yaml.safe_dump({"names": dict(enumerate(names))}))
    for img in coco["images"]:
        shutil.copyfile(coco_root / "images" / img["file_name"], yolo_root / "images" / img["file_name"])
        lines = []
        for ann in coco["annotations"]:
            if ann["image_id"] == img["id"]:
                x, y, w, h = ann["bbox"]
                width, height = img["width"], img["height"]
                lines.append(
                    f"{ann['category_id'] - 1} {(x + w / 2) / width:.8f} {(y + h / 2) / height:.8f} "
                    f"{w / width:.8f} {h / height:.8f}"
                )
        (yolo_root / "labels" / f"{Path(img['file_name']).stem}.txt").write_text("\n".join(lines) + "\n")
    return yolo_root
