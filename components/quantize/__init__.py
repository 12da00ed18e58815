"""Quantization workbench: calibrators, a FLOAT/HYBRID/INT8 engine, a layer-by-layer inspector, model graph.

Modules:
- :mod:`~components.quantize.graph`: trace a model (BN folded) into an ordered list of layers;
- :mod:`~components.quantize.calibrate`: ``minmax``, ``percentile``, ``kl`` and ``log2`` activation ranges;
- :mod:`~components.quantize.fixed_point`: gemmlowp/TFLite fixed-point requantization;
- :mod:`~components.quantize.engine`: runs the layers in float, hybrid or integer-only int8;
- :mod:`~components.quantize.inspector`: STEP / CROSS / edit sessions and the per-layer report;
- :mod:`~components.quantize.store`: sessions bounded in number and memory, with expiry;
- :mod:`~components.quantize.metrics`: tensor statistics and float-vs-quantized error (JSON-ready);
- :mod:`~components.quantize.visualize`: model graph JSON and picture, report chart, layer pictures.
"""

from components.quantize.calibrate import CALIBRATORS, Calibration, TensorRange, calibrate, calibration_batches
from components.quantize.engine import Precision, QuantEngine, build_engine
from components.quantize.errors import (
    CalibrationError,
    EditError,
    LayerIndexError,
    QuantizeError,
    SessionError,
    SessionLimitError,
    SessionStateError,
    UnsupportedLayerError,
)
from components.quantize.graph import Layer, QuantGraph
from components.quantize.inspector import InspectorSession, LayerReport, ModelReport
from components.quantize.store import SessionStore
from components.quantize.visualize import ModelGraph, model_graph, plot_report, render_graph

__all__ = [
    "CALIBRATORS",
    "Calibration",
    "CalibrationError",
    "EditError",
    "InspectorSession",
    "Layer",
    "LayerIndexError",
    "LayerReport",
    "ModelGraph",
    "ModelReport",
    "Precision",
    "QuantEngine",
    "QuantGraph",
    "QuantizeError",
    "SessionError",
    "SessionLimitError",
    "SessionStateError",
    "SessionStore",
    "TensorRange",
    "UnsupportedLayerError",
    "build_engine",
    "calibrate",
    "calibration_batches",
    "model_graph",
    "plot_report",
    "render_graph",
]
