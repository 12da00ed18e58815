"""The trainers' shared mechanics: LR schedule values, AdamW decay groups, deterministic kernels."""

from __future__ import annotations

import pytest
import torch

from components.train.schedule import WarmupCosine, adamw, deterministic_algorithms, lr_factor


def test_lr_factor_warms_up_linearly_then_decays_by_cosine_to_five_percent() -> None:
    # 100 steps, 10 of warm-up: 0.1, 0.2, ... 1.0 over steps 0..9.
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(4, 100, 10) == pytest.approx(0.5)
    assert lr_factor(9, 100, 10) == 1.0
    assert lr_factor(10, 100, 10) == 1.0  # the cosine starts at its top
    assert lr_factor(55, 100, 10) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the decay
    assert lr_factor(100, 100, 10) == pytest.approx(0.05)
    assert lr_factor(250, 100, 10) == pytest.approx(0.05)  # past the end it stays at the floor
    assert lr_factor(0, 10, 0) == 1.0  # no warm-up: the first step is at the full rate


def test_decay_matches_torch_cosine_annealing() -> None:
    base, total, warmup = 0.01, 30, 5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.05 * base)
    for step in range(warmup, total + 1):
        assert base * lr_factor(step, total, warmup) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        reference.step()


def test_warmup_cosine_counts_steps_and_sets_every_group() -> None:
    schedule = WarmupCosine(base_lr=0.02, steps_per_epoch=4, epochs=5, warmup_epochs=0.5)
    assert schedule.total_steps == 20 and schedule.warmup_steps == 2
    assert [schedule.lr(s) for s in (0, 1)] == pytest.approx([0.01, 0.02])
    assert schedule.lr(20) == pytest.approx(0.001)
    model = torch.nn.Linear(3, 2)
    opt = adamw(model.parameters(), lr=0.02, weight_decay=0.1)
    assert schedule.apply(opt, 0) == pytest.approx(0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])
    schedule.apply(opt, 11)  # progress 0.5 through the 18 decay steps
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 0.525] * 2)


def test_adamw_decays_weights_but_not_biases_or_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    opt = adamw(model.parameters(), lr=3e-3, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert decayed["lr"] == plain["lr"] == 3e-3
    conv, norm, linear = model
    assert [id(p) for p in decayed["params"]] == [id(conv.weight), id(linear.weight)]
    assert [id(p) for p in plain["params"]] == [id(conv.bias), id(norm.weight), id(norm.bias), id(linear.bias)]


def test_deterministic_algorithms_sets_flags_and_restores_them() -> None:
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"), deterministic_algorithms():
        raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()  # restored after an error too


def test_deterministic_algorithms_keeps_an_outer_setting_on() -> None:
    torch.use_deterministic_algorithms(True)
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
