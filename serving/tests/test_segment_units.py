"""Segmentation pieces without Ray: the byte-bounded cache, prompt checks, the three output forms, args."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from contourpy import FillType, contour_generator
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import ValidationError

from serving.app import ServeArgs, app_builder
from serving.embedding_cache import EmbeddingCache, image_sha256
from serving.schemas import SegmentParams
from serving.segment_outputs import (
    blended_png,
    encode_rles,
    hard_segmentation,
    label_masks,
    label_png,
    mask_polygons,
    rle_bbox_area,
)
from serving.segmenter import PromptError, build_prompts


@dataclass(frozen=True)
class Blob:
    nbytes: int


def test_cache_evicts_least_recently_used_to_stay_within_bytes() -> None:
    cache: EmbeddingCache[Blob] = EmbeddingCache(capacity_bytes=100)
    assert cache.put("a", Blob(40)) and cache.put("b", Blob(40))
    assert cache.get("a") == Blob(40)  # a is now the most recently used
    assert cache.put("c", Blob(40))  # 120 > 100: evicts b, the least recently used
    assert cache.keys() == ["a", "c"] and cache.get("b") is None
    stats = cache.stats()
    assert (stats.bytes, stats.entries, stats.hits, stats.misses, stats.evictions) == (80, 2, 1, 1, 1)
    assert not cache.put("huge", Blob(101))  # larger than the whole cache: never stored
    assert cache.stats().rejected == 1 and cache.stats().bytes == 80
    cache.put("a", Blob(10))  # replacing a value re-counts its bytes
    assert cache.stats().bytes == 50
    cache.resize(45)
    assert cache.keys() == ["a"] and cache.stats().bytes == 10
    cache.clear()
    assert len(cache) == 0 and cache.stats().bytes == 0


def test_image_id_is_the_sha256_of_shape_and_pixels() -> None:
    a = torch.zeros(3, 2, 8, dtype=torch.uint8)
    assert image_sha256(a) == image_sha256(a.clone())
    assert image_sha256(a) != image_sha256(torch.zeros(3, 4, 4, dtype=torch.uint8))  # same bytes, other shape
    b = a.clone()
    b[0, 1, 7] = 1
    assert image_sha256(a) != image_sha256(b)
    assert len(image_sha256(a)) == 64
    with pytest.raises(ValueError, match="CxHxW uint8"):
        image_sha256(a.float())


@pytest.mark.parametrize(("body", "message"), [
    ({"points": [[1, 2]], "labels": [1, 0]}, "labels has 2 entries but points has 1"),
    ({"points": [[1, 2]]}, "points (1) need 'labels'"),
    ({"labels": [1]}, "labels (1) were given without points"),
    ({"points": [[1, 2, 3]], "labels": [1]}, "points.0"),
    ({"points": [[1, 2]], "labels": [2]}, "labels.0"),
    ({"boxes": [[1, 2, 3]]}, "boxes.0"),
    ({"points": [[1, 2]], "labels": [1], "boxes": [[0, 0, 5, 5], [1, 1, 4, 4]]}, "points can refine one box only"),
    ({"image_id": "abc"}, "image_id"),
    ({"output": "svg"}, "output"),
    ({"points": [[float("nan"), 2]], "labels": [1]}, "points.0.0"),
    ({"colour": "red"}, "colour"),
])
def test_prompt_shapes_and_labels_are_validated(body: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        SegmentParams.model_validate(body)
    assert message in str(info.value)


def test_prompts_must_lie_inside_the_image() -> None:
    ok = build_prompts(SegmentParams(points=[(0, 0), (96, 80)], labels=[1, 0]), 96, 80)  # edges included
    assert ok.coords is not None and ok.coords.shape == (1, 2, 2) and not ok.multimask
    one = build_prompts(SegmentParams(points=[(5, 5)], labels=[1]), 96, 80)
    assert one.multimask  # a lone point is ambiguous: three candidates, keep the best
    boxes = build_prompts(SegmentParams(boxes=[(0, 0, 10, 10), (5, 5, 96, 80)]), 96, 80)
    assert boxes.boxes is not None and boxes.size == 2 and boxes.coords is None
    with pytest.raises(PromptError, match=r"points\[1\] = \[97, 3\] is outside the 96x80 image"):
        build_prompts(SegmentParams(points=[(1, 1), (97, 3)], labels=[1, 1]), 96, 80)
    with pytest.raises(PromptError, match=r"boxes\[0\] = \[-1, 0, 10, 10\] does not fit the 96x80 image"):
        build_prompts(SegmentParams(boxes=[(-1, 0, 10, 10)]), 96, 80)
    with pytest.raises(PromptError, match="x_min < x_max"):
        build_prompts(SegmentParams(boxes=[(10, 0, 10, 10)]), 96, 80)  # zero width


def _masks() -> torch.Tensor:
    masks = torch.zeros(3, 40, 50, dtype=torch.bool)
    masks[0, 5:20, 5:30] = True  # rank 0
    masks[1, 10:35, 20:45] = True  # overlaps rank 0: loses the shared pixels
    masks[2, 12:18, 8:12] = True  # inside rank 0: loses everything
    return masks


def test_hard_segmentation_gives_overlaps_to_the_higher_rank() -> None:
    masks = _masks()
    label = hard_segmentation(masks)
    assert label.dtype == torch.uint8 and label.shape == (40, 50)
    assert torch.equal(label == 1, masks[0])
    assert torch.equal(label == 2, masks[1] & ~masks[0])
    assert not (label == 3).any()
    hard = label_masks(label, 3)
    assert hard.shape == (3, 40, 50) and int(hard.sum(0).max()) == 1  # disjoint


def test_rle_bbox_and_area_describe_the_mask() -> None:
    hard = label_masks(hard_segmentation(_masks()), 3)
    rles = encode_rles(hard)
    assert all(isinstance(r["counts"], str) and r["size"] == [40, 50] for r in rles)
    boxes, areas = rle_bbox_area(rles)
    for rle, box, area, mask in zip(rles, boxes, areas, hard, strict=True):
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.numpy())
        assert area == int(mask.sum())
        if area:
            ys, xs = np.nonzero(mask.numpy())
            assert box == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert areas[2] == 0 and boxes[2] == [0, 0, 0, 0]


def test_polygon_follows_the_pixel_edges() -> None:
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[5:15, 10:30] = True  # pixels x 10..29, y 5..14: edges x 10 and 30, y 5 and 15
    mask[8:12, 15:20] = False  # a hole: not part of the outer polygon
    mask[20:26, 2:6] = True  # a second region
    polygons = mask_polygons(mask)
    assert len(polygons) == 2
    xs, ys = np.array(polygons[0][0::2]), np.array(polygons[0][1::2])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 30, 5, 15)
    # Rasterised by pycocotools, the polygons cover the regions (holes filled) up to the cut corners.
    raster = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 30, 40))).astype(bool)
    filled = mask.numpy().copy()
    filled[8:12, 15:20] = True
    iou = (raster & filled).sum() / (raster | filled).sum()
    assert iou > 0.9, iou
    assert mask_polygons(torch.zeros(4, 4, dtype=torch.bool)) == []


def test_polygon_keeps_only_corners_and_outlines_the_same_area_as_every_boundary_vertex() -> None:
    mask = torch.zeros(30, 40, dtype=torch.bool)
    mask[5:15, 10:30] = True
    # A rectangle: 8 vertices (4 sides, 4 cut corners), not one per boundary pixel.
    assert mask_polygons(mask) == [[10.0, 5.5, 10.5, 5.0, 29.5, 5.0, 30.0, 5.5,
                                    30.0, 14.5, 29.5, 15.0, 10.5, 15.0, 10.0, 14.5]]
    # Ragged masks with many islands: each polygon rasterises exactly like the unsimplified
    # marching-squares outer ring of the same region.
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        m = rng.random((h, w)) < rng.uniform(0.2, 0.8)
        z = np.pad(m.astype(np.float64), 1)
        points, offsets = contour_generator(z=z, fill_type=FillType.OuterOffset).filled(0.5, 2.0)
        full = [(pts[int(o[0]):int(o[1]) - 1] - 0.5).reshape(-1).tolist()
                for pts, o in zip(points, offsets, strict=True)]
        polygons = mask_polygons(m)
        assert len(polygons) == len(full) > 0
        assert sum(len(p) for p in polygons) < sum(len(p) for p in full)
        for simple, every in zip(polygons, full, strict=True):
            raster = mask_utils.decode(mask_utils.frPyObjects([simple, every], h, w))
            assert np.array_equal(raster[..., 0], raster[..., 1])


def test_polygon_of_a_small_object_in_a_large_image_is_in_image_coordinates() -> None:
    # Only the object's bounding box is contoured; the answer must not depend on that.
    mask = torch.zeros(1080, 1920, dtype=torch.bool)
    mask[1076:1080, 1915:1920] = True  # touches the bottom-right corner: x edges 1915 and 1920, y 1076 and 1080
    (polygon,) = mask_polygons(mask)
    xs, ys = np.array(polygon[0::2]), np.array(polygon[1::2])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (1915, 1920, 1076, 1080)
    raster = mask_utils.decode(mask_utils.frPyObjects([polygon], 1080, 1920)).astype(bool)[..., 0]
    assert (raster & mask.numpy()).sum() / (raster | mask.numpy()).sum() > 0.8


def test_label_and_blended_pngs() -> None:
    masks = _masks()
    label = hard_segmentation(masks)
    with Image.open(io.BytesIO(label_png(label))) as im:
        assert im.mode == "L" and im.size == (50, 40)
        assert np.array_equal(np.asarray(im), label.numpy())
    image = torch.full((3, 40, 50), 100, dtype=torch.uint8)
    with Image.open(io.BytesIO(blended_png(image, label_masks(label, 3)))) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert im.size == (50, 40)
    assert (pixels[0, 0] == 100).all()  # background untouched
    assert not (pixels[6, 6] == 100).all()  # inside a mask: coloured


def test_serve_args_make_either_model_optional() -> None:
    assert ServeArgs(model_uri="/m/det").segmenter_model_uri == ""  # empty = off
    with pytest.raises(ValidationError, match="nothing to serve"):
        ServeArgs(model_uri="", segmenter_model_uri="")
    application = app_builder({"model_uri": "/m/det", "segmenter_model_uri": "/m/sam",
                               "embedding_cache_bytes": 1234, "segmenter_num_cpus": 0.25})
    ingress = application._bound_deployment
    segmenter = ingress.init_kwargs["segmenter"]._bound_deployment
    assert segmenter.name == "segmenter" and segmenter.num_replicas == 1
    assert segmenter.ray_actor_options == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert segmenter.init_kwargs == {"model_uri": "/m/sam", "cache_bytes": 1234}
    assert segmenter.user_config["cache_bytes"] == 1234
    only_segmenter = app_builder({"model_uri": "", "segmenter_model_uri": "/m/sam"})._bound_deployment
    assert only_segmenter.init_args == (None,)
