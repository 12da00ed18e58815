"""Readers for dataset *sources*: COCO JSON and YOLO txt folders, plus format auto-detection.

A reader turns a folder into a :class:`SourceDataset` (images, annotations, class names) and a list
of :class:`Problem` for single bad entries. It never raises for one bad entry; it raises
:class:`DatasetError` only when the source as a whole is unusable (no annotation file, unreadable
JSON, no class list), naming the path.

Supported layouts::

    COCO   <root>/annotations.json (or the only *.json in <root> or <root>/annotations/)
           images at <root>/images/<file_name> or <root>/<file_name>
           segmentation: polygons, uncompressed or compressed RLE
    YOLO   <root>/images/**/<name>.<ext> with <root>/labels/**/<name>.txt  (same relative path)
           lines "cls cx cy w h", normalised to [0, 1]; a missing label file means no objects
           class names from <root>/classes.txt (one per line) or data.yaml / dataset.yaml ``names``

Pixel checks (decoding, box bounds, duplicates) need the image bytes and belong to intake.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from components.data.format import MANIFEST_FILE, REJECTIONS_FILE, DatasetError

Format = Literal["coco", "yolo"]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class Problem:
    """One rejected item, as written to ``rejections.json``.

    ``item`` is the kind (``"image"`` or ``"annotation"``); ``file`` the image file it concerns (relative
    to the source root) or the annotation file when no image is known; ``field`` what is wrong
    (``bytes``, ``bbox``, ``category_id``, ...); ``source`` where the entry came from
    (``annotations.json annotations[3] (id 17)``, ``labels/a.txt:2``).
    """

    item: str
    file: str
    field: str
    reason: str
    source: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class SourceImage:
    """An image entry. ``key`` is unique within the source; ``path`` is None when the file is missing."""

    key: str
    file: str  # path relative to the source root, as reported in problems
    path: Path | None
    width: int | None = None  # declared by COCO; YOLO declares none
    height: int | None = None
    source: str = ""


@dataclass
class SourceAnnotation:
    """One object. ``bbox`` is [x, y, w, h] in pixels, or [cx, cy, w, h] in [0, 1] when ``normalized``."""

    image_key: str
    category: str
    bbox: tuple[float, float, float, float] | None
    normalized: bool = False
    segmentation: Any = None  # COCO polygons (list of [x0, y0, x1, y1, ...]) or RLE dict
    area: float | None = None
    iscrowd: int = 0
    source: str = ""


@dataclass
class SourceDataset:
    """What a reader found. ``total_items`` counts every image and annotation entry seen, bad ones too."""

    root: Path
    fmt: Format
    classes: list[str]
    images: list[SourceImage]
    annotations: list[SourceAnnotation]
    problems: list[Problem] = field(default_factory=list)
    total_items: int = 0


def detect_format(root: Path) -> Format:
    """``"coco"`` if a COCO annotation file is present, ``"yolo"`` if ``labels/`` is; else DatasetError."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset source is not a directory")
    if _find_coco_json(root) is not None:
        return "coco"
    if (root / "labels").is_dir():
        return "yolo"
    raise DatasetError(
        f"{root}: cannot detect the dataset format: expected annotations.json (COCO) or "
        "images/ + labels/ (YOLO) with classes.txt or data.yaml"
    )


def read_source(root: Path, fmt: Literal["auto", "coco", "yolo"] = "auto") -> SourceDataset:
    """Read a source folder in ``fmt`` (``"auto"`` detects it)."""
    root = Path(root)
    if fmt not in ("auto", "coco", "yolo"):
        raise DatasetError(f"fmt={fmt!r}: allowed formats are 'auto', 'coco', 'yolo'")
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset source is not a directory")
    resolved: Format = detect_format(root) if fmt == "auto" else fmt
    return read_coco_source(root) if resolved == "coco" else read_yolo_source(root)


# ---- COCO --------------------------------------------------------------------------------------


def _find_coco_json(root: Path) -> Path | None:
    preferred = root / "annotations.json"
    if preferred.is_file():
        return preferred
    ignore = {MANIFEST_FILE, REJECTIONS_FILE}
    for folder in (root, root / "annotations"):
        if folder.is_dir():
            candidates = sorted(p for p in folder.glob("*.json") if p.name not in ignore)
            if len(candidates) == 1:
                return candidates[0]
    return None


def read_coco_source(root: Path) -> SourceDataset:
    """Read a COCO detection source folder (see the module docstring for the layout)."""
    root = Path(root)
    ann_path = _find_coco_json(root)
    if ann_path is None:
        raise DatasetError(
            f"{root}: no COCO annotation file: expected {root / 'annotations.json'} or a single *.json "
            f"in {root} or {root / 'annotations'}"
        )
    ann_rel = ann_path.relative_to(root).as_posix()
    try:
        coco = json.loads(ann_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{ann_path}: not readable COCO JSON: {exc}") from exc
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetError(f"{ann_path}: not COCO detection JSON: top-level 'images' list missing")
    raw_categories = coco.get("categories")
    if not isinstance(raw_categories, list) or not raw_categories:
        raise DatasetError(f"{ann_path}: 'categories' must be a non-empty list of {{id, name}}")

    categories: dict[int, str] = {}
    for i, cat in enumerate(raw_categories):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not cat.get("name"):
            raise DatasetError(f"{ann_path}: categories[{i}] needs an integer 'id' and a 'name': {cat!r}")
        if cat["id"] in categories:
            raise DatasetError(f"{ann_path}: categories[{i}]: duplicate category id {cat['id']}")
        categories[cat["id"]] = str(cat["name"])
    names = [categories[k] for k in sorted(categories)]
    if len(set(names)) != len(names):
        raise DatasetError(f"{ann_path}: category names must be unique, got {names}")

    problems: list[Problem] = []
    images: list[SourceImage] = []
    by_id: dict[Any, SourceImage] = {}
    seen_files: set[str] = set()
    for i, entry in enumerate(coco["images"]):
        where = f"{ann_rel} images[{i}]"
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            problems.append(Problem("image", ann_rel, "images", "entry needs 'id' and 'file_name'", where))
            continue
        where = f"{ann_rel} images[{i}] (id {entry['id']})"
        file_name = entry["file_name"]
        path = _resolve_image(root, file_name)
        rel = path.relative_to(root).as_posix() if path is not None else f"images/{file_name}"
        if entry["id"] in by_id:
            problems.append(Problem("image", rel, "id", f"duplicate image id {entry['id']!r}", where))
            continue
        if rel in seen_files:
            problems.append(Problem("image", rel, "file_name", "listed twice in images[]", where))
            continue
        width, height = entry.get("width"), entry.get("height")
        image = SourceImage(
            key=str(entry["id"]),
            file=rel,
            path=path,
            width=width if isinstance(width, int) else None,
            height=height if isinstance(height, int) else None,
            source=where,
        )
        by_id[entry["id"]] = image
        seen_files.add(rel)
        images.append(image)  # path None (file missing) is rejected by intake, with its annotations

    annotations: list[SourceAnnotation] = []
    raw_annotations = coco.get("annotations", [])
    if not isinstance(raw_annotations, list):
        raise DatasetError(f"{ann_path}: 'annotations' must be a list")
    for i, ann in enumerate(raw_annotations):
        where = f"{ann_rel} annotations[{i}]"
        if isinstance(ann, dict) and "id" in ann:
            where += f" (id {ann['id']})"
        parsed = _coco_annotation(ann, by_id, categories, names, where, ann_rel)
        if isinstance(parsed, Problem):
            problems.append(parsed)
        else:
            annotations.append(parsed)

    # Files on disk that annotations.json does not list are reported, not silently ignored.
    listed = {img.path.resolve() for img in images if img.path is not None}
    images_dir = root / "images"
    if images_dir.is_dir():
        for path in sorted(images_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.resolve() not in listed:
                rel = path.relative_to(root).as_posix()
                problems.append(Problem("image", rel, "file_name", f"not listed in {ann_rel}", rel))
    unlisted = sum(1 for p in problems if p.reason.startswith("not listed in"))
    return SourceDataset(
        root=root,
        fmt="coco",
        classes=names,
        images=images,
        annotations=annotations,
        problems=problems,
        total_items=len(coco["images"]) + len(raw_annotations) + unlisted,
    )


def _resolve_image(root: Path, file_name: str) -> Path | None:
    rel = Path(file_name)
    if rel.is_absolute() or ".." in rel.parts:
        return None  # never read outside the source folder
    for candidate in (root / "images" / rel, root / rel):
        if candidate.is_file():
            return candidate
    return None


def _coco_annotation(
    ann: Any,
    by_id: dict[Any, SourceImage],
    categories: dict[int, str],
    names: list[str],
    where: str,
    ann_rel: str,
) -> SourceAnnotation | Problem:
    if not isinstance(ann, dict):
        return Problem("annotation", ann_rel, "annotations", f"entry is not an object: {ann!r}", where)
    image = by_id.get(ann.get("image_id"))
    if image is None:
        return Problem(
            "annotation", ann_rel, "image_id", f"image_id {ann.get('image_id')!r} is not in images[]", where
        )
    if ann.get("category_id") not in categories:
        return Problem(
            "annotation",
            image.file,
            "category_id",
            f"unknown category_id {ann.get('category_id')!r}; known ids {sorted(categories)} ({names})",
            where,
        )
    bbox = ann.get("bbox")
    segmentation = ann.get("segmentation") or None
    box: tuple[float, float, float, float] | None = None
    if bbox is not None:
        if (
            not isinstance(bbox, list | tuple)
            or len(bbox) != 4
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox)
        ):
            return Problem(
                "annotation", image.file, "bbox", f"bbox must be 4 finite numbers, got {bbox!r}", where
            )
        box = (float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3]))
    elif segmentation is None:
        return Problem("annotation", image.file, "bbox", "neither bbox nor segmentation given", where)
    area = ann.get("area")
    return SourceAnnotation(
        image_key=image.key,
        category=categories[ann["category_id"]],
        bbox=box,
        segmentation=segmentation,
        area=float(area) if isinstance(area, int | float) else None,
        iscrowd=1 if ann.get("iscrowd") in (1, True) else 0,
        source=where,
    )


# ---- YOLO --------------------------------------------------------------------------------------


def read_yolo_classes(root: Path) -> list[str]:
    """Class names from ``classes.txt`` or ``data.yaml``/``dataset.yaml`` ``names`` (list or {i: name})."""
    classes_txt = root / "classes.txt"
    if classes_txt.is_file():
        names = [line.strip() for line in classes_txt.read_text().splitlines() if line.strip()]
        if not names:
            raise DatasetError(f"{classes_txt}: no class names (one per line expected)")
        return names
    for yaml_name in ("data.yaml", "dataset.yaml"):
        path = root / yaml_name
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise DatasetError(f"{path}: not valid YAML: {exc}") from exc
        raw = data.get("names") if isinstance(data, dict) else None
        if isinstance(raw, dict):
            try:
                keys = sorted(int(k) for k in raw)
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{path}: 'names' keys must be class indices 0..K-1") from exc
            if keys != list(range(len(keys))):
                raise DatasetError(f"{path}: 'names' keys must be 0..K-1 without gaps, got {keys}")
            raw = [raw[k] if k in raw else raw[str(k)] for k in keys]
        if not isinstance(raw, list) or not raw:
            raise DatasetError(f"{path}: 'names' must be a non-empty list or {{index: name}} mapping")
        return [str(name) for name in raw]
    raise DatasetError(
        f"{root}: YOLO source has no class names: add classes.txt (one name per line) "
        "or data.yaml with 'names'"
    )


def read_yolo_source(root: Path) -> SourceDataset:
    """Read a YOLO txt source folder (see the module docstring for the layout)."""
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: YOLO source needs an images/ folder")
    classes = read_yolo_classes(root)
    problems: list[Problem] = []
    images: list[SourceImage] = []
    annotations: list[SourceAnnotation] = []
    total = 0
    image_paths = sorted(
        p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    label_stems: set[Path] = set()
    for path in image_paths:
        rel_in_images = path.relative_to(images_dir).with_suffix("")
        if rel_in_images in label_stems:
            # a.png and a.jpg would share labels/a.txt: ambiguous, keep the first.
            rel = path.relative_to(root).as_posix()
            problems.append(
                Problem("image", rel, "file_name", "another image already uses this label file", rel)
            )
            total += 1
            continue
        label_stems.add(rel_in_images)
        rel = path.relative_to(root).as_posix()
        images.append(SourceImage(key=rel, file=rel, path=path, source=rel))
        total += 1
        label = labels_dir / rel_in_images.with_suffix(".txt")
        if label.is_file():
            parsed, line_problems, seen = _yolo_labels(label, root, rel, classes)
            annotations.extend(parsed)
            problems.extend(line_problems)
            total += seen

    if labels_dir.is_dir():
        for label in sorted(labels_dir.rglob("*.txt")):
            if label.relative_to(labels_dir).with_suffix("") not in label_stems:
                rel = label.relative_to(root).as_posix()
                problems.append(Problem("annotation", rel, "image", "no image file for this label file", rel))
                total += 1
    return SourceDataset(
        root=root,
        fmt="yolo",
        classes=classes,
        images=images,
        annotations=annotations,
        problems=problems,
        total_items=total,
    )


def _yolo_labels(
    label: Path, root: Path, image_rel: str, classes: list[str]
) -> tuple[list[SourceAnnotation], list[Problem], int]:
    label_rel = label.relative_to(root).as_posix()
    try:
        lines = label.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problem = Problem("annotation", image_rel, "labels", f"cannot read {label_rel}: {exc}", label_rel)
        return [], [problem], 1
    parsed: list[SourceAnnotation] = []
    problems: list[Problem] = []
    seen = 0
    for lineno, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        seen += 1
        where = f"{label_rel}:{lineno}"
        if len(tokens) != 5:
            problems.append(
                Problem(
                    "annotation",
                    image_rel,
                    "line",
                    f"expected 5 values 'cls cx cy w h', got {len(tokens)}: {line.strip()!r}",
                    where,
                )
            )
            continue
        try:
            cls = int(tokens[0])
            values = [float(t) for t in tokens[1:]]
        except ValueError:
            problems.append(Problem("annotation", image_rel, "line", f"not numbers: {line.strip()!r}", where))
            continue
        if not 0 <= cls < len(classes):
            problems.append(
                Problem(
                    "annotation",
                    image_rel,
                    "category_id",
                    f"unknown class index {cls}; allowed 0..{len(classes) - 1} ({classes})",
                    where,
                )
            )
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(
                Problem("annotation", image_rel, "bbox", f"non-finite value: {line.strip()!r}", where)
            )
            continue
        parsed.append(
            SourceAnnotation(
                image_key=image_rel,
                category=classes[cls],
                bbox=(values[0], values[1], values[2], values[3]),
                normalized=True,
                source=where,
            )
        )
    return parsed, problems, seen
