"""companion/papers/transmla.py: every conversion step, exact where the math says so, and its guards."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.model import Attention, ModelConfig, TinyLM, rope_cos_sin
from companion.papers import transmla as tm

EXACT = 1e-10


def _model(d_model=64, n_heads=8, n_kv_heads=2, vocab=48, seed=0) -> TinyLM:
    """A small fp64 GQA model with weights large enough that attention is far from uniform."""
    torch.manual_seed(seed)
    m = TinyLM(ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=2, n_heads=n_heads,
                           n_kv_heads=n_kv_heads)).double()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    return m.eval()


def _tokens(vocab=48, n=4, t=33, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def setup():
    m = _model()
    toks = _tokens()
    return m, toks, tm.logits_and_ppl(m, toks)[0]


# -- step 0 --------------------------------------------------------------------------------------
def test_replicated_up_projection_is_the_gqa_head_map():
    up = tm.replicated_up_projection(6, 2, 4, dtype=torch.float64)  # H=6, K=2, d=4
    assert up.shape == (6, 4, 8)
    for h in range(6):
        block = up[h].reshape(4, 2, 4)
        kv = h // 3
        torch.testing.assert_close(block[:, kv], torch.eye(4, dtype=torch.float64))
        assert block[:, 1 - kv].abs().sum() == 0


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])  # MQA, GQA and MHA are all "GQA structure"
def test_latent_rewrite_is_exact(n_kv_heads):
    m, toks = _model(n_kv_heads=n_kv_heads), _tokens()
    ref = tm.logits_and_ppl(m, toks)[0]
    lat = tm.latent_model(m)
    assert isinstance(lat.blocks[0].attn, tm.LatentAttention)
    assert tm.max_abs_diff(tm.logits_and_ppl(lat, toks)[0], ref) < EXACT
    assert isinstance(m.blocks[0].attn, Attention)  # the input model is untouched


def test_model_without_gqa_structure_raises(setup):
    m, _, _ = setup
    with pytest.raises(ValueError, match="without GQA structure"):
        tm.latent_model(tm.latent_model(m))  # already latent: nothing left to convert
    with pytest.raises(ValueError, match="without GQA structure"):
        tm.to_latent(nn.Identity())
    odd = copy.deepcopy(m)
    odd.blocks[1].attn.k_proj = nn.Linear(64, 16, bias=True).double()
    with pytest.raises(ValueError, match=r"blocks\[1\].*k_proj"):
        tm.latent_model(odd)


# -- step 1 --------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(ff_log=st.integers(0, 2), collapse_log=st.integers(0, 2), seed=st.integers(0, 1000))
def test_rorope_rotation_is_orthogonal_and_a_valid_layout(ff_log, collapse_log, seed):
    K, d = 3, 8
    ff, collapse = 2 ** ff_log, 2 ** collapse_log
    if ff % collapse:
        with pytest.raises(ValueError, match="freqfold"):
            tm.check_rope_split(d, ff, d // collapse)
        return
    keys = torch.randn(50, K * d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    _, evecs = tm.joint_complex_pca(keys, K, d, ff)
    R, layout = tm.rorope_rotation(evecs, K, d, ff, d // collapse)
    torch.testing.assert_close(R @ R.T, torch.eye(K * d, dtype=torch.float64), rtol=0, atol=1e-12)
    assert layout.chunk_dim == d // collapse and layout.n_chunks * layout.chunk_dim == K * d
    assert int(layout.freq.max()) < d // 2


def test_rorope_with_freqfold_1_commutes_with_rope():
    """The heart of RoRoPE: U per frequency, same on real and imaginary parts, commutes with RoPE."""
    K, d, T = 3, 8, 5
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(40, K * d, generator=gen, dtype=torch.float64)
    _, evecs = tm.joint_complex_pca(keys, K, d, 1)
    R, layout = tm.rorope_rotation(evecs, K, d, 1, d)
    cos, sin = rope_cos_sin(torch.arange(T), d, dtype=torch.float64)
    x = torch.randn(T, K * d, generator=gen, dtype=torch.float64)
    rotated_then_rope = layout.apply(x @ R.T, cos, sin)
    rope_then_rotated = tm.gqa_layout(K, d).apply(x, cos, sin) @ R.T
    torch.testing.assert_close(rotated_then_rope, rope_then_rotated, rtol=0, atol=1e-12)


def test_rorope_keeping_rope_everywhere_is_exact(setup):
    m, toks, ref = setup
    conv = tm.convert(m, toks, freqfold=1, partial=False)
    assert tm.max_abs_diff(tm.logits_and_ppl(conv.model, toks)[0], ref) < EXACT
    approx = tm.convert(m, toks, freqfold=2, partial=False)  # FreqFold merges frequencies: approximate
    assert tm.max_abs_diff(tm.logits_and_ppl(approx.model, toks)[0], ref) > 1e-4


def test_rorope_puts_more_energy_in_chunk_0_and_freqfold_adds_more(setup):
    m, toks, _ = setup
    fractions = [tm.convert(m, toks, freqfold=ff, partial=False).rorope_stats[0]["kept_fraction"] for ff in (1, 2, 4)]
    lat = tm.latent_model(m)
    x = tm.attention_inputs(m, toks)[0][0]
    before = tm.energy_per_dim(lat.blocks[0].attn.k_proj(x).detach())
    head0 = float(before[:8].sum() / before.sum())
    # PCA puts the larger eigenvalue first for every frequency, so chunk 0 >= either head; and
    # folding nested groups can only add energy (Ky Fan), never remove it.
    assert fractions[0] >= max(head0, 1 - head0) - 1e-12
    assert fractions[0] <= fractions[1] + 1e-12 <= fractions[2] + 2e-12


def test_bad_rope_split_raises():
    with pytest.raises(ValueError, match="rope_dim"):
        tm.check_rope_split(16, 1, 6)
    with pytest.raises(ValueError, match="freqfold"):
        tm.check_rope_split(16, 3, 16)
    with pytest.raises(ValueError, match="freqfold"):
        tm.check_rope_split(16, 1, 8)  # collapse 2 needs freqfold a multiple of 2


# -- steps 2 and 3 -------------------------------------------------------------------------------
def test_partial_rope_is_the_only_approximation_so_far(setup):
    m, toks, ref = setup
    conv = tm.convert(m, toks, freqfold=1, partial=True, balance=False)
    assert conv.model.blocks[0].attn.layout.rope_dim == 8  # one chunk of head_dim keeps RoPE
    assert tm.max_abs_diff(tm.logits_and_ppl(conv.model, toks)[0], ref) > 1e-3
    with pytest.raises(ValueError, match="rope_chunks"):
        tm.partial_rope(conv.model.blocks[0].attn, rope_chunks=5)


def test_bkv_is_exact_and_balances_the_norms(setup):
    m, toks, _ = setup
    plain = tm.convert(m, toks, freqfold=1, balance=False)
    attn, x = plain.model.blocks[0].attn, plain.calib_inputs[0]
    balanced, ratio = tm.balance_kv(attn, x)
    assert ratio != pytest.approx(1.0)
    cos, sin = m.rotary(torch.arange(x.shape[0]), torch.float64)
    torch.testing.assert_close(balanced(x[None], cos, sin), attn(x[None], cos, sin), rtol=0, atol=EXACT)
    with torch.no_grad():
        k_nope, v = balanced.k_proj(x)[:, 8:], balanced.v_proj(x)
    assert k_nope.norm(dim=0).mean().item() == pytest.approx(v.norm(dim=0).mean().item(), rel=1e-12)


# -- step 4 --------------------------------------------------------------------------------------
def test_full_rank_without_rope_removal_is_exact(setup):
    m, toks, ref = setup
    conv = tm.convert(m, toks, freqfold=1, partial=False)
    assert conv.max_kv_rank == 16  # 2·D_L − r with r = D_L: only V is left to compress
    mla = conv.mla(conv.max_kv_rank)
    assert isinstance(mla.blocks[0].attn, tm.MLAAttention)
    assert tm.max_abs_diff(tm.logits_and_ppl(mla, toks)[0], ref) < EXACT


def test_full_rank_with_partial_rope_equals_the_partial_model_and_error_falls_with_rank(setup):
    m, toks, _ = setup
    conv = tm.convert(m, toks, freqfold=1, partial=True)
    before = tm.logits_and_ppl(conv.model, toks)[0]
    assert conv.max_kv_rank == 24
    errors = [tm.relative_error(tm.logits_and_ppl(conv.mla(r), toks)[0], before) for r in (4, 8, 16, 24)]
    assert errors[-1] < EXACT
    assert all(a > b for a, b in zip(errors, errors[1:]))
    attn = conv.mla(8).blocks[0].attn
    assert attn.cache_floats_per_token == 8 + 8 and attn.kv_rank == 8


@pytest.mark.parametrize("rank", [0, 25, 64, 8.0])
def test_infeasible_kv_rank_raises(setup, rank):
    m, toks, _ = setup
    conv = tm.convert(m, toks, freqfold=1, partial=True)
    with pytest.raises(ValueError, match=r"kv_rank must be an int in \[1, 2·D_L − r = 24\]"):
        conv.mla(rank)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_absorbed_decode_equals_explicit_decompression(setup, backend):
    m, toks, _ = setup
    mla = tm.convert(m, toks, freqfold=1, partial=True).mla(12)
    assert tm.decode_matches_explicit(mla, toks, backend=backend) < EXACT


def test_choose_freqfold_follows_the_doubling_rule():
    assert tm.choose_freqfold({1: 3.0, 2: 2.5, 4: 2.7, 8: 1.0}) == 2  # stops at the first doubling that hurts
    assert tm.choose_freqfold({1: 2.0, 2: 3.0}) == 1
    assert tm.choose_freqfold({1: 3.0, 2: 2.0, 4: 1.0}) == 4  # stops at the largest candidate given
    assert tm.choose_freqfold({2: 3.0, 4: 2.0}, collapse=2) == 4
    with pytest.raises(ValueError, match="collapse"):
        tm.choose_freqfold({2: 1.0})


# -- measurements and figures --------------------------------------------------------------------
def test_gap_closed():
    assert tm.gap_closed(10.0, 7.0, 4.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no gap"):
        tm.gap_closed(3.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def tiny_sweep(setup):
    m, toks, _ = setup
    return tm.sweep(m, toks, toks, settings=tm.grid([1, 2]) + [(1, True, False)], kv_ranks=[8, 16, 24])


def test_sweep_skips_infeasible_ranks(tiny_sweep):
    assert tiny_sweep.curve(1, True)["kv_rank"].tolist() == [8, 16, 24]
    assert tiny_sweep.curve(1, False)["kv_rank"].tolist() == [8, 16]  # r = D_L leaves at most D_L
    assert tiny_sweep.curve(1, False)["logit_error"][-1] < EXACT
    assert len(tiny_sweep.curve(1, True, balance=False)["ppl"]) == 3
    with pytest.raises(ValueError, match="no sweep rows"):
        tiny_sweep.curve(8, True)
    assert sorted(tiny_sweep.calib_ppl) == [1, 2] and sorted(tiny_sweep.rorope_stats) == [1, 2]
    # the sweep's partial-RoPE calibration perplexity is the converted model's own
    conv = tiny_sweep.converted[(1, True, True)]
    assert tiny_sweep.calib_ppl[1] == pytest.approx(tm.logits_and_ppl(conv.model, _tokens())[1], rel=1e-12)


def test_explorer_figure_follows_its_controls(tiny_sweep):
    """The explorer's interaction without a browser: other control values, other figures."""
    base = tm.explorer_figure(tiny_sweep, kv_rank=16, freqfold=1, partial_rope=True)
    again = tm.explorer_figure(tiny_sweep, kv_rank=16, freqfold=1, partial_rope=True)
    assert base.to_json() == again.to_json()
    for other in (dict(kv_rank=8, freqfold=1, partial_rope=True), dict(kv_rank=16, freqfold=2, partial_rope=True),
                  dict(kv_rank=16, freqfold=1, partial_rope=False)):
        assert tm.explorer_figure(tiny_sweep, **other).to_json() != base.to_json()
    bars = [t for t in base.data if t.type == "bar"][0]
    assert list(bars.y) == [2 * 16 * 2 * 2, (16 + 8) * 2 * 2]  # GQA 2·D_L vs MLA r_kv + r, 2 layers, 2 bytes
    infeasible = tm.explorer_figure(tiny_sweep, kv_rank=24, freqfold=1, partial_rope=False)
    assert "infeasible" in infeasible.layout.title.text


def test_other_figures_build(setup, tiny_sweep):
    m, toks, _ = setup
    stats = tiny_sweep.rorope_stats
    fig = tm.energy_figure(stats, layer=0, freqfold=1, rope_dim=8, n_kv_heads=2)
    assert len(fig.data) == 2 and len(fig.data[0].y) == 16
    with pytest.raises(ValueError, match="no RoRoPE stats"):
        tm.energy_figure(stats, layer=0, freqfold=4, rope_dim=8, n_kv_heads=2)
    assert tm.energy_figure(stats, layer=1, freqfold=2, rope_dim=8, n_kv_heads=2).to_json() != fig.to_json()
    assert len(tm.sweep_figure(tiny_sweep, freqfolds=[1, 2], no_bkv_freqfold=1).data) == 6
    assert len(tm.cache_bytes_figure([("a", 100, 50), ("b", 10, 1)]).data) == 2
    assert len(tm.finetune_figure({"MLA": {0: 3.0, 5: 2.0}}, gqa_ppl=1.5).data) == 1


def test_recovery_finetune_runs_and_records_the_curve():
    from companion.tokenizer import stories_tokenizer

    vocab = stories_tokenizer(512).vocab_size
    m = _model(d_model=32, n_heads=4, n_kv_heads=2, vocab=vocab)
    test = tm.story_windows("test", 2, seq_len=16)
    mla = tm.convert(m, tm.story_windows("calibration", 2, seq_len=16), freqfold=1).mla(4)
    student, curve = tm.recovery_finetune(mla, steps=4, batch_size=2, seq_len=16, lr=1e-3, test=test, eval_every=2)
    assert sorted(curve) == [0, 2, 4] and student.embed.weight.dtype == torch.float32
    assert mla.embed.weight.dtype == torch.float64  # the input model is untouched


def test_story_windows_are_deterministic_and_split_by_seed():
    a, b = tm.story_windows("test", 3, 20), tm.story_windows("test", 3, 20)
    assert a.shape == (3, 21) and torch.equal(a, b)
    assert not torch.equal(a, tm.story_windows("calibration", 3, 20))
    with pytest.raises(ValueError, match="split"):
        tm.story_windows("dev", 3)
