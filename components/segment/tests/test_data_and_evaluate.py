"""Masks from the dataset artifact, prompt sampling, and the mIoU evaluation on known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from components.segment.data import (
    SegSample,
    center_points,
    decode_segmentation,
    jitter_boxes,
    load_seg_samples,
    masks_to_boxes_xyxy,
    random_points,
)
from components.segment.evaluate import evaluate_prompts, mask_iou


def test_samples_carry_the_coco_masks_resized_with_their_boxes(tiny_dataset: Path) -> None:
    manifest, samples = load_seg_samples(tiny_dataset, "val", 128)
    assert {s.image_id for s in samples} == set(manifest.split.val)
    coco = json.loads((tiny_dataset / "annotations.json").read_text())
    sample = samples[0]
    anns = [a for a in coco["annotations"] if a["image_id"] == sample.image_id]
    assert sample.masks.shape == (len(anns), 96, 96) and sample.input_masks.shape == (len(anns), 128, 128)
    assert sample.image.dtype == torch.uint8 and sample.input_image.shape == (3, 128, 128)
    for mask, ann in zip(sample.masks, anns, strict=True):
        assert int(mask.sum()) == ann["area"]
        rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
        assert [round(v) for v in mask_utils.toBbox(rle).tolist()] == [round(v) for v in ann["bbox"]]
    # input boxes are the tight boxes of the resized masks, about 128/96 of the COCO boxes
    scaled = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32) * 128 / 96
    scaled[:, 2:] += scaled[:, :2]
    assert torch.allclose(sample.boxes, scaled, atol=2.0)


def test_decode_segmentation_reads_polygons_and_both_rle_forms() -> None:
    square = np.zeros((10, 12), dtype=np.uint8)
    square[2:6, 3:8] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    assert np.array_equal(decode_segmentation({"size": [10, 12], "counts": compressed["counts"].decode()}, 10, 12),
                          square)
    uncompressed = {"size": [10, 12], "counts": [32, 4, 6, 4, 6, 4, 6, 4, 6, 4, 44]}  # column-major
    assert np.array_equal(decode_segmentation(uncompressed, 10, 12), square)
    polygon = decode_segmentation([[3, 2, 8, 2, 8, 6, 3, 6]], 10, 12)
    assert polygon[3:5, 4:7].all() and not polygon[8:].any()
    with pytest.raises(ValueError, match="not polygons or RLE"):
        decode_segmentation("nope", 10, 12)


def test_prompts_fall_inside_their_masks_and_boxes_stay_in_the_image() -> None:
    masks = torch.zeros((2, 40, 50), dtype=torch.bool)
    masks[0, 5:15, 10:30] = True
    masks[1, 20:39, 2:9] = True
    gen = torch.Generator().manual_seed(0)
    for points in (random_points(masks, gen), center_points(masks)):
        for mask, (x, y) in zip(masks, points.long().tolist(), strict=True):
            assert mask[y, x]
    assert center_points(masks)[0].tolist() == [19.0, 9.0]  # the middle of the 10x20 block (ties: nearest centroid)
    boxes = masks_to_boxes_xyxy(masks)
    assert boxes.tolist() == [[10.0, 5.0, 30.0, 15.0], [2.0, 20.0, 9.0, 39.0]]
    jittered = jitter_boxes(boxes, gen, size=(40, 50))
    assert not torch.equal(jittered, boxes)
    assert (jittered[:, 0::2] >= 0).all() and (jittered[:, 0::2] <= 50).all() and (jittered[:, 1::2] <= 40).all()
    assert ((jittered - boxes).abs() <= 20).all()
    assert (jittered[:, 2] > jittered[:, 0]).all() and (jittered[:, 3] > jittered[:, 1]).all()


def test_mask_iou_known_values() -> None:
    a = torch.zeros((3, 4, 4), dtype=torch.bool)
    b = torch.zeros((3, 4, 4), dtype=torch.bool)
    a[0, :2] = True
    b[0, 1:3] = True  # 4 shared of 12
    a[1] = True
    b[1] = True
    assert mask_iou(a, b).tolist() == pytest.approx([1 / 3, 1.0, 1.0])  # two empty masks agree


def test_perfect_masks_score_miou_one_and_empty_masks_zero(tiny_dataset: Path) -> None:
    _, samples = load_seg_samples(tiny_dataset, "val", 96)

    def oracle(sample: SegSample, points: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert points.shape == (len(sample.masks), 2) and boxes.shape == (len(sample.masks), 4)
        return sample.masks.clone(), sample.masks.clone()

    def empty(sample: SegSample, points: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(sample.masks), sample.masks.clone()

    perfect = evaluate_prompts(samples, oracle)
    instances = sum(len(s.masks) for s in samples)
    assert perfect.metrics == {"miou_point": 1.0, "miou_box": 1.0, "instances": float(instances),
                               "images": float(len(samples))}
    half = evaluate_prompts(samples, empty)
    assert half.metrics["miou_point"] == 0.0 and half.metrics["miou_box"] == 1.0

    def wrong_shape(sample: SegSample, points: torch.Tensor, boxes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        return sample.masks[:, :-1], sample.masks

    with pytest.raises(ValueError, match=r"point masks for image \d+ have shape \(\d+, 95, 96\)"):
        evaluate_prompts(samples, wrong_shape)
