"""kernels/softmax_xent.py: every backend against the torch reference, and the reference against torch."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import softmax_xent as k


def _inputs(n, v, dtype, seed=0, *, ignore_every=0, mask_prob=0.0):
    gen = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(n, v, generator=gen, dtype=dtype)
    r = z + torch.randn(n, v, generator=gen, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        y[::ignore_every] = -100
    if mask_prob:  # -inf entries in the reference: p_ref = 0 there
        r[torch.rand(n, v, generator=gen) < mask_prob] = -math.inf
        r[:, 0] = 0.0  # keep one finite entry per row
    return z, y, r


def _assert_same(got, want, **tol):
    for key in ("lse", "loss", "kl"):
        if want[key] is None:
            assert got[key] is None, key
        else:
            torch.testing.assert_close(got[key], want[key], equal_nan=True, **tol)


def test_reference_equals_torch_losses_fp64():
    """The specification is the usual torch pair: F.cross_entropy and F.kl_div(log_softmax, log_softmax)."""
    z, y, r = _inputs(37, 301, torch.float64, ignore_every=5)
    out = k.reference(z, y, r)
    want_loss = F.cross_entropy(z, y, reduction="none")
    want_kl = F.kl_div(F.log_softmax(z, -1), F.log_softmax(r, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(out["loss"], want_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["kl"], want_kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["lse"], torch.logsumexp(z, -1), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(1, 700), seed=st.integers(0, 2**16), with_targets=st.booleans(),
       with_ref=st.booleans())
def test_cpu_matches_reference_fp64(n, v, seed, with_targets, with_ref):
    z, y, r = _inputs(n, v, torch.float64, seed, ignore_every=3)
    args = (z, y if with_targets else None, r if with_ref else None)
    _assert_same(k.cpu(*args), k.reference(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1), (3, 255), (4, 257), (9, 1000)])  # around the tile size 256
def test_cpu_matches_reference_fp32(shape):
    z, y, r = _inputs(*shape, torch.float32)
    out = k.cpu(z, y, r)
    assert out["kl"].dtype == torch.float32
    _assert_same(out, k.reference(z, y, r), rtol=1e-5, atol=1e-5)


def test_cpu_handles_minus_infinity_like_the_reference():
    z, y, r = _inputs(6, 300, torch.float64, mask_prob=0.5)
    z[0, 5] = -math.inf  # p(5) = 0: the KL is +inf where p_ref(5) > 0, and stays finite where p_ref(5) = 0
    r[0, 5] = 1.0
    z[1, 7] = r[1, 7] = -math.inf  # both zero: contributes nothing
    z[2, :] = -math.inf  # a fully masked row of logits: lse = -inf
    y[2] = -100
    got, want = k.cpu(z, y, r), k.reference(z, y, r)
    _assert_same(got, want, rtol=1e-12, atol=1e-12)
    assert math.isinf(got["kl"][0].item()) and math.isfinite(got["kl"][1].item())
    assert got["lse"][2].item() == -math.inf and got["loss"][2].item() == 0.0


def test_large_logits_do_not_overflow():
    z, y, r = _inputs(4, 50, torch.float64)
    shifted = k.cpu(z + 1e4, y, r - 1e4)  # softmax ignores a constant shift; only lse moves
    plain = k.cpu(z, y, r)
    torch.testing.assert_close(shifted["loss"], plain["loss"], rtol=0, atol=1e-9)
    torch.testing.assert_close(shifted["kl"], plain["kl"], rtol=0, atol=1e-9)
    torch.testing.assert_close(shifted["lse"], plain["lse"] + 1e4, rtol=0, atol=1e-9)


def test_kl_of_a_row_with_itself_is_zero_and_kl_is_nonnegative():
    z, y, r = _inputs(20, 128, torch.float64)
    assert k.cpu(z, None, z)["kl"].abs().max() < 1e-12
    assert (k.cpu(z, None, r)["kl"] >= -1e-12).all()


@pytest.mark.parametrize("shape", [(1, 1), (3, 129), (5, 300)])  # 300 = 2 full strides of 128 + a tail
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(shape, dtype):
    z, y, r = _inputs(*shape, dtype, ignore_every=2, mask_prob=0.3 if shape[1] > 1 else 0.0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    _assert_same(k.cuda(z, y, r), k.reference(z, y, r), **tol)
    _assert_same(k.cuda(z, None, None), k.reference(z), **tol)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's -inf + inf on the masked row
def test_cuda_handles_minus_infinity():
    z, y, r = _inputs(3, 140, torch.float64)
    z[0, 5], r[0, 5] = -math.inf, 1.0
    z[1, :] = -math.inf
    y[1] = -100
    _assert_same(k.cuda(z, y, r), k.reference(z, y, r), rtol=1e-12, atol=1e-12)


def test_bad_inputs_raise_value_error():
    z, y, r = _inputs(4, 10, torch.float32)
    with pytest.raises(ValueError, match="logits must have 2 dims"):
        k.run(z[0], y)
    with pytest.raises(ValueError, match="targets has shape"):
        k.run(z, y[:2])
    with pytest.raises(ValueError, match="targets has dtype"):
        k.run(z, y.int())
    with pytest.raises(ValueError, match="targets must be in"):
        k.run(z, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="ref_logits has dtype"):
        k.run(z, y, r.double())
    with pytest.raises(ValueError, match="ref_logits has shape"):
        k.run(z, y, r[:, :5])
    with pytest.raises(ValueError, match="backend="):
        k.run(z, y, backend="tpu")
    with pytest.raises(ValueError, match="logits has dtype"):
        k.run(z.long(), y)


def test_bench_cases_compare_like_with_like():
    case = k.bench_cases(quick=True)[0]
    x = case.setup()
    loss, kl = case.torch_fn(x)
    ours = case.numba_fn(x)
    torch.testing.assert_close(ours["loss"], loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours["kl"], kl, rtol=1e-4, atol=1e-4)
