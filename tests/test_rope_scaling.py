"""companion/rope_scaling.py: PI, NTK-aware and YaRN as λ generators, on known values."""

import math

import numpy as np
import pytest
import torch

from companion import rope_scaling as rs


# ----------------------------------------------------------------------------------------------
# Baselines on known values
# ----------------------------------------------------------------------------------------------
def test_pi_is_the_constant_scale():
    assert torch.equal(rs.pi_factors(4, 32), torch.full((16,), 4.0, dtype=torch.float64))


@pytest.mark.parametrize("scale, d", [(2, 32), (8, 32), (16, 128)])
def test_ntk_is_a_base_change_from_1_to_s(scale, d):
    lam = rs.ntk_factors(scale, d)
    assert lam[0] == 1.0 and abs(lam[-1] - scale) < 1e-12
    base, new_base = 10000.0, 10000.0 * scale ** (d / (d - 2))
    i = torch.arange(d // 2, dtype=torch.float64)
    theta, theta_ntk = base ** (-2 * i / d), new_base ** (-2 * i / d)
    torch.testing.assert_close(theta / lam, theta_ntk, rtol=1e-12, atol=0)


def test_yarn_ramp_matches_the_llama2_values():
    """d=128, b=10⁴, L=4096, β=(32, 1): the ramp runs from dim floor(20.94)=20 to ceil(45.03)=46."""
    dim = lambda r: 128 * math.log(4096 / (r * 2 * math.pi)) / (2 * math.log(10000))
    assert math.floor(dim(32)) == 20 and math.ceil(dim(1)) == 46
    gamma = rs.yarn_ramp(128, 10000.0, 4096)
    assert torch.all(gamma[:21] == 1) and torch.all(gamma[46:] == 0)
    torch.testing.assert_close(gamma[20:47], 1 - torch.arange(27, dtype=torch.float64) / 26, rtol=0, atol=1e-15)


def test_yarn_factors_keep_fast_dims_and_interpolate_slow_ones():
    lam = rs.yarn_factors(8, 128, base=10000.0, original_length=4096)
    assert torch.all(lam[:21] == 1) and torch.allclose(lam[46:], torch.tensor(8.0, dtype=torch.float64))
    assert rs.is_monotone(lam.numpy())
    gamma = rs.yarn_ramp(128, 10000.0, 4096)
    torch.testing.assert_close(1 / lam, gamma + (1 - gamma) / 8, rtol=1e-14, atol=0)  # inverse-frequency blend


def test_temperatures():
    assert rs.yarn_mscale(1) == 1.0 and abs(rs.yarn_mscale(4) - (0.1 * math.log(4) + 1)) < 1e-15
    assert abs(rs.longrope_mscale(32, 4096) - math.sqrt(17 / 12)) < 1e-15  # ln 32 / ln 4096 = 5/12
    assert rs.longrope_mscale(1, 128) == 1.0


def test_baseline_temperatures_and_names():
    kw = dict(head_dim=32, base=10000.0, original_length=128)
    assert rs.baseline("pi", 4, **kw).mscale == 1.0 and rs.baseline("ntk", 4, **kw).mscale == 1.0
    assert rs.baseline("yarn", 4, **kw).mscale == rs.yarn_mscale(4)
    assert torch.equal(rs.baseline("none", 4, **kw).factors, torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("call, match", [
    (lambda: rs.pi_factors(0.5, 32), "scale"),
    (lambda: rs.ntk_factors(2, 7), "head_dim"),
    (lambda: rs.yarn_ramp(32, 10000.0, 128, beta_fast=1, beta_slow=32), "beta_fast"),
    (lambda: rs.baseline("xpos", 2, head_dim=32, base=1e4, original_length=128), "method"),
    (lambda: rs.Scaling(torch.tensor([0.5, 1.0])), "factors"),
    (lambda: rs.Scaling(torch.ones(4), start=-1), "start"),
    (lambda: rs.longrope_mscale(2, 1), "original_length"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_is_monotone():
    assert rs.is_monotone(np.array([1.0, 1.0, 2.0])) and not rs.is_monotone([1.0, 2.0, 1.5])
