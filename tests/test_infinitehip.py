"""companion/papers/infinitehip.py: configurations, measurements, RoPE re-indexing, the LM hook,
the offload bank and the figures."""

import math

import numpy as np
import pytest
import torch

from companion.model import ModelConfig, TinyLM, apply_rope, rope_cos_sin
from companion.papers import infinitehip as ih
from kernels import block_sparse_attention as BS
from kernels import hip_mask as HM

SMALL = ih.HipConfig(stages=((16, 128), (4, 32)), n_sink=16, window=32, block_size=16, block_q=32, refresh=(4, 2))


@pytest.fixture(scope="module")
def problem():
    return ih.planted_needles(1024, D=16, H=2, n_queries=64, n_spans=4, span_len=16, seed=1, dtype=torch.float64)


def _full_mask(T, S, H, bs=16, q_offset=None):
    """A HipMask that lists every key block (for metric tests)."""
    n_fqb, n_kb = -(-T // bs), -(-S // bs)
    index = torch.arange(n_kb).expand(1, H, n_fqb, n_kb).clone()
    q_offset = S - T if q_offset is None else q_offset
    return HM.HipMask(index, bs, 64, q_offset, None, None, torch.zeros(-(-T // 64), dtype=torch.int64), [])


# --------------------------------------------------------------------------------------------- config
def test_presets_follow_paper_and_code():
    assert [s.chunk_size for s in ih.PAPER_APPENDIX_F.stages] == [256, 32, 8]
    assert [s.keep for s in ih.PAPER_APPENDIX_F.stages] == [32768, 8192, 2048]
    assert (ih.PAPER_APPENDIX_F.n_sink, ih.PAPER_APPENDIX_F.window, ih.PAPER_APPENDIX_F.refresh) == (256, 1024,
                                                                                                   (16, 8, 4))
    assert [s.stride_q for s in ih.CODE_DEFAULT.stages] == [4, 4, 1] and ih.CODE_DEFAULT.window == 512
    assert [(s.chunk_size, s.keep) for s in ih.TOY.stages] == [(64, 2048), (16, 512), (4, 128)]
    assert ih.TOY.mask_kwargs()["n_sink"] == 16


@pytest.mark.parametrize("kw, match", [
    (dict(refresh=(1, 2)), "refresh"),
    (dict(stages=((16, 24),)), "multiple"),
    (dict(block_size=8), "block_size"),
    (dict(chunk_rope_layers=-1), "chunk_rope_layers"),
    (dict(window=0), "window"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        ih.TOY.with_(**kw)


# --------------------------------------------------------------------------------------------- toy
def test_planted_needles_is_seeded_and_planted(problem):
    again = ih.planted_needles(1024, D=16, H=2, n_queries=64, n_spans=4, span_len=16, seed=1, dtype=torch.float64)
    assert torch.equal(problem.k, again.k) and torch.equal(problem.spans, again.spans)
    p = problem
    u = p.q[0, 0].mean(0) / p.q[0, 0].mean(0).norm()
    s0 = int(p.spans[0, 0])
    assert (p.k[0, 0, s0:s0 + 16] @ u).mean() > (p.k[0, 0, :s0] @ u).mean() + 3
    assert ih.span_mass(p) > 0.5
    with pytest.raises(ValueError, match="too short"):
        ih.planted_needles(100, n_queries=64)


def test_full_mask_has_recall_one_density_one_and_no_error(problem):
    p = problem
    m = _full_mask(p.q.shape[2], p.T, p.q.shape[1])
    assert ih.topk_recall(m, p.q, p.k, topk=32) == 1.0
    assert ih.density(m, p.q.shape[2], p.T) == pytest.approx(1.0)
    dense = ih.dense_attention.reference(p.q, p.k, p.v, mask="causal")
    assert ih.relative_error(ih.sparse_output(m, p.q, p.k, p.v), dense) < 1e-12
    assert ih.weight_covered(m, p.q, p.k) == pytest.approx(1.0, abs=1e-6)


def test_weight_covered_matches_a_direct_sum(problem):
    p = problem
    m = ih.evaluate(p, SMALL, topk=16).mask
    dense_mask = BS.dense_mask(m.block_index, p.q.shape[2], p.T, block_size=m.block_size)  # (B, H, T, S) bool
    s = (p.q @ p.k.transpose(-1, -2)) / math.sqrt(p.q.shape[-1])
    pos = m.q_offset + torch.arange(p.q.shape[2])
    w = s.masked_fill(torch.arange(p.T)[None, :] > pos[:, None], float("-inf")).softmax(-1)
    want = (w * dense_mask).sum(-1).mean().item()
    got = ih.weight_covered(m, p.q, p.k)
    assert got == pytest.approx(want, abs=1e-6) and 0 < got < 1


def test_visible_pairs_counts_the_dense_mask():
    gen = torch.Generator().manual_seed(0)
    T, S, bs = 37, 90, 16
    index = torch.full((1, 2, 3, 4), -1)
    for h in range(2):
        for f in range(3):
            ids = torch.randperm(6, generator=gen)[:3]
            index[0, h, f, :3] = ids
    m = HM.HipMask(index, bs, 32, S - T, None, None, torch.zeros(2, dtype=torch.int64), [])
    want = BS.dense_mask(index, T, S, block_size=bs).sum(-1)
    assert torch.equal(ih.visible_pairs(m, T, S), want)


def test_evaluate_and_stage1_reads(problem):
    r = ih.evaluate(problem, SMALL, topk=16)
    assert 0 < r.density < 1 and 0 <= r.recall <= 1 and r.error >= 0
    reads = ih.stage1_reads(r.mask)
    assert reads["full_min"] == reads["full_max"] == 2 * math.log2(16) == reads["formula"]


def test_more_budget_never_lowers_recall_on_the_toy(problem):
    rows = ih.sweep(problem, SMALL, chunk_sets=[(16, 4)], k_scales=[0.5, 1, 4], topk=16)
    recalls = [r["recall"] for r in rows]
    assert recalls[-1] >= recalls[0] and rows[-1]["density"] > rows[0]["density"]


# --------------------------------------------------------------------------------------------- RoPE
def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rope_sparse_attention_without_streaming_is_block_sparse_on_rotated_inputs():
    B, H, H_kv, T, d, bs = 1, 4, 2, 75, 8, 16
    q, k, v = _rand(B, H, T, d, seed=1), _rand(B, H_kv, T, d, seed=2), _rand(B, H_kv, T, d, seed=3)
    index = BS.infinitehip_like_index(B, H, T, bs, seed=4)
    got = ih.rope_sparse_attention(q, k, v, index, block_size=bs, base=10000.0, streaming=False)
    cos, sin = rope_cos_sin(torch.arange(T), d, 10000.0, dtype=torch.float64)
    want = BS.reference(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, index, block_size=bs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_streaming_equals_true_positions_when_the_gathered_keys_are_contiguous():
    T, d, bs = 64, 8, 16
    q, k, v = _rand(1, 1, T, d, seed=5), _rand(1, 1, T, d, seed=6), _rand(1, 1, T, d, seed=7)
    index = torch.tensor([[[[0, -1], [0, 1], [1, 2], [2, 3]]]])  # each block reads itself and the one before
    kw = dict(block_size=bs, base=10000.0)
    torch.testing.assert_close(ih.rope_sparse_attention(q, k, v, index, streaming=True, **kw),
                               ih.rope_sparse_attention(q, k, v, index, streaming=False, **kw), rtol=1e-12, atol=1e-12)


def test_streaming_positions_keep_the_window_and_bound_every_distance(problem):
    m = ih.mask(problem.q, problem.k, SMALL)
    assert ih.window_offsets_exact(m, problem.T) == 0
    plan = ih.gather_plan(m.block_index, m.block_size, problem.T)
    n_gathered = plan.valid.sum(-1)
    assert ih.max_relative_distance(m, problem.T, streaming=True) < int(n_gathered.max())
    assert ih.max_relative_distance(m, problem.T, streaming=False) > 500  # the plain positions are far
    pos = torch.where(plan.valid, plan.positions, -1)
    for row in pos.flatten(0, 2).tolist():  # strictly increasing by one: contiguous re-indexing
        row = [x for x in row if x >= 0]
        assert row == list(range(row[0], row[0] + len(row)))


def test_chunk_indexed_hook_rotates_keys_by_slot_and_query_by_clamped_position():
    hook = ih.chunk_indexed_rope(8, 10000.0, window=4)
    q = _rand(1, 1, 3, 8)
    positions = torch.tensor([2, 30, 31])
    q_rot, cos_k, sin_k = hook(0, 10, q, positions)
    cos, sin = rope_cos_sin(torch.tensor([2, 14, 14]), 8, 10000.0, dtype=torch.float64)
    torch.testing.assert_close(q_rot, apply_rope(q, cos, sin))
    assert cos_k.shape == (10, 8) and torch.allclose(cos_k[0], torch.ones(8, dtype=torch.float64))
    q_rel, none_cos, _ = ih.relative_rope(8, 10000.0, window=4)(0, 10, q, positions)
    assert none_cos is None and torch.allclose(q_rel.norm(dim=-1), q.norm(dim=-1))


# --------------------------------------------------------------------------------------------- the LM hook
def _tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)).double().eval()


def test_naive_method_is_the_original_model():
    model = _tiny_lm()
    x = torch.randint(0, 32, (2, 40))
    twin = ih.with_method(model, "naive").double()
    torch.testing.assert_close(twin(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hip (true positions)", "infinitehip", "streaming"])
def test_sparse_methods_equal_dense_when_the_window_covers_everything(method):
    model = _tiny_lm(1)
    x = torch.randint(0, 32, (2, 50))
    wide = ih.HipConfig(stages=((16, 32), (4, 16)), n_sink=0, window=128, block_size=16, block_q=16, refresh=None)
    twin = ih.with_method(model, method, wide).double()
    torch.testing.assert_close(twin(x).logits, model(x).logits, rtol=1e-10, atol=1e-10)


def test_sparse_method_differs_from_dense_on_a_long_input():
    model = _tiny_lm(2)
    x = torch.randint(0, 32, (1, 300))
    twin = ih.with_method(model, "infinitehip", SMALL).double()
    assert not torch.allclose(twin(x).logits, model(x).logits, atol=1e-3)
    with pytest.raises(ValueError, match="method"):
        ih.HipAttention(model.cfg, 0, method="dense")


def test_passkey_batch_targets_only_the_key():
    setup = ih.PasskeySetup(vocab_size=40, key_len=3, train_length=64)
    x, y, key = ih.passkey_batch(4, length=64, setup=setup, depth=0.5, seed=0)
    assert x.shape == (4, 63) and int((y != -100).sum()) == 4 * 3
    assert torch.equal(y[:, -3:], key)
    marker = setup.vocab_size - 1
    for row, kr in zip(x, key):  # the needle: marker, key, marker; the key tokens come from the reserved range
        first = int((row == marker).nonzero()[0])
        assert torch.equal(row[first + 1:first + 4], kr) and int(row[first + 4]) == marker
        assert int(kr.min()) >= setup.vocab_size - setup.key_vocab - 1


def test_needle_read_rate_is_one_when_the_window_covers_the_input():
    setup = ih.PasskeySetup(vocab_size=40, key_len=2, train_length=64, d_model=16, n_heads=2)
    model = TinyLM(setup.model_config()).eval()
    wide = ih.HipConfig(stages=((16, 32), (4, 8)), n_sink=16, window=128, block_size=16, block_q=32, refresh=None)
    assert ih.needle_read_rate(model, setup, length=64, n=2, hip=wide, method="streaming") == 1.0
    narrow = wide.with_(window=16, n_sink=0)  # sink-free, tiny window: the needle at depth 0.1 is out of sight
    assert ih.needle_read_rate(model, setup, length=64, n=2, hip=narrow, method="streaming", depths=(0.1,)) == 0.0
    assert ih.needle_read_rate(model, setup, length=64, n=2, hip=wide, method="streaming", every_head=True) == 1.0
    with pytest.raises(ValueError, match="naive"):
        ih.needle_read_rate(model, setup, length=64, n=2, method="naive")
    table = ih.passkey_table(model, setup, lengths=[64], n=2, hip=wide, methods=("naive", "streaming"))
    assert table["reads"] == {"streaming": [(1.0, 1.0)]} and 0 <= table["naive"][0] <= 1
    assert table["streaming"][0] == ih.passkey_accuracy(ih.with_method(model, "streaming", wide), setup, length=64, n=2)


# --------------------------------------------------------------------------------------------- offload
def test_lru_bank_counts_hits_and_evicts_the_least_recent():
    host = torch.arange(20, dtype=torch.float64)[:, None].repeat(1, 3)
    bank = ih.LRUBank(host, capacity=3)
    assert torch.equal(bank.fetch([1, 2, 1]), host[[1, 2, 1]])
    assert (bank.hits, bank.misses) == (1, 2)
    bank.fetch([3])  # fills the third slot
    bank.fetch([1])  # 1 is now the most recent; 2 the least
    bank.fetch([4])  # evicts 2
    assert bank.table[2] == -1 and bank.table[1] >= 0 and bank.table[4] >= 0
    assert torch.equal(bank.fetch([5, 6, 7, 8, 1]), host[[5, 6, 7, 8, 1]])  # more than fits: overflow from host
    assert bank.accesses == 3 + 1 + 1 + 1 + 5 and 0 < bank.hit_ratio < 1
    with pytest.raises(ValueError, match="token ids"):
        bank.fetch([25])
    with pytest.raises(ValueError, match="capacity"):
        ih.LRUBank(host, 0)


def test_refresh_level_follows_the_official_rule():
    levels = [ih.refresh_level(t, (16, 8, 4)) for t in range(17)]
    assert levels[0] == 0 and levels[16] == 0 and levels[8] == 1 and levels[4] == 2 and levels[12] == 2
    assert levels[1] is None and levels[7] is None
    assert ih.refresh_level(5, None) == 0


def test_simulate_decode_serves_exact_rows_and_caching_reads_less():
    p = ih.planted_needles(2048, D=16, H=1, n_queries=64, n_spans=4, span_len=16, seed=2, dtype=torch.float64)
    every = ih.simulate_decode(p, SMALL, steps=16, capacity=128, refresh=None)
    cached = ih.simulate_decode(p, SMALL, steps=16, capacity=128, refresh=(4, 2))
    assert every.max_output_diff == 0.0 and cached.max_output_diff == 0.0
    assert all(a > 0 for a in every.mask_accesses)
    assert sum(cached.mask_accesses) < sum(every.mask_accesses)
    assert cached.mask_accesses[1] == 0  # step 1 reuses the whole mask
    assert len(cached.sa_accesses) == 16 and min(cached.sa_accesses) > 0


# --------------------------------------------------------------------------------------------- figures
def test_explorer_figure_reacts_to_its_controls(problem):
    data = ih.explorer_data(problem, SMALL)
    base = ih.explorer_figure(data, chunk=16, k1=128, k2=32, k3=16, n_sink=16, window=32)
    other = ih.explorer_figure(data, chunk=16, k1=128, k2=32, k3=16, n_sink=16, window=96)
    assert base.to_json() != other.to_json()
    smaller = ih.explorer_figure(data, chunk=32, k1=64, k2=32, k3=16, n_sink=0, window=32)
    assert smaller.to_json() != base.to_json()


def test_explorer_config_rounds_and_never_grows():
    cfg = ih.explorer_config(ih.TOY, chunk=64, k1=1000, k2=2000, k3=100, n_sink=0, window=64)
    assert [(s.chunk_size, s.keep) for s in cfg.stages] == [(64, 960), (16, 960), (4, 100)]


def test_other_figures_build(problem):
    m = ih.mask(problem.q, problem.k, SMALL)
    kinds = ih.block_kinds(m, SMALL, problem.T)
    assert kinds.shape == (4, 64) and set(np.unique(kinds)) <= {0, 1, 2, 3} and (kinds[:, 0] == 1).all()
    assert len(ih.stages_figure(problem, m).data) >= 2
    assert len(ih.mask_figure(problem, m, SMALL).data) == 1
    rows = [{"chunks": (16, 4), "k": (64, 16), "scale": 1, "recall": 0.5, "error": 0.2, "density": 0.1}]
    assert len(ih.sweep_figure(rows).data) == 2
    timing = {"T": [1, 2], "dense": [2.0, 4.0], "mask": [0.1, 0.1], "sparse": [0.5, 0.5], "density": [0.1, 0.1]}
    assert len(ih.time_figure(timing).data) == 3
    table = {"length": [64, 128], "naive": [1.0, 0.0], "infinitehip": [1.0, 0.5]}
    assert len(ih.passkey_figure(table, train_length=64).data) == 2
    stats = ih.DecodeStats([1, 2], [2, 2], [3, 3], [3, 4], 0.0)
    assert stats.ratio("mask") == 0.75 and len(ih.bank_figure({"a": stats}).data) == 2
