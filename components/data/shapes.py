"""Synthetic ``shapes`` data: circles, rectangles and triangles on textured backgrounds.

The output is a COCO *source* folder that :func:`components.data.intake.intake` reads::

    images/000000.png ...   RGB PNG, image_size x image_size
    annotations.json        COCO: categories 1..K named by ``classes`` (in that order), bbox [x, y, w, h]
                            in pixels, area, iscrowd=0, segmentation = compressed RLE (counts as str)

Labels are exact by construction: every shape is painted through its own binary mask, shapes never
overlap (placement is retried), so each mask is exactly the object's pixels and each bbox is the tight
box of its mask (``[min_col, min_row, max_col - min_col + 1, max_row - min_row + 1]``).

Image ``i`` is drawn from its own generator seeded by ``(seed, i)``: output is byte-identical across
runs for a seed, and a larger ``count`` only appends images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils
from tqdm import tqdm

SHAPE_CLASSES = ("circle", "rectangle", "triangle")
BACKGROUNDS = ("noise", "gradient", "stripes", "checks")

# Shapes keep this many pixels of background between them so instances never touch.
_GAP = 2
_PLACEMENT_ATTEMPTS = 60
# Minimum RGB distance between a shape's colour and every background colour, so shapes stay visible.
_MIN_CONTRAST = 90.0


def generate_shapes(
    out_dir: Path,
    *,
    count: int = 400,
    image_size: int = 160,
    classes: Sequence[str] = SHAPE_CLASSES,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
    min_size: int = 16,
    max_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write ``count`` synthetic images and their COCO annotations into ``out_dir``; return ``out_dir``.

    ``min_size``/``max_size`` bound a shape's extent in pixels (circle diameter, rectangle sides,
    triangle circumscribed diameter). Raises ``ValueError`` naming the argument for invalid input.
    """
    classes = tuple(classes)
    _validate(count, image_size, classes, min_objects, max_objects, min_size, max_size)
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in tqdm(range(count), desc="shapes", unit="img", disable=not progress or count < 50):
        rng = np.random.default_rng([seed, index])
        pixels, objects = _draw_image(
            rng, image_size, classes, min_objects, max_objects, min_size, max_size, index
        )
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels, mode="RGB").save(images_dir / file_name, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for class_index, mask in objects:
            annotations.append(_annotation(len(annotations) + 1, image_id, class_index + 1, mask))

    coco = {
        "info": {
            "description": "ModelCommons synthetic shapes",
            "generator": "components.data.shapes",
            "seed": seed,
            "count": count,
            "image_size": image_size,
        },
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out_dir / "annotations.json").write_text(json.dumps(coco))
    return out_dir


def _validate(
    count: int,
    image_size: int,
    classes: tuple[str, ...],
    min_objects: int,
    max_objects: int,
    min_size: int,
    max_size: int,
) -> None:
    if count < 1:
        raise ValueError(f"count={count}: must be at least 1")
    if image_size < 32:
        raise ValueError(f"image_size={image_size}: must be at least 32 pixels")
    if not classes:
        raise ValueError(f"classes={list(classes)}: give at least one of {list(SHAPE_CLASSES)}")
    unknown = [name for name in classes if name not in SHAPE_CLASSES]
    if unknown:
        raise ValueError(f"classes: unknown shape(s) {unknown}; allowed: {list(SHAPE_CLASSES)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes={list(classes)}: each class may appear only once")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects}: need 0 <= min <= max")
    if not 4 <= min_size <= max_size:
        raise ValueError(f"min_size={min_size}, max_size={max_size}: need 4 <= min_size <= max_size")
    if max_size > image_size - 2:
        raise ValueError(f"max_size={max_size}: must be at most image_size - 2 = {image_size - 2}")


# ---- drawing ------------------------------------------------------------------------------------


def _draw_image(
    rng: np.random.Generator,
    size: int,
    classes: tuple[str, ...],
    min_objects: int,
    max_objects: int,
    min_size: int,
    max_size: int,
    index: int,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image: HxWx3 uint8 pixels and [(class index, HxW bool mask)] of non-overlapping shapes."""
    background, bg_colours = _background(rng, size)
    pixels = background.astype(np.float32)
    occupied = Image.new("L", (size, size), 0)  # grown by _GAP around every placed shape
    objects: list[tuple[int, np.ndarray]] = []
    wanted = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(wanted):
        class_index = int(rng.integers(len(classes)))
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            mask = _shape_mask(rng, classes[class_index], size, min_size, max_size)
            if mask is not None and not (mask & (np.asarray(occupied) > 0)).any():
                break
        else:
            continue  # no room left for this shape; the image simply holds fewer objects
        colour = _contrasting_colour(rng, bg_colours)
        pixels[mask] = colour
        grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * _GAP + 1))
        occupied = Image.fromarray(np.maximum(np.asarray(occupied), np.asarray(grown)))
        objects.append((class_index, mask))
    if len(objects) < min_objects:
        raise ValueError(
            f"image {index}: placed only {len(objects)} of min_objects={min_objects} shapes without "
            f"overlap; lower max_size={max_size} or min_objects, or raise image_size={size}"
        )
    # Mild sensor noise over everything (shapes included) so flat colours are not a shortcut.
    pixels += rng.normal(0.0, 4.0, size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A textured HxWx3 float background and the main colours it uses."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c1 = rng.uniform(0, 255, size=3)
    c2 = rng.uniform(0, 255, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "noise":
        # Smooth blotches: coarse noise upsampled, plus fine grain.
        cells = int(rng.integers(4, 12))
        coarse = rng.uniform(-40, 40, size=(cells, cells, 3)).astype(np.float32)
        smooth = np.stack(
            [
                np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.Resampling.BILINEAR))
                for c in range(3)
            ],
            axis=-1,
        )
        img = c1 + smooth + rng.normal(0, 12, size=(size, size, 3))
        colours = [c1]
    elif kind == "gradient":
        t = (along - along.min()) / max(float(along.max() - along.min()), 1.0)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        colours = [c1, c2]
    elif kind == "stripes":
        period = rng.uniform(6, 24)
        t = (np.floor(along / period) % 2)[..., None]
        img = c1 * (1 - t) + c2 * t
        colours = [c1, c2]
    else:  # checks
        period = int(rng.integers(6, 24))
        t = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
        img = c1 * (1 - t) + c2 * t
        colours = [c1, c2]
    return np.clip(img, 0, 255), colours


def _contrasting_colour(rng: np.random.Generator, background: list[np.ndarray]) -> np.ndarray:
    best, best_dist = rng.uniform(0, 255, size=3), -1.0
    for _ in range(30):
        colour = rng.uniform(0, 255, size=3)
        dist = min(float(np.linalg.norm(colour - bg)) for bg in background)
        if dist >= _MIN_CONTRAST:
            return colour
        if dist > best_dist:
            best, best_dist = colour, dist
    return best


def _shape_mask(
    rng: np.random.Generator, kind: str, size: int, min_size: int, max_size: int
) -> np.ndarray | None:
    """HxW bool mask of one shape fully inside the image, or None if the draw was degenerate."""
    extent = float(rng.uniform(min_size, max_size))
    half = extent / 2.0
    # Keep the whole shape (and its anti-touching gap) inside the canvas.
    cx = float(rng.uniform(half + 1, size - half - 1))
    cy = float(rng.uniform(half + 1, size - half - 1))
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=1)
    elif kind == "rectangle":
        w = extent
        h = float(rng.uniform(min_size, max_size))
        # Half the rectangles are axis-aligned, half turned by up to 45 degrees.
        theta = 0.0 if rng.random() < 0.5 else float(rng.uniform(-math.pi / 4, math.pi / 4))
        # Shrink until the rotated rectangle fits around the chosen centre.
        corners = _rotated_rect(cx, cy, w, h, theta)
        reach = max(max(abs(x - cx), abs(y - cy)) for x, y in corners)
        if reach > half:
            corners = _rotated_rect(cx, cy, w * half / reach, h * half / reach, theta)
        draw.polygon(corners, fill=1)
    else:  # triangle: three points on a circle, roughly 120 degrees apart
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.4, 0.4, 3)
        radius = half * rng.uniform(0.8, 1.0, 3)
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radius, angles, strict=True)]
        draw.polygon(points, fill=1)
    mask = np.asarray(canvas, dtype=bool)
    if mask.sum() < 9:
        return None
    return mask


def _rotated_rect(cx: float, cy: float, w: float, h: float, theta: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(theta), math.sin(theta)
    return [
        (cx + dx * cos - dy * sin, cy + dx * sin + dy * cos)
        for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2))
    ]


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    """COCO annotation whose bbox/area come from ``mask`` (HxW bool) and segmentation is its RLE."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1],
        "area": int(mask.sum()),
        "iscrowd": 0,
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode()},
    }
