from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from components.data.format import DatasetError, read_coco, verify_dataset
from components.data.intake import IntakeError, intake, split_ids
from components.data.tests.helpers import coco_to_yolo, load_coco, save_coco
from components.settings import Settings
from components.storage import minio_client, upload_directory
from components.storage.testing import MotoS3


def _rejections(out: Path) -> list[dict[str, str]]:
    return json.loads((out / "rejections.json").read_text())


def test_coco_intake_writes_the_canonical_artifact(
    coco_source: Path, tmp_path: Path, local_settings: Settings
) -> None:
    source = load_coco(coco_source)
    result = intake(coco_source, tmp_path / "out", seed=3, settings=local_settings, progress=False)
    out = tmp_path / "out"
    manifest = result.manifest

    assert sorted(p.name for p in out.iterdir()) == [
        "annotations.json",
        "images",
        "manifest.json",
        "rejections.json",
    ]
    assert verify_dataset(out) == manifest  # every file's sha256 matches
    assert set(manifest.files) == {
        "annotations.json",
        *(f"images/{i['file_name']}" for i in source["images"]),
    }
    for img in source["images"]:  # byte-for-byte copies
        assert (out / "images" / img["file_name"]).read_bytes() == (
            coco_source / "images" / img["file_name"]
        ).read_bytes()
    coco = read_coco(out)
    assert [i["id"] for i in coco["images"]] == list(range(1, 13))
    assert coco["categories"] == [
        {"id": 1, "name": "circle"},
        {"id": 2, "name": "rectangle"},
        {"id": 3, "name": "triangle"},
    ]
    assert [a["bbox"] for a in coco["annotations"]] == [a["bbox"] for a in source["annotations"]]
    assert [a["segmentation"] for a in coco["annotations"]] == [
        a["segmentation"] for a in source["annotations"]
    ]

    assert manifest.classes == ["circle", "rectangle", "triangle"]
    assert manifest.source == str(coco_source.resolve()) and manifest.name == "coco"
    assert sorted(manifest.split.train + manifest.split.val) == list(range(1, 13))
    assert len(manifest.split.val) == round(12 * 0.2) == 2
    expected_per_class = {
        name: sum(a["category_id"] == i + 1 for a in source["annotations"])
        for i, name in enumerate(manifest.classes)
    }
    assert manifest.counts.model_dump() == {
        "images": 12,
        "annotations": len(source["annotations"]),
        "train_images": 10,
        "val_images": 2,
        "rejected": 0,
        "per_class": expected_per_class,
    }
    assert result.rejections == [] and _rejections(out) == []
    assert result.s3_uri is None and manifest.augmentations == []
    assert manifest.params == {"format": "coco", "val_fraction": 0.2, "seed": 3, "max_error_fraction": 0.05,
                               "augment": False}

    # Same input and seed -> same dataset identity.
    again = intake(coco_source, tmp_path / "again", seed=3, settings=local_settings, progress=False)
    assert again.manifest.sha256 == manifest.sha256
    assert again.manifest.split == manifest.split


def test_split_is_seeded_and_keeps_one_val_image() -> None:
    assert split_ids([1, 2], 0.01, seed=0).val != []
    assert split_ids([7], 0.5, seed=0).model_dump() == {"train": [7], "val": []}
    a, b = split_ids(list(range(1, 101)), 0.2, seed=1), split_ids(list(range(1, 101)), 0.2, seed=2)
    assert len(a.val) == 20 and a.val != b.val
    assert split_ids(list(range(1, 101)), 0.2, seed=1) == a


@pytest.mark.parametrize("names_in", ["classes.txt", "data.yaml"])
def test_yolo_intake(shapes_source: Path, tmp_path: Path, local_settings: Settings, names_in: str) -> None:
    yolo = coco_to_yolo(shapes_source, tmp_path / "yolo", names_in=names_in)
    (yolo / "labels" / "000004.txt").unlink()  # no label file: a negative image, kept
    result = intake(yolo, tmp_path / "out", settings=local_settings, progress=False)
    source = load_coco(shapes_source)
    coco = read_coco(tmp_path / "out")
    assert result.rejections == []
    assert result.manifest.classes == ["circle", "rectangle", "triangle"]
    assert [i["file_name"] for i in coco["images"]] == [i["file_name"] for i in source["images"]]
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(96, 96)] * 12
    expected = [a for a in source["annotations"] if a["image_id"] != 5]  # 000004.png has id 5
    assert len(coco["annotations"]) == len(expected) == result.manifest.counts.annotations
    for got, want in zip(coco["annotations"], expected, strict=True):
        assert got["category_id"] == want["category_id"]
        assert got["image_id"] == want["image_id"]
        np.testing.assert_allclose(got["bbox"], want["bbox"], atol=1e-3)
        assert "segmentation" not in got


# ---- validation -------------------------------------------------------------------------------


def _truncate(root: Path, coco: dict[str, Any]) -> None:
    path = root / "images" / "000001.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(root: Path, coco: dict[str, Any]) -> None:
    (root / "images" / "000002.png").write_bytes(np.random.default_rng(0).bytes(3000))


def _box_outside(root: Path, coco: dict[str, Any]) -> None:
    ann = next(a for a in coco["annotations"] if a["image_id"] == 4)
    ann["bbox"] = [80.0, 10.0, 30.0, 10.0]  # x + w = 110 > 96
    ann.pop("segmentation")


def _degenerate_box(root: Path, coco: dict[str, Any]) -> None:
    ann = next(a for a in coco["annotations"] if a["image_id"] == 4)
    ann["bbox"] = [10.0, 10.0, 0.0, 5.0]
    ann.pop("segmentation")


def _unknown_category(root: Path, coco: dict[str, Any]) -> None:
    next(a for a in coco["annotations"] if a["image_id"] == 6)["category_id"] = 99


def _duplicate(root: Path, coco: dict[str, Any]) -> None:
    shutil.copyfile(root / "images" / "000003.png", root / "images" / "copy_of_3.png")
    coco["images"].append({"id": 100, "file_name": "copy_of_3.png", "width": 96, "height": 96})
    coco["annotations"].append(
        {"id": 1000, "image_id": 100, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
    )


def _missing_file(root: Path, coco: dict[str, Any]) -> None:
    (root / "images" / "000007.png").unlink()


def _orphan_annotation(root: Path, coco: dict[str, Any]) -> None:
    coco["annotations"].append({"id": 1001, "image_id": 555, "category_id": 1, "bbox": [1, 1, 5, 5]})


def _size_mismatch(root: Path, coco: dict[str, Any]) -> None:
    coco["images"][8]["width"] = 200


def _unlisted_image(root: Path, coco: dict[str, Any]) -> None:
    shutil.copyfile(root / "images" / "000000.png", root / "images" / "stray.png")


CASES = [
    # (corruption, item, file, field, reason pattern, whole image rejected)
    (
        _truncate,
        "image",
        "images/000001.png",
        "bytes",
        r"cannot decode image: OSError: (?i:.*truncated.*)",
        True,
    ),
    (
        _random_bytes,
        "image",
        "images/000002.png",
        "bytes",
        r"cannot decode image: UnidentifiedImageError: not a format PIL recognises",
        True,
    ),
    (
        _box_outside,
        "annotation",
        "images/000003.png",
        "bbox",
        r"box \[80, 10, 30, 10\] \(xywh px\) extends outside the 96x96 image \(tolerance 0.5 px\)",
        False,
    ),
    (
        _degenerate_box,
        "annotation",
        "images/000003.png",
        "bbox",
        r"degenerate box \[10, 10, 0, 5\] \(xywh\): width and height must be > 0",
        False,
    ),
    (
        _unknown_category,
        "annotation",
        "images/000005.png",
        "category_id",
        r"unknown category_id 99; known ids \[1, 2, 3\] \(\['circle', 'rectangle', 'triangle'\]\)",
        False,
    ),
    (
        _duplicate,
        "image",
        "images/copy_of_3.png",
        "bytes",
        r"duplicate of images/000003.png \(identical bytes, sha256 [0-9a-f]{12}\)",
        True,
    ),
    (_missing_file, "image", "images/000007.png", "file_name", r"image file not found", True),
    (
        _orphan_annotation,
        "annotation",
        "annotations.json",
        "image_id",
        r"image_id 555 is not in images\[\]",
        None,
    ),
    (
        _size_mismatch,
        "image",
        "images/000008.png",
        "width/height",
        r"declared 200x96 but the file is 96x96",
        True,
    ),
    (_unlisted_image, "image", "images/stray.png", "file_name", r"not listed in annotations.json", True),
]


@pytest.mark.parametrize(
    ("corrupt", "item", "file", "field", "reason", "whole_image"),
    CASES,
    ids=[c[0].__name__.strip("_") for c in CASES],
)
def test_each_problem_is_reported(
    coco_source: Path,
    tmp_path: Path,
    local_settings: Settings,
    corrupt,
    item,
    file,
    field,
    reason,
    whole_image,
) -> None:
    coco = load_coco(coco_source)
    corrupt(coco_source, coco)
    save_coco(coco_source, coco)
    result = intake(
        coco_source, tmp_path / "out", max_error_fraction=1.0, settings=local_settings, progress=False
    )
    rejections = _rejections(tmp_path / "out")
    assert rejections == result.rejections
    first = rejections[0]
    assert (first["item"], first["file"], first["field"]) == (item, file, field)
    assert re.fullmatch(reason, first["reason"]), first["reason"]
    kept_files = {i["file_name"] for i in read_coco(tmp_path / "out")["images"]}
    if whole_image is not None:  # None: the problem is not about one image file
        assert (Path(file).name not in kept_files) == whole_image
    if whole_image and corrupt is not _unlisted_image:
        # The image's annotations are rejected with it, each listed.
        assert len(rejections) >= 2
        assert all(
            (r["item"], r["file"], r["field"]) == ("annotation", file, "image_id") for r in rejections[1:]
        )
        assert all(r["reason"] == f"its image was rejected: {first['reason']}" for r in rejections[1:])
    else:
        assert len(rejections) == 1
    assert result.manifest.counts.rejected == len(rejections)


def test_box_within_half_a_pixel_is_clipped(
    coco_source: Path, tmp_path: Path, local_settings: Settings
) -> None:
    coco = load_coco(coco_source)
    ann = coco["annotations"][0]
    ann.pop("segmentation")
    ann["bbox"] = [-0.4, 2.0, 10.0, 94.4]  # 0.4 px over the left and bottom edges
    save_coco(coco_source, coco)
    intake(coco_source, tmp_path / "out", settings=local_settings, progress=False)
    assert read_coco(tmp_path / "out")["annotations"][0]["bbox"] == [0.0, 2.0, 9.6, 94.0]


def test_too_many_problems_fail_and_name_the_files(
    coco_source: Path, tmp_path: Path, local_settings: Settings
) -> None:
    _truncate(coco_source, {})
    _random_bytes(coco_source, {})
    out = tmp_path / "out"
    with pytest.raises(IntakeError) as excinfo:
        intake(coco_source, out, max_error_fraction=0.05, settings=local_settings, progress=False)
    message = str(excinfo.value)
    assert "more than max_error_fraction=5.0%" in message
    assert "images/000001.png: bytes: cannot decode image" in message
    assert "images/000002.png: bytes: cannot decode image" in message
    assert str(out / "rejections.json") in message
    # The report is written even though intake failed, and nothing else is.
    assert sorted(p.name for p in out.iterdir()) == ["rejections.json"]
    assert _rejections(out) == excinfo.value.rejections
    assert {r["file"] for r in excinfo.value.rejections} == {"images/000001.png", "images/000002.png"}
    # A rerun into the same directory is allowed once the source is fixed.
    intake(coco_source, out, max_error_fraction=1.0, settings=local_settings, progress=False)
    assert (out / "manifest.json").is_file()


def test_long_failure_message_lists_twenty_and_counts_the_rest(
    coco_source: Path, tmp_path: Path, local_settings: Settings
) -> None:
    coco = load_coco(coco_source)
    for ann in coco["annotations"]:
        ann["category_id"] = 42
    save_coco(coco_source, coco)
    with pytest.raises(IntakeError) as excinfo:
        intake(coco_source, tmp_path / "out", settings=local_settings, progress=False)
    n = len(coco["annotations"])
    assert n > 20
    assert str(excinfo.value).count("unknown category_id 42") == 20
    assert f"... and {n - 20} more" in str(excinfo.value)


def test_unusable_sources_raise_dataset_error(tmp_path: Path, local_settings: Settings) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=re.escape(f"{empty}: cannot detect the dataset format")):
        intake(empty, tmp_path / "o1", settings=local_settings)
    with pytest.raises(DatasetError, match="no COCO annotation file"):
        intake(empty, tmp_path / "o2", fmt="coco", settings=local_settings)
    with pytest.raises(DatasetError, match="fmt='voc'"):
        intake(empty, tmp_path / "o3", fmt="voc", settings=local_settings)  # type: ignore[arg-type]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="output directory is not empty"):
        intake(empty, busy, settings=local_settings)


# ---- augmentation ------------------------------------------------------------------------------


def test_augment_multiplies_train_images_only(
    coco_source: Path, tmp_path: Path, local_settings: Settings
) -> None:
    plain = intake(coco_source, tmp_path / "plain", seed=5, settings=local_settings, progress=False).manifest
    result = intake(
        coco_source, tmp_path / "aug", seed=5, augment=True, settings=local_settings, progress=False
    )
    manifest = result.manifest
    coco = read_coco(tmp_path / "aug")
    assert manifest.augmentations == ["rotate", "blur", "flip", "flop"]
    assert manifest.counts.images == 12 + 4 * 10
    assert manifest.counts.train_images == 50 and manifest.split.val == plain.split.val
    names = {i["id"]: i["file_name"] for i in coco["images"]}
    for val_id in manifest.split.val:  # val is untouched: same file, no copies
        stem = Path(names[val_id]).stem
        assert not any(n.startswith(f"{stem}_") for n in names.values())
    first_train = names[manifest.split.train[0]]
    stem = Path(first_train).stem
    assert {f"{stem}_{op}.png" for op in manifest.augmentations} <= set(names.values())
    verify_dataset(tmp_path / "aug")
    # Every augmented annotation's box is the tight box of its RLE mask.
    for ann in coco["annotations"]:
        if ann["image_id"] > 12:
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            assert list(mask_utils.toBbox(rle)) == ann["bbox"]
            assert int(mask_utils.area(rle)) == ann["area"]
    by_name = {i["file_name"]: i["id"] for i in coco["images"]}
    orig = [a["bbox"] for a in coco["annotations"] if a["image_id"] == by_name[first_train]]
    flop = [a["bbox"] for a in coco["annotations"] if a["image_id"] == by_name[f"{stem}_flop.png"]]
    assert flop == [[96 - x - w, y, w, h] for x, y, w, h in orig]


# ---- S3 ------------------------------------------------------------------------------------


def test_intake_from_s3_and_upload(moto_s3: MotoS3, shapes_source: Path, tmp_path: Path) -> None:
    settings = moto_s3.settings(home=tmp_path / "home", s3_bucket="intake-artifacts")
    client = minio_client(settings)
    upload_directory(client, shapes_source, "s3://raw-data/shapes/v1")
    result = intake("s3://raw-data/shapes/v1", tmp_path / "out", settings=settings, progress=False)
    manifest = result.manifest
    assert manifest.source == "s3://raw-data/shapes/v1" and manifest.name == "v1"
    assert manifest.counts.images == 12 and result.rejections == []
    local = intake(shapes_source, tmp_path / "local", settings=Settings(s3_endpoint=None), progress=False)
    assert manifest.files == local.manifest.files  # same bytes whichever way they came

    assert result.s3_uri == f"s3://intake-artifacts/datasets/{manifest.sha256}/"
    prefix = f"datasets/{manifest.sha256}/"
    keys = {
        o.object_name[len(prefix) :]
        for o in client.list_objects("intake-artifacts", prefix=prefix, recursive=True)
    }
    assert keys == {*manifest.files, "manifest.json", "rejections.json"}


def test_s3_source_with_nothing_there_names_the_uri(moto_s3: MotoS3, tmp_path: Path) -> None:
    settings = moto_s3.settings(home=tmp_path / "home")
    minio_client(settings).make_bucket("empty-source")
    with pytest.raises(DatasetError, match=r"s3://empty-source/nothing: .*no objects under this prefix"):
        intake("s3://empty-source/nothing", tmp_path / "out", settings=settings)
