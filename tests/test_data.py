"""companion/data.py: determinism, distributions, copy spans, batches, biographies, passkey layouts, errors."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from companion import data
from companion.data import (
    Person,
    bio_qa,
    bio_text,
    biographies,
    lm_batches,
    passkey_text,
    passkey_tokens,
    stories,
    zipf_markov,
    zipf_probs,
)


def _repeated_spans(tokens: torch.Tensor, doc_len: int, span: int) -> list[tuple[int, int]]:
    """(doc, t) for every t whose length-``span`` window occurs earlier in the same document, disjointly."""
    docs = tokens.view(-1, doc_len).numpy()
    out = []
    for d, doc in enumerate(docs):
        first: dict[bytes, int] = {}
        for t in range(doc_len - span + 1):
            key = doc[t:t + span].tobytes()
            if key in first and first[key] + span <= t:
                out.append((d, t))
            first.setdefault(key, t)
    return out


# ----------------------------------------------------------------------------------------------
# determinism of every generator
# ----------------------------------------------------------------------------------------------
GENERATORS = {
    "zipf_markov": lambda seed: zipf_markov(3000, vocab_size=64, doc_len=100, copy_prob=0.01, copy_len=4, seed=seed),
    "lm_batches": lambda seed: lm_batches(torch.arange(500), 4, 16, seed=seed)(3),
    "stories": lambda seed: stories(20, seed=seed),
    "biographies": lambda seed: biographies(30, seed=seed),
    "passkey_tokens": lambda seed: passkey_tokens(3, length=64, depth=0.5, vocab_size=50, seed=seed),
    "passkey_text": lambda seed: passkey_text(5, depth=0.5, seed=seed),
}


def _flat(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype), tuple(x.flatten().tolist()))
    if isinstance(x, data.PasskeyBatch):
        return tuple(_flat(v) for v in (x.tokens, x.key, x.needle_pos, x.answer_pos))
    if isinstance(x, (list, tuple)):
        return tuple(_flat(v) for v in x)
    return x


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_output_different_seed_different(name):
    gen = GENERATORS[name]
    a, b, c = _flat(gen(0)), _flat(gen(0)), _flat(gen(1))
    assert a == b
    assert a != c


# ----------------------------------------------------------------------------------------------
# zipf_probs / zipf_markov
# ----------------------------------------------------------------------------------------------
def test_zipf_probs_exact():
    p = zipf_probs(5, 1.0)
    want = 1 / np.arange(1, 6)
    np.testing.assert_allclose(p, want / want.sum(), rtol=1e-15)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    assert np.all(np.diff(p) < 0)


def test_zipf_markov_length_dtype_range():
    x = zipf_markov(1234, vocab_size=50, doc_len=100, seed=3)
    assert x.shape == (1234,) and x.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 50
    assert len(torch.unique(x)) > 25  # uses much of the vocabulary


def test_zipf_markov_frequencies_follow_rank():
    V = 256
    x = zipf_markov(200_000, vocab_size=V, seed=0)
    counts = np.bincount(x.numpy(), minlength=V)
    rho = spearmanr(np.arange(V), counts).statistic
    assert rho < -0.5  # frequency falls with token id (= rank)
    assert counts.argmax() == 0  # "token 0 is the most frequent"
    assert counts[:8].sum() > counts[-128:].sum()


def test_zipf_markov_without_noise_only_uses_successor_table():
    """noise=0: every token is followed (inside a document) by one of its ``branching`` successors."""
    doc_len, branching = 50, 3
    x = zipf_markov(10_000, vocab_size=40, branching=branching, noise=0.0, doc_len=doc_len, seed=2).numpy()
    succ: dict[int, set[int]] = {}
    for t in range(len(x) - 1):
        if (t + 1) % doc_len:  # skip document boundaries
            succ.setdefault(int(x[t]), set()).add(int(x[t + 1]))
    assert max(len(s) for s in succ.values()) <= branching
    # with full noise the successor sets are far larger (the bound above is not vacuous)
    y = zipf_markov(10_000, vocab_size=40, branching=branching, noise=1.0, doc_len=doc_len, seed=2).numpy()
    succ_y: dict[int, set[int]] = {}
    for t in range(len(y) - 1):
        if (t + 1) % doc_len:
            succ_y.setdefault(int(y[t]), set()).add(int(y[t + 1]))
    assert max(len(s) for s in succ_y.values()) > 3 * branching


def test_copy_spans_present_when_enabled_and_absent_otherwise():
    doc_len, span = 256, 16
    plain = zipf_markov(doc_len * 100, vocab_size=256, doc_len=doc_len, copy_prob=0.0, copy_len=span, seed=1)
    copied = zipf_markov(doc_len * 100, vocab_size=256, doc_len=doc_len, copy_prob=0.01, copy_len=span, seed=1)
    n_plain = len(_repeated_spans(plain, doc_len, span))
    n_copied = len(_repeated_spans(copied, doc_len, span))
    assert n_plain <= 2
    assert n_copied >= 50
    assert len({d for d, _ in _repeated_spans(copied, doc_len, span)}) >= 30  # in many documents


def test_copy_spans_fill_every_slot_when_probability_saturates():
    """copy_prob·copy_len >= 1: every span slot t = 2L, 3L, ... repeats an earlier span of its own document."""
    doc_len, span = 64, 4
    x = zipf_markov(doc_len * 20, vocab_size=512, doc_len=doc_len, copy_prob=0.5, copy_len=span, seed=4)
    docs = x.view(-1, doc_len).numpy()
    for doc in docs:
        for t in range(2 * span, doc_len - span + 1, span):
            window = doc[t:t + span]
            assert any(np.array_equal(window, doc[s:s + span]) for s in range(0, t - span + 1)), t


@settings(max_examples=25, deadline=None)
@given(n_tokens=st.integers(1, 3000), vocab_size=st.integers(2, 300), doc_len=st.integers(2, 600),
       seed=st.integers(0, 2**31))
def test_zipf_markov_property(n_tokens, vocab_size, doc_len, seed):
    x = zipf_markov(n_tokens, vocab_size=vocab_size, doc_len=doc_len, branching=4, seed=seed)
    assert x.shape == (n_tokens,)
    assert x.dtype == torch.int64
    assert x.is_contiguous()
    assert int(x.min()) >= 0 and int(x.max()) < vocab_size
    assert torch.equal(x, zipf_markov(n_tokens, vocab_size=vocab_size, doc_len=doc_len, branching=4, seed=seed))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_tokens=0), "n_tokens"),
        (dict(n_tokens=10.0), "n_tokens"),
        (dict(n_tokens=True), "n_tokens"),
        (dict(vocab_size=1), "vocab_size"),
        (dict(exponent=0.0), "exponent"),
        (dict(exponent=float("nan")), "exponent"),
        (dict(branching=0), "branching"),
        (dict(doc_len=1), "doc_len"),
        (dict(copy_len=0), "copy_len"),
        (dict(noise=-0.1), "noise"),
        (dict(noise=1.5), "noise"),
        (dict(copy_prob=1.0), "copy_prob"),
        (dict(copy_prob=-0.1), "copy_prob"),
    ],
)
def test_zipf_markov_rejects_bad_arguments(kw, match):
    args = dict(n_tokens=100)
    args.update(kw)
    n = args.pop("n_tokens")
    with pytest.raises(ValueError, match=match):
        zipf_markov(n, **args)


# ----------------------------------------------------------------------------------------------
# lm_batches
# ----------------------------------------------------------------------------------------------
def test_lm_batches_shapes_and_shift():
    tokens = torch.arange(1000) * 7 % 1009  # distinct values: a window identifies its start
    batches = lm_batches(tokens, 5, 12, seed=3)
    x, y = batches(0)
    assert x.shape == y.shape == (5, 12)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    inverse = {int(v): i for i, v in enumerate(tokens)}
    for row_x, row_y in zip(x, y):
        s = inverse[int(row_x[0])]
        assert torch.equal(row_x, tokens[s:s + 12])
        assert torch.equal(row_y, tokens[s + 1:s + 13])


def test_lm_batches_depend_only_on_seed_and_step():
    tokens = torch.arange(5000)
    a, b = lm_batches(tokens, 4, 16, seed=0), lm_batches(tokens, 4, 16, seed=0)
    for step in (0, 1, 99):
        assert torch.equal(a(step)[0], b(step)[0])
    b(5)  # calling other steps in between changes nothing
    assert torch.equal(a(7)[0], b(7)[0])
    assert not torch.equal(a(0)[0], a(1)[0])
    assert not torch.equal(a(0)[0], lm_batches(tokens, 4, 16, seed=1)(0)[0])


def test_lm_batches_can_reach_every_window():
    seq_len = 8
    tokens = torch.arange(seq_len + 3)  # three valid windows: starts 0, 1, 2
    batches = lm_batches(tokens, 4, seq_len, seed=0)
    starts = {int(s) for step in range(100) for s in batches(step)[0][:, 0]}
    assert starts == {0, 1, 2}
    assert any(int(y[-1]) == seq_len + 2 for step in range(100) for y in batches(step)[1])


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.arange(100).view(10, 10), 2, 4), "1-D"),
        ((torch.arange(100), 0, 4), "batch_size"),
        ((torch.arange(100), 2, 0), "seq_len"),
        ((torch.arange(100), 2.0, 4), "batch_size"),
        ((torch.arange(10), 2, 9), "tokens"),
    ],
)
def test_lm_batches_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        lm_batches(*args)


# ----------------------------------------------------------------------------------------------
# stories
# ----------------------------------------------------------------------------------------------
def test_stories_shape_and_grammar():
    out = stories(50, seed=0)
    assert len(out) == 50 and all(isinstance(s, str) for s in out)
    assert all(s.startswith("Once upon a time, ") for s in out)
    assert len(set(out)) > 40
    for s in out:
        name = re.match(r"Once upon a time, (\w+) the ", s).group(1)
        female = name in {"Mia", "Ada", "Zoe", "Lily", "Nora", "Ruby"}
        wrong = ("Then he ", "So he ") if female else ("Then she ", "So she ")
        assert not any(w in s for w in wrong), s
        assert f"{name} and {name} " not in s  # the friend is someone else


def test_stories_rejects_bad_n():
    with pytest.raises(ValueError, match="n must"):
        stories(0)


# ----------------------------------------------------------------------------------------------
# biographies
# ----------------------------------------------------------------------------------------------
def test_biographies_unique_names_and_attribute_ranges():
    people = biographies(720, seed=5)  # every (first, last) pair
    assert len(people) == 720
    assert len({p.name for p in people}) == 720
    for p in people:
        assert isinstance(p, Person)
        assert p.city in data._CITIES
        assert p.employer in data._EMPLOYERS
        assert isinstance(p.birth_year, int) and 1950 <= p.birth_year <= 2003
        first, last = p.name.split(" ")
        assert first in data._FIRST and last in data._LAST
        m = re.fullmatch(r"([a-z]+)\.([a-z]+)(\d\d)@(.+)", p.email)
        assert m and m.group(1) == first.lower() and m.group(2) == last.lower()
        assert 10 <= int(m.group(3)) <= 99 and m.group(4) in data._DOMAINS
    years = {p.birth_year for p in people}
    assert min(years) == 1950 and max(years) == 2003


def test_bio_text_and_qa_contain_the_attributes():
    for p in biographies(10, seed=1):
        texts = [bio_text(p, t) for t in range(3)]
        assert len(set(texts)) == 3
        assert bio_text(p, 3) == texts[0]
        for text in texts:
            for value in (p.name, p.city, str(p.birth_year), p.employer, p.email):
                assert value in text
        qa = bio_qa(p)
        assert len(qa) == 12
        assert [a for a, _, _ in qa] == [a for a in Person.ATTRIBUTES for _ in range(3)]
        for attr, q, a in qa:
            assert p.name in q and q.endswith("?")
            assert str(getattr(p, attr)) in a and p.name in a
        assert len({q for _, q, _ in qa}) == 12


def test_biographies_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_people"):
        biographies(0)
    with pytest.raises(ValueError, match="n_people"):
        biographies(721)


# ----------------------------------------------------------------------------------------------
# passkey
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("key_len", [1, 4])
def test_passkey_tokens_layout(depth, key_len):
    n, length, vocab = 4, 50, 30
    b = passkey_tokens(n, length=length, depth=depth, vocab_size=vocab, key_len=key_len, seed=2)
    M = vocab - 1
    haystack = length - 3 - 2 * key_len
    cut = round(depth * haystack)
    assert b.tokens.shape == (n, length) and b.tokens.dtype == torch.int64
    assert b.key.shape == (n, key_len)
    assert torch.equal(b.needle_pos, torch.full((n,), cut + 1))
    assert torch.equal(b.answer_pos, torch.full((n,), length - key_len))
    for row, key, npos, apos in zip(b.tokens, b.key, b.needle_pos, b.answer_pos):
        markers = (row == M).nonzero().flatten().tolist()
        assert markers == [cut, cut + key_len + 1, length - key_len - 1]
        assert torch.equal(row[npos:npos + key_len], key)
        assert torch.equal(row[apos:], key)
        assert int(key.max()) < M and int(key.min()) >= 0
        assert int(row.min()) >= 0
    # the needle sits at the requested fraction of the haystack
    assert abs(cut / haystack - depth) <= 0.5 / haystack + 1e-12


def test_passkey_tokens_keys_vary():
    b = passkey_tokens(32, length=40, depth=0.5, vocab_size=100, key_len=4, seed=0)
    assert len({tuple(k.tolist()) for k in b.key}) == 32
    assert len({tuple(r[:10].tolist()) for r in b.tokens}) > 1  # filler differs per row


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n=0), "n must"),
        (dict(key_len=0), "key_len"),
        (dict(vocab_size=2), "vocab_size"),
        (dict(depth=-0.1), "depth"),
        (dict(depth=1.01), "depth"),
        (dict(depth=float("nan")), "depth"),
        (dict(length=11, key_len=4), "length"),
    ],
)
def test_passkey_tokens_rejects_bad_arguments(kw, match):
    args = dict(n=2, length=40, depth=0.5, vocab_size=30)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        passkey_tokens(args.pop("n"), **args)


@pytest.mark.parametrize("length", [40.0, 40.5])
def test_passkey_tokens_non_int_length_names_length(length):
    with pytest.raises(ValueError, match="length"):
        passkey_tokens(2, length=length, depth=0.5, vocab_size=30)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_text(depth):
    n_filler = 10
    prompt, key = passkey_text(n_filler, depth=depth, seed=3)
    assert re.fullmatch(r"\d{5}", key)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    assert prompt.count(needle) == 1
    assert prompt.count(key) == 2  # both occurrences are inside the needle
    assert prompt.endswith("What is the pass key? The pass key is")
    before = prompt[:prompt.index(needle)]
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    assert before.count(filler) == round(depth * n_filler)
    assert prompt.count(filler) == n_filler


def test_passkey_text_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_filler"):
        passkey_text(0, depth=0.5)
    with pytest.raises(ValueError, match="depth"):
        passkey_text(3, depth=1.5)
