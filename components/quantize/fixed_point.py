"""Fixed-point requantization as in gemmlowp / TFLite: a real multiplier ``M = M0 * 2^(shift - 31)``.

``M0`` is an int32 in ``[2^30, 2^31)`` and ``shift`` an integer (negative: a right shift). Applying it to
an int32 accumulator is ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x << left, M0), right)``
with ``left = max(shift, 0)`` and ``right = max(-shift, 0)``. Everything runs on int64 tensors, which
hold the 62-bit intermediate product exactly.
"""

from __future__ import annotations

import numpy as np
import torch

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def quantize_multiplier(real: float | np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real multipliers (>= 0, any shape) -> (``M0`` int64 tensor, ``shift`` int64 tensor), same shape.

    ``real == M0 * 2**(shift - 31)`` up to the rounding of ``M0``; a zero multiplier gives ``M0 = 0``.
    """
    values = np.asarray(real.detach().cpu().numpy() if isinstance(real, torch.Tensor) else real, dtype=np.float64)
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"multipliers must be finite and >= 0, got min {values.min()}")
    mantissa, exponent = np.frexp(values)  # values = mantissa * 2^exponent, mantissa in [0.5, 1)
    m0 = np.round(mantissa * 2.0**31).astype(np.int64)
    carry = m0 == 2**31  # mantissa rounded up to 1.0
    m0 = np.where(carry, m0 // 2, m0)
    exponent = np.where(carry, exponent + 1, exponent).astype(np.int64)
    tiny = exponent < -62  # below any int32 accumulator's resolution: multiplier is zero
    m0 = np.where((values == 0) | tiny, 0, m0)
    exponent = np.where((values == 0) | tiny, 0, exponent)
    return torch.from_numpy(m0), torch.from_numpy(exponent)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``(a * b * 2 + 2^31) >> 32`` with round-half-away-from-zero, on int32-range int64 tensors."""
    ab = a.to(torch.int64) * b.to(torch.int64)
    nudge = torch.where(ab >= 0, torch.tensor(1 << 30), torch.tensor(1 - (1 << 30)))
    out = torch.div(ab + nudge, 2**31, rounding_mode="trunc")
    # The only overflow case, a == b == INT32_MIN, cannot happen: M0 is never negative.
    return out


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``x / 2^exponent`` rounded half away from zero (gemmlowp ``RoundingDivideByPOT``); exponent >= 0."""
    exponent = exponent.to(torch.int64)
    mask = (torch.ones_like(exponent) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Integer ``round(x * M)`` for int32-range ``x`` (int tensor) and ``M = M0 * 2^(shift - 31)``.

    ``m0`` and ``shift`` broadcast against ``x`` (e.g. shape ``(C, 1, 1)`` for per-channel conv outputs).
    Returns int64.
    """
    x = x.to(torch.int64)
    if bool((shift > 0).any()):  # multipliers >= 1: shift left first, saturating to int32
        x = (x << shift.clamp(min=0)).clamp(INT32_MIN, INT32_MAX)
    right = (-shift).clamp(min=0)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), right)


def requantize(acc: torch.Tensor, real_multiplier: float | np.ndarray | torch.Tensor, *, qmin: int = -128,
               qmax: int = 127, channel_dim: int | None = None) -> torch.Tensor:
    """int32 accumulators -> int8 ``clamp(round(acc * M), qmin, qmax)`` in fixed point.

    ``real_multiplier`` is a scalar, or one value per channel along ``channel_dim`` of ``acc``.
    """
    m0, shift = quantize_multiplier(real_multiplier)
    if channel_dim is not None and m0.ndim == 1:
        view = [1] * acc.ndim
        view[channel_dim] = -1
        m0, shift = m0.view(view), shift.view(view)
    out = multiply_by_quantized_multiplier(acc, m0, shift)
    return out.clamp(qmin, qmax).to(torch.int8)
