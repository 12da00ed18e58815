from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from components.data.format import DatasetError, read_coco
from components.data.formats import detect_format, read_source, read_yolo_classes
from components.data.intake import intake
from components.data.tests.helpers import coco_to_yolo, load_coco, save_coco
from components.settings import Settings


def test_detects_coco_and_yolo(shapes_source: Path, tmp_path: Path) -> None:
    assert detect_format(shapes_source) == "coco"
    assert detect_format(coco_to_yolo(shapes_source, tmp_path / "y")) == "yolo"
    src = read_source(shapes_source)
    assert (src.fmt, src.classes, len(src.images)) == ("coco", ["circle", "rectangle", "triangle"], 12)
    assert src.total_items == 12 + len(src.annotations) and src.problems == []


def test_coco_polygons_and_uncompressed_rle_are_accepted(coco_source: Path, tmp_path: Path) -> None:
    coco = load_coco(coco_source)
    a0, a1, a2 = coco["annotations"][:3]
    a0["segmentation"] = [[10, 10, 30, 10, 30, 20, 10, 20]]  # polygon, no bbox: derived from it
    a0.pop("bbox")
    a0.pop("area")
    mask = mask_utils.decode(
        {"size": a1["segmentation"]["size"], "counts": a1["segmentation"]["counts"].encode()}
    )
    flat = mask.flatten(order="F")  # uncompressed RLE counts runs in column-major order
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    a1["segmentation"] = {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0, *runs]}
    a2["segmentation"] = {"size": [5, 5], "counts": "bad"}  # wrong size for the 96x96 image
    save_coco(coco_source, coco)

    result = intake(
        coco_source,
        tmp_path / "out",
        max_error_fraction=1.0,
        settings=Settings(s3_endpoint=None),
        progress=False,
    )
    out = read_coco(tmp_path / "out")["annotations"]
    assert out[0]["segmentation"] == a0["segmentation"]
    assert out[0]["bbox"] == [10.0, 10.0, 20.0, 10.0]  # the box of the polygon as pycocotools rasterises it
    assert isinstance(out[1]["segmentation"]["counts"], str)  # normalised to compressed RLE
    decoded = mask_utils.decode(
        {"size": out[1]["segmentation"]["size"], "counts": out[1]["segmentation"]["counts"].encode()}
    )
    assert np.array_equal(decoded, mask)
    assert [(r["field"], r["reason"]) for r in result.rejections] == [
        ("segmentation", "RLE size [5, 5] does not match the image (height, width) = [96, 96]")
    ]


def test_coco_source_level_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(
        DatasetError, match=re.escape(f"{tmp_path / 'annotations.json'}: not readable COCO JSON")
    ):
        read_source(tmp_path)
    (tmp_path / "annotations.json").write_text('{"images": [], "categories": []}')
    with pytest.raises(DatasetError, match="'categories' must be a non-empty list"):
        read_source(tmp_path)
    (tmp_path / "annotations.json").write_text('{"annotations": []}')
    with pytest.raises(DatasetError, match="top-level 'images' list missing"):
        read_source(tmp_path)


def test_yolo_problems_are_per_line(shapes_source: Path, tmp_path: Path) -> None:
    yolo = coco_to_yolo(shapes_source, tmp_path / "y")
    label = yolo / "labels" / "000000.txt"
    good = label.read_text().splitlines()
    label.write_text(
        "\n".join([*good, "7 0.5 0.5 0.1 0.1", "0 0.5 0.5", "0 a b c d", "0 1.2 0.5 0.2 0.2", ""])
    )
    (yolo / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    result = intake(
        yolo, tmp_path / "out", max_error_fraction=1.0, settings=Settings(s3_endpoint=None), progress=False
    )
    n = len(good)
    assert [(r["item"], r["file"], r["field"], r["source"]) for r in result.rejections] == [
        ("annotation", "images/000000.png", "category_id", f"labels/000000.txt:{n + 1}"),
        ("annotation", "images/000000.png", "line", f"labels/000000.txt:{n + 2}"),
        ("annotation", "images/000000.png", "line", f"labels/000000.txt:{n + 3}"),
        ("annotation", "labels/ghost.txt", "image", "labels/ghost.txt"),
        ("annotation", "images/000000.png", "bbox", f"labels/000000.txt:{n + 4}"),
    ]
    reasons = [r["reason"] for r in result.rejections]
    assert reasons[0] == "unknown class index 7; allowed 0..2 (['circle', 'rectangle', 'triangle'])"
    assert reasons[1] == "expected 5 values 'cls cx cy w h', got 3: '0 0.5 0.5'"
    assert reasons[3] == "no image file for this label file"
    assert reasons[4].startswith("box [105.6, 38.4, 19.2, 19.2] (xywh px) extends outside the 96x96 image")


def test_yolo_class_names(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("names: {0: cat, 2: dog}\n")
    with pytest.raises(DatasetError, match=r"keys must be 0..K-1 without gaps, got \[0, 2\]"):
        read_yolo_classes(tmp_path)
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\n")
    assert read_yolo_classes(tmp_path) == ["cat", "dog"]
    (tmp_path / "classes.txt").write_text("a\nb\n\n")  # classes.txt wins
    assert read_yolo_classes(tmp_path) == ["a", "b"]
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"add classes\.txt"):
        read_yolo_classes(empty)


def test_yolo_nested_split_folders(shapes_source: Path, tmp_path: Path) -> None:
    yolo = coco_to_yolo(shapes_source, tmp_path / "y")
    for sub in ("images", "labels"):
        (yolo / sub / "train").mkdir()
    for name in ("000000", "000001"):
        shutil.move(yolo / "images" / f"{name}.png", yolo / "images" / "train" / f"{name}.png")
        shutil.move(yolo / "labels" / f"{name}.txt", yolo / "labels" / "train" / f"{name}.txt")
    src = read_source(yolo, "yolo")
    assert src.problems == []
    assert [i.file for i in src.images][:3] == ["images/000002.png", "images/000003.png", "images/000004.png"]
    assert "images/train/000000.png" in [i.file for i in src.images]
    assert sum(a.image_key == "images/train/000000.png" for a in src.annotations) >= 1


def test_same_file_name_in_two_folders_is_renamed_not_overwritten(
    shapes_source: Path, tmp_path: Path
) -> None:
    from PIL import Image

    yolo = coco_to_yolo(shapes_source, tmp_path / "y")
    (yolo / "images" / "val").mkdir()
    (yolo / "labels" / "val").mkdir()
    # Same pixels, different PNG bytes: not a duplicate, but the same file name.
    with Image.open(yolo / "images" / "000003.png") as im:
        im.save(yolo / "images" / "val" / "000002.png", compress_level=1)
    shutil.copyfile(yolo / "labels" / "000003.txt", yolo / "labels" / "val" / "000002.txt")
    result = intake(yolo, tmp_path / "out", settings=Settings(s3_endpoint=None), progress=False)
    names = [i["file_name"] for i in read_coco(tmp_path / "out")["images"]]
    assert result.rejections == [] and len(names) == 13
    assert names[:3] == ["000000.png", "000001.png", "000002.png"] and "000002_2.png" in names
    assert (tmp_path / "out" / "images" / "000002_2.png").read_bytes() == (
        yolo / "images" / "val" / "000002.png"
    ).read_bytes()
