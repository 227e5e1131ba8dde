"""kernels/block_sparse_attention.py: every backend against the dense-mask reference.

Tolerances as in test_kernel_attention: float64 1e-10 (abs and rel), float32 2e-5 abs / 1e-4 rel.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import attention as A
from kernels import block_sparse_attention as BS

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def _qkv(B, H, H_kv, T, S, D, Dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    return mk(B, H, T, D), mk(B, H_kv, S, D), mk(B, H_kv, S, Dv)


def _random_index(B, H, T, S, bs, width, seed=0, p_pad=0.3):
    """Random unique key-block ids per query block, padded with -1 at random places."""
    gen = torch.Generator().manual_seed(seed)
    n_qb, n_kb = -(-T // bs), -(-S // bs)
    index = torch.full((B, H, n_qb, width), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for qb in range(n_qb):
                ids = torch.randperm(n_kb, generator=gen)[:width]
                keep = torch.rand(len(ids), generator=gen) >= p_pad
                slots = torch.randperm(width, generator=gen)[:len(ids)]
                index[b, h, qb, slots[keep]] = ids[keep]
    return index


def _assert_same(got, want, dtype):
    (out_g, lse_g), (out_w, lse_w) = got, want
    assert not torch.isnan(out_g).any() and not torch.isnan(lse_g).any()
    torch.testing.assert_close(out_g, out_w, **TOL[dtype])
    assert torch.equal(torch.isinf(lse_g), torch.isinf(lse_w)), "fully-masked rows differ"
    fin = torch.isfinite(lse_w)
    torch.testing.assert_close(lse_g[fin], lse_w[fin], **TOL[dtype])


@st.composite
def problems(draw, max_t=150, max_d=12):
    bs = draw(st.sampled_from(BS.BLOCK_SIZES))
    B, H_kv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = H_kv * draw(st.integers(1, 3))
    T = draw(st.integers(1, max_t))
    S = T + draw(st.sampled_from([0, 0, 5, 40]))
    D, Dv = draw(st.integers(1, max_d)), draw(st.integers(1, max_d))
    width = draw(st.integers(1, 5))
    kw = dict(block_size=bs, causal=draw(st.booleans()))
    if draw(st.booleans()):
        kw["q_offset"] = draw(st.integers(-3, S))
    return (B, H, H_kv, T, S, D, Dv), bs, width, kw


@settings(max_examples=50, deadline=None)
@given(p=problems(), block_k=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp64(p, block_k, seed):
    shape, bs, width, kw = p
    q, k, v = _qkv(*shape, torch.float64, seed)
    index = _random_index(shape[0], shape[1], shape[3], shape[4], bs, width, seed)
    _assert_same(BS.cpu(q, k, v, index, return_lse=True, block_k=block_k, **kw),
                 BS.reference(q, k, v, index, return_lse=True, **kw), torch.float64)


@settings(max_examples=25, deadline=None)
@given(p=problems(), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp32(p, seed):
    shape, bs, width, kw = p
    q, k, v = _qkv(*shape, torch.float32, seed)
    index = _random_index(shape[0], shape[1], shape[3], shape[4], bs, width, seed)
    want = BS.reference(q, k, v, index, return_lse=True, **kw)
    _assert_same(BS.cpu(q, k, v, index, return_lse=True, **kw), want, torch.float32)


@pytest.mark.parametrize("bs", BS.BLOCK_SIZES)
@pytest.mark.parametrize("T", [1, 70, 128])  # 70: ragged last block for every block size
def test_all_blocks_listed_equals_dense_attention(bs, T):
    q, k, v = _qkv(1, 2, 1, T, T, 8, 8, torch.float64)
    n = -(-T // bs)
    every = torch.arange(n).expand(1, 2, n, n).contiguous()
    for causal, mask in ((True, "causal"), (False, "none")):
        want = A.reference(q, k, v, mask=mask)
        for backend in ("reference", "cpu"):
            got = BS.run(q, k, v, every, block_size=bs, causal=causal, backend=backend)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sink_plus_local_blocks_equals_block_aligned_sliding_window():
    """Listing {block 0} + {own block, previous block} is the sliding mask at block granularity."""
    bs, T = 16, 96
    q, k, v = _qkv(1, 1, 1, T, T, 8, 8, torch.float64)
    index = BS.infinitehip_like_index(1, 1, T, bs, n_sink_blocks=1, n_local_blocks=2, n_top_blocks=0)
    got = BS.cpu(q, k, v, index, block_size=bs)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    visible = (j <= i) & ((j // bs >= i // bs - 1) | (j < bs))
    torch.testing.assert_close(got, A.masked_reference(q, k, v, visible), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
def test_rows_with_no_listed_block_are_zero(backend):
    q, k, v = _qkv(1, 2, 2, 40, 40, 4, 4, torch.float32)
    index = torch.full((1, 2, 3, 2), -1, dtype=torch.int64)
    index[:, :, 1, 0] = 2  # query block 1 lists only a future block: causal hides all of it
    index[:, :, 2, :] = torch.tensor([0, 1])
    out, lse = BS.run(q, k, v, index, block_size=16, backend=backend, return_lse=True)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))
    assert torch.isneginf(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 32:]).all()


def test_block_order_does_not_matter():
    q, k, v = _qkv(1, 2, 1, 64, 64, 8, 8, torch.float64)
    index = _random_index(1, 2, 64, 64, 16, 4, p_pad=0.0)
    a = BS.cpu(q, k, v, index, block_size=16)
    b = BS.cpu(q, k, v, index.flip(-1), block_size=16)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_infinitehip_like_index_is_valid_and_causal():
    index = BS.infinitehip_like_index(2, 3, 300, 32)
    assert index.shape == (2, 3, 10, 5)
    for qb in range(10):
        row = index[0, 0, qb]
        ids = row[row >= 0]
        assert len(set(ids.tolist())) == len(ids) and (ids <= qb).all()  # unique, never in the future
        assert 0 in ids.tolist() and qb in ids.tolist()  # the sink block and the own block


# ---------------------------------------------------------------- CUDA (simulator when no GPU)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bs", BS.BLOCK_SIZES)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_matches_reference(dtype, bs, causal):
    shape = (1, 2, 1, 37, 40, 8, 5)  # ragged T and S, GQA
    q, k, v = _qkv(*shape, dtype)
    index = _random_index(1, 2, 37, 40, bs, 3)
    _assert_same(BS.cuda(q, k, v, index, block_size=bs, causal=causal, return_lse=True),
                 BS.reference(q, k, v, index, block_size=bs, causal=causal, return_lse=True), dtype)


@settings(max_examples=6, deadline=None)
@given(p=problems(max_t=36, max_d=8), seed=st.integers(0, 2**16))
def test_cuda_property_fp64(p, seed):
    shape, bs, width, kw = p
    q, k, v = _qkv(*shape, torch.float64, seed)
    index = _random_index(shape[0], shape[1], shape[3], shape[4], bs, width, seed)
    want = BS.reference(q, k, v, index, return_lse=True, **kw)
    _assert_same(BS.cuda(q, k, v, index, return_lse=True, **kw), want, torch.float64)


# ---------------------------------------------------------------- validation
def test_bad_inputs_raise_value_error():
    q, k, v = _qkv(1, 2, 1, 40, 40, 8, 8, torch.float32)
    index = _random_index(1, 2, 40, 40, 16, 2, p_pad=0.0)
    for backend in ("reference", "cpu", "cuda"):
        def run(idx, backend=backend, **kw):
            return BS.run(q, k, v, idx, backend=backend, **{"block_size": 16, **kw})

        with pytest.raises(ValueError, match="block_size must be"):
            run(index, block_size=8)
        with pytest.raises(ValueError, match="block_index has shape"):
            run(index[:, :, :2])
        with pytest.raises(ValueError, match="block_index has dtype"):
            run(index.float())
        with pytest.raises(ValueError, match="ids in"):
            run(torch.full_like(index, 3))  # only blocks 0..2 exist
        with pytest.raises(ValueError, match="ids in"):
            run(torch.full_like(index, -2))
        dup = index.clone()
        dup[0, 1, 2] = torch.tensor([1, 1])
        with pytest.raises(ValueError, match=r"twice for \(b, h, query block\) = \(0, 1, 2\)"):
            run(dup)
        with pytest.raises(ValueError, match="k has dtype"):
            BS.run(q, k.double(), v, index, block_size=16, backend=backend)
        with pytest.raises(ValueError, match="q_offset must be"):
            run(index, q_offset=0.5)
    with pytest.raises(ValueError, match="block_k must be"):
        BS.cpu(q, k, v, index, block_size=16, block_k=0)
