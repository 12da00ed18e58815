"""One intra-op thread for these tests (and the KFP component subprocesses they start, through
``OMP_NUM_THREADS``): their tensors are tiny, and on a shared 2-core machine OpenMP threads spinning
against other processes made a 2-epoch training test 10x slower in wall time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(previous)
