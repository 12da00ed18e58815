"""The three answer forms of ``POST /v1/segment``, from one hard segmentation.

All forms describe the same disjoint segments: masks are ranked by score and, where masks overlap,
the higher-ranked mask keeps the pixels (:func:`hard_segmentation`). So the COCO RLE of ``masks[i]``
decodes to exactly ``label == i + 1`` in the mask PNG, and its bbox and area are those of that mask.

- ``json``: per segment a COCO RLE (pycocotools), XYWH bbox and area (pycocotools ``toBbox``/``area``
  on the same RLE), and outer polygons (contourpy, matplotlib's contouring library);
- ``mask``: an 8-bit PNG label image (0 background, i + 1 for ``masks[i]``);
- ``blended``: the original image with coloured masks drawn over it
  (``torchvision.utils.draw_segmentation_masks``).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from contourpy import FillType, contour_generator
from pycocotools import mask as mask_utils
from torchvision.utils import draw_segmentation_masks

from serving.detector import PALETTE
from serving.images import encode_png_bytes
from serving.schemas import MAX_MASKS

BLEND_ALPHA = 0.5


def hard_segmentation(masks: torch.Tensor) -> torch.Tensor:
    """``NxHxW`` bool masks in rank order -> ``HxW`` uint8 label image (0 background, i + 1 for mask i).

    Where masks overlap, the earlier (higher-ranked) mask wins. At most :data:`MAX_MASKS` masks.
    """
    if masks.ndim != 3 or masks.dtype != torch.bool:
        raise ValueError(f"expected NxHxW bool masks, got {tuple(masks.shape)} {masks.dtype}")
    n = int(masks.shape[0])
    if n > MAX_MASKS:
        raise ValueError(f"{n} masks do not fit an 8-bit label image (at most {MAX_MASKS})")
    label = torch.zeros(masks.shape[-2:], dtype=torch.uint8)
    for i in range(n - 1, -1, -1):  # paint lowest rank first so higher ranks overwrite it
        label[masks[i]] = i + 1
    return label


def label_masks(label: torch.Tensor, n: int) -> torch.Tensor:
    """``HxW`` label image -> ``nxHxW`` bool masks, ``masks[i] = label == i + 1``."""
    ids = torch.arange(1, n + 1, dtype=label.dtype).view(-1, 1, 1)
    return label.unsqueeze(0) == ids


def encode_rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """``NxHxW`` bool masks -> COCO compressed RLEs ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    if masks.shape[0] == 0:
        return []
    fortran = np.asfortranarray(masks.permute(1, 2, 0).cpu().numpy().astype(np.uint8))  # (H, W, N)
    rles = mask_utils.encode(fortran)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")  # bytes are not JSON
    return list(rles)


def rle_bbox_area(rles: list[dict[str, Any]]) -> tuple[list[list[float]], list[int]]:
    """XYWH boxes and pixel areas of COCO RLEs, computed by pycocotools from the RLEs themselves."""
    if not rles:
        return [], []
    encoded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    boxes = mask_utils.toBbox(encoded).tolist()
    areas = [int(a) for a in mask_utils.area(encoded)]
    return boxes, areas


def mask_polygons(mask: torch.Tensor | np.ndarray) -> list[list[float]]:
    """Outer boundaries of an ``HxW`` bool mask as COCO polygons ``[x1, y1, x2, y2, ...]``.

    The boundary is the 0.5 iso-line through pixel centres (marching squares, contourpy), shifted to
    COCO's pixel-edge coordinates, so a filled rectangle of pixels ``[x0, x1) x [y0, y1)`` gives the
    8-vertex polygon along ``x0``, ``x1``, ``y0``, ``y1`` with its corners cut at 45 degrees. Holes are
    left out: COCO polygons are filled, the RLE carries the holes.

    Marching squares puts a vertex on every pixel edge the boundary crosses; vertices on a straight
    run are dropped (OpenCV's ``CHAIN_APPROX_SIMPLE``). They sit on a half-pixel grid, so the test is
    exact and the outline does not move. All rings are handled in one vectorised pass: a ragged mask
    can have thousands of islands.
    """
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        return []
    # Contour only the mask's bounding box: a small object in a large image costs what the object costs.
    y0, x0 = int(rows[0]), int(cols[0])
    crop = m[y0:int(rows[-1]) + 1, x0:int(cols[-1]) + 1]
    z = np.pad(crop.astype(np.float64), 1)  # zero border: every region gets a closed boundary
    filled = contour_generator(z=z, fill_type=FillType.ChunkCombinedOffsetOffset, chunk_count=1).filled(0.5, 2.0)
    chunks = cast(tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]], filled)
    points, offsets, outer = chunks[0][0], chunks[1][0].astype(np.int64), chunks[2][0][:-1].astype(np.int64)
    # Every ring is closed (its last point repeats its first), so the edge after vertex i is step[i] and
    # the edge before it step[i - 1], or the ring's last step for its first vertex.
    step = np.diff(points, axis=0)
    starts, closing = offsets[:-1], offsets[1:] - 1
    before = np.empty_like(points)
    before[1:] = step
    before[starts] = step[closing - 1]
    after = np.empty_like(points)
    after[:-1] = step
    after[-1] = 0.0  # a closing point: dropped below
    keep = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0] != 0
    ring = np.repeat(np.arange(len(starts)), np.diff(offsets))
    is_outer = np.zeros(len(starts), dtype=bool)
    is_outer[outer] = True  # each polygon's first ring; the others are its holes
    keep &= is_outer[ring]
    keep[closing] = False  # COCO polygons are implicitly closed
    kept, kept_ring = points[keep], ring[keep]
    shift = np.array([x0 - 0.5, y0 - 0.5])  # -1 pad + 0.5 pixel centre, then back to image coordinates
    flat = np.round(kept + shift, 2).reshape(-1).tolist()
    bounds = np.r_[0, np.cumsum(np.bincount(kept_ring, minlength=len(starts))[outer])] * 2
    return [flat[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True) if b - a >= 6]


def label_png(label: torch.Tensor) -> bytes:
    """``HxW`` uint8 label image -> 8-bit grayscale PNG bytes."""
    return encode_png_bytes(label.unsqueeze(0))


def blended_png(image: torch.Tensor, masks: torch.Tensor, *, alpha: float = BLEND_ALPHA) -> bytes:
    """``3xHxW`` uint8 image + ``NxHxW`` bool masks -> PNG of the image with coloured masks over it."""
    if masks.shape[0] == 0:
        return encode_png_bytes(image)
    colors = [PALETTE[i % len(PALETTE)] for i in range(int(masks.shape[0]))]
    drawn = draw_segmentation_masks(image, masks, alpha=alpha, colors=colors)
    return encode_png_bytes(drawn)
