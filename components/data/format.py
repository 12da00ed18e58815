"""The canonical dataset artifact every stage reads.

A dataset artifact is a directory::

    images/<file_name>      the accepted images, byte-for-byte as given (PNG/JPEG/...)
    annotations.json        COCO detection JSON: ``images`` (id, file_name, width, height),
                            ``annotations`` (id, image_id, category_id, bbox [x, y, w, h] in pixels,
                            area, iscrowd, optional ``segmentation`` as polygons or RLE),
                            ``categories`` (id 1..K, name) in class order
    manifest.json           see :class:`Manifest`
    rejections.json         every item intake refused, with file, field and reason

Class index ``i`` (0-based, what models predict) is COCO ``category_id`` ``i + 1``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

FORMAT_VERSION = 1
IMAGES_DIR = "images"
ANNOTATIONS_FILE = "annotations.json"
MANIFEST_FILE = "manifest.json"
REJECTIONS_FILE = "rejections.json"


class DatasetError(ValueError):
    """A dataset is missing, malformed or fails validation; the message names file and field."""


class Split(BaseModel):
    """Image ids (COCO ``images[].id``) of each split."""

    train: list[int]
    val: list[int]


class Counts(BaseModel):
    images: int
    annotations: int
    train_images: int
    val_images: int
    rejected: int
    per_class: dict[str, int] = Field(default_factory=dict)


class Manifest(BaseModel):
    """``manifest.json``: identity and contents of a dataset artifact."""

    format_version: int = FORMAT_VERSION
    name: str
    source: str
    classes: list[str]
    files: dict[str, str] = Field(description="relative path -> sha256 hex of the file's bytes")
    sha256: str = Field(description="digest of the sorted (path, sha256) list: the dataset identity")
    split: Split
    counts: Counts
    augmentations: list[str] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict, description="intake parameters (the recipe)")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dataset_digest(files: dict[str, str]) -> str:
    """Order-independent digest of a ``{relative path: sha256}`` map."""
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(f"{rel}\0{files[rel]}\n".encode())
    return digest.hexdigest()


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: not a dataset artifact (manifest.json missing)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise DatasetError(f"{path}: invalid manifest: {exc}") from exc


def read_coco(root: Path) -> dict[str, Any]:
    path = Path(root) / ANNOTATIONS_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: annotations file missing") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    return data


def verify_dataset(root: Path) -> Manifest:
    """Check every file against the manifest's sha256; raise :class:`DatasetError` on mismatch."""
    manifest = read_manifest(root)
    bad = [rel for rel, sha in manifest.files.items() if not (Path(root) / rel).is_file()
           or sha256_file(Path(root) / rel) != sha]
    if bad:
        raise DatasetError(f"{root}: {len(bad)} file(s) missing or changed since intake: {bad[:10]}")
    return manifest
