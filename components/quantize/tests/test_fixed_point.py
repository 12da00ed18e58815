from __future__ import annotations

import math

import numpy as np
import torch

from components.quantize.fixed_point import (
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
)


def test_quantize_multiplier_represents_real_value_with_31_bit_mantissa() -> None:
    reals = np.array([1e-6, 0.00123, 0.25, 0.5, 0.7071, 0.9999999999, 1.0, 3.5, 1234.5])
    m0, shift = quantize_multiplier(reals)
    assert ((m0 >= 2**30) & (m0 < 2**31)).all()
    back = m0.double() * torch.pow(2.0, (shift - 31).double())
    np.testing.assert_allclose(back.numpy(), reals, rtol=2**-30)
    assert quantize_multiplier(0.0)[0].item() == 0


def test_rounding_divide_by_pot_rounds_half_away_from_zero() -> None:
    x = torch.tensor([5, -5, 6, -6, 7, -7, 4, -4])
    assert rounding_divide_by_pot(x, torch.tensor(1)).tolist() == [3, -3, 3, -3, 4, -4, 2, -2]


def test_fixed_point_multiply_matches_exact_rounding_within_one() -> None:
    gen = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**24), 2**24, (20000,), generator=gen)
    for real in [0.000731, 0.0123, 0.31, 0.999, 1.7, 12.25]:
        m0, shift = quantize_multiplier(real)
        got = multiply_by_quantized_multiplier(acc, m0, shift)
        exact = acc.double() * real
        # gemmlowp rounds twice (high-mul, then the right shift): at most 0.5 + 2^-(right+1) off.
        # M0 itself is rounded: |M0 2^(shift-31) - M| <= 2^(shift-32), times |acc| < 2^24.
        slack = (0.5 ** (-int(shift) + 1) if int(shift) < 0 else 0.0) + 2.0 ** (int(shift) - 32 + 24)
        assert (got.double() - exact).abs().max() <= 0.5 + slack
        # Away from ties the result is the correctly rounded value.
        frac = (exact - exact.floor() - 0.5).abs()
        clear = frac > slack
        expected = torch.sign(exact) * torch.floor(exact.abs() + 0.5)
        assert torch.equal(got[clear].double(), expected[clear])


def test_requantize_clamps_to_int8_per_channel() -> None:
    acc = torch.tensor([[[[1000]], [[-1000]]]])  # (1, 2, 1, 1)
    out = requantize(acc, np.array([0.5, 0.01]), channel_dim=1)
    assert out.dtype == torch.int8
    assert out.flatten().tolist() == [127, -10]
    assert math.isclose(float(requantize(torch.tensor([255]), 0.5)[0]), 127)  # 127.5 -> 128 -> clamped
