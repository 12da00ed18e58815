"""Detector weights on disk without pickle: ``model.safetensors`` next to ``config.json``.

A model directory holds (the generic format is in :mod:`components.models.files`)::

    config.json          {"kind": "detector", "format_version": 1, "config": {...DetectorConfig...}}
    model.safetensors    the state_dict (BatchNorm not folded)
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.models.detector import Detector, DetectorConfig
from components.models.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    read_model_config,
    read_weights,
    save_model_dir,
)

# CONFIG_FILE, WEIGHTS_FILE and ModelFileError stay importable from here, where callers found them first.
__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "ModelFileError", "load_detector",
           "read_detector_config", "save_detector"]

KIND = "detector"
FORMAT_VERSION = 1


def save_detector(model: Detector, directory: Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``; return the directory."""
    return save_model_dir(model, directory, kind=KIND, format_version=FORMAT_VERSION,
                          config=model.config.to_dict())


def read_detector_config(directory: Path) -> DetectorConfig:
    """Parse ``<directory>/config.json``; raise :class:`ModelFileError` naming the file and field."""
    return read_model_config(directory, kind=KIND, format_version=FORMAT_VERSION, parse=DetectorConfig.from_dict)


def load_detector(directory: Path, *, device: str | torch.device = "cpu") -> Detector:
    """Build the detector from ``config.json`` and load ``model.safetensors`` with strict keys."""
    directory = Path(directory)
    config = read_detector_config(directory)
    state = read_weights(directory, device=device)
    weights = directory / WEIGHTS_FILE
    model = Detector(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFileError(
            f"{weights}: keys do not match a {config.preset} detector: missing={sorted(missing)[:20]} "
            f"unexpected={sorted(unexpected)[:20]}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelFileError(f"{weights}: {exc}") from exc
    return model.to(device).eval()
