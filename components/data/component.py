"""KFP v2 component for dataset intake: a thin wrapper around :func:`components.data.intake.intake`.

Top-level imports are stdlib + ``kfp.dsl`` only; the stage logic is imported inside the body so the
same function runs under ``kfp.local.SubprocessRunner(use_venv=False)`` and in the project image.
S3 access (an ``s3://`` source, uploading the artifact) comes from ``MODELCOMMONS_S3_*`` settings.
"""

# No ``from __future__ import annotations``: KFP reads the real annotation objects.
from kfp import dsl

from components.kfp_image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, packages_to_install=[])
def intake_component(
    source: str,
    dataset: dsl.Output[dsl.Dataset],
    rejections: dsl.Output[dsl.Artifact],
    fmt: str = "auto",
    val_fraction: float = 0.2,
    seed: int = 0,
    max_error_fraction: float = 0.05,
    augment: bool = False,
) -> None:
    """Import ``source`` (folder or s3:// prefix, COCO or YOLO) into the canonical dataset artifact.

    ``dataset.path`` becomes the artifact directory (images/, annotations.json, manifest.json,
    rejections.json); ``rejections`` is a copy of rejections.json. Dataset metadata: sha256, images,
    annotations, classes, rejected, s3_uri (when S3 is configured).
    """
    import shutil
    from pathlib import Path

    from components.data.format import REJECTIONS_FILE
    from components.data.intake import intake

    out_dir = Path(dataset.path)
    try:
        result = intake(
            source,
            out_dir,
            fmt=fmt,  # type: ignore[arg-type]  # validated by intake, which names the allowed values
            val_fraction=val_fraction,
            seed=seed,
            max_error_fraction=max_error_fraction,
            augment=augment,
        )
    finally:
        # Even a failed intake leaves its report, so the run page shows what was wrong.
        if (out_dir / REJECTIONS_FILE).is_file():
            shutil.copyfile(out_dir / REJECTIONS_FILE, rejections.path)
    manifest = result.manifest
    dataset.metadata.update(
        {
            "sha256": manifest.sha256,
            "name": manifest.name,
            "images": manifest.counts.images,
            "annotations": manifest.counts.annotations,
            "classes": manifest.classes,
            "rejected": manifest.counts.rejected,
            "augmentations": manifest.augmentations,
        }
    )
    if result.s3_uri:
        dataset.metadata["s3_uri"] = result.s3_uri
    rejections.metadata["count"] = len(result.rejections)
