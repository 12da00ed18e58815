"""Weights on disk without pickle: ``model.safetensors`` next to ``config.json``.

A model directory holds::

    config.json          {"kind": "detector", "format_version": 1, "config": {...DetectorConfig...}}
    model.safetensors    the state_dict (BatchNorm not folded)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.models.detector import Detector, DetectorConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model directory is missing files, or its config or weights do not match."""


def save_detector(model: Detector, directory: Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``; return the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"kind": "detector"})
    doc = {"kind": "detector", "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return directory


def read_detector_config(directory: Path) -> DetectorConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelFileError(f"{path}: missing; a model directory needs {CONFIG_FILE} and {WEIGHTS_FILE}") from exc
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("kind") != "detector":
        kind = doc.get("kind") if isinstance(doc, dict) else doc
        raise ModelFileError(f"{path}: field 'kind' must be 'detector', got {kind!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: format_version {doc.get('format_version')!r} unsupported; expected {FORMAT_VERSION}")
    try:
        return DetectorConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid 'config': {exc}") from exc


def load_detector(directory: Path, *, device: str | torch.device = "cpu") -> Detector:
    """Build the detector from ``config.json`` and load ``model.safetensors`` with strict keys."""
    directory = Path(directory)
    config = read_detector_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{weights}: missing")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(f"{weights}: not a readable safetensors file: {exc}") from exc
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
