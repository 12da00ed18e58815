"""Mini-batch selection: uniform batches and three adaptive samplers, selected by name.

Every sampler is a torch ``Sampler[list[int]]`` (a batch sampler): iterating it yields one epoch of
mini-batches as lists of dataset indices. The adaptive ones learn from the *training* forward pass:
after each step the trainer calls :meth:`BatchSelector.observe` with what the model said about the
samples of that batch (:class:`Feedback`), so no extra forward passes are made. Batches are drawn
lazily, so the weights of batch ``t + 1`` already use the feedback of batch ``t`` (consume the
iterator in the training loop; do not prefetch it with DataLoader workers).

- ``uniform``: a seeded random permutation cut into batches (the default; every sample once per epoch).
- ``recency_bias`` (Song, Kim, Kim, Lee, CIKM 2020), exactly as in ``shared/design.md`` source 4:
  each sample keeps its last ``q`` predicted labels; uncertainty is the normalised entropy
  ``F = -Σ_y p(y) log p(y) / log(k)`` of the label frequencies in that window; the quantized rank is
  ``Q = ceil((1 - F) / Δ)`` with ``Δ = 1/N`` (N = number of samples), and the selection weight is
  ``(1 / exp(log(s_e) / N)) ** Q``, normalised: the most uncertain sample weighs 1, the most certain
  ``1/s_e``. The pressure ``s_e`` decays exponentially from ``s_e0`` (first epoch after warm-up) to 1
  (last epoch): ``s_e = s_e0 * exp(log(1/s_e0) / (e_end - e_0)) ** (e - e_0)``. Warm-up epochs are
  uniform. A sample that was never predicted counts as maximally uncertain (F = 1).
- ``online_batch`` (Loshchilov & Hutter 2015): rank samples by their latest training loss, highest
  first (rank 0..N-1); weight ``exp(-log(s_e) * rank / N)``, i.e. exponential decay over the loss rank,
  with the same ``s_e`` schedule and warm-up. Losses come from the training pass, so they are up to one
  epoch stale (the paper recomputes them with extra passes). Never-seen samples rank first.
- ``active_bias`` (Chang, Learned-Miller, McCallum 2017, SGD-SPV): weight ``std_i + ε`` where ``std_i``
  is the paper's bias-corrected standard deviation ``sqrt(var + var² / (|H| - 1))`` of the true-class
  probability over the sample's last ``q`` observations, and ``ε`` is the mean of those stds (keeps
  every sample reachable). Samples with fewer than 2 observations get the largest std seen.

Adaptive samplers draw each batch with :func:`torch.multinomial` without replacement inside the batch
(samples may repeat across batches of one epoch, as in the papers); an epoch has ``ceil(N / batch)``
batches, like uniform.

Warm-up default: the paper uses 15 uniform epochs of long runs. Short runs here would spend all their
time warming up, so the default is ``min(15, round(0.15 * epochs))`` (:func:`default_warmup_epochs`):
15 epochs from 100 epochs on, 2 of 10, 0 of 3 or fewer. An explicit ``warmup_epochs`` overrides it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

SAMPLERS = ("uniform", "recency_bias", "online_batch", "active_bias")

# (1 - F) * N can land a hair above an integer through rounding; without this an exact F = 0.5 would
# sometimes get rank N/2 + 1.
_RANK_EPS = 1e-9


class SamplerConfigError(ValueError):
    """A sampler name or parameter is invalid; the message names it and what is allowed."""


@dataclass(frozen=True)
class Feedback:
    """What one training step said about the samples of its batch (all tensors are length B, on CPU).

    ``predicted``: the predicted label id per sample, in ``[0, num_labels)``.
    ``true_prob``: probability the model gave the true label (class or class set), in [0, 1].
    ``loss``: per-sample training loss.
    """

    indices: torch.Tensor  # B int64 dataset indices
    predicted: torch.Tensor  # B int64
    true_prob: torch.Tensor  # B float
    loss: torch.Tensor  # B float


def default_warmup_epochs(epochs: int) -> int:
    """Uniform warm-up epochs for a run of ``epochs``: ``min(15, round(0.15 * epochs))``."""
    return min(15, round(0.15 * epochs))


def selection_pressure(epoch: int, *, s_e0: float, warmup_epochs: int, epochs: int) -> float:
    """``s_e`` at 0-based ``epoch``: ``s_e0`` at the first epoch after warm-up, 1 at the last epoch.

    ``e_0 = warmup_epochs`` and ``e_end = epochs - 1``. With a single adaptive epoch the value is
    ``s_e0``. Warm-up epochs return ``s_e0`` too (they are uniform anyway).
    """
    e0, e_end = warmup_epochs, epochs - 1
    if epoch <= e0 or e_end <= e0:
        return float(s_e0)
    decay = math.exp(math.log(1.0 / s_e0) / (e_end - e0))
    return float(s_e0 * decay ** (min(epoch, e_end) - e0))


def normalized_entropy(history: torch.Tensor, num_labels: int) -> torch.Tensor:
    """F per sample from a window of labels.

    history: NxQ int64 label ids, ``-1`` for empty slots. Returns N floats in [0, 1]; an empty window
    gives 1 (never predicted = maximally uncertain). ``num_labels`` is k in ``log(k)``.
    Uses ``Σ_y p(y) log p(y) = (1/m) Σ_slots log p(label of slot)`` over the m filled slots, so the cost
    is N x Q x Q whatever k is (k may be 2**K class sets).
    """
    n = history.shape[0]
    if num_labels < 2:
        return torch.zeros(n)
    valid = history >= 0  # (N, Q)
    same = (history[:, :, None] == history[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (N, Q, Q)
    m = valid.sum(dim=1).double()  # (N,)
    p_slot = same.sum(dim=2).double() / m.clamp(min=1)[:, None]  # p(label of slot j), 0 for empty slots
    log_p = torch.where(valid, p_slot.clamp(min=1e-300).log(), torch.zeros_like(p_slot))
    ent = -log_p.sum(dim=1) / m.clamp(min=1) / math.log(num_labels)
    return torch.where(m > 0, ent, torch.ones_like(ent)).float()


def recency_bias_weights(uncertainty: torch.Tensor, s_e: float) -> torch.Tensor:
    """Selection probabilities (sum 1) from the normalised entropies ``uncertainty`` (N).

    Q = ceil((1 - F) / Δ), Δ = 1/N; weight = (1 / exp(log(s_e) / N)) ** Q: F = 1 weighs 1, F = 0 weighs 1/s_e.
    """
    n = uncertainty.numel()
    q = torch.ceil((1.0 - uncertainty.double()) * n - _RANK_EPS).clamp(0, n)
    w = torch.exp(-math.log(s_e) / n * q)
    return (w / w.sum()).float()


def loss_rank_weights(losses: torch.Tensor, s_e: float) -> torch.Tensor:
    """Online Batch probabilities (sum 1): rank by loss (highest = rank 0), weight exp(-log(s_e) * rank / N)."""
    n = losses.numel()
    order = torch.argsort(losses.double(), descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = torch.arange(n, dtype=torch.float64)
    w = torch.exp(-math.log(s_e) * rank / n)
    return (w / w.sum()).float()


def active_bias_weights(history: torch.Tensor) -> torch.Tensor:
    """Active Bias probabilities (sum 1) from NxQ true-class probabilities (NaN = empty slot)."""
    valid = ~torch.isnan(history)
    m = valid.sum(dim=1).double()
    h = torch.nan_to_num(history.double(), nan=0.0)
    mean = h.sum(dim=1) / m.clamp(min=1)
    var = (((h - mean[:, None]) ** 2) * valid).sum(dim=1) / (m - 1).clamp(min=1)  # unbiased
    std = torch.sqrt(var + var**2 / (m - 1).clamp(min=1))
    known = m >= 2
    fill = std[known].max() if known.any() else torch.tensor(1.0, dtype=torch.float64)
    std = torch.where(known, std, fill)
    w = std + std.mean()
    if float(w.sum()) <= 0:  # every sample perfectly consistent: nothing to emphasise
        w = torch.ones_like(w)
    return (w / w.sum()).float()


class BatchSelector(Sampler[list[int]]):
    """Base class: an epoch of ``ceil(num_samples / batch_size)`` index batches, seeded by ``generator``.

    Call :meth:`set_epoch` before iterating an epoch and :meth:`observe` after each training step.
    :meth:`state_dict` holds the learned state (tensors only) for checkpoints.
    """

    name = "base"

    def __init__(self, num_samples: int, batch_size: int, *, generator: torch.Generator) -> None:
        if num_samples < 1:
            raise SamplerConfigError(f"sampler needs at least 1 sample, got num_samples={num_samples}")
        if batch_size < 1:
            raise SamplerConfigError(f"sampler batch_size={batch_size} is invalid: must be >= 1")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.generator = generator
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def uniform_epoch(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_samples, generator=self.generator)
        for start in range(0, self.num_samples, self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return self.uniform_epoch()

    def probabilities(self) -> torch.Tensor:
        """Current selection probability of every sample (N, sums to 1)."""
        return torch.full((self.num_samples,), 1.0 / self.num_samples)

    def observe(self, feedback: Feedback) -> None:
        """Record one training step's per-sample feedback (no-op for uniform)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            current = getattr(self, key)
            if current.shape != value.shape:
                raise SamplerConfigError(
                    f"{self.name} sampler state {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(current.shape)}: the checkpoint belongs to another dataset")
            current.copy_(value)


class UniformSampler(BatchSelector):
    """Random permutation batches: every sample exactly once per epoch."""

    name = "uniform"


class _AdaptiveSampler(BatchSelector):
    """Shared machinery: warm-up, ``s_e`` schedule, weighted draws recomputed before every batch."""

    def __init__(self, num_samples: int, batch_size: int, *, generator: torch.Generator, epochs: int,
                 warmup_epochs: int | None, s_e0: float, q: int) -> None:
        super().__init__(num_samples, batch_size, generator=generator)
        self.epochs = epochs
        self.warmup_epochs = default_warmup_epochs(epochs) if warmup_epochs is None else warmup_epochs
        self.s_e0 = s_e0
        self.q = q

    @property
    def in_warmup(self) -> bool:
        return self.epoch < self.warmup_epochs

    @property
    def s_e(self) -> float:
        return selection_pressure(self.epoch, s_e0=self.s_e0, warmup_epochs=self.warmup_epochs,
                                  epochs=self.epochs)

    def adaptive_probabilities(self) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self) -> torch.Tensor:
        return super().probabilities() if self.in_warmup else self.adaptive_probabilities()

    def __iter__(self) -> Iterator[list[int]]:
        if self.in_warmup:
            yield from self.uniform_epoch()
            return
        for start in range(0, self.num_samples, self.batch_size):
            size = min(self.batch_size, self.num_samples - start)
            picked = torch.multinomial(self.adaptive_probabilities(), size, replacement=False,
                                       generator=self.generator)
            yield picked.tolist()


class RecencyBiasSampler(_AdaptiveSampler):
    """Recency Bias: favour samples whose last ``q`` predicted labels disagree (see module docstring)."""

    name = "recency_bias"

    def __init__(self, num_samples: int, batch_size: int, *, generator: torch.Generator, epochs: int,
                 num_labels: int, q: int = 10, s_e0: float = 100.0, warmup_epochs: int | None = None) -> None:
        super().__init__(num_samples, batch_size, generator=generator, epochs=epochs,
                         warmup_epochs=warmup_epochs, s_e0=s_e0, q=q)
        self.num_labels = num_labels
        self.history = torch.full((num_samples, q), -1, dtype=torch.int64)  # ring buffer of label ids
        self.cursor = torch.zeros(num_samples, dtype=torch.int64)  # next slot per sample

    def observe(self, feedback: Feedback) -> None:
        idx = feedback.indices.long()
        self.history[idx, self.cursor[idx] % self.q] = feedback.predicted.long()
        self.cursor[idx] += 1

    def uncertainty(self) -> torch.Tensor:
        return normalized_entropy(self.history, self.num_labels)

    def adaptive_probabilities(self) -> torch.Tensor:
        return recency_bias_weights(self.uncertainty(), self.s_e)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history, "cursor": self.cursor}


class OnlineBatchSampler(_AdaptiveSampler):
    """Online Batch selection: exponential decay of probability over the latest-loss rank."""

    name = "online_batch"

    def __init__(self, num_samples: int, batch_size: int, *, generator: torch.Generator, epochs: int,
                 s_e0: float = 100.0, warmup_epochs: int | None = None) -> None:
        super().__init__(num_samples, batch_size, generator=generator, epochs=epochs,
                         warmup_epochs=warmup_epochs, s_e0=s_e0, q=1)
        self.losses = torch.full((num_samples,), float("inf"), dtype=torch.float64)

    def observe(self, feedback: Feedback) -> None:
        self.losses[feedback.indices.long()] = feedback.loss.double()

    def adaptive_probabilities(self) -> torch.Tensor:
        return loss_rank_weights(self.losses, self.s_e)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"losses": self.losses}


class ActiveBiasSampler(_AdaptiveSampler):
    """Active Bias: favour samples whose true-class probability varies over the last ``q`` steps."""

    name = "active_bias"

    def __init__(self, num_samples: int, batch_size: int, *, generator: torch.Generator, epochs: int,
                 q: int = 10, warmup_epochs: int | None = None) -> None:
        super().__init__(num_samples, batch_size, generator=generator, epochs=epochs,
                         warmup_epochs=warmup_epochs, s_e0=1.0, q=q)
        self.history = torch.full((num_samples, q), float("nan"), dtype=torch.float64)
        self.cursor = torch.zeros(num_samples, dtype=torch.int64)

    def observe(self, feedback: Feedback) -> None:
        idx = feedback.indices.long()
        self.history[idx, self.cursor[idx] % self.q] = feedback.true_prob.double()
        self.cursor[idx] += 1

    def adaptive_probabilities(self) -> torch.Tensor:
        return active_bias_weights(self.history)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history, "cursor": self.cursor}


def validate_sampler_params(name: str, *, q: int, s_e0: float, warmup_epochs: int | None, epochs: int) -> None:
    """Raise :class:`SamplerConfigError` naming the parameter when any is out of range."""
    if name not in SAMPLERS:
        raise SamplerConfigError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    if not isinstance(q, int) or q < 1:
        raise SamplerConfigError(f"sampler parameter q={q!r} is invalid: must be an integer >= 1 (window length)")
    if not (isinstance(s_e0, int | float) and math.isfinite(s_e0) and s_e0 >= 1):
        raise SamplerConfigError(f"sampler parameter s_e0={s_e0!r} is invalid: must be a number >= 1 "
                                 "(ratio of largest to smallest selection weight)")
    if warmup_epochs is not None and not (0 <= warmup_epochs <= epochs):
        raise SamplerConfigError(f"sampler parameter warmup_epochs={warmup_epochs!r} is invalid: must be "
                                 f"between 0 and epochs ({epochs}), or unset for min(15, round(0.15 * epochs))")


def build_sampler(name: str, *, num_samples: int, batch_size: int, epochs: int, num_labels: int,
                  generator: torch.Generator, q: int = 10, s_e0: float = 100.0,
                  warmup_epochs: int | None = None) -> BatchSelector:
    """The sampler called ``name`` (one of :data:`SAMPLERS`).

    ``num_labels`` is k, the size of the predicted-label space (recency bias only). ``q`` is the
    history window (recency bias, active bias); ``s_e0`` the initial selection pressure (recency
    bias, online batch); ``warmup_epochs`` None means :func:`default_warmup_epochs`.
    """
    validate_sampler_params(name, q=q, s_e0=s_e0, warmup_epochs=warmup_epochs, epochs=epochs)
    if name == "uniform":
        return UniformSampler(num_samples, batch_size, generator=generator)
    if name == "recency_bias":
        return RecencyBiasSampler(num_samples, batch_size, generator=generator, epochs=epochs,
                                  num_labels=num_labels, q=q, s_e0=s_e0, warmup_epochs=warmup_epochs)
    if name == "online_batch":
        return OnlineBatchSampler(num_samples, batch_size, generator=generator, epochs=epochs, s_e0=s_e0,
                                  warmup_epochs=warmup_epochs)
    return ActiveBiasSampler(num_samples, batch_size, generator=generator, epochs=epochs, q=q,
                             warmup_epochs=warmup_epochs)
