"""companion/tokenizer.py: round-trips, training against a naive reference, persistence, the cache."""

import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import tokenizer as tk
from companion.data import stories
from companion.tokenizer import PRETOKEN, BPETokenizer, stories_tokenizer

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return BPETokenizer.train(stories(300, seed=0), 400)


# ----------------------------------------------------------------------------------------------
# an independent, slow reference: recount every pair from scratch before each merge
# ----------------------------------------------------------------------------------------------
def _ref_merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if ids[i:i + 2] == list(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _ref_train(texts, vocab_size, n_special=1):
    counts = Counter(w for t in texts for w in PRETOKEN.findall(t))
    words = {w: list(w.encode("utf-8")) for w in counts}
    merges = []
    for new_id in range(256, vocab_size - n_special):
        pairs = Counter()
        for w, ids in words.items():
            for p in zip(ids, ids[1:]):
                pairs[p] += counts[w]
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == top)  # ties: the smallest pair
        merges.append(best)
        words = {w: _ref_merge(ids, best, new_id) for w, ids in words.items()}
    return merges


def _ref_encode(merges, text):
    out = []
    for w in PRETOKEN.findall(text):
        ids = list(w.encode("utf-8"))
        for rank, pair in enumerate(merges):
            ids = _ref_merge(ids, pair, 256 + rank)
        out.extend(ids)
    return out


def test_training_matches_naive_reference():
    texts = stories(40, seed=3) + ["aaaa aaa aa a", "abab baba 123 4567 ''s 'll", "  \n\t x"]
    got = BPETokenizer.train(texts, 330)
    assert got.merges == _ref_train(texts, 330)
    assert len(got.merges) == 330 - 256 - 1


def test_tie_break_takes_smallest_pair():
    tok = BPETokenizer.train(["ab cd"], 258)  # pairs (a,b), (' ',c), (c,d) all occur once
    assert tok.merges == [(32, 99)]


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=60))
def test_encode_matches_reference(tok, text):
    assert tok.encode(text) == _ref_encode(tok.merges, text)


# ----------------------------------------------------------------------------------------------
# round trip
# ----------------------------------------------------------------------------------------------
_pieces = st.one_of(
    st.text(max_size=20),
    st.just(EOT),
    st.sampled_from(["<|endoftext", "|>", "<|", "Once upon a time", " the", "'s", "  \n", "\u00a0\u2028\x85", "é",
                     "\U0001f98a", "e\u0301", "12345", "\x00"]),
)


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_pieces, max_size=8))
def test_round_trip_any_text(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.int64)) == text
    assert ids.count(tok.special[EOT]) == text.count(EOT)


def test_special_token_maps_to_its_own_id(tok):
    eot = tok.special[EOT]
    assert eot == tok.vocab_size - 1 == 256 + len(tok.merges)
    ids = tok.encode(f"Mia{EOT}Leo")
    assert ids == tok.encode("Mia") + [eot] + tok.encode("Leo")
    assert tok.encode(EOT) == [eot]
    # a broken-up special token is ordinary text
    assert eot not in tok.encode("<|endoftext|")


def test_segments(tok):
    assert tok.segments("Once upon a time,") == ["Once", " upon", " a", " time", ","]
    assert "".join(tok.segments("Mia the fox lived happily.")) == "Mia the fox lived happily."


# ----------------------------------------------------------------------------------------------
# training, vocabulary bookkeeping
# ----------------------------------------------------------------------------------------------
def test_training_is_deterministic(tok):
    again = BPETokenizer.train(stories(300, seed=0), 400)
    assert again.merges == tok.merges
    assert again.special == tok.special
    other = BPETokenizer.train(stories(300, seed=1), 400)
    assert other.merges != tok.merges


def test_vocab_size_bookkeeping(tok):
    assert tok.vocab_size == 400
    assert len(tok.merges) == 400 - 256 - 1
    assert len(tok.pieces) == 256 + len(tok.merges)
    assert len(set(tok.pieces)) == len(tok.pieces)  # every merge makes a new string
    for i, (a, b) in enumerate(tok.merges):
        assert a < 256 + i and b < 256 + i  # merges only use earlier tokens
        assert tok.pieces[256 + i] == tok.pieces[a] + tok.pieces[b]
    two = BPETokenizer.train(["x y"], 300, special_tokens=("<a>", "<b>"))
    assert two.special == {"<a>": two.vocab_size - 2, "<b>": two.vocab_size - 1}
    none = BPETokenizer.train(["x y"], 300, special_tokens=())
    assert none.special == {} and none.merges == [(32, 121)] and none.vocab_size == 257
    assert none.encode(EOT) == list(EOT.encode())  # no specials: the marker is plain text


def test_training_stops_when_nothing_is_left_to_merge():
    t = BPETokenizer.train(["abc abc"], 1000)
    # pre-tokens "abc" and " abc": (a,b) and (b,c) tie at 2 -> "ab"; then "abc"; then " abc"; then nothing
    assert t.merges == [(97, 98), (256, 99), (32, 257)]
    assert t.vocab_size == 256 + 3 + 1  # fewer than asked for: documented early stop
    assert t.encode("abc abc") == [257, 258]


def test_minimal_vocab_is_bytes_only():
    t = BPETokenizer.train(["hello world"], 257)
    assert t.merges == [] and t.vocab_size == 257
    assert t.encode("hi") == [104, 105]
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["hello"], 256)
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["hello"], 257, special_tokens=("<a>", "<b>"))


def test_frequent_words_become_single_tokens(tok):
    counts = Counter(w for s in stories(300, seed=0) for w in PRETOKEN.findall(s))
    for word, _ in counts.most_common(15):
        assert len(tok.encode(word)) == 1, word
    # and a word the stories never use is split into several tokens
    assert len(tok.encode(" xylophonic")) > 3


def test_train_accepts_a_single_string():
    a = BPETokenizer.train("the cat the cat the dog", 265)
    b = BPETokenizer.train(["the cat the cat the dog"], 265)
    assert a.merges == b.merges


def test_duplicate_special_tokens_stay_in_range():
    try:
        t = BPETokenizer([], ["<a>", "<a>"])
    except ValueError:
        return  # rejecting duplicates is fine too
    assert all(i < t.vocab_size for i in t.special.values())


# ----------------------------------------------------------------------------------------------
# decode / encode_corpus
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-1, 400, 401, 10**9])
def test_decode_rejects_out_of_range(tok, bad):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([65, bad])


def test_decode_of_partial_utf8_replaces_instead_of_raising(tok):
    fox = "\U0001f98a".encode()
    assert tok.decode(list(fox[:2])) == "\ufffd"
    assert tok.decode(list(fox[:2]) + [65]) == "\ufffdA"
    assert tok.decode(list(fox)) == "\U0001f98a"


def test_encode_corpus_joins_with_separator(tok):
    texts = ["Mia the fox.", "", "Leo sang."]
    ids = tok.encode_corpus(texts)
    eot = tok.special[EOT]
    want = tok.encode(texts[0]) + [eot] + [eot] + tok.encode(texts[2]) + [eot]
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert ids.tolist() == want
    assert tok.decode(ids) == EOT.join(texts) + EOT
    with pytest.raises(ValueError, match="separator"):
        tok.encode_corpus(texts, separator="<|pad|>")


# ----------------------------------------------------------------------------------------------
# persistence
# ----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    back = BPETokenizer.load(path)
    assert back.merges == tok.merges
    assert back.special == tok.special
    assert back.vocab_size == tok.vocab_size
    text = stories(3, seed=9)[0] + EOT + "ünïcode"
    assert back.encode(text) == tok.encode(text)
    assert json.loads(path.read_text())["format"] == "lab-bpe-1"
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "lab-bpe-2", "merges": [], "special_tokens": []}',
        '{"merges": [], "special_tokens": []}',
        '{"format": "lab-bpe-1", "merges": [[300, 1]], "special_tokens": []}',
    ],
)
def test_from_json_rejects_wrong_content(text):
    with pytest.raises(ValueError):
        BPETokenizer.from_json(text)


@pytest.mark.parametrize("text", ["[]", "null", '"lab-bpe-1"', "3"])
def test_from_json_rejects_non_object(text):
    with pytest.raises(ValueError):
        BPETokenizer.from_json(text)


# ----------------------------------------------------------------------------------------------
# the stories_tokenizer cache
# ----------------------------------------------------------------------------------------------
SMALL = dict(vocab_size=300, n_stories=60, seed=0)


def _cache_path(tmp_path):
    return tmp_path / "tokenizers" / "stories-v300-n60-s0.json"


def test_stories_tokenizer_builds_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DATA", str(tmp_path))
    first = stories_tokenizer(**SMALL)
    path = _cache_path(tmp_path)
    assert path.exists()
    assert first.merges == BPETokenizer.train(stories(60, seed=0), 300).merges

    def no_training(*a, **k):
        raise AssertionError("a warm cache must not retrain")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    second = stories_tokenizer(**SMALL)
    assert second.merges == first.merges and second.special == first.special
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _corruptions():
    good = BPETokenizer.train(stories(60, seed=0), 300).to_json()
    return {
        "empty": b"",
        "garbage": b"this is not json",
        "truncated": good[: len(good) // 2].encode(),
        "bad-utf8": b"\xff\xfe\x00{",
        "wrong-format": b'{"format": "something-else"}',
        "missing-key": b'{"format": "lab-bpe-1"}',
        "bad-merge": b'{"format": "lab-bpe-1", "merges": [[999, 1]], "special_tokens": []}',
        "merge-not-pair": b'{"format": "lab-bpe-1", "merges": [[1, 2, 3]], "special_tokens": []}',
        "json-array": b"[]",
        "json-null": b"null",
    }


_CORRUPT = _corruptions()


@pytest.mark.parametrize("payload", list(_CORRUPT.values()), ids=list(_CORRUPT))
def test_corrupt_cache_warns_and_is_rebuilt(tmp_path, monkeypatch, payload):
    monkeypatch.setenv("LAB_DATA", str(tmp_path))
    path = _cache_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(payload)
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = stories_tokenizer(**SMALL)
    assert rebuilt.vocab_size == 300
    reloaded = BPETokenizer.load(path)  # the rebuilt file is valid ...
    assert reloaded.merges == rebuilt.merges
    assert reloaded.merges == BPETokenizer.train(stories(60, seed=0), 300).merges  # ... and the right one


def test_cache_key_includes_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DATA", str(tmp_path))
    a = stories_tokenizer(300, n_stories=60, seed=0)
    b = stories_tokenizer(300, n_stories=60, seed=1)
    c = stories_tokenizer(290, n_stories=60, seed=0)
    assert a.merges != b.merges
    assert c.vocab_size == 290
    assert len(list((tmp_path / "tokenizers").iterdir())) == 3


def test_module_uses_data_dir_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DATA", str(tmp_path / "elsewhere"))
    stories_tokenizer(**SMALL)
    assert (tmp_path / "elsewhere" / "tokenizers").is_dir()
    assert tk.data_dir() == tmp_path / "elsewhere"
