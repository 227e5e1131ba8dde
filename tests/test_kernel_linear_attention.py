"""kernels/linear_attention.py: torch_chunked, cpu and cuda against the quadratic reference.

Tolerances: float64 1e-10 (abs and rel). float32 5e-5 abs / 1e-4 rel on inputs scaled by Dk**-0.5
(linear attention is not normalised, so outputs grow like sqrt(T); the inputs are scaled to keep
them O(1) at the sizes tested).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import linear_attention as LA

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=5e-5)}


def _inputs(B, H, T, Dk, Dv, dtype, seed=0, decay=True, state=True):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype) * Dk ** -0.5
    q, k, v = mk(B, H, T, Dk), mk(B, H, T, Dk), mk(B, H, T, Dv)
    gamma = (0.5 + 0.5 * torch.rand(H, generator=gen, dtype=torch.float64)).to(dtype) if decay else None
    m0 = mk(B, H, Dk, Dv) if state else None
    return q, k, v, gamma, m0


def _assert_same(got, want, dtype):
    for g, w in zip(got, want):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g, w, **TOL[dtype])


@st.composite
def problems(draw, max_t=130, max_d=16):
    return dict(B=draw(st.integers(1, 2)), H=draw(st.integers(1, 3)), T=draw(st.integers(1, max_t)),
                Dk=draw(st.integers(1, max_d)), Dv=draw(st.integers(1, max_d)),
                decay=draw(st.booleans()), state=draw(st.booleans()))


@settings(max_examples=50, deadline=None)
@given(p=problems(), chunk=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_cpu_and_torch_chunked_match_reference_fp64(p, chunk, seed):
    shape = (p[n] for n in ("B", "H", "T", "Dk", "Dv"))
    q, k, v, gamma, m0 = _inputs(*shape, torch.float64, seed, p["decay"], p["state"])
    want = LA.reference(q, k, v, decay=gamma, initial_state=m0)
    for impl in (LA.cpu, LA.torch_chunked):
        _assert_same(impl(q, k, v, decay=gamma, initial_state=m0, chunk=chunk), want, torch.float64)


@settings(max_examples=25, deadline=None)
@given(p=problems(), chunk=st.sampled_from([1, 16, 64]), seed=st.integers(0, 2**16))
def test_cpu_and_torch_chunked_match_reference_fp32(p, chunk, seed):
    shape = (p[n] for n in ("B", "H", "T", "Dk", "Dv"))
    q, k, v, gamma, m0 = _inputs(*shape, torch.float32, seed, p["decay"], p["state"])
    want = LA.reference(q, k, v, decay=gamma, initial_state=m0)
    for impl in (LA.cpu, LA.torch_chunked):
        _assert_same(impl(q, k, v, decay=gamma, initial_state=m0, chunk=chunk), want, torch.float32)


def test_reference_equals_the_recurrence():
    """The closed form is the RNN  M_t = gamma M_{t-1} + k_t^T v_t,  o_t = q_t M_t  (M_{-1} = M0)."""
    q, k, v, gamma, m0 = _inputs(2, 3, 25, 5, 4, torch.float64)
    M = m0.clone()
    outs = []
    for t in range(25):
        M = gamma[None, :, None, None] * M + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ M)[:, :, 0])
    out, final = LA.reference(q, k, v, decay=gamma, initial_state=m0)
    torch.testing.assert_close(out, torch.stack(outs, dim=2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, M, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
@pytest.mark.parametrize("decay", [False, True])
def test_splitting_the_sequence_and_passing_the_state_is_exact(backend, decay):
    """LASP's invariant: run segment 1, hand its final_state to segment 2 as initial_state."""
    q, k, v, gamma, m0 = _inputs(1, 2, 21, 8, 6, torch.float64, decay=decay)
    full, final = LA.run(q, k, v, decay=gamma, initial_state=m0, backend=backend)
    head, tail = (slice(None, 9),), (slice(9, None),)  # the cut is not on a chunk boundary
    o1, s1 = LA.run(*(x[:, :, head[0]] for x in (q, k, v)), decay=gamma, initial_state=m0, backend=backend)
    o2, s2 = LA.run(*(x[:, :, tail[0]] for x in (q, k, v)), decay=gamma, initial_state=s1, backend=backend)
    torch.testing.assert_close(torch.cat([o1, o2], dim=2), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
def test_cpu_edge_lengths_default_chunk(T):
    q, k, v, gamma, m0 = _inputs(1, 2, T, 16, 16, torch.float64)
    want = LA.reference(q, k, v, decay=gamma, initial_state=m0)
    _assert_same(LA.cpu(q, k, v, decay=gamma, initial_state=m0), want, torch.float64)


def test_decay_one_equals_no_decay():
    q, k, v, _, m0 = _inputs(1, 3, 40, 4, 4, torch.float64)
    ones = torch.ones(3, dtype=torch.float64)
    for impl in (LA.reference, LA.cpu, LA.torch_chunked):
        a = impl(q, k, v, decay=ones, initial_state=m0, chunk=16)
        b = impl(q, k, v, initial_state=m0, chunk=16)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_chunk_size_does_not_change_the_result():
    q, k, v, gamma, m0 = _inputs(1, 2, 100, 8, 8, torch.float64)
    base = LA.cpu(q, k, v, decay=gamma, initial_state=m0, chunk=100)
    for chunk in (1, 3, 32, 99, 1000):
        for x, y in zip(LA.cpu(q, k, v, decay=gamma, initial_state=m0, chunk=chunk), base):
            torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------- CUDA (simulator when no GPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1),  # T = 1
                                   (1, 1, 21, 12, 20),  # ragged last chunk, two value-column tiles
                                   (2, 1, 16, 5, 3)])  # exactly one chunk
@pytest.mark.parametrize("decay_state", [(False, False), (True, True)])
def test_cuda_matches_reference(dtype, shape, decay_state):
    q, k, v, gamma, m0 = _inputs(*shape, dtype, decay=decay_state[0], state=decay_state[1])
    _assert_same(LA.cuda(q, k, v, decay=gamma, initial_state=m0),
                 LA.reference(q, k, v, decay=gamma, initial_state=m0), dtype)


def test_cuda_rejects_large_head_dim():
    q, k, v, _, _ = _inputs(1, 1, 4, LA.DK_MAX + 1, 4, torch.float32, decay=False, state=False)
    with pytest.raises(ValueError, match="DK_MAX"):
        LA.cuda(q, k, v)


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise_value_error():
    q, k, v, gamma, m0 = _inputs(1, 2, 10, 4, 3, torch.float32)
    for backend in ("reference", "cpu", "cuda"):
        run = lambda backend=backend, **kw: LA.run(**{"q": q, "k": k, "v": v, "backend": backend, **kw})
        with pytest.raises(ValueError, match="decay must hold"):
            run(decay=torch.tensor([0.5, 1.5]))
        with pytest.raises(ValueError, match="decay must hold"):
            run(decay=torch.tensor([0.0, 0.5]))
        with pytest.raises(ValueError, match="decay has shape"):
            run(decay=torch.tensor([0.5, 0.5, 0.5]))
        with pytest.raises(ValueError, match="decay has dtype"):
            run(decay=gamma.double())
        with pytest.raises(ValueError, match="initial_state has shape"):
            run(initial_state=m0[..., :2])
        with pytest.raises(ValueError, match="chunk must be"):
            run(chunk=0)
        with pytest.raises(ValueError, match="k has shape"):
            run(k=k[:, :, :5])
        with pytest.raises(ValueError, match="v has shape"):
            run(v=v[:, :1])
        with pytest.raises(ValueError, match="v has dtype"):
            run(v=v.double())
        with pytest.raises(ValueError, match="q must have 4 dims"):
            run(q=q[0])
    with pytest.raises(ValueError, match="backend="):
        LA.run(q, k, v, backend="gpu")
