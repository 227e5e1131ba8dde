"""companion/long_context.py: folded population scoring equals one scaling at a time (fp64); toy data."""

import pytest
import torch

from companion import long_context as lc
from companion.model import ModelConfig
from companion.rope_scaling import Scaling, baseline


# ----------------------------------------------------------------------------------------------
# Batched population scoring equals scoring one candidate at a time (fp64)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = lc.population_model(ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1))
    return model.double().eval()


def _scalings(d=16):
    gen = torch.Generator().manual_seed(1)
    kw = dict(head_dim=d, base=10000.0, original_length=8)
    return [baseline(m, 3, **kw) for m in ("none", "pi", "ntk", "yarn")] + [
        Scaling(1 + 4 * torch.rand(d // 2, generator=gen, dtype=torch.float64).sort().values, start=s,
                   mscale=1.2) for s in (0, 4, 4, 9)]


@pytest.mark.parametrize("max_rows", [1, 5, 64])
def test_population_nll_equals_one_at_a_time(tiny, max_rows):
    docs = torch.randint(0, 40, (3, 25), generator=torch.Generator().manual_seed(2))
    scalings = _scalings()
    got = lc.population_nll(tiny, docs, scalings, max_rows=max_rows)
    want = torch.tensor([lc.reference_nll(tiny, docs, s) for s in scalings], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(set(got.tolist())) > 4  # the scalings really differ
    assert tiny.rotary.factors is None  # reference_nll restores the model


def test_population_passkey_equals_argmax_of_the_reference(tiny):
    tokens = torch.randint(0, 40, (4, 20), generator=torch.Generator().manual_seed(3))
    scalings = _scalings()
    got = lc.population_passkey(tiny, tokens, 2, scalings, max_rows=7)
    for s, acc in zip(scalings, got):
        s.apply(tiny)
        pred = tiny(tokens[:, :-1]).logits[:, -2:].argmax(-1)
        tiny.rotary.set_scaling(None)
        assert acc == (pred == tokens[:, -2:]).all(-1).double().mean()


def test_population_outside_the_block_is_plain_attention(tiny):
    from companion.model import TinyLM

    plain = TinyLM(tiny.cfg).double()
    plain.load_state_dict(tiny.state_dict())
    x = torch.randint(0, 40, (2, 12))
    torch.testing.assert_close(tiny(x).logits, plain(x).logits, rtol=0, atol=0)


def test_insert_copies_repeats_earlier_spans():
    docs = torch.arange(2 * 64).view(2, 64)  # all tokens distinct: a copy is easy to trace
    out = lc.insert_copies(docs, prob=1.0, length=8, seed=0)
    assert torch.equal(out[:, :16], docs[:, :16])
    for row in out:
        for t in range(16, 64, 8):
            earlier = [row[s:s + 8] for s in range(t - 7)]  # later slots never write before t
            assert any(torch.equal(row[t:t + 8], e) for e in earlier)
    assert torch.equal(lc.insert_copies(docs, prob=0.0, length=8, seed=0), docs)


def test_passkey_layout():
    filler = torch.randint(0, 49, (500,))
    tok = lc.passkey_samples(filler, 5, 40, 0.5, vocab_size=50, key_len=3, seed=1)
    assert tok.shape == (5, 40)
    for row in tok:
        marks = (row == 49).nonzero().flatten()
        assert len(marks) == 2 and marks[1] == 40 - 4
        assert torch.equal(row[marks[0] + 1:marks[0] + 4], row[-3:])




def test_markov_text_skip_bigram_structure():
    """skip=1: token t is always a successor of token t-2 (noise 0), so (t-2, t) pairs repeat a lot."""
    docs = lc.markov_text(64, 40, vocab_size=50, branching=2, noise=0.0, skip=1.0, seed=0)
    pairs = {(int(a), int(b)) for row in docs for a, b in zip(row[:-2], row[2:])}
    assert len(pairs) <= 2 * 50  # at most `branching` successors per token
    assert torch.equal(docs, lc.markov_text(64, 40, vocab_size=50, branching=2, noise=0.0, skip=1.0, seed=0))


@pytest.mark.parametrize("call, match", [
    (lambda: lc.passkey_samples(torch.arange(100), 2, 8, 0.5, vocab_size=50, key_len=3, seed=0), "length"),
    (lambda: lc.passkey_samples(torch.arange(10), 2, 40, 0.5, vocab_size=50, key_len=3, seed=0), "filler"),
    (lambda: lc.markov_text(2, 40, vocab_size=50, skip=1.5), "skip"),
    (lambda: lc.insert_copies(torch.zeros(2, 8, dtype=torch.long), prob=2.0, length=2, seed=0), "prob"),
    (lambda: lc.population_nll(None, torch.zeros(3, dtype=torch.long), []), "docs"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
