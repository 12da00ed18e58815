"""What the detector and segmenter trainers share of a run's mechanics.

- :func:`deterministic_algorithms`: torch's deterministic kernels for the length of a run, so a seed
  fixes the result on CPU;
- :func:`adamw`: AdamW with weight decay on weight matrices and kernels only;
- :class:`WarmupCosine`: the learning-rate schedule, a linear warm-up then a cosine decay to 5% of the
  base rate, set on the optimiser step by step (:func:`lr_factor` is its shape).

The schedule is a pure function of the global step, not a ``torch.optim.lr_scheduler`` with state of
its own: a run resumed from a checkpoint gets the right rate from the step number alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["FINAL_LR_FRACTION", "WarmupCosine", "adamw", "deterministic_algorithms", "lr_factor"]

FINAL_LR_FRACTION = 0.05  # the cosine ends at 5% of the base rate, not 0: the last epochs still learn


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Turn on ``torch.use_deterministic_algorithms`` (warn-only) in the block; restore the previous setting.

    Warn-only: an op with no deterministic kernel warns instead of failing the run.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def adamw(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params`` in two groups: ``weight_decay`` on tensors with ndim > 1, none on the rest.

    Biases and normalisation scales/shifts (ndim <= 1) are not decayed, as is usual for AdamW.
    Group 0 holds the decayed parameters, group 1 the others, each in the order given.
    """
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at 0-based ``step`` of ``total_steps``.

    Linear warm-up over the first ``warmup_steps`` steps (``1/warmup`` .. 1), then a cosine from 1 down
    to :data:`FINAL_LR_FRACTION` at ``total_steps``; steps past the end stay there.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class WarmupCosine:
    """A run's learning-rate schedule: ``epochs`` of ``steps_per_epoch`` optimiser steps.

    ``warmup_epochs`` may be fractional; the warm-up covers ``int(warmup_epochs * steps_per_epoch)`` steps.
    """

    base_lr: float
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_epochs * self.steps_per_epoch)

    def lr(self, step: int) -> float:
        """The learning rate at 0-based global ``step`` (``epoch * steps_per_epoch + step_in_epoch``)."""
        return self.base_lr * lr_factor(step, self.total_steps, self.warmup_steps)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group of ``optimizer`` to the rate at ``step``; return that rate."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
