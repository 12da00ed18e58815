"""The model directory on disk, for any model kind: ``config.json`` next to ``model.safetensors``.

A model directory holds::

    config.json          {"kind": "<kind>", "format_version": <int>, "config": {...architecture...}}
    model.safetensors    the state_dict (tensors only: loading never unpickles anything)

The kind-specific modules (:mod:`components.models.weights` for the detector,
:mod:`components.segment.model` for the segmenter) pick the kind, the config class and how the
state_dict is matched against the model; the reading, writing and their errors live here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "ModelFileError", "find_dir", "read_config_doc", "read_model_config",
           "read_weights", "save_model_dir"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

ConfigT = TypeVar("ConfigT")


class ModelFileError(ValueError):
    """A model directory is missing files, or its config or weights do not match."""


def save_model_dir(model: torch.nn.Module, directory: Path, *, kind: str, format_version: int,
                   config: dict[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s state_dict and its ``config`` (a JSON-able dict) into ``directory``; return it.

    The safetensors header carries ``{"kind": kind, **metadata}`` so a weights file is recognisable alone.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors that own no autograd history
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"kind": kind, **(metadata or {})})
    doc = {"kind": kind, "format_version": format_version, "config": config}
    (directory / CONFIG_FILE).write_text(json.dumps(doc, indent=2))
    return directory


def read_config_doc(directory: Path) -> Any:
    """``<directory>/config.json`` parsed, whatever JSON value it holds (the caller checks its fields).

    Raises :class:`ModelFileError` naming the file when it is missing or not valid JSON.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelFileError(f"{path}: missing; a model directory needs {CONFIG_FILE} and {WEIGHTS_FILE}") from exc
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: not valid JSON: {exc}") from exc


def find_dir(root: Path, marker: str, accept: Callable[[Path], bool]) -> Path | None:
    """``root`` when ``accept(root)``, else the first directory under it (by sorted path of its ``marker``
    file) that holds ``marker`` and is accepted; None when there is none."""
    root = Path(root)
    if accept(root):
        return root
    for found in sorted(root.rglob(marker)):
        if accept(found.parent):
            return found.parent
    return None


def read_model_config(directory: Path, *, kind: str, format_version: int,
                      parse: Callable[[dict[str, Any]], ConfigT]) -> ConfigT:
    """Parse ``<directory>/config.json`` of a ``kind`` model with ``parse`` (e.g. ``Config.from_dict``).

    Raises :class:`ModelFileError` naming the file and what is wrong: missing, not JSON, another
    ``kind``, an unsupported ``format_version``, or a ``config`` that ``parse`` rejects (KeyError,
    TypeError or ValueError).
    """
    path = Path(directory) / CONFIG_FILE
    doc = read_config_doc(directory)
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        found = doc.get("kind") if isinstance(doc, dict) else doc
        raise ModelFileError(f"{path}: field 'kind' must be {kind!r}, got {found!r}")
    if doc.get("format_version") != format_version:
        raise ModelFileError(
            f"{path}: format_version {doc.get('format_version')!r} unsupported; expected {format_version}")
    try:
        return parse(doc["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: invalid 'config': {exc}") from exc


def read_weights(directory: Path, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``<directory>/model.safetensors`` onto ``device``: a name -> tensor state_dict.

    Raises :class:`ModelFileError` naming the file when it is missing or not a readable safetensors
    file. Keys are not checked here: the caller matches them against its model.
    """
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelFileError(f"{weights}: missing; a model directory needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        return load_file(str(weights), device=str(device))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelFileError(f"{weights}: not a readable safetensors file: {exc}") from exc
