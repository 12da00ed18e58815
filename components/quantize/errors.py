"""Errors of the quantization workbench. Each maps to one HTTP status in the serving layer (see docstrings)."""

from __future__ import annotations


class QuantizeError(ValueError):
    """Base class: bad input to the workbench (a client error, 4xx over HTTP)."""


class CalibrationError(QuantizeError):
    """Unknown calibrator, bad calibrator parameter, or empty/ill-shaped calibration data (422)."""


class UnsupportedLayerError(QuantizeError):
    """The model contains an operation the chosen precision cannot run (422)."""


class LayerIndexError(QuantizeError, IndexError):
    """A layer index outside ``0 .. num_layers - 1`` (404)."""


class EditError(QuantizeError):
    """A weight edit with the wrong shape, dtype, channel or factor, or on a layer without weights (422)."""


class SessionError(QuantizeError, KeyError):
    """An unknown, closed or expired inspector session (404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SessionLimitError(QuantizeError):
    """Creating a session would exceed the store's session count or memory budget (429)."""


class SessionStateError(QuantizeError):
    """An inspector call that the session's state does not allow yet, e.g. inspecting a layer not run (409)."""
