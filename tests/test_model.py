"""companion/model.py: shapes, loss, GQA exactness, RoPE algebra, the attention hook, causality, errors."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.model import (
    Attention,
    ModelConfig,
    Rotary,
    TinyLM,
    apply_rope,
    rope_cos_sin,
    rotate_half,
)

V, D, L = 37, 16, 2


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, d_ff=24)
    base.update(kw)
    return ModelConfig(**base)


def _model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(_cfg(**kw))


def _idx(B: int = 2, T: int = 7, seed: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def test_config_defaults_resolve():
    cfg = ModelConfig(d_model=32, n_heads=4)
    assert cfg.n_kv_heads == 4
    assert cfg.d_ff == 128
    assert cfg.head_dim == 8
    assert cfg.to_dict()["n_kv_heads"] == 4


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_model=16, n_heads=3), "divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3), "divisible by n_kv_heads"),
        (dict(n_heads=4, n_kv_heads=8), "divisible by n_kv_heads"),
        (dict(d_model=12, n_heads=4, n_kv_heads=4), "head_dim=3"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(d_model=-16), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_heads=0), "n_heads"),
        (dict(n_kv_heads=0), "n_kv_heads"),
        (dict(d_ff=0), "d_ff"),
        (dict(d_model=16.0), "d_model"),
        (dict(vocab_size="37"), "vocab_size"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


@pytest.mark.parametrize("base", [0.0, -10000.0, float("nan")])
def test_config_rejects_non_positive_rope_base(base):
    with pytest.raises(ValueError, match="rope_base"):
        _cfg(rope_base=base)


# ----------------------------------------------------------------------------------------------
# forward: shapes, hidden states, loss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_shapes_for_mha_gqa_mqa(n_kv):
    model = _model(n_kv_heads=n_kv)
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (n_kv * 4, D)
    assert attn.q_proj.weight.shape == (D, D)
    out = model(_idx(3, 5), return_hidden=True)
    assert out.logits.shape == (3, 5, V)
    assert out.loss is None
    assert len(out.hidden) == L + 1
    assert all(h.shape == (3, 5, D) for h in out.hidden)
    assert torch.isfinite(out.logits).all()


def test_hidden_none_unless_requested():
    assert _model()(_idx()).hidden is None


def test_hidden_states_are_embedding_then_block_outputs(fp64):
    model = _model()
    idx = _idx()
    out = model(idx, return_hidden=True)
    torch.testing.assert_close(out.hidden[0], model.embed(idx), rtol=0, atol=0)
    cos, sin = model.rotary(torch.arange(idx.shape[1]), torch.float64)
    for i, block in enumerate(model.blocks):
        torch.testing.assert_close(out.hidden[i + 1], block(out.hidden[i], cos, sin), rtol=0, atol=0)
    # "last is pre-norm": logits = lm_head(norm(hidden[-1]))
    torch.testing.assert_close(out.logits, model.lm_head(model.norm(out.hidden[-1])), rtol=0, atol=0)


def test_loss_equals_cross_entropy_of_logits(fp64):
    model = _model()
    idx, tgt = _idx(seed=1), _idx(seed=2)
    out = model(idx, tgt)
    want = F.cross_entropy(out.logits.reshape(-1, V), tgt.reshape(-1))
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-14)
    # and by hand: mean of -log softmax at the targets
    logp = torch.log_softmax(out.logits, -1).gather(-1, tgt[..., None]).squeeze(-1)
    assert out.loss.item() == pytest.approx(-logp.mean().item(), rel=1e-12)


def test_loss_ignores_minus_100(fp64):
    model = _model()
    idx, tgt = _idx(seed=1), _idx(seed=2)
    masked = tgt.clone()
    masked[0, :3] = -100
    masked[1, -1] = -100
    out = model(idx, masked)
    logp = torch.log_softmax(out.logits, -1)
    keep = masked != -100
    want = -logp[keep].gather(-1, masked[keep][:, None]).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert model(idx, tgt).loss.item() != out.loss.item()
    # only one kept position: the loss is exactly that position's negative log-likelihood
    single = torch.full_like(tgt, -100)
    single[1, 4] = tgt[1, 4]
    assert model(idx, single).loss.item() == pytest.approx(-logp[1, 4, tgt[1, 4]].item(), rel=1e-13)


def test_untied_embeddings_and_num_params():
    tied, untied = _model(tie_embeddings=True), _model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == V * D
    assert tied.num_params(exclude_embedding=True) == tied.num_params() - V * D
    manual = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert tied.num_params() == manual


def test_residual_output_init_is_scaled():
    torch.manual_seed(0)
    model = TinyLM(_cfg(d_model=64, n_heads=4, n_kv_heads=4, d_ff=256, n_layers=8))
    want = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        for w in (block.attn.o_proj.weight, block.mlp.down.weight):
            assert w.std().item() == pytest.approx(want, rel=0.1)
        assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_same_seed_same_init_different_seed_different():
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])


# ----------------------------------------------------------------------------------------------
# GQA == MHA with replicated k/v heads (exact in fp64)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv", [2, 1], ids=["GQA", "MQA"])
def test_gqa_equals_mha_with_replicated_kv_heads(fp64, n_kv):
    n_heads = 4
    gqa = _model(seed=5, n_heads=n_heads, n_kv_heads=n_kv)
    mha = _model(seed=6, n_heads=n_heads, n_kv_heads=n_heads)
    group, hd = n_heads // n_kv, D // n_heads
    sd = gqa.state_dict()
    for key in list(sd):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[key].reshape(n_kv, hd, D).repeat_interleave(group, dim=0).reshape(n_heads * hd, D)
            sd[key] = w
    mha.load_state_dict(sd)
    idx = _idx(2, 9)
    a, b = gqa(idx).logits, mha(idx).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the replicated rows really are per-head blocks: reversing the head order in the MHA copy
    # (which moves distinct kv heads to other query heads when n_kv > 1) must change the output
    k = mha.blocks[0].attn.k_proj.weight
    with torch.no_grad():
        k.copy_(k.reshape(n_heads, hd, D).flip(0).reshape(n_heads * hd, D))
    if n_kv > 1:
        assert (mha(idx).logits - a).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------
def test_rotate_half_is_a_quarter_turn(fp64):
    x = torch.randn(3, 8)
    r = rotate_half(x)
    torch.testing.assert_close(r[..., :4], -x[..., 4:], rtol=0, atol=0)
    torch.testing.assert_close(r[..., 4:], x[..., :4], rtol=0, atol=0)
    torch.testing.assert_close(rotate_half(r), -x, rtol=0, atol=0)
    assert torch.allclose((x * r).sum(-1), torch.zeros(3), atol=1e-15)


def test_rope_table_matches_formula(fp64):
    d, base = 8, 500.0
    pos = torch.tensor([0, 1, 5, 17, 300])
    cos, sin = rope_cos_sin(pos, d, base, dtype=torch.float64)
    assert cos.shape == sin.shape == (5, d)
    for t, p in enumerate(pos.tolist()):
        for i in range(d // 2):
            theta = base ** (-2 * i / d)
            for j in (i, i + d // 2):
                assert cos[t, j].item() == pytest.approx(math.cos(p * theta), abs=1e-13)
                assert sin[t, j].item() == pytest.approx(math.sin(p * theta), abs=1e-13)


def test_rope_table_dtype_and_mscale(fp64):
    pos = torch.arange(6)
    c32, s32 = rope_cos_sin(pos, 8)
    assert c32.dtype == s32.dtype == torch.float32
    c, s = rope_cos_sin(pos, 8, dtype=torch.float64)
    c2, s2 = rope_cos_sin(pos, 8, mscale=1.7, dtype=torch.float64)
    torch.testing.assert_close(c2, 1.7 * c, rtol=1e-15, atol=0)
    torch.testing.assert_close(s2, 1.7 * s, rtol=1e-15, atol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), half=st.integers(1, 8), base=st.sampled_from([10.0, 10000.0, 1e6]))
def test_apply_rope_preserves_norm(seed, half, base):
    d = 2 * half
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 11, d, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 5000, (11,), generator=gen)
    cos, sin = rope_cos_sin(pos, d, base, dtype=torch.float64)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    # and it is a rotation of each (i, i + d/2) pair, not just norm-preserving overall
    pair_x = x[..., :half] ** 2 + x[..., half:] ** 2
    pair_y = y[..., :half] ** 2 + y[..., half:] ** 2
    torch.testing.assert_close(pair_y, pair_x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("factors", [None, "ramp"])
def test_rope_score_depends_only_on_relative_position(factors):
    d = 16
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    lam = torch.linspace(1, 8, d // 2, dtype=torch.float64) if factors else None

    def score(m, n):
        cos, sin = rope_cos_sin(torch.tensor([m, n]), d, 10000.0, factors=lam, dtype=torch.float64)
        qm = apply_rope(q, cos[0], sin[0])
        kn = apply_rope(k, cos[1], sin[1])
        return (qm @ kn).item()

    for m, n in [(3, 0), (10, 7), (0, 5), (40, 40)]:
        ref = score(m, n)
        for shift in (1, 13, 250, 4096):
            assert score(m + shift, n + shift) == pytest.approx(ref, rel=1e-9, abs=1e-11)
    # and it does depend on m - n
    assert abs(score(5, 0) - score(6, 0)) > 1e-6


def test_rope_unit_factors_equal_no_factors():
    pos = torch.arange(0, 200, 7)
    for start in (0, 50):
        a = rope_cos_sin(pos, 12, 10000.0, dtype=torch.float64)
        b = rope_cos_sin(pos, 12, 10000.0, factors=torch.ones(6), start=start, dtype=torch.float64)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("start", [0, 1, 9, 100])
def test_rope_factors_apply_from_start(start):
    d, base = 8, 10000.0
    lam = torch.tensor([1.0, 2.0, 4.5, 16.0])
    pos = torch.arange(0, 40)
    cos, sin = rope_cos_sin(pos, d, base, factors=lam, start=start, dtype=torch.float64)
    for p in pos.tolist():
        for i in range(d // 2):
            theta = base ** (-2 * i / d)
            if p >= start:
                theta = theta / lam[i].item()
            ang = p * theta
            for j in (i, i + d // 2):
                assert cos[p, j].item() == pytest.approx(math.cos(ang), abs=1e-13)
                assert sin[p, j].item() == pytest.approx(math.sin(ang), abs=1e-13)
    plain_cos, _ = rope_cos_sin(pos, d, base, dtype=torch.float64)
    if start > 0:
        torch.testing.assert_close(cos[:start], plain_cos[:start], rtol=0, atol=0)
    if start < 40:
        assert not torch.allclose(cos[max(start, 1):], plain_cos[max(start, 1):])


def test_rope_factors_shape_checked():
    with pytest.raises(ValueError, match="factors"):
        rope_cos_sin(torch.arange(4), 8, factors=torch.ones(3))


def test_rotary_set_scaling_roundtrip(fp64):
    rot = Rotary(8, 10000.0)
    pos = torch.arange(20)
    plain = rot(pos, torch.float64)
    rot.set_scaling([2.0, 2.0, 2.0, 2.0], start=4, mscale=1.25)
    want = rope_cos_sin(pos, 8, 10000.0, factors=torch.full((4,), 2.0), start=4, mscale=1.25, dtype=torch.float64)
    for got, w in zip(rot(pos, torch.float64), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    rot.set_scaling(None)
    for got, w in zip(rot(pos, torch.float64), plain):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(factors=torch.ones(3)),
        dict(factors=torch.ones(5)),
        dict(factors=torch.ones(2, 2)),
        dict(factors=torch.tensor([1.0, 0.0, 1.0, 1.0])),
        dict(factors=torch.tensor([1.0, -2.0, 1.0, 1.0])),
        dict(start=-1),
        dict(mscale=0.0),
        dict(mscale=-1.0),
    ],
)
def test_rotary_set_scaling_rejects_bad_values(kw):
    rot = Rotary(8, 10000.0)
    with pytest.raises(ValueError):
        rot.set_scaling(**kw)
    assert rot.factors is None and rot.start == 0 and rot.mscale == 1.0  # unchanged after a rejection


@pytest.mark.parametrize("kw", [dict(factors=torch.tensor([1.0, float("nan"), 1.0, 1.0])),
                                dict(mscale=float("nan"))], ids=["nan-factor", "nan-mscale"])
def test_rotary_set_scaling_rejects_nan(kw):
    with pytest.raises(ValueError):
        Rotary(8, 10000.0).set_scaling(**kw)


def test_model_uses_rotary_scaling(fp64):
    model = _model()
    idx = _idx()
    before = model(idx).logits
    model.rotary.set_scaling(torch.full((2,), 4.0))
    after = model(idx).logits
    assert (after - before).abs().max() > 1e-8
    model.rotary.set_scaling(None)
    torch.testing.assert_close(model(idx).logits, before, rtol=0, atol=0)


def test_positions_shift_invariance(fp64):
    """Attention sees only relative positions, so shifting every position by c changes nothing."""
    model = _model()
    idx = _idx(2, 8)
    ref = model(idx).logits
    torch.testing.assert_close(model(idx, positions=torch.arange(8)).logits, ref, rtol=0, atol=0)
    for c in (1, 37, 1000):
        torch.testing.assert_close(model(idx, positions=torch.arange(8) + c).logits, ref, rtol=1e-9, atol=1e-11)
    # but non-uniform positions do change it
    spread = torch.arange(8) * 3
    assert (model(idx, positions=spread).logits - ref).abs().max() > 1e-8


# ----------------------------------------------------------------------------------------------
# the attention hook
# ----------------------------------------------------------------------------------------------
class _Recorder(nn.Module):
    def __init__(self, cfg, layer_index, log):
        super().__init__()
        self.layer_index = layer_index
        self.inner = Attention(cfg, layer_index)
        self.log = log

    def forward(self, x, cos, sin):
        self.log.append((self.layer_index, tuple(x.shape), tuple(cos.shape), tuple(sin.shape)))
        return self.inner(x, cos, sin)


def test_attention_factory_builds_every_layer():
    log, made = [], []

    def factory(cfg, layer_index):
        assert isinstance(cfg, ModelConfig)
        made.append(layer_index)
        return _Recorder(cfg, layer_index, log)

    torch.manual_seed(0)
    model = TinyLM(_cfg(n_layers=3), attention=factory)
    assert made == [0, 1, 2]
    assert [b.attn.layer_index for b in model.blocks] == [0, 1, 2]
    model(_idx(2, 5))
    hd = D // 4
    assert log == [(i, (2, 5, D), (5, hd), (5, hd)) for i in range(3)]
    # its parameters are part of the model (trained and saved with it)
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.2.attn.inner.q_proj.weight" in names


class _Zero(nn.Module):
    def __init__(self, cfg, layer_index):
        super().__init__()
        self.calls = 0

    def forward(self, x, cos, sin):
        self.calls += 1
        return torch.zeros_like(x)


def test_zero_attention_equals_attention_free_model(fp64):
    torch.manual_seed(0)
    model = TinyLM(_cfg(), attention=_Zero)
    idx = _idx()
    logits = model(idx).logits
    x = model.embed(idx)
    for block in model.blocks:
        x = x + block.mlp(block.mlp_norm(x))
    torch.testing.assert_close(logits, model.lm_head(model.norm(x)), rtol=0, atol=0)
    assert all(b.attn.calls == 1 for b in model.blocks)
    # with no attention, each position's logits depend on its own token only
    a = model(torch.tensor([[1, 2, 3]])).logits
    b = model(torch.tensor([[5, 6, 3]])).logits
    torch.testing.assert_close(a[0, 2], b[0, 2], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# causality
# ----------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, 9), new=st.integers(0, V - 1), n_kv=st.sampled_from([1, 2, 4]))
def test_future_tokens_do_not_change_past_logits(t, new, n_kv):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = _model(n_kv_heads=n_kv)
        idx = _idx(2, 10)
        changed = idx.clone()
        changed[:, t] = new
        a, b = model(idx).logits, model(changed).logits
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-12)
        if bool((idx[:, t] != new).all()):
            assert (a[:, t] - b[:, t]).abs().amax(-1).min() > 1e-9
    finally:
        torch.set_default_dtype(prev)


def test_prefix_logits_equal_full_sequence_logits(fp64):
    model = _model()
    idx = _idx(2, 10)
    full = model(idx).logits
    for t in (1, 4, 9):
        torch.testing.assert_close(model(idx[:, :t]).logits, full[:, :t], rtol=0, atol=1e-12)


def test_batch_rows_are_independent(fp64):
    model = _model()
    idx = _idx(3, 6)
    full = model(idx).logits
    for b in range(3):
        torch.testing.assert_close(model(idx[b:b + 1]).logits[0], full[b], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(torch.zeros(5, dtype=torch.long)), "idx"),
        (lambda m: m(torch.zeros(1, 2, 3, dtype=torch.long)), "idx"),
        (lambda m: m(torch.tensor([[0, V]])), "token ids"),
        (lambda m: m(torch.tensor([[-1, 0]])), "token ids"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(3)), "positions"),
        (lambda m: m(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(4)[None]), "positions"),
        (lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), "targets"),
        (lambda m: m(torch.zeros(2, 4, dtype=torch.long), torch.zeros(8, dtype=torch.long)), "targets"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(_model())


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def test_generate_greedy_is_deterministic_and_argmax():
    model = _model()
    prompt = _idx(2, 3)
    a = model.generate(prompt, 6)
    b = model.generate(prompt, 6)
    assert a.shape == (2, 9)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :3], prompt)
    # each appended token is the argmax of the logits given everything before it
    logits = model(a[:, :-1]).logits
    assert torch.equal(a[:, 3:], logits[:, 2:].argmax(-1))


def test_generate_zero_tokens_returns_prompt():
    prompt = _idx(1, 4)
    assert torch.equal(_model().generate(prompt, 0), prompt)


def test_generate_sampling_is_seeded():
    model = _model()
    prompt = _idx(2, 3)
    a = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a.shape == (2, 11)
    assert torch.equal(a, b)
    outs = {tuple(model.generate(prompt, 8, temperature=5.0, generator=torch.Generator().manual_seed(s))[0].tolist())
            for s in range(5)}
    assert len(outs) > 1


def test_generate_stops_when_every_row_emits_stop_token():
    model = _model()
    prompt = _idx(1, 3)
    greedy = model.generate(prompt, 5)
    first = int(greedy[0, 3])
    stopped = model.generate(prompt, 5, stop_token=first)
    assert torch.equal(stopped, greedy[:, :4])
    never = model.generate(prompt, 5, stop_token=V + 10)
    assert never.shape == (1, 8)
