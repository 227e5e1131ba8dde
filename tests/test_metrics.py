"""companion/metrics.py: closed-form values, invariances, and input validation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.metrics import (
    condition_ratio,
    embedding_report,
    isotropy,
    mean_vector_norm,
    norm_frequency_correlation,
    relative_mean_norm,
)

METRICS = [mean_vector_norm, relative_mean_norm, isotropy, condition_ratio]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _orthogonal(n, seed=0):
    q, r = torch.linalg.qr(_randn(n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r))


# ----------------------------------------------------------------------------------------------
# mean norms
# ----------------------------------------------------------------------------------------------
def test_identical_rows():
    row = torch.tensor([3.0, -4.0, 12.0], dtype=torch.float64)
    E = row.repeat(7, 1)
    assert relative_mean_norm(E) == pytest.approx(1.0, abs=1e-15)
    assert mean_vector_norm(E) == pytest.approx(13.0, rel=1e-15)


def test_centred_cloud_has_zero_mean():
    X = torch.randint(-50, 50, (5, 6), generator=torch.Generator().manual_seed(0)).double() / 8  # sums are exact
    E = torch.cat([X, -X])
    assert mean_vector_norm(E) == 0.0
    assert relative_mean_norm(E) == 0.0


def test_mean_vector_norm_known_value():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    assert mean_vector_norm(E) == pytest.approx(math.hypot(1.0, 1.0), rel=1e-15)
    mean_norm = (1 + 1 + math.sqrt(8) + math.sqrt(2)) / 4
    assert relative_mean_norm(E) == pytest.approx(math.sqrt(2) / mean_norm, rel=1e-14)


@settings(max_examples=30, deadline=None)
@given(V=st.integers(2, 40), H=st.integers(1, 12), seed=st.integers(0, 2**16),
       scale=st.floats(1e-3, 1e3), offset=st.floats(0, 10))
def test_relative_mean_norm_bounds_and_scale_invariance(V, H, seed, scale, offset):
    E = _randn(V, H, seed=seed) + offset
    r = relative_mean_norm(E)
    assert 0.0 <= r <= 1.0 + 1e-12  # ‖mean‖ <= mean ‖e_i‖ (triangle inequality)
    assert relative_mean_norm(scale * E) == pytest.approx(r, rel=1e-10)
    assert mean_vector_norm(scale * E) == pytest.approx(scale * mean_vector_norm(E), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# isotropy
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H, s", [(1, 1.0), (4, 0.5), (8, 3.0), (16, 40.0)])
def test_isotropy_of_signed_basis_is_one(H, s):
    I = torch.eye(H, dtype=torch.float64)
    E = s * torch.cat([I, -I])
    assert isotropy(E) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_isotropy_closed_form_for_rotated_scaled_basis(seed):
    """Rows ±s_k u_k (orthonormal u_k, distinct s_k): Z(±u_j) = 2 cosh(s_j) + 2 (H - 1), so
    Iso = (2 cosh(s_min) + 2(H-1)) / (2 cosh(s_max) + 2(H-1))."""
    H = 6
    Q = _orthogonal(H, seed=seed)
    s = torch.tensor([0.3, 0.7, 1.1, 1.6, 2.2, 3.0], dtype=torch.float64)
    U = s[:, None] * Q.T  # row k = s_k u_k
    E = torch.cat([U, -U])
    want = (2 * math.cosh(0.3) + 2 * (H - 1)) / (2 * math.cosh(3.0) + 2 * (H - 1))
    assert isotropy(E) == pytest.approx(want, rel=1e-10)


def test_isotropy_falls_with_a_common_offset():
    E = _randn(400, 8, seed=3)
    v = torch.nn.functional.normalize(_randn(8, seed=4), dim=0)
    values = [isotropy(E + a * v) for a in (0.0, 0.5, 2.0, 5.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] > 0.3 and values[-1] < 0.01


@settings(max_examples=25, deadline=None)
@given(V=st.integers(4, 60), H=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_isotropy_invariances(V, H, seed):
    E = _randn(V, H, seed=seed)
    iso = isotropy(E)
    assert 0.0 < iso <= 1.0
    assert isotropy(-E) == pytest.approx(iso, rel=1e-9)  # eigenvectors have no sign
    assert isotropy(E[torch.randperm(V, generator=torch.Generator().manual_seed(seed))]) == pytest.approx(iso, rel=1e-9)
    assert isotropy(E @ _orthogonal(H, seed=seed + 1)) == pytest.approx(iso, rel=1e-7)  # rotation


def test_isotropy_does_not_overflow():
    E = _randn(50, 4, seed=5) * 1e4 + 3e4
    iso = isotropy(E)
    assert math.isfinite(iso) and 0.0 <= iso <= 1.0
    assert iso < 1e-10


# ----------------------------------------------------------------------------------------------
# condition ratio
# ----------------------------------------------------------------------------------------------
def test_condition_ratio_known_values():
    assert condition_ratio(_orthogonal(7, seed=2)) == pytest.approx(1.0, abs=1e-13)
    assert condition_ratio(3.5 * _orthogonal(5, seed=3)) == pytest.approx(1.0, abs=1e-13)
    D = torch.diag(torch.tensor([1.0, 2.0, 8.0], dtype=torch.float64))
    assert condition_ratio(_orthogonal(3, seed=4) @ D @ _orthogonal(3, seed=5)) == pytest.approx(1 / 8, rel=1e-12)
    tall = torch.cat([torch.eye(3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)])
    assert condition_ratio(tall) == pytest.approx(1.0, abs=1e-15)


def test_condition_ratio_rank_deficient_is_zero():
    X = _randn(10, 4)
    X[:, 3] = X[:, 0] - 2 * X[:, 1]
    assert condition_ratio(X) < 1e-14


# ----------------------------------------------------------------------------------------------
# norm-frequency correlation
# ----------------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(V=st.integers(3, 50), H=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_norm_frequency_correlation_equals_numpy(V, H, seed):
    E = _randn(V, H, seed=seed)
    freq = _randn(V, seed=seed + 1).abs()
    want = np.corrcoef(E.norm(dim=1).numpy(), freq.numpy())[0, 1]
    got = norm_frequency_correlation(E, freq)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    assert norm_frequency_correlation(E, freq.numpy()) == got  # array-like accepted
    assert norm_frequency_correlation(E, 1e6 * freq) == pytest.approx(got, rel=1e-10, abs=1e-12)


def test_norm_frequency_correlation_perfect():
    freq = torch.tensor([1.0, 2.0, 3.0, 4.0])
    E = torch.stack([2 * freq + 1, torch.zeros(4)], dim=1)  # norm = 2 f + 1: exactly linear
    assert norm_frequency_correlation(E, freq) == pytest.approx(1.0, abs=1e-14)
    assert norm_frequency_correlation(E, -freq) == pytest.approx(-1.0, abs=1e-14)
    assert norm_frequency_correlation(E, freq[:, None]) == pytest.approx(1.0, abs=1e-14)  # (V, 1) flattens


def test_norm_frequency_correlation_errors():
    E = _randn(4, 3)
    with pytest.raises(ValueError, match="frequencies"):
        norm_frequency_correlation(E, torch.ones(5))
    with pytest.raises(ValueError, match="undefined"):
        norm_frequency_correlation(E, torch.ones(4))
    with pytest.raises(ValueError, match="undefined"):
        norm_frequency_correlation(torch.eye(4, dtype=torch.float64), torch.arange(4.0))  # constant norms


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_norm_frequency_correlation_rejects_non_finite_frequencies(bad):
    with pytest.raises(ValueError):
        norm_frequency_correlation(_randn(4, 3), torch.tensor([1.0, bad, 2.0, 3.0]))


# ----------------------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", METRICS + [lambda E: norm_frequency_correlation(E, torch.arange(len(E)) * 1.0)],
                         ids=[m.__name__ for m in METRICS] + ["norm_frequency_correlation"])
@pytest.mark.parametrize(
    "E",
    [
        torch.tensor([[1.0, float("nan")], [0.0, 1.0]]),
        torch.tensor([[1.0, float("inf")], [0.0, 1.0]]),
        torch.ones(4),
        torch.ones(2, 3, 4),
        torch.ones(1, 5),
        np.ones((4, 3)),
        [[1.0, 2.0], [3.0, 4.0]],
    ],
    ids=["nan", "inf", "1-D", "3-D", "one-row", "numpy", "list"],
)
def test_bad_input_raises_value_error(metric, E):
    with pytest.raises(ValueError):
        metric(E)


@pytest.mark.parametrize("metric", [relative_mean_norm, condition_ratio])
def test_all_zero_matrix_is_not_silently_nan(metric):
    try:
        value = metric(torch.zeros(4, 3))
    except ValueError:
        return
    assert math.isfinite(value)


@pytest.mark.parametrize("metric", METRICS)
def test_float32_and_grad_inputs_are_computed_in_float64(metric):
    E32 = _randn(30, 5, seed=8).float().requires_grad_()
    assert metric(E32) == metric(E32.detach().double())


def test_embedding_report():
    E = _randn(20, 4, seed=9) + 0.5
    freq = torch.arange(20.0)
    report = embedding_report(E, freq)
    assert report == {"iso": isotropy(E), "mu_norm": mean_vector_norm(E), "mu_rel": relative_mean_norm(E),
                      "cond_ratio": condition_ratio(E), "rho_norm_freq": norm_frequency_correlation(E, freq)}
    assert "rho_norm_freq" not in embedding_report(E)
