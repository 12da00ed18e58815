"""Dataset intake: a COCO or YOLO source (local folder or ``s3://`` prefix) -> the canonical artifact.

Intake validates every item and never drops data silently:

- an image that is missing, undecodable or truncated (PIL ``verify`` *and* a full ``load``), whose
  declared size disagrees with its pixels, or whose bytes duplicate an earlier image, is rejected
  together with all its annotations;
- an annotation with an unknown category, a box outside the image (0.5 px tolerance) or of zero size,
  or a malformed segmentation is rejected on its own; its image stays;
- images with no annotations are kept as negatives.

Every rejection goes to ``rejections.json`` (see :class:`components.data.formats.Problem`). When the
rejected fraction of all items (images + annotations) exceeds ``max_error_fraction``, intake writes
``rejections.json`` and raises :class:`IntakeError` listing the files and problems.

The output is exactly the layout of :mod:`components.data.format`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils
from tqdm import tqdm

from components.data.augment import AUGMENTATIONS, augment_image
from components.data.format import (
    ANNOTATIONS_FILE,
    IMAGES_DIR,
    MANIFEST_FILE,
    REJECTIONS_FILE,
    Counts,
    DatasetError,
    Manifest,
    Split,
    dataset_digest,
    sha256_file,
)
from components.data.formats import Problem, SourceAnnotation, SourceDataset, SourceImage, read_source
from components.settings import Settings, get_settings

log = logging.getLogger(__name__)

BOX_TOLERANCE_PX = 0.5  # annotation tools round; half a pixel outside the image is still the image
_MAX_LISTED = 20


class IntakeError(DatasetError):
    """Too many items were rejected (or none was usable). ``rejections`` holds every problem."""

    def __init__(self, message: str, rejections: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.rejections = rejections


@dataclass
class IntakeResult:
    """What intake produced: the manifest, where the artifact is, what was rejected, and its S3 copy."""

    manifest: Manifest
    out_dir: Path
    rejections: list[dict[str, str]]
    s3_uri: str | None = None
    augment_dropped: list[str] = field(default_factory=list)  # instances augmentation pushed out


@dataclass
class _Accepted:
    image: SourceImage
    width: int
    height: int
    annotations: list[dict[str, Any]]  # category (name), bbox xywh, area, iscrowd, segmentation?


def intake(
    source: str | Path,
    out_dir: Path,
    *,
    fmt: Literal["auto", "coco", "yolo"] = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    max_error_fraction: float = 0.05,
    augment: bool = False,
    name: str | None = None,
    settings: Settings | None = None,
    progress: bool = True,
) -> IntakeResult:
    """Import ``source`` into ``out_dir`` (which must be absent or empty) as a dataset artifact.

    ``source`` is a local folder or ``s3://bucket/prefix`` (downloaded through the minio SDK; needs S3
    settings). The split is a seeded shuffle with ``round(N * val_fraction)`` validation images, at
    least one when N >= 2. ``augment`` adds rotate/blur/flip/flop copies of the *train* images only.
    With S3 configured in ``settings`` (default: :func:`get_settings`), the artifact is also uploaded to
    ``s3://<bucket>/datasets/<sha256>/``.
    """
    if fmt not in ("auto", "coco", "yolo"):
        raise DatasetError(f"fmt={fmt!r}: allowed formats are 'auto', 'coco', 'yolo'")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction}: must be between 0 and 1 (exclusive)")
    if not 0.0 <= max_error_fraction <= 1.0:
        raise DatasetError(f"max_error_fraction={max_error_fraction}: must be between 0 and 1")
    settings = settings if settings is not None else get_settings()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    source_str = str(source)
    is_s3 = source_str.startswith("s3://")

    with ExitStack() as stack:
        if is_s3:
            from components.storage import StorageError, download_prefix, minio_client

            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="modelcommons-intake-")))
            try:
                download_prefix(minio_client(settings), source_str, root)
            except (StorageError, ValueError) as exc:
                raise DatasetError(f"cannot read dataset source {source_str}: {exc}") from exc
        else:
            root = Path(source)
            source_str = str(root.resolve())
        src = read_source(root, fmt)
        accepted, problems = _validate(src, progress=progress)
        rejections = [p.to_dict() for p in problems]
        _write_json(out_dir / REJECTIONS_FILE, rejections)
        _check_error_fraction(source_str, out_dir, src, accepted, rejections, max_error_fraction)
        manifest, dropped = _write_artifact(
            src,
            accepted,
            out_dir,
            name=name or _default_name(source_str),
            source=source_str,
            val_fraction=val_fraction,
            seed=seed,
            augment=augment,
            max_error_fraction=max_error_fraction,
            rejected=len(rejections),
            progress=progress,
        )

    s3_uri = None
    if settings.use_s3:
        from components.storage import minio_client, upload_directory

        s3_uri = f"s3://{settings.s3_bucket}/datasets/{manifest.sha256}/"
        upload_directory(minio_client(settings), out_dir, s3_uri)
    return IntakeResult(
        manifest=manifest, out_dir=out_dir, rejections=rejections, s3_uri=s3_uri, augment_dropped=dropped
    )


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DatasetError(f"{out_dir}: output exists and is not a directory")
        # A failed intake leaves only rejections.json behind; anything else is someone's data.
        leftovers = [p.name for p in out_dir.iterdir() if p.name != REJECTIONS_FILE]
        if leftovers:
            raise DatasetError(f"{out_dir}: output directory is not empty ({sorted(leftovers)[:5]})")
    out_dir.mkdir(parents=True, exist_ok=True)


def _default_name(source: str) -> str:
    tail = source.rstrip("/").rsplit("/", 1)[-1]
    return tail if tail and not tail.startswith("s3:") else "dataset"


# ---- validation --------------------------------------------------------------------------------


class _RejectedError(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def _validate(src: SourceDataset, *, progress: bool) -> tuple[list[_Accepted], list[Problem]]:
    problems = list(src.problems)
    by_image: dict[str, list[SourceAnnotation]] = {}
    for ann in src.annotations:
        by_image.setdefault(ann.image_key, []).append(ann)
    first_by_sha: dict[str, str] = {}
    accepted: list[_Accepted] = []
    for image in tqdm(src.images, desc="validate", unit="img", disable=not progress or len(src.images) < 200):
        anns = by_image.get(image.key, [])
        try:
            width, height, sha = _check_image(image)
            if sha in first_by_sha:
                raise _RejectedError(
                    "bytes", f"duplicate of {first_by_sha[sha]} (identical bytes, sha256 {sha[:12]})"
                )
        except _RejectedError as bad:
            problems.append(Problem("image", image.file, bad.field, bad.reason, image.source))
            problems.extend(
                Problem(
                    "annotation", image.file, "image_id", f"its image was rejected: {bad.reason}", a.source
                )
                for a in anns
            )
            continue
        first_by_sha[sha] = image.file
        kept: list[dict[str, Any]] = []
        for ann in anns:
            try:
                kept.append(_check_annotation(ann, width, height))
            except _RejectedError as bad:
                problems.append(Problem("annotation", image.file, bad.field, bad.reason, ann.source))
        accepted.append(_Accepted(image=image, width=width, height=height, annotations=kept))
    return accepted, problems


def _check_image(image: SourceImage) -> tuple[int, int, str]:
    """(width, height, sha256) of a decodable image; raises _RejectedError otherwise."""
    if image.path is None:
        raise _RejectedError("file_name", "image file not found")
    try:
        data = image.path.read_bytes()
    except OSError as exc:
        raise _RejectedError("file_name", f"cannot read file: {exc}") from exc
    sha = hashlib.sha256(data).hexdigest()
    try:
        # verify() checks structure/CRCs without decoding; load() decodes every pixel and catches
        # truncation that verify() lets through. Both need a fresh Image object.
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except UnidentifiedImageError as exc:  # its message only names the in-memory buffer
        raise _RejectedError(
            "bytes", "cannot decode image: UnidentifiedImageError: not a format PIL recognises"
        ) from exc
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise _RejectedError("bytes", f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    if width < 1 or height < 1:
        raise _RejectedError("bytes", f"image has no pixels ({width}x{height})")
    declared = (image.width or width, image.height or height)
    if declared != (width, height):
        raise _RejectedError(
            "width/height", f"declared {image.width}x{image.height} but the file is {width}x{height}"
        )
    return width, height, sha


def _check_annotation(ann: SourceAnnotation, width: int, height: int) -> dict[str, Any]:
    """COCO-ready fields of a valid annotation (bbox clipped to the image), else _RejectedError."""
    rle = _segmentation_rle(ann.segmentation, width, height) if ann.segmentation is not None else None
    if ann.bbox is None:
        assert rle is not None  # readers guarantee a bbox or a segmentation
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    elif ann.normalized:
        cx, cy, nw, nh = ann.bbox
        x, y, w, h = (cx - nw / 2) * width, (cy - nh / 2) * height, nw * width, nh * height
    else:
        x, y, w, h = ann.bbox
    shown = f"[{x:.6g}, {y:.6g}, {w:.6g}, {h:.6g}]"
    if w <= 0 or h <= 0:
        raise _RejectedError("bbox", f"degenerate box {shown} (xywh): width and height must be > 0")
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _RejectedError(
            "bbox",
            f"box {shown} (xywh px) extends outside the {width}x{height} image (tolerance {tol} px)",
        )
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    out: dict[str, Any] = {
        "category": ann.category,
        "bbox": [round(x0, 4), round(y0, 4), round(x1 - x0, 4), round(y1 - y0, 4)],
        "iscrowd": ann.iscrowd,
    }
    if rle is not None:
        out["segmentation"] = ann.segmentation if isinstance(ann.segmentation, list) else _rle_json(rle)
        out["area"] = ann.area if ann.area is not None else float(mask_utils.area(rle))
    else:
        out["area"] = round((x1 - x0) * (y1 - y0), 4)
    return out


def _segmentation_rle(segmentation: Any, width: int, height: int) -> dict[str, Any]:
    """Compressed RLE of COCO polygons or RLE (compressed or not); raises _RejectedError if malformed."""
    try:
        if isinstance(segmentation, list):
            if not segmentation or not all(
                isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 for poly in segmentation
            ):
                raise _RejectedError("segmentation", "polygons must be lists of >= 3 (x, y) pairs")
            return dict(mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width)))
        if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
            if list(segmentation["size"]) != [height, width]:
                raise _RejectedError(
                    "segmentation",
                    f"RLE size {segmentation['size']} does not match the image (height, width) = "
                    f"[{height}, {width}]",
                )
            if isinstance(segmentation["counts"], list):  # uncompressed RLE
                return dict(mask_utils.frPyObjects(segmentation, height, width))
            counts = segmentation["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
            mask_utils.area(rle)  # decodes: raises on corrupt counts
            return rle
    except _RejectedError:
        raise
    except Exception as exc:  # pycocotools raises TypeError/ValueError/... on malformed input
        raise _RejectedError("segmentation", f"malformed segmentation: {exc}") from exc
    raise _RejectedError("segmentation", "expected polygons (list of lists) or RLE {size, counts}")


def _rle_json(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode() if isinstance(counts, bytes) else counts,
    }


def _check_error_fraction(
    source: str,
    out_dir: Path,
    src: SourceDataset,
    accepted: list[_Accepted],
    rejections: list[dict[str, str]],
    max_error_fraction: float,
) -> None:
    total = max(src.total_items, len(rejections), 1)
    fraction = len(rejections) / total
    if fraction <= max_error_fraction and accepted:
        if rejections:
            log.warning(
                "intake %s: rejected %d of %d items, see %s",
                source,
                len(rejections),
                total,
                out_dir / REJECTIONS_FILE,
            )
        return
    headline = (
        f"intake of {source}: no usable image"
        if not accepted
        else f"intake of {source}: rejected {len(rejections)} of {total} items ({fraction:.1%}), more than "
        f"max_error_fraction={max_error_fraction:.1%}"
    )
    lines = [
        f"  {r['file']}: {r['field']}: {r['reason']}" + (f" [{r['source']}]" if r.get("source") else "")
        for r in rejections[:_MAX_LISTED]
    ]
    if len(rejections) > _MAX_LISTED:
        lines.append(f"  ... and {len(rejections) - _MAX_LISTED} more")
    raise IntakeError(
        "\n".join([f"{headline}; every problem is in {out_dir / REJECTIONS_FILE}:", *lines]), rejections
    )


# ---- output ------------------------------------------------------------------------------------


def split_ids(image_ids: list[int], val_fraction: float, seed: int) -> Split:
    """Seeded train/val split: ``round(N * val_fraction)`` val ids, clamped to 1..N-1 when N >= 2."""
    n = len(image_ids)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(image_ids[i] for i in order[:n_val])
    train = sorted(image_ids[i] for i in order[n_val:])
    return Split(train=train, val=val)


def _unique_name(name: str, used: set[str]) -> str:
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, k = name, 2
    while candidate.lower() in used:  # lower(): stay safe on case-insensitive filesystems
        candidate, k = f"{stem}_{k}{suffix}", k + 1
    used.add(candidate.lower())
    return candidate


def _write_artifact(
    src: SourceDataset,
    accepted: list[_Accepted],
    out_dir: Path,
    *,
    name: str,
    source: str,
    val_fraction: float,
    seed: int,
    augment: bool,
    max_error_fraction: float,
    rejected: int,
    progress: bool,
) -> tuple[Manifest, list[str]]:
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    category_id = {cls: i + 1 for i, cls in enumerate(src.classes)}
    used: set[str] = set()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []

    def add_annotation(image_id: int, ann: dict[str, Any]) -> None:
        entry = {
            "id": len(annotations) + 1,
            "image_id": image_id,
            "category_id": category_id[ann["category"]],
        }
        entry.update({k: v for k, v in ann.items() if k != "category"})
        annotations.append(entry)

    for image_id, item in enumerate(
        tqdm(accepted, desc="copy", unit="img", disable=not progress or len(accepted) < 200), start=1
    ):
        assert item.image.path is not None
        file_name = _unique_name(item.image.path.name, used)
        shutil.copyfile(item.image.path, images_dir / file_name)  # byte-for-byte
        images.append({"id": image_id, "file_name": file_name, "width": item.width, "height": item.height})
        for ann in item.annotations:
            add_annotation(image_id, ann)

    split = split_ids([img["id"] for img in images], val_fraction, seed)
    dropped: list[str] = []
    if augment:
        dropped = _augment_train(accepted, images, split, images_dir, used, add_annotation, seed, progress)

    # Content only (no name/source): the same images and labels give the same dataset sha256
    # wherever they came from; the manifest records name and source.
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category_id[c], "name": c} for c in src.classes],
    }
    _write_json(out_dir / ANNOTATIONS_FILE, coco)
    files = {f"{IMAGES_DIR}/{img['file_name']}": sha256_file(images_dir / img["file_name"]) for img in images}
    files[ANNOTATIONS_FILE] = sha256_file(out_dir / ANNOTATIONS_FILE)
    per_class = Counter(src.classes[a["category_id"] - 1] for a in annotations)
    manifest = Manifest(
        name=name,
        source=source,
        classes=list(src.classes),
        files=files,
        sha256=dataset_digest(files),
        split=split,
        counts=Counts(
            images=len(images),
            annotations=len(annotations),
            train_images=len(split.train),
            val_images=len(split.val),
            rejected=rejected,
            per_class={c: per_class.get(c, 0) for c in src.classes},
        ),
        augmentations=list(AUGMENTATIONS) if augment else [],
        params={"format": src.fmt, "val_fraction": val_fraction, "seed": seed,
                "max_error_fraction": max_error_fraction, "augment": augment},
    )
    (out_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest, dropped


def _augment_train(
    accepted: list[_Accepted],
    images: list[dict[str, Any]],
    split: Split,
    images_dir: Path,
    used: set[str],
    add_annotation: Any,
    seed: int,
    progress: bool,
) -> list[str]:
    """Append rotate/blur/flip/flop PNG copies of every train image; their ids join ``split.train``."""
    dropped: list[str] = []
    train_ids = list(split.train)
    for image_id in tqdm(train_ids, desc="augment", unit="img", disable=not progress or len(train_ids) < 50):
        item, meta = accepted[image_id - 1], images[image_id - 1]
        anns = item.annotations
        with Image.open(images_dir / meta["file_name"]) as im:
            pil = im.convert("RGB")
        masks = None
        # Masks keep rotated boxes tight; only usable when every instance has one.
        if anns and all("segmentation" in a for a in anns):
            masks = np.stack(
                [
                    mask_utils.decode(_segmentation_rle(a["segmentation"], item.width, item.height)).astype(
                        bool
                    )
                    for a in anns
                ]
            )
        results = augment_image(
            pil, [a["bbox"] for a in anns], list(range(len(anns))), masks, seed=seed * 1_000_003 + image_id
        )
        stem = Path(meta["file_name"]).stem
        for result in results:
            new_id = len(images) + 1
            file_name = _unique_name(f"{stem}_{result.op}.png", used)
            result.image.save(images_dir / file_name, format="PNG")
            images.append({"id": new_id, "file_name": file_name, "width": item.width, "height": item.height})
            split.train.append(new_id)
            for k, (src_index, box) in enumerate(zip(result.kept, result.boxes, strict=True)):
                ann = {
                    "category": anns[src_index]["category"],
                    "iscrowd": anns[src_index]["iscrowd"],
                    "bbox": [round(v, 4) for v in box],
                }
                if result.masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(result.masks[k].astype(np.uint8)))
                    ann["segmentation"] = _rle_json(dict(rle))
                    ann["area"] = int(result.masks[k].sum())
                else:
                    ann["area"] = round(box[2] * box[3], 4)
                add_annotation(new_id, ann)
            dropped.extend(
                f"{file_name}: {result.op} moved annotation {i} ({anns[i]['category']}) out of the image"
                for i in result.dropped
            )
    if dropped:
        log.warning("augmentation dropped %d instance(s) that left the image", len(dropped))
    return dropped


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))
