"""kernels/rope.py: every backend against the reference, plus the algebra the papers rely on.

Tolerances: float64 1e-10 (abs and rel): the CPU kernel builds cos/sin for consecutive positions by
angle addition, which differs from cos(pos * w) by about one rounding of the angle (~1e-12 at
position 8000). float32 1e-6 abs / 1e-5 rel: every backend computes the angles in float64 and rounds
cos and sin once, so float32 results differ only in the last bit.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import rope as R

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@st.composite
def problems(draw, max_t=70, max_half=12):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    T, D = draw(st.integers(1, max_t)), 2 * draw(st.integers(1, max_half))
    kind = draw(st.sampled_from(["none", "vector", "population"]))
    P = draw(st.integers(1, 4))
    kw = dict(base=draw(st.sampled_from([10000.0, 500000.0, 37.5])), start=draw(st.integers(0, 40)),
              mscale=draw(st.floats(0.5, 2.0)))
    kind = (kind, draw(st.sampled_from(["consecutive", "random"])))  # the CPU kernel's two paths
    return lead, T, D, kind, P, kw


def _make(lead, T, D, kind, P, dtype, seed=0):
    kind, order = kind if isinstance(kind, tuple) else (kind, "random")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, T, D, generator=gen, dtype=dtype)
    if order == "consecutive":  # a KV cache / LongRoPE evaluation: pos0, pos0 + 1, ...
        positions = int(torch.randint(0, 5000, (1,), generator=gen)) + torch.arange(T)
    else:
        positions = torch.randint(0, 5000, (T,), generator=gen)
    factors = {"none": None,
               "vector": 1 + 7 * torch.rand(D // 2, generator=gen, dtype=dtype),
               "population": 1 + 7 * torch.rand(P, D // 2, generator=gen, dtype=dtype)}[kind]
    return x, positions, factors


@settings(max_examples=60, deadline=None)
@given(p=problems(), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp64(p, seed):
    lead, T, D, kind, P, kw = p
    x, pos, factors = _make(lead, T, D, kind, P, torch.float64, seed)
    want = R.reference(x, pos, factors=factors, **kw)
    got = R.cpu(x, pos, factors=factors, **kw)
    assert got.shape == want.shape == ((P,) if kind[0] == "population" else ()) + x.shape
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@settings(max_examples=30, deadline=None)
@given(p=problems(), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp32(p, seed):
    lead, T, D, kind, P, kw = p
    x, pos, factors = _make(lead, T, D, kind, P, torch.float32, seed)
    want = R.reference(x, pos, factors=factors, **kw)
    torch.testing.assert_close(R.cpu(x, pos, factors=factors, **kw), want, **TOL[torch.float32])


def test_reference_matches_companion_model_rope():
    """The kernels and the lab's model (companion/model.py) share one RoPE convention (rotate_half)."""
    from companion.model import apply_rope, rope_cos_sin

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 48, 16, generator=gen, dtype=torch.float64)
    positions = torch.arange(48) + 5
    for base in (10000.0, 500.0):
        cos, sin = rope_cos_sin(positions, 16, base)
        want = apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))
        torch.testing.assert_close(R.reference(x, positions, base=base), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(R.cpu(x, positions, base=base), want, rtol=1e-6, atol=1e-6)


def test_long_consecutive_positions_across_start():
    """The angle-addition path over thousands of positions, with blocks on both sides of n-hat."""
    x = torch.randn(2, 4100, 16, dtype=torch.float64)
    factors = 1 + 3 * torch.rand(3, 8, dtype=torch.float64)
    for start in (0, 45, 4099):
        kw = dict(factors=factors, start=start, mscale=1.2)
        want = R.reference(x, torch.arange(4100), **kw)
        torch.testing.assert_close(R.cpu(x, torch.arange(4100), **kw), want, **TOL[torch.float64])


def test_population_is_a_stack_of_single_vectors():
    x, pos, pop = _make((2, 3), 20, 8, "population", 5, torch.float64)
    stacked = R.cpu(x, pos, factors=pop, start=4, mscale=1.1)
    for i in range(5):
        single = R.cpu(x, pos, factors=pop[i], start=4, mscale=1.1)
        torch.testing.assert_close(stacked[i], single, rtol=0, atol=0)


def test_rotation_preserves_norm_and_relative_position():
    """RoPE is a rotation (norms kept, times mscale) and q.k depends only on the position difference."""
    gen = torch.Generator().manual_seed(1)
    D = 16
    q, k = (torch.randn(1, D, generator=gen, dtype=torch.float64) for _ in range(2))
    factors = 1 + 3 * torch.rand(D // 2, generator=gen, dtype=torch.float64)
    for backend in ("reference", "cpu"):
        def rot(x, p, backend=backend):
            return R.run(x, torch.tensor([p]), factors=factors, mscale=1.5, backend=backend)

        torch.testing.assert_close(rot(q, 37).norm(), 1.5 * q.norm(), rtol=1e-12, atol=0)
        a = (rot(q, 100) * rot(k, 90)).sum()
        b = (rot(q, 1010) * rot(k, 1000)).sum()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_start_leaves_early_positions_unscaled():
    x, pos, factors = _make((2,), 30, 8, "vector", 1, torch.float64)
    pos = torch.arange(30)
    scaled = R.cpu(x, pos, factors=factors, start=10)
    plain = R.cpu(x, pos)
    everywhere = R.cpu(x, pos, factors=factors)
    torch.testing.assert_close(scaled[..., :10, :], plain[..., :10, :], rtol=0, atol=0)
    torch.testing.assert_close(scaled[..., 10:, :], everywhere[..., 10:, :], rtol=0, atol=0)


def test_position_interpolation_is_position_division():
    """PI: lambda_i = s for every i is the same as plain RoPE at position / s (exact in real arithmetic)."""
    x = torch.randn(3, 40, 8, dtype=torch.float64)
    pos = torch.arange(40) * 4
    pi = R.cpu(x, pos, factors=torch.full((4,), 4.0, dtype=torch.float64))
    torch.testing.assert_close(pi, R.cpu(x, torch.arange(40)), rtol=1e-12, atol=1e-12)


def test_factors_one_is_plain_rope():
    x, pos, _ = _make((2,), 25, 12, "none", 1, torch.float64)
    torch.testing.assert_close(R.cpu(x, pos, factors=torch.ones(6, dtype=torch.float64)), R.cpu(x, pos),
                               rtol=0, atol=0)


def test_cos_sin_tables():
    cos, sin = R.cos_sin(torch.tensor([0, 1, 2]), 4, base=100.0, mscale=2.0)
    assert cos.shape == sin.shape == (1, 3, 4)
    assert torch.equal(cos[0, 0], torch.full((4,), 2.0, dtype=torch.float64))
    want = 2.0 * torch.tensor([math.sin(1.0), math.sin(0.1)] * 2, dtype=torch.float64)  # inv_freq = 1, 1/10
    torch.testing.assert_close(sin[0, 1], want)


# ---------------------------------------------------------------- CUDA (simulator when no GPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["none", "vector", "population"])
@pytest.mark.parametrize("shape", [((), 1, 2), ((2, 3), 11, 10)])  # T=1; T not a multiple of CU_ROWS
def test_cuda_matches_reference(dtype, kind, shape):
    x, pos, factors = _make(*shape, kind, 2, dtype)
    kw = dict(start=3, mscale=1.3, base=500.0)
    got, want = R.cuda(x, pos, factors=factors, **kw), R.reference(x, pos, factors=factors, **kw)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_cuda_rejects_large_head_dim():
    x = torch.randn(2, 2 * R.HALF_MAX + 2)
    with pytest.raises(ValueError, match="HALF_MAX"):
        R.cuda(x, torch.arange(2))


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise_value_error():
    x = torch.randn(2, 5, 8)
    pos = torch.arange(5)
    for backend in ("reference", "cpu", "cuda"):
        run = lambda backend=backend, **kw: R.run(**{"x": x, "positions": pos, "backend": backend, **kw})
        with pytest.raises(ValueError, match="must be even"):
            run(x=torch.randn(5, 7))
        with pytest.raises(ValueError, match="x must have shape"):
            run(x=torch.randn(8))
        with pytest.raises(ValueError, match="x has dtype"):
            run(x=x.long())
        with pytest.raises(ValueError, match="positions has shape"):
            run(positions=torch.arange(4))
        with pytest.raises(ValueError, match="positions has dtype"):
            run(positions=pos.float())
        with pytest.raises(ValueError, match="positions must be >= 0"):
            run(positions=pos - 2)
        with pytest.raises(ValueError, match="factors has shape"):
            run(factors=torch.ones(3))
        with pytest.raises(ValueError, match="factors has shape"):
            run(factors=torch.ones(2, 2, 4))
        with pytest.raises(ValueError, match="factors must be finite and >= 1"):
            run(factors=torch.full((4,), 0.5))
        with pytest.raises(ValueError, match="factors must be finite and >= 1"):
            run(factors=torch.tensor([1.0, float("inf"), 1.0, 1.0]))
        with pytest.raises(ValueError, match="factors has dtype"):
            run(factors=torch.ones(4, dtype=torch.float64))
        with pytest.raises(ValueError, match="start"):
            run(start=-1)
        with pytest.raises(ValueError, match="mscale"):
            run(mscale=0.0)
        with pytest.raises(ValueError, match="base"):
            run(base=1.0)
    with pytest.raises(ValueError, match="backend="):
        R.run(x, pos, backend="npu")
