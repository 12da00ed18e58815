from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from components.data.shapes import generate_shapes


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"count": 4, "image_size": 64, "max_size": 24, "progress": False}
    a = _files(generate_shapes(tmp_path / "a", seed=3, **kwargs))
    b = _files(generate_shapes(tmp_path / "b", seed=3, **kwargs))
    c = _files(generate_shapes(tmp_path / "c", seed=4, **kwargs))
    assert sorted(a) == ["annotations.json", *(f"images/{i:06d}.png" for i in range(4))]
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_labels_are_exact(shapes_source: Path) -> None:
    coco = json.loads((shapes_source / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["circle", "rectangle", "triangle"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert len(coco["images"]) == 12
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in coco["annotations"]:
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["iscrowd"] == 0
        mask = mask_utils.decode(
            {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        ).astype(bool)
        assert mask.shape == (96, 96)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        tight = [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1]
        assert ann["bbox"] == [int(v) for v in tight]
        assert ann["area"] == int(mask.sum())
        by_image.setdefault(ann["image_id"], []).append(mask)
    counts = [len(v) for v in by_image.values()]
    assert min(counts) >= 1 and max(counts) <= 4
    for masks in by_image.values():  # shapes never overlap
        assert int(np.sum(masks, axis=0).max()) == 1
    with Image.open(shapes_source / "images" / "000000.png") as im:
        assert (im.mode, im.size) == ("RGB", (96, 96))


def test_class_subset_and_count_prefix(tmp_path: Path) -> None:
    small = generate_shapes(
        tmp_path / "s", count=2, image_size=64, max_size=24, classes=("triangle",), progress=False
    )
    coco = json.loads((small / "annotations.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "triangle", "supercategory": "shape"}]
    assert {a["category_id"] for a in coco["annotations"]} == {1}
    # Image i depends only on (seed, i): a longer run starts with the same images.
    big = generate_shapes(
        tmp_path / "b", count=3, image_size=64, max_size=24, classes=("triangle",), progress=False
    )
    assert (small / "images/000001.png").read_bytes() == (big / "images/000001.png").read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"classes": ("circle", "hexagon")},
            r"unknown shape\(s\) \['hexagon'\]; allowed: \['circle', 'rectangle', 'triangle'\]",
        ),
        ({"classes": ()}, "at least one"),
        ({"count": 0}, "count=0"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects=3"),
        ({"min_size": 30, "max_size": 20}, "min_size=30"),
        ({"image_size": 64, "max_size": 80}, "max_size=80"),
    ],
)
def test_invalid_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_shapes(tmp_path, **{"progress": False, **kwargs})
