"""kernels/mla_decode.py: absorbed MLA decode (every backend) against the torch reference, the
absorbed form against explicit decompression, and the GQA baseline against torch SDPA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import mla_decode as k

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)


def _inputs(B, H, R, P, T, d, dtype=torch.float64, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    return dict(q_lat=spread * mk(B, H, R), q_pe=spread * mk(B, H, P), c_cache=mk(B, T, R), pe_cache=mk(B, T, P),
                w_uv=mk(H, d, R))


def _call(fn, x, scale=0.3):
    return fn(x["q_lat"], x["q_pe"], x["c_cache"], x["pe_cache"], x["w_uv"], scale=scale)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 6), R=st.integers(1, 20), P=st.integers(0, 6), T=st.integers(1, 200),
       d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_cpu_matches_reference_fp64(B, H, R, P, T, d, seed):
    x = _inputs(B, H, R, P, T, d, seed=seed)
    torch.testing.assert_close(_call(k.cpu, x), _call(k.reference, x), **F64)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 3, 16, 4, 130, 5), (1, 8, 24, 8, 300, 16)])
def test_cpu_matches_reference_fp32(shape):
    x = _inputs(*shape, dtype=torch.float32)
    torch.testing.assert_close(_call(k.cpu, x), _call(k.reference, x), **F32)


def test_large_scores_do_not_overflow():
    """The online softmax subtracts the running max: scores of ~1e3 must not give inf or NaN."""
    x = _inputs(2, 3, 8, 2, 150, 4, spread=60.0)
    out = _call(k.cpu, x, scale=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _call(k.reference, x, scale=1.0), **F64)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 5), R=st.integers(1, 12), P=st.integers(0, 4), T=st.integers(1, 40),
       d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_absorbed_equals_explicit_decompression(B, H, R, P, T, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q_nope = torch.randn(B, H, d, generator=gen, dtype=torch.float64)
    w_uk = torch.randn(H, d, R, generator=gen, dtype=torch.float64)
    x = _inputs(B, H, R, P, T, d, seed=seed + 1)
    explicit = k.explicit_reference(q_nope, x["q_pe"], x["c_cache"], x["pe_cache"], w_uk, x["w_uv"], scale=0.3)
    absorbed = k.reference(k.absorb_query(q_nope, w_uk), x["q_pe"], x["c_cache"], x["pe_cache"], x["w_uv"],
                           scale=0.3)
    torch.testing.assert_close(absorbed, explicit, **F64)


# T = 1, T not a multiple of the 32-token tile, H not a multiple of the 4-head block, P = 0.
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (1, 5, 7, 3, 40, 4), (1, 4, 9, 0, 33, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(shape, dtype):
    x = _inputs(*shape, dtype=dtype)
    torch.testing.assert_close(_call(k.cuda, x), _call(k.reference, x), **(F64 if dtype == torch.float64 else F32))


def test_cuda_rejects_a_rank_above_its_shared_memory():
    x = _inputs(1, 1, k.MAX_R + 1, 1, 2, 1, dtype=torch.float32)
    with pytest.raises(ValueError, match="latent rank"):
        _call(k.cuda, x)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H_kv=st.integers(1, 3), group=st.integers(1, 4), D=st.integers(1, 16),
       T=st.integers(1, 150), seed=st.integers(0, 2**16))
def test_gqa_cpu_matches_sdpa(B, H_kv, group, D, T, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H_kv * group, D, generator=gen, dtype=torch.float64)
    kc, vc = (torch.randn(B, H_kv, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    want = k.gqa_sdpa(q, kc, vc, scale=0.25)
    torch.testing.assert_close(k.gqa_reference(q, kc, vc, scale=0.25), want, **F64)
    torch.testing.assert_close(k.gqa_cpu(q, kc, vc, scale=0.25), want, **F64)


def test_run_dispatches_and_checks_the_backend():
    x = _inputs(1, 2, 4, 2, 9, 3)
    torch.testing.assert_close(k.run(**x, scale=0.3, backend="cpu"), _call(k.reference, x), **F64)
    with pytest.raises(ValueError, match="backend="):
        k.run(**x, scale=0.3, backend="tpu")


def test_bad_inputs_raise_value_error():
    x = _inputs(2, 3, 4, 2, 9, 3)
    bad = lambda **kw: _call(k.reference, {**x, **kw})
    with pytest.raises(ValueError, match="c_cache has shape"):
        bad(c_cache=x["c_cache"][:, :, :3])
    with pytest.raises(ValueError, match="pe_cache has shape"):
        bad(pe_cache=x["pe_cache"][:, :4])
    with pytest.raises(ValueError, match="w_uv has shape"):
        bad(w_uv=x["w_uv"][:2])
    with pytest.raises(ValueError, match="q_pe has dtype"):
        bad(q_pe=x["q_pe"].float())
    with pytest.raises(ValueError, match="T >= 1"):
        bad(c_cache=x["c_cache"][:, :0], pe_cache=x["pe_cache"][:, :0])
    with pytest.raises(ValueError, match="scale"):
        _call(k.reference, x, scale=0.0)
    q = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="H_kv dividing"):
        k.gqa_reference(q, torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), scale=0.5)


def test_kv_bytes_per_token_matches_the_papers_arithmetic():
    """LLaMA-2-7B (32 layers, 32 kv heads of 128) vs TransMLA's 512 + 64: 7.03% of the cache."""
    gqa = k.kv_bytes_per_token(kind="gqa", n_layers=32, n_kv_heads=32, head_dim=128)
    mla = k.kv_bytes_per_token(kind="mla", n_layers=32, kv_rank=512, rope_dim=64)
    assert (gqa, mla) == (524_288, 36_864)
    assert mla / gqa == pytest.approx(0.0703, abs=1e-4)
    with pytest.raises(ValueError, match="kind"):
        k.kv_bytes_per_token(kind="mha")


def test_bench_cases_are_well_formed():
    cases = k.bench_cases(quick=True)
    assert {c.kernel for c in cases} == {"mla_decode", "mla_decode:gqa_baseline"}
    small = k.decode_inputs(1, 2, 1, 4, 6, 2, 5)
    for case in cases:
        assert case.flops > 0 and case.bytes > 0 and "kv_bytes_per_token_per_layer" in case.notes
        out = case.numba_fn(small)
        torch.testing.assert_close(out, case.torch_fn(small), **F32)
