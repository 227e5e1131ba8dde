"""kernels/hip_mask.py: the stage scan of every backend against the torch reference, and the pipeline.

Scores agree to 1e-10 in float64; the integer outputs (where each descent ended, how many keys it
read, the final block lists) must be identical. Random data makes exact score ties improbable.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import hip_mask as HM


def _qk(B, H, H_kv, T, S, D, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=gen, dtype=dtype), torch.randn(B, H_kv, S, D, generator=gen, dtype=dtype)


def _chunks(B, H, n_qb, C, S, max_len, seed=0):
    """Random chunks [left, right) inside [0, S), lengths 0..max_len (empty chunks included)."""
    gen = torch.Generator().manual_seed(seed)
    length = torch.randint(0, min(max_len, S) + 1, (B, H, n_qb, C), generator=gen)
    left = (torch.rand(B, H, n_qb, C, generator=gen) * (S - length + 1)).long().clamp(max=S)
    return left, torch.minimum(left + length, torch.tensor(S))


def _rope(C, D, dtype=torch.float64):
    angle = torch.arange(C, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, D, 2) / D)
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos().to(dtype), angle.sin().to(dtype)


def _assert_same_scan(got, want):
    assert torch.equal(got.reads, want.reads)
    assert torch.equal(got.best, want.best)
    fin = torch.isfinite(want.score)
    assert torch.equal(fin, torch.isfinite(got.score))
    torch.testing.assert_close(got.score[fin], want.score[fin], rtol=1e-10, atol=1e-10)


@st.composite
def scan_problems(draw, max_rows=9, max_c=7):
    B, H_kv = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = H_kv * draw(st.integers(1, 2))
    rows = draw(st.integers(1, max_rows))
    Tr = draw(st.integers(1, 3 * rows))
    S = draw(st.integers(1, 90))
    D = 2 * draw(st.integers(1, 5))
    C = draw(st.integers(0, max_c))
    return B, H, H_kv, Tr, S, D, rows, C, draw(st.integers(1, 40)), draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(p=scan_problems(), seed=st.integers(0, 2**16))
def test_cpu_scan_matches_reference_fp64(p, seed):
    B, H, H_kv, Tr, S, D, rows, C, max_len, rope = p
    q, k = _qk(B, H, H_kv, Tr, S, D, seed=seed)
    left, right = _chunks(B, H, -(-Tr // rows), C, S, max_len, seed)
    cos, sin = _rope(C, D) if rope else (None, None)
    want = HM.scan_stage_reference(q, k, left, right, rows=rows, key_cos=cos, key_sin=sin)
    _assert_same_scan(HM.scan_stage_cpu(q, k, left, right, rows=rows, key_cos=cos, key_sin=sin), want)


def test_cpu_scan_matches_reference_fp32():
    q, k = _qk(2, 4, 2, 50, 700, 16, dtype=torch.float32, seed=3)
    left, right = _chunks(2, 4, 4, 12, 700, 64, seed=3)
    cos, sin = _rope(12, 16, torch.float32)
    for kw in (dict(), dict(key_cos=cos, key_sin=sin)):
        want = HM.scan_stage_reference(q, k, left, right, rows=16, **kw)
        got = HM.scan_stage_cpu(q, k, left, right, rows=16, **kw)
        assert torch.equal(got.reads, want.reads) and torch.equal(got.best, want.best)
        torch.testing.assert_close(got.score, want.score, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_cuda_scan_matches_reference_fp64(rope):
    q, k = _qk(1, 2, 1, 11, 70, 6, seed=5)
    left, right = _chunks(1, 2, 3, 5, 70, 19, seed=5)  # rows=4 -> 3 blocks, the last one ragged
    cos, sin = _rope(5, 6) if rope else (None, None)
    want = HM.scan_stage_reference(q, k, left, right, rows=4, key_cos=cos, key_sin=sin)
    _assert_same_scan(HM.scan_stage_cuda(q, k, left, right, rows=4, key_cos=cos, key_sin=sin), want)


def test_cuda_scan_more_rows_than_a_shared_tile():
    q, k = _qk(1, 1, 1, 2 * HM.Q_TILE + 3, 40, 4, seed=6)  # one block of 35 rows: three tiles
    left, right = _chunks(1, 1, 1, 3, 40, 16, seed=6)
    _assert_same_scan(HM.scan_stage_cuda(q, k, left, right, rows=q.shape[2]),
                      HM.scan_stage_reference(q, k, left, right, rows=q.shape[2]))


@pytest.mark.parametrize("length", [1, 2, 4, 16, 64, 256])
def test_reads_are_two_log2_chunk_for_powers_of_two(length):
    q, k = _qk(1, 1, 1, 8, 512, 8, seed=length)
    left = torch.tensor([[[[3, 100]]]])
    right = left + torch.tensor([[[[length, 0]]]])  # the second chunk is empty
    for scan in (HM.scan_stage_reference, HM.scan_stage_cpu):
        r = scan(q, k, left, right, rows=8)
        want = 1 if length == 1 else 2 * int(math.log2(length))
        assert int(r.reads[0, 0, 0, 0]) == want
        assert int(r.reads[0, 0, 0, 1]) == 0 and int(r.best[0, 0, 0, 1]) == -1
        assert r.score[0, 0, 0, 1] == float("-inf")


def test_trace_reads_the_middle_of_each_half_and_ends_in_the_chunk():
    q, k = _qk(1, 1, 1, 4, 300, 8, seed=1)
    left, right = torch.tensor([[[[40, 7]]]]), torch.tensor([[[[104, 300]]]])
    r = HM.scan_stage_reference(q, k, left, right, rows=4, return_trace=True)
    for c in range(2):
        lo, hi = int(left[0, 0, 0, c]), int(right[0, 0, 0, c])
        for a, b in r.trace[0, 0, 0, c].tolist():
            if a < 0:
                break
            mid = (lo + hi) // 2
            assert (a, b) == ((lo + mid) // 2, (mid + hi) // 2)
            s = q[0, 0] @ k[0, 0, [a, b]].T
            sa, sb = s.max(0).values.tolist()
            lo, hi = (lo, mid) if sa > sb else (mid, hi)
        assert hi - lo == 1 and int(r.best[0, 0, 0, c]) == lo
        assert int((r.trace[0, 0, 0, c] >= 0).sum()) == int(r.reads[0, 0, 0, c])


def test_descent_score_is_the_best_winner_and_finds_a_planted_block():
    # one chunk of 64 keys where keys 16..47 point along q: every first-step read lands in the plant
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 64, 4, dtype=torch.float64)
    k[0, 0, 16:48, 0] = torch.linspace(1, 2, 32, dtype=torch.float64)
    r = HM.scan_stage_reference(q, k, torch.tensor([[[[0]]]]), torch.tensor([[[[64]]]]), rows=1)
    assert 16 <= int(r.best) < 48
    assert float(r.score) == pytest.approx(float(k[0, 0, int(r.best), 0]))


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
CFG = dict(stages=[(16, 64), (4, 32), (1, 8)], n_sink=5, window=20, block_size=16, block_q=32)


def _assert_same_mask(got, want):
    assert torch.equal(got.block_index, want.block_index)
    assert torch.equal(got.left, want.left) and torch.equal(got.right, want.right)
    for a, b in zip(got.stages, want.stages):
        assert torch.equal(a.left, b.left) and torch.equal(a.reads, b.reads)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 90), extra=st.sampled_from([0, 7, 200]), H_kv=st.integers(1, 2), seed=st.integers(0, 999))
def test_cpu_pipeline_matches_reference(T, extra, H_kv, seed):
    q, k = _qk(1, 2 * H_kv, H_kv, T, T + extra, 8, seed=seed)
    _assert_same_mask(HM.cpu(q, k, **CFG), HM.reference(q, k, **CFG))


def test_cuda_pipeline_matches_reference():
    q, k = _qk(1, 2, 1, 40, 150, 6, seed=2)
    cfg = dict(CFG, stages=[(16, 32), (4, 8)])
    _assert_same_mask(HM.cuda(q, k, **cfg), HM.reference(q, k, **cfg))


def test_pipeline_with_scan_rope_hook_matches_reference():
    q, k = _qk(1, 2, 2, 64, 400, 8, seed=4)

    def hook(stage, n_slots, q, positions):
        cos, sin = _rope(n_slots, 8)
        return q * 0.5, cos, sin

    _assert_same_mask(HM.cpu(q, k, scan_rope=hook, **CFG), HM.reference(q, k, scan_rope=hook, **CFG))


def test_block_index_invariants():
    B, H, T, S, bs = 1, 2, 70, 300, 16
    q, k = _qk(B, H, 1, T, S, 8, seed=7)
    m = HM.reference(q, k, **CFG)
    n_kb = -(-S // bs)
    for h in range(H):
        for f, row in enumerate(m.block_index[0, h].tolist()):
            ids = [i for i in row if i >= 0]
            assert ids == sorted(set(ids)) and all(0 <= i < n_kb for i in ids)
            assert row[len(ids):] == [-1] * (len(row) - len(ids))  # padding only at the end
            last = m.q_offset + min(T, (f + 1) * bs) - 1
            assert max(ids) == last // bs and 0 in ids  # own block and the sink block are always read
            start = int(m.window_start[(f * bs) // CFG["block_q"]])
            assert set(range(start // bs, last // bs + 1)) <= set(ids)  # the whole window
            assert all(i * bs <= last for i in ids)  # nothing entirely in the future
    kept = (m.right > m.left).sum(-1)
    assert int(kept.max()) <= CFG["stages"][-1][1] // CFG["stages"][-1][0]


def test_stage_sizes_follow_the_configuration():
    q, k = _qk(1, 1, 1, 64, 2000, 8, seed=8)
    m = HM.reference(q, k, stages=[(64, 512), (16, 128), (4, 32)], n_sink=16, window=64, block_q=64)
    assert [s.left.shape[-1] for s in m.stages] == [-(-(int(m.window_start.max()) - 16) // 64), 8 * 4, 8 * 4]
    full = (m.stages[0].right - m.stages[0].left) == 64
    assert full.any() and bool((m.stages[0].reads[full] == 12).all())


def test_no_candidates_gives_sink_and_window_only():
    q, k = _qk(1, 1, 1, 16, 40, 4, seed=9)
    m = HM.cpu(q, k, stages=[(16, 32)], n_sink=0, window=64, block_size=16, block_q=16)
    assert m.stages[0].left.shape[-1] == 0
    assert m.block_index[0, 0, 0].tolist() == [0, 1, 2]


def test_run_dispatch():
    q, k = _qk(1, 1, 1, 20, 50, 4)
    _assert_same_mask(HM.run(q, k, backend="reference", **CFG), HM.reference(q, k, **CFG))
    with pytest.raises(ValueError, match="backend"):
        HM.run(q, k, backend="tpu", **CFG)


@pytest.mark.parametrize("kw, match", [
    (dict(stages=[]), "stages"),
    (dict(stages=[(16, 40)]), "multiple of chunk_size"),
    (dict(stages=[(16, 32), (6, 12)]), "must divide"),
    (dict(stages=[(16, 32, 0)]), "ints >= 1"),
    (dict(stages="abc"), "stages"),
    (dict(block_size=8), "block_size"),
    (dict(block_q=24), "block_q"),
    (dict(stages=[(16, 32, 3)]), "stride_q"),
    (dict(window=0), "window"),
    (dict(n_sink=-1), "n_sink"),
    (dict(q_offset=500), "q_offset"),
])
def test_bad_arguments_raise(kw, match):
    q, k = _qk(1, 1, 1, 20, 50, 4)
    with pytest.raises(ValueError, match=match):
        HM.reference(q, k, **{**CFG, **kw})


def test_bad_scan_inputs_raise():
    q, k = _qk(1, 1, 1, 8, 30, 4)
    left, right = torch.zeros(1, 1, 1, 2, dtype=torch.int64), torch.full((1, 1, 1, 2), 40)
    with pytest.raises(ValueError, match="chunks must lie"):
        HM.scan_stage_cpu(q, k, left, right, rows=8)
    with pytest.raises(ValueError, match="left"):
        HM.scan_stage_cpu(q, k, left.int(), right, rows=8)
    with pytest.raises(ValueError, match="key_cos"):
        HM.scan_stage_reference(q, k, left, left + 1, rows=8, key_cos=torch.ones(2, 4, dtype=torch.float64))


def test_bench_cases_quick_is_small():
    cases = HM.bench_cases(quick=True)
    assert len(cases) == 1 and "S=4096" in cases[0].shape
    x = cases[0].setup()
    assert cases[0].numba_fn(x).shape == cases[0].torch_fn(x).shape
