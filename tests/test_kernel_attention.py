"""kernels/attention.py: every backend against the torch reference, plus the properties later papers use.

Tolerances: float64 is compared at 1e-10 (abs and rel); float32 at 2e-5 abs / 1e-4 rel. The float32 CPU
kernel uses a polynomial exp2 with relative error < 1e-7 and BLAS tiles, so it differs from torch's
float32 only by rounding (observed max |diff| ~ 5e-7 on unit-normal inputs).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention as A
from kernels._backend import _scipy_openblas, single_threaded_blas

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _qkv(B, H, H_kv, T, S, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    return mk(B, H, T, D), mk(B, H_kv, S, D), mk(B, H_kv, S, Dv)


def _assert_same(got, want, dtype):
    out_g, lse_g = got
    out_w, lse_w = want
    assert not torch.isnan(out_g).any() and not torch.isnan(lse_g).any()
    torch.testing.assert_close(out_g, out_w, **TOL[dtype])
    assert torch.equal(torch.isinf(lse_g), torch.isinf(lse_w)), "fully-masked rows differ"
    fin = torch.isfinite(lse_w)
    torch.testing.assert_close(lse_g[fin], lse_w[fin], **TOL[dtype])


@st.composite
def problems(draw, max_t=70, max_d=20, max_group=3):
    """(shapes, mask kwargs) at small sizes, covering every mask mode, GQA and q_offset."""
    B = draw(st.integers(1, 2))
    H_kv = draw(st.integers(1, 3))
    H = H_kv * draw(st.integers(1, max_group))
    T = draw(st.integers(1, max_t))
    S = T + draw(st.sampled_from([0, 0, 1, 7, 23]))  # self-attention, or a KV cache longer than T
    D, Dv = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    mask = draw(st.sampled_from(A.MASKS))
    kw = {"mask": mask}
    if mask == "sliding":
        kw["window"] = draw(st.integers(1, T + 10))
        kw["n_sink"] = draw(st.integers(0, 6))
    if draw(st.booleans()):
        kw["q_offset"] = draw(st.integers(-4, S))  # negative: early rows see nothing
    return (B, H, H_kv, T, S, D, Dv), kw


@settings(max_examples=60, deadline=None)
@given(p=problems(), block_q=st.integers(1, 40), block_k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp64(p, block_q, block_k, seed):
    shape, kw = p
    q, k, v = _qkv(*shape, torch.float64, seed)
    want = A.reference(q, k, v, return_lse=True, **kw)
    got = A.cpu(q, k, v, return_lse=True, block_q=block_q, block_k=block_k, **kw)
    _assert_same(got, want, torch.float64)


@settings(max_examples=30, deadline=None)
@given(p=problems(), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp32(p, seed):
    shape, kw = p
    q, k, v = _qkv(*shape, torch.float32, seed)
    _assert_same(A.cpu(q, k, v, return_lse=True, **kw), A.reference(q, k, v, return_lse=True, **kw),
                 torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])  # length 1 and lengths around the 64-row tile
@pytest.mark.parametrize("kw", [dict(mask="causal"), dict(mask="none"),
                                dict(mask="sliding", window=16, n_sink=3)])
def test_cpu_default_tiles_edge_lengths(dtype, T, kw):
    q, k, v = _qkv(1, 2, 1, T, T, 16, 8, dtype)
    _assert_same(A.cpu(q, k, v, return_lse=True, **kw), A.reference(q, k, v, return_lse=True, **kw), dtype)


def test_decode_single_query_sees_every_key():
    """T=1 with the default q_offset = S - 1: the one query is the newest token, so causal = none."""
    q, k, v = _qkv(2, 4, 2, 1, 37, 8, 8, torch.float64)
    for backend in ("reference", "cpu"):
        causal = A.run(q, k, v, mask="causal", backend=backend)
        none = A.run(q, k, v, mask="none", backend=backend)
        torch.testing.assert_close(causal, none, rtol=1e-12, atol=1e-12)


def test_decode_equals_last_row_of_full_attention():
    """The KV-cache property: attending with the last query alone = the last row of the full pass."""
    q, k, v = _qkv(1, 2, 2, 50, 50, 8, 8, torch.float64)
    for kw in (dict(mask="causal"), dict(mask="sliding", window=9, n_sink=2)):
        full = A.cpu(q, k, v, **kw)
        last = A.cpu(q[:, :, -1:], k, v, **kw)
        torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_window_at_least_T_is_causal(dtype):
    q, k, v = _qkv(1, 2, 2, 45, 45, 8, 8, dtype)
    causal = A.cpu(q, k, v, mask="causal")
    for window in (45, 46, 1000):
        for n_sink in (0, 3):
            torch.testing.assert_close(A.cpu(q, k, v, mask="sliding", window=window, n_sink=n_sink), causal,
                                       **TOL[dtype])


def test_window_one_without_sinks_returns_own_value():
    q, k, v = _qkv(1, 1, 1, 30, 30, 4, 5, torch.float64)
    out, lse = A.cpu(q, k, v, mask="sliding", window=1, return_lse=True)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-15)  # softmax over a single key is 1
    scores = (q * k).sum(-1) * 4 ** -0.5
    torch.testing.assert_close(lse, scores, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fully_masked_rows_are_zero_not_nan(backend, dtype):
    """q_offset = -5: queries 0..4 sit before the first key, so the causal mask hides everything."""
    q, k, v = _qkv(1, 2, 1, 12, 12, 8, 8, dtype)
    out, lse = A.run(q, k, v, mask="causal", q_offset=-5, backend=backend, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()


@pytest.mark.parametrize("H_kv", [1, 2, 4, 8])  # MQA, GQA 4 and 2, MHA
def test_gqa_equals_repeated_kv_heads(H_kv):
    H = 8
    q, k, v = _qkv(2, H, H_kv, 33, 33, 8, 8, torch.float64)
    rep = dict(repeats=H // H_kv, dim=1)
    want = A.reference(q, k.repeat_interleave(**rep), v.repeat_interleave(**rep), mask="sliding", window=7,
                       n_sink=2)
    for backend in ("reference", "cpu"):
        got = A.run(q, k, v, mask="sliding", window=7, n_sink=2, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_lse_merges_two_key_sets():
    """Attention over keys A+B equals the lse-weighted mix of attention over A and over B.

    This is how LM-Infinite's two branches (and InfiniteHiP's chunks) are combined, so lse must be the
    true natural-log normaliser: out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b).
    """
    q, k, v = _qkv(1, 2, 2, 10, 40, 8, 8, torch.float64)
    full, lse = A.cpu(q, k, v, mask="none", return_lse=True)
    oa, la = A.cpu(q, k[:, :, :13], v[:, :, :13], mask="none", return_lse=True)
    ob, lb = A.cpu(q, k[:, :, 13:], v[:, :, 13:], mask="none", return_lse=True)
    merged_lse = torch.logaddexp(la, lb)
    merged = (torch.exp(la - merged_lse)[..., None] * oa + torch.exp(lb - merged_lse)[..., None] * ob)
    torch.testing.assert_close(merged, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged_lse, lse, rtol=1e-12, atol=1e-12)


def test_reference_matches_torch_sdpa():
    """The spec itself agrees with torch's SDPA for every mask (SDPA takes the dense boolean mask)."""
    import torch.nn.functional as F

    q, k, v = _qkv(2, 4, 4, 40, 40, 16, 16, torch.float64)
    for kw in (dict(mask="none"), dict(mask="causal"), dict(mask="sliding", window=8, n_sink=4)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=A.dense_mask(40, 40, **kw))
        torch.testing.assert_close(A.reference(q, k, v, **kw), want, rtol=1e-12, atol=1e-12)


def test_dense_mask_shapes():
    m = A.dense_mask(4, 6, mask="sliding", window=2, n_sink=1)  # q_offset = 2: positions 2..5
    want = torch.tensor([[1, 1, 1, 0, 0, 0],
                         [1, 0, 1, 1, 0, 0],
                         [1, 0, 0, 1, 1, 0],
                         [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)
    assert torch.equal(A.dense_mask(3, 3, mask="causal"), torch.ones(3, 3, dtype=torch.bool).tril())


def test_custom_scale():
    q, k, v = _qkv(1, 1, 1, 9, 9, 4, 4, torch.float64)
    for backend in ("reference", "cpu"):
        a = A.run(q, k, v, scale=0.3, backend=backend)
        b = A.run(q * 0.3 / 4 ** -0.5, k, v, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_exp2_polynomial_accuracy():
    """The float32 kernel's exp2: relative error below float32 epsilon on [-126, 0]; -inf -> 0 exactly."""
    special = [-0.5, -0.5 - 1e-6, -1e-30, -125.999]  # the rounding boundary, tiny, the bottom
    xs = np.concatenate([np.linspace(-126.0, 0.0, 3001), special]).astype(np.float32)
    got = np.array([A._exp2_poly(x) for x in xs], dtype=np.float32)
    want = np.exp2(xs.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < np.finfo(np.float32).eps
    for x in (-np.inf, -126.01, -127.0, -1e30):  # below 2**-126 the kernel flushes to exactly 0
        assert A._exp2_poly(np.float32(x)) == 0.0


def test_single_threaded_blas_restores_thread_count():
    handles = _scipy_openblas()
    if handles is None:  # a BLAS we do not manage (MKL, Accelerate): the context is a no-op
        with single_threaded_blas():
            return
    get, _ = handles
    before = get()
    with single_threaded_blas():
        assert get() == 1
    assert get() == before


# ---------------------------------------------------------------- CUDA (simulator when no GPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", [dict(mask="causal"), dict(mask="none"),
                                dict(mask="sliding", window=5, n_sink=2), dict(mask="causal", q_offset=-3)])
@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 1, 3, 2),  # T = S = 1
                                   (1, 2, 2, 37, 37, 8, 5),  # T not a multiple of TILE_Q / TILE_K
                                   (2, 4, 2, 5, 19, 16, 16)])  # decode-like: short T, longer cache, GQA
def test_cuda_matches_reference(dtype, kw, shape):
    q, k, v = _qkv(*shape, dtype)
    _assert_same(A.cuda(q, k, v, return_lse=True, **kw), A.reference(q, k, v, return_lse=True, **kw), dtype)


@settings(max_examples=8, deadline=None)
@given(p=problems(max_t=24, max_d=12, max_group=2), seed=st.integers(0, 2**16))
def test_cuda_property_fp64(p, seed):
    shape, kw = p
    q, k, v = _qkv(*shape, torch.float64, seed)
    _assert_same(A.cuda(q, k, v, return_lse=True, **kw), A.reference(q, k, v, return_lse=True, **kw),
                 torch.float64)


def test_cuda_rejects_head_dim_above_limit():
    q, k, v = _qkv(1, 1, 1, 2, 2, A.D_MAX + 1, 4, torch.float32)
    with pytest.raises(ValueError, match="D_MAX"):
        A.cuda(q, k, v)


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise_value_error():
    q, k, v = _qkv(1, 4, 2, 6, 6, 8, 8, torch.float32)
    bad = [
        (dict(mask="diagonal"), "mask="),
        (dict(mask="sliding"), "window must be"),
        (dict(mask="sliding", window=0), "window must be"),
        (dict(mask="sliding", window=2.5), "window must be"),
        (dict(mask="sliding", window=3, n_sink=-1), "n_sink must be"),
        (dict(mask="causal", window=3), "only applies"),
        (dict(mask="none", n_sink=2), "only applies"),
        (dict(scale=0.0), "scale must be"),
        (dict(scale=float("nan")), "scale must be"),
        (dict(q_offset=1.5), "q_offset must be"),
    ]
    for backend in ("reference", "cpu", "cuda"):
        for kw, msg in bad:
            with pytest.raises(ValueError, match=msg):
                A.run(q, k, v, backend=backend, **kw)
        with pytest.raises(ValueError, match="multiple of H_kv"):
            A.run(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1), backend=backend)  # H_kv=3
        with pytest.raises(ValueError, match="k has dtype"):
            A.run(q, k.double(), v, backend=backend)
        with pytest.raises(ValueError, match="v has dtype"):
            A.run(q, k, v.double(), backend=backend)
        with pytest.raises(ValueError, match="q has dtype"):
            A.run(q.long(), k.long(), v.long(), backend=backend)
        with pytest.raises(ValueError, match="k has shape"):
            A.run(q, k[..., :4], v, backend=backend)
        with pytest.raises(ValueError, match="v has shape"):
            A.run(q, k, v[:, :, :5], backend=backend)
        with pytest.raises(ValueError, match="q must have 4 dims"):
            A.run(q[0], k, v, backend=backend)
        with pytest.raises(ValueError, match="must be a torch.Tensor"):
            A.run(q.numpy(), k, v, backend=backend)
    with pytest.raises(ValueError, match="backend="):
        A.run(q, k, v, backend="tpu")
    with pytest.raises(ValueError, match="block_k must be"):
        A.cpu(q, k, v, block_k=0)
    with pytest.raises(ValueError, match="visible must be"):
        A.masked_reference(q, k, v, torch.ones(6, 6))


def test_auto_backend_without_gpu_is_cpu():
    from kernels._backend import gpu_available

    q, k, v = _qkv(1, 2, 2, 9, 9, 4, 4, torch.float64)
    expect = "cuda" if gpu_available() else "cpu"
    want = getattr(A, expect)(q, k, v, mask="causal")
    torch.testing.assert_close(A.run(q, k, v, mask="causal"), want, rtol=0, atol=0)
    assert math.isclose(float(want.sum()), float(A.reference(q, k, v).sum()), rel_tol=1e-10)
