"""kernels/coupled_adam_step.py: every backend against the torch reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import coupled_adam_step as k

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, avg_scale=1.0)


def _inputs(n_rows, n_cols, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(n_rows, n_cols, generator=gen, dtype=dtype)
    return [mk(), mk(), 0.1 * mk(), 0.01 * mk().abs()]


def _run(backend, tensors, steps=3):
    p, g, m, v = (t.clone() for t in tensors)
    for step in range(1, steps + 1):
        k.run(p, g, m, v, backend=backend, step=step, **HYPER)
    return p, m, v


@settings(max_examples=25, deadline=None)
@given(n_rows=st.integers(1, 130), n_cols=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp64(n_rows, n_cols, seed):
    x = _inputs(n_rows, n_cols, torch.float64, seed)
    for got, want in zip(_run("cpu", x), _run("reference", x)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (300, 33)])
def test_cpu_matches_reference_fp32(shape):
    x = _inputs(*shape, torch.float32)
    for got, want in zip(_run("cpu", x), _run("reference", x)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (37, 19), (300, 33)])  # 300 rows: two row chunks of 256
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(shape, dtype):
    x = _inputs(*shape, dtype)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(_run("cuda", x, steps=2), _run("reference", x, steps=2)):
        torch.testing.assert_close(got, want, **tol)


def test_coupled_update_sums_to_zero_when_gradients_do():
    """The paper's point: if sum_i g_i = 0 for every step, sum_i (delta e_i) = 0 exactly."""
    p, g, m, v = _inputs(50, 8, torch.float64)
    g -= g.mean(dim=0, keepdim=True)  # make columns of the gradient sum to zero
    before = p.sum(0).clone()
    hyper = {**HYPER, "weight_decay": 0.0}
    m.zero_()
    v.zero_()
    for step in (1, 2, 3):
        k.cpu(p, g, m, v, step=step, **hyper)
    assert (p.sum(0) - before).abs().max() < 1e-12


def test_bad_inputs_raise_value_error():
    p, g, m, v = _inputs(4, 3, torch.float32)
    with pytest.raises(ValueError, match="grad has shape"):
        k.run(p, g[:2], m, v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg has dtype"):
        k.run(p, g, m.double(), v, step=1, lr=1e-3)
    with pytest.raises(ValueError, match="step must be"):
        k.run(p, g, m, v, step=0, lr=1e-3)
    with pytest.raises(ValueError, match="backend="):
        k.run(p, g, m, v, backend="tpu", step=1, lr=1e-3)
    with pytest.raises(ValueError, match="param has dtype"):
        k.run(p.long(), g, m, v, step=1, lr=1e-3)
