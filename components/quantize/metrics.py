"""JSON-ready statistics of tensors and of float-versus-quantized error."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, Field

HIST_BINS = 64


class Histogram(BaseModel):
    edges: list[float] = Field(description="bins + 1 bin edges, ascending")
    counts: list[int]


class TensorStats(BaseModel):
    """Statistics of a tensor (int8 tensors are described by their dequantized values)."""

    shape: list[int]
    dtype: str = Field(description="'float32' or 'int8' (how the layer holds it)")
    scale: float | None = Field(default=None, description="int8 scale (None for float tensors)")
    min: float
    max: float
    mean: float
    std: float
    histogram: Histogram
    saturated_fraction: float = Field(
        description="int8: fraction at -128/127 (+-127 for weights); float: fraction with |x| beyond the "
                    "calibrated threshold (that int8 would clip)")


class ErrorStats(BaseModel):
    """Quantized tensor versus its float reference."""

    sqnr_db: float | None = Field(description="10 log10(sum ref^2 / sum (ref - x)^2); None when identical")
    cosine: float
    mse: float
    max_abs: float


def tensor_stats(values: torch.Tensor, *, scale: float | None = None, int8: bool = False,
                 threshold: float | None = None, qmin: int = -128, qmax: int = 127,
                 bins: int = HIST_BINS) -> TensorStats:
    """Stats of ``values`` (int8 values times ``scale`` when ``int8``); see :class:`TensorStats`."""
    if int8:
        q = values.to(torch.int64)
        saturated = float(((q <= qmin) | (q >= qmax)).double().mean()) if q.numel() else 0.0
        x = values.double() * float(scale or 1.0)
    else:
        x = values.detach().double()
        saturated = float((x.abs() > threshold).double().mean()) if threshold is not None and x.numel() else 0.0
    if x.numel() == 0:
        return TensorStats(shape=list(values.shape), dtype="int8" if int8 else "float32", scale=scale, min=0.0,
                           max=0.0, mean=0.0, std=0.0, histogram=Histogram(edges=[0.0, 0.0], counts=[0]),
                           saturated_fraction=0.0)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        hi = lo + 1e-12
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return TensorStats(shape=list(values.shape), dtype="int8" if int8 else "float32", scale=scale,
                       min=float(x.min()), max=float(x.max()), mean=float(x.mean()),
                       std=float(x.std(unbiased=False)), histogram=Histogram(edges=edges.tolist(),
                                                                             counts=[int(c) for c in counts]),
                       saturated_fraction=saturated)


def error_stats(reference: torch.Tensor, test: torch.Tensor) -> ErrorStats:
    """SQNR (dB), cosine similarity, MSE and max |diff| of ``test`` against ``reference`` (same shape)."""
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)} vs test {tuple(test.shape)}")
    ref, x = reference.detach().double().flatten(), test.detach().double().flatten()
    diff = ref - x
    noise, signal = float((diff**2).sum()), float((ref**2).sum())
    if noise == 0:
        sqnr: float | None = None
    elif signal == 0:
        sqnr = -300.0  # all noise: report a floor rather than -inf (JSON has no infinities)
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    denom = float(ref.norm() * x.norm())
    cosine = float(ref @ x) / denom if denom > 0 else (1.0 if noise == 0 else 0.0)
    n = max(ref.numel(), 1)
    return ErrorStats(sqnr_db=sqnr, cosine=cosine, mse=noise / n,
                      max_abs=float(diff.abs().max()) if diff.numel() else 0.0)
