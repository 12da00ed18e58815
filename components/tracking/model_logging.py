"""Log a detector directory to MLflow as a pyfunc model with a signature (no pickle involved)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

PYFUNC_CODE = Path(__file__).resolve().parents[1] / "models" / "pyfunc_detector.py"
MODEL_ARTIFACT_NAME = "model"


def detector_signature() -> ModelSignature:
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), name="images")])
    outputs = Schema([ColSpec("long", "image_index"), ColSpec("double", "x1"), ColSpec("double", "y1"),
                      ColSpec("double", "x2"), ColSpec("double", "y2"), ColSpec("double", "score"),
                      ColSpec("long", "class_id"), ColSpec("string", "class_name")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_pyfunc_model(model_dir: Path, *, python_model: Path, artifact: str, signature: ModelSignature,
                     extra_requirements: Sequence[str] = ()) -> str:
    """Log ``model_dir`` as a models-from-code pyfunc in the active run; return the model URI.

    ``python_model`` is the code file that loads the directory from its ``artifact`` key; the model
    directory itself is the artifact, so nothing is pickled. Requirements: this package at its installed
    version, the running torch, safetensors, and ``extra_requirements``. No input example: MLflow would
    re-run the model to validate it, which costs ~20 s per run here.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        requirement = f"modelcommons=={version('modelcommons')}"
    except PackageNotFoundError:
        requirement = "modelcommons"
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT_NAME,
        python_model=str(python_model),
        artifacts={artifact: str(model_dir)},
        signature=signature,
        pip_requirements=[requirement, f"torch=={torch.__version__.split('+')[0]}", "safetensors",
                          *extra_requirements],
    )
    return str(info.model_uri)


def log_detector_model(model_dir: Path) -> str:
    """Log ``model_dir`` (config.json + model.safetensors, plus quantization.json for an int8 model) in the
    active run; return the model URI. The pyfunc loads an int8 directory with its int8 kernels."""
    return log_pyfunc_model(model_dir, python_model=PYFUNC_CODE, artifact="detector", signature=detector_signature())
