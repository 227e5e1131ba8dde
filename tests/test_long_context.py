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


def test_passkey_layout():
    filler = torch.randint(0, 49, (500,))
    tok = lc.passkey_samples(filler, 5, 40, 0.5, vocab_size=50, key_len=3, seed=1)
    assert tok.shape == (5, 40)
    for row in tok:
        marks = (row == 49).nonzero().flatten()
        assert len(marks) == 2 and marks[1] == 40 - 4
        assert torch.equal(row[marks[0] + 1:marks[0] + 4], row[-3:])




def test_short_lm_corpus_shapes_and_copies():
    """Training rows are train_len + 1 long, evaluation documents max_len + 1; held-out docs differ from val."""
    cfg = lc.ShortLMConfig(train_len=32, max_len=128, train_docs=8, copy_prob=1 / 16, copy_len=16)  # every slot
    data = lc.corpus(cfg, n_eval_docs=3)
    assert data["train"].shape[1] == 33 and data["val"].shape == data["test"].shape == (3, 129)
    assert not torch.equal(data["val"], data["test"])
    assert int(data["train"].max()) < cfg.vocab_size - 1  # the passkey marker never occurs in text
    doc = data["val"][0]
    for t in range(32, 113, 16):  # every slot from 2·copy_len on repeats an earlier span of its document
        assert any(torch.equal(doc[t:t + 16], doc[s:s + 16]) for s in range(t - 15))


def test_training_batches_mix_in_passkeys_and_are_deterministic():
    cfg = lc.ShortLMConfig(train_len=32, max_len=128, train_docs=8, batch_size=8, passkey_frac=0.25)
    rows = lc.corpus(cfg, n_eval_docs=1)["train"]
    batches = lc.training_batches(cfg, rows, 32, seed=0, pool=32)
    x, y = batches(5)
    assert x.shape == y.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert ((x[:2] == cfg.vocab_size - 1).sum(1) >= 1).all()  # the first quarter are passkey samples
    assert not (x[2:] == cfg.vocab_size - 1).any()
    assert torch.equal(batches(5)[0], x) and not torch.equal(batches(6)[0], x)


def test_short_lm_recipes_are_registered():
    from companion import zoo

    assert set(lc.SHORT_LM_NAMES.values()) <= set(zoo.names())
    assert lc.SHORT_LM["full"].head_dim == 32 and lc.SHORT_LM["full"].train_len == 128


@pytest.mark.parametrize("call, match", [
    (lambda: lc.passkey_samples(torch.arange(100), 2, 8, 0.5, vocab_size=50, key_len=3, seed=0), "length"),
    (lambda: lc.passkey_samples(torch.arange(10), 2, 40, 0.5, vocab_size=50, key_len=3, seed=0), "filler"),
    (lambda: lc.population_nll(None, torch.zeros(3, dtype=torch.long), []), "docs"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
