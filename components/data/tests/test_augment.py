from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from components.data.augment import AUGMENTATIONS, augment_image, rotation_angle

H, W = 60, 80


def _scene() -> tuple[Image.Image, np.ndarray]:
    pixels = np.zeros((H, W, 3), np.uint8)
    masks = np.zeros((2, H, W), bool)
    masks[0, 10:20, 5:25] = True  # box xywh (5, 10, 20, 10)
    masks[1, 30:50, 50:70] = True  # box xywh (50, 30, 20, 20)
    pixels[masks[0]] = (255, 0, 0)
    pixels[masks[1]] = (0, 255, 0)
    return Image.fromarray(pixels), masks


def _tight(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))


def test_one_image_becomes_four_transformed_copies_with_exact_boxes() -> None:
    image, masks = _scene()
    boxes = [_tight(m) for m in masks]
    out = {a.op: a for a in augment_image(image, boxes, [0, 2], masks, seed=1)}
    assert tuple(out) == AUGMENTATIONS == ("rotate", "blur", "flip", "flop")
    # flop mirrors left-right: x -> W - x - w; flip mirrors top-bottom: y -> H - y - h.
    assert out["flop"].boxes == [(W - 5 - 20, 10.0, 20.0, 10.0), (W - 50 - 20, 30.0, 20.0, 20.0)]
    assert out["flip"].boxes == [(5.0, H - 10 - 10, 20.0, 10.0), (50.0, H - 30 - 20, 20.0, 20.0)]
    assert out["blur"].boxes == boxes
    assert np.array_equal(out["flop"].masks, masks[:, :, ::-1])
    for aug in out.values():
        assert aug.image.size == (W, H) and aug.labels == [0, 2] and aug.dropped == []
        assert aug.masks is not None
        # Boxes are the tight boxes of the transformed masks, also after rotation.
        assert aug.boxes == [_tight(m) for m in aug.masks]
    # The flopped image really is mirrored (red object now on the right).
    assert np.array_equal(np.asarray(out["flop"].image), np.asarray(image)[:, ::-1])
    # Rotation moved the objects and kept them tight (a loose enclosing box would be larger).
    assert out["rotate"].boxes != boxes
    assert 5 <= abs(rotation_angle(1)) <= 15


def test_without_masks_boxes_follow_the_transform() -> None:
    image, _ = _scene()
    out = {a.op: a for a in augment_image(image, [(5, 10, 20, 10)], [1])}
    assert out["flop"].boxes == [(55.0, 10.0, 20.0, 10.0)]
    assert out["flip"].boxes == [(5.0, 40.0, 20.0, 10.0)]
    assert out["rotate"].masks is None
    _, _, w, h = out["rotate"].boxes[0]
    assert w > 20 and h > 10  # enclosing box of the rotated corners


def test_instances_that_leave_the_image_are_dropped_and_reported() -> None:
    image, _ = _scene()
    masks = np.zeros((2, H, W), bool)
    masks[0, 0:2, 0:2] = True  # corner pixel block: rotation about the centre pushes it out
    masks[1, 25:35, 35:45] = True  # centre block stays
    out = {a.op: a for a in augment_image(image, [_tight(m) for m in masks], [0, 1], masks, seed=0)}
    assert out["rotate"].dropped == [0]
    assert out["rotate"].kept == [1] and out["rotate"].labels == [1]
    rle = mask_utils.encode(np.asfortranarray(out["rotate"].masks[0].astype(np.uint8)))
    assert list(mask_utils.toBbox(rle)) == list(out["rotate"].boxes[0])


def test_bad_inputs_are_named() -> None:
    image, masks = _scene()
    with pytest.raises(ValueError, match=r"masks shape \(2, 60, 80\) != \(N=1"):
        augment_image(image, [(0, 0, 1, 1)], [0], masks)
    with pytest.raises(ValueError, match="unknown augmentation 'shear'"):
        augment_image(image, [], [], ops=["shear"])
