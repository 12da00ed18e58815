"""Log a segmenter directory to MLflow as a models-from-code pyfunc (no pickle involved).

The logged model keeps the directory (``config.json`` + ``model.safetensors``) as its ``segmenter``
artifact, so :func:`components.tracking.resolve.resolve_model` finds it behind ``models:/segmenter@champion``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

from components.tracking.model_logging import log_pyfunc_model

PYFUNC_CODE = Path(__file__).resolve().parent / "pyfunc_segmenter.py"


def segmenter_signature() -> ModelSignature:
    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3), name="image"),
                     TensorSpec(np.dtype(np.float32), (-1, 4), name="boxes")])
    outputs = Schema([ColSpec("long", "prompt_index"), ColSpec("double", "score"), ColSpec("long", "area"),
                      ColSpec("double", "x"), ColSpec("double", "y"), ColSpec("double", "w"),
                      ColSpec("double", "h"), ColSpec("string", "rle")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_segmenter_model(model_dir: Path) -> str:
    """Log ``model_dir`` in the active run; return the model URI (no input example: it would run the model)."""
    return log_pyfunc_model(model_dir, python_model=PYFUNC_CODE, artifact="segmenter",
                            signature=segmenter_signature(), extra_requirements=("segment-anything", "pycocotools"))
