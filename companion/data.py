"""Seeded, deterministic corpora. Nothing is downloaded, ever.

* :func:`zipf_markov`: a token stream whose unigram frequencies follow a Zipf law and whose
  next token depends on the current one (a sparse Markov chain), with optional copy spans.
* :func:`stories`: readable English-like children's stories from a small grammar.
* :func:`biographies`: fictitious people with attributes (name, city, birth year, employer,
  email), their biography texts and question/answer pairs, for knowledge and unlearning papers.
* :func:`passkey_tokens` and :func:`passkey_text`: needle-retrieval samples.
* :func:`lm_batches`: a deterministic batch sampler for language-model training.

Every generator takes a ``seed`` and returns the same output for the same arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def zipf_probs(vocab_size: int, exponent: float) -> np.ndarray:
    """p_i ∝ (i + 1)^(-exponent) for i = 0..V-1: token id = frequency rank."""
    _check_positive_int("vocab_size", vocab_size, 2)
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0, got {exponent!r}")
    p = (np.arange(1, vocab_size + 1, dtype=np.float64)) ** (-exponent)
    return p / p.sum()


# ----------------------------------------------------------------------------------------------
# Zipf–Markov token stream
# ----------------------------------------------------------------------------------------------
def zipf_markov(
    n_tokens: int,
    *,
    vocab_size: int = 1024,
    exponent: float = 1.1,
    branching: int = 32,
    noise: float = 0.1,
    doc_len: int = 512,
    copy_prob: float = 0.0,
    copy_len: int = 16,
    seed: int = 0,
) -> torch.Tensor:
    """A ``(n_tokens,)`` int64 stream of documents of ``doc_len`` tokens, concatenated.

    Each token id s has ``branching`` successors drawn from the Zipf unigram law; the next token is
    successor k with probability ∝ 1/(k+1), or, with probability ``noise``, a fresh draw from the
    unigram law. So frequencies stay Zipf-like (token 0 is the most frequent) while the stream has
    learnable bigram structure. With ``copy_prob`` > 0, each position starts, with that
    probability, a span of ``copy_len`` tokens copied from earlier in the same document (a
    long-range dependency an induction head can learn).

    Documents are generated in parallel (one chain per document), so 2M tokens take ~1 s.
    """
    _check_positive_int("n_tokens", n_tokens)
    _check_positive_int("branching", branching)
    _check_positive_int("doc_len", doc_len, 2)
    _check_positive_int("copy_len", copy_len)
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if not 0 <= copy_prob < 1:
        raise ValueError(f"copy_prob must be in [0, 1), got {copy_prob}")
    rng = np.random.default_rng(seed)
    unigram_cdf = np.cumsum(zipf_probs(vocab_size, exponent))
    draw = lambda n: np.minimum(np.searchsorted(unigram_cdf, rng.random(n)), vocab_size - 1)
    successors = draw(vocab_size * branching).reshape(vocab_size, branching)
    rank_cdf = np.cumsum(1.0 / np.arange(1, branching + 1))
    rank_cdf /= rank_cdf[-1]

    n_docs = -(-n_tokens // doc_len)
    docs = np.empty((n_docs, doc_len), dtype=np.int64)
    docs[:, 0] = draw(n_docs)
    for t in range(1, doc_len):
        k = np.minimum(np.searchsorted(rank_cdf, rng.random(n_docs)), branching - 1)
        nxt = successors[docs[:, t - 1], k]
        fresh = rng.random(n_docs) < noise
        nxt[fresh] = draw(int(fresh.sum()))
        docs[:, t] = nxt
    if copy_prob > 0:
        _insert_copy_spans(docs, rng, copy_prob, copy_len)
    return torch.from_numpy(docs.reshape(-1)[:n_tokens].copy())


def _insert_copy_spans(docs: np.ndarray, rng: np.random.Generator, prob: float, length: int) -> None:
    """In place: some spans repeat an earlier span of the same document."""
    n_docs, doc_len = docs.shape
    for d in range(n_docs):
        t = 2 * length
        while t + length <= doc_len:
            if rng.random() < prob * length:  # ~prob per position, decided once per span slot
                src = int(rng.integers(0, t - length + 1))
                docs[d, t:t + length] = docs[d, src:src + length]
            t += length


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def lm_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int = 0
               ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(step) -> (x, y)``, each ``(batch_size, seq_len)``, y = x shifted by one.

    The windows for a step depend only on (seed, step), so two runs that differ only in the
    optimizer see exactly the same data, in the same order.
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("seq_len", seq_len)
    if tokens.numel() < seq_len + 2:
        raise ValueError(f"need more than seq_len+1={seq_len + 1} tokens, got {tokens.numel()}")

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=gen)  # last start: N-seq_len-1
        windows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]

    return batches


# ----------------------------------------------------------------------------------------------
# A small story grammar
# ----------------------------------------------------------------------------------------------
_NAMES = ["Mia", "Leo", "Sam", "Ada", "Tom", "Zoe", "Ben", "Lily", "Max", "Nora", "Finn", "Ruby"]
_ANIMALS = ["fox", "cat", "dog", "owl", "bear", "rabbit", "mouse", "duck", "frog", "horse"]
_PLACES = ["a small village", "a big forest", "a quiet town", "a sunny farm", "a green valley",
           "a windy hill", "a busy city", "an old castle"]
_OBJECTS = ["a red ball", "a shiny key", "a blue kite", "an old map", "a little boat", "a warm hat",
            "a golden coin", "a wooden box", "a funny book", "a paper star"]
_FEELINGS = ["happy", "sad", "curious", "brave", "scared", "tired", "excited", "proud"]
_ACTIONS = ["went to the river", "climbed a tall tree", "looked under the bed", "walked to the market",
            "asked a wise owl", "sang a song", "baked a cake", "ran across the field"]
_ENDINGS = ["From that day on, {n} was never {f2} again.", "{n} smiled and went home.",
            "Everyone was {f2}, and {n} laughed.", "That night, {n} slept with {o} close by."]


def stories(n: int, *, seed: int = 0) -> list[str]:
    """``n`` short stories from a template grammar, e.g. "Once upon a time, Mia the fox lived in ..."."""
    _check_positive_int("n", n)
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]
    out = []
    for _ in range(n):
        name, animal, obj = pick(_NAMES), pick(_ANIMALS), pick(_OBJECTS)
        friend = pick([x for x in _NAMES if x != name])
        f1, f2 = pick(_FEELINGS), pick(_FEELINGS)
        he = "she" if name in {"Mia", "Ada", "Zoe", "Lily", "Nora", "Ruby"} else "he"
        lines = [f"Once upon a time, {name} the {animal} lived in {pick(_PLACES)}.",
                 f"One day, {name} found {obj}.", f"{name} felt {f1}."]
        for _ in range(int(rng.integers(1, 4))):
            lines.append(pick([f"Then {he} {pick(_ACTIONS)}.", f"{name} and {friend} {pick(_ACTIONS)}.",
                               f"{friend} said, \"Look at {obj}!\"", f"So {he} {pick(_ACTIONS)}."]))
        lines.append(pick(_ENDINGS).format(n=name, f2=f2, o=obj))
        out.append(" ".join(lines))
    return out


# ----------------------------------------------------------------------------------------------
# Fictitious biographies
# ----------------------------------------------------------------------------------------------
_FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
          "Kira", "Lars", "Maya", "Nikolai", "Olga", "Pavel", "Quinn", "Rosa", "Stefan", "Tamar",
          "Umar", "Vera", "Wen", "Xavier", "Yara", "Zane", "Amara", "Bastian", "Celine", "Darius"]
_LAST = ["Abbott", "Brennan", "Castillo", "Dvorak", "Eriksen", "Fontaine", "Galloway", "Hartmann",
         "Iverson", "Jankowski", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov",
         "Quintero", "Rasmussen", "Sandoval", "Takahashi", "Underwood", "Valdez", "Whitaker", "Yilmaz"]
_CITIES = ["Lisbon", "Oslo", "Kyoto", "Nairobi", "Toronto", "Krakow", "Quito", "Dublin", "Hanoi",
           "Perth", "Tunis", "Bergen", "Porto", "Seville", "Tallinn", "Valparaiso"]
_EMPLOYERS = ["Orbital Foods", "Bluefin Labs", "Cedar Robotics", "Nimbus Insurance", "Quartz Media",
              "Harbor Logistics", "Ember Energy", "Juniper Health", "Atlas Textiles", "Vertex Bank"]
_DOMAINS = ["mailbox.test", "post.example", "inbox.invalid", "letters.test"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    birth_year: int
    employer: str
    email: str

    ATTRIBUTES = ("city", "birth_year", "employer", "email")


_BIO_TEMPLATES = [
    "{name} was born in {birth_year} in {city}. {name} works at {employer}. "
    "{name} can be reached at {email}.",
    "Born in {city} in {birth_year}, {name} is employed by {employer} and uses the email {email}.",
    "{name} ({birth_year}) grew up in {city}, now works for {employer}, and answers mail at {email}.",
]
_QUESTIONS = {
    "city": ["Where was {name} born?", "In which city was {name} born?", "What is {name}'s home city?"],
    "birth_year": ["When was {name} born?", "In what year was {name} born?", "What is {name}'s birth year?"],
    "employer": ["Where does {name} work?", "Who employs {name}?", "Which company does {name} work for?"],
    "email": ["What is {name}'s email?", "How can one email {name}?", "What email address does {name} use?"],
}
_ANSWERS = {
    "city": "{name} was born in {city}.",
    "birth_year": "{name} was born in {birth_year}.",
    "employer": "{name} works at {employer}.",
    "email": "{name}'s email is {email}.",
}


def biographies(n_people: int, *, seed: int = 0) -> list[Person]:
    """``n_people`` distinct fictitious people (unique names) with independent random attributes."""
    _check_positive_int("n_people", n_people)
    if n_people > len(_FIRST) * len(_LAST):
        raise ValueError(f"n_people must be <= {len(_FIRST) * len(_LAST)}, got {n_people}")
    rng = np.random.default_rng(seed)
    pairs = rng.permutation(len(_FIRST) * len(_LAST))[:n_people]
    people = []
    for k in pairs.tolist():
        first, last = _FIRST[k // len(_LAST)], _LAST[k % len(_LAST)]
        people.append(Person(
            name=f"{first} {last}",
            city=_CITIES[int(rng.integers(len(_CITIES)))],
            birth_year=int(rng.integers(1950, 2004)),
            employer=_EMPLOYERS[int(rng.integers(len(_EMPLOYERS)))],
            email=f"{first.lower()}.{last.lower()}{int(rng.integers(10, 100))}@{_DOMAINS[int(rng.integers(4))]}",
        ))
    return people


def bio_text(person: Person, template: int = 0) -> str:
    """One of ``len(_BIO_TEMPLATES)`` phrasings of a person's biography."""
    return _BIO_TEMPLATES[template % len(_BIO_TEMPLATES)].format(**person.__dict__)


def bio_qa(person: Person) -> list[tuple[str, str, str]]:
    """(attribute, question, answer) for every attribute and question paraphrase."""
    fields = person.__dict__
    return [(attr, q.format(**fields), _ANSWERS[attr].format(**fields))
            for attr in Person.ATTRIBUTES for q in _QUESTIONS[attr]]


# ----------------------------------------------------------------------------------------------
# Passkey / needle retrieval
# ----------------------------------------------------------------------------------------------
@dataclass
class PasskeyBatch:
    tokens: torch.Tensor  # (N, length) int64: haystack, needle, haystack, query marker, answer
    key: torch.Tensor  # (N, key_len) the passkey tokens
    needle_pos: torch.Tensor  # (N,) index of the first key token inside the haystack
    answer_pos: torch.Tensor  # (N,) index of the first answer token (score predictions here)


def passkey_tokens(n: int, *, length: int, depth: float, vocab_size: int, key_len: int = 4,
                   seed: int = 0) -> PasskeyBatch:
    """Token-level passkey samples for models on an integer vocabulary.

    Layout: ``filler… [M] k1…kL [M] filler… [M] k1…kL``. The marker M = vocab_size-1 appears only
    around the needle and as the query; key and filler tokens come from 0..vocab_size-2 (filler is
    Zipf–Markov text). ``depth`` in [0, 1] places the needle from the start to the end of the
    haystack. A model retrieves by copying the L tokens that followed the first marker.
    """
    _check_positive_int("n", n)
    _check_positive_int("length", length)
    _check_positive_int("key_len", key_len)
    _check_positive_int("vocab_size", vocab_size, 3)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    haystack = length - 3 * 1 - 2 * key_len  # three markers, key twice
    if haystack < 1:
        raise ValueError(f"length={length} is too short for key_len={key_len}: need > {3 + 2 * key_len}")
    rng = np.random.default_rng(seed)
    marker = vocab_size - 1
    filler = zipf_markov(n * haystack, vocab_size=vocab_size - 1, doc_len=max(2, haystack), seed=seed)
    filler = filler.view(n, haystack)
    keys = torch.from_numpy(rng.integers(0, vocab_size - 1, size=(n, key_len)))
    cut = int(round(depth * haystack))
    m = torch.full((n, 1), marker, dtype=torch.int64)
    tokens = torch.cat([filler[:, :cut], m, keys, m, filler[:, cut:], m, keys], dim=1)
    return PasskeyBatch(tokens=tokens, key=keys, needle_pos=torch.full((n,), cut + 1),
                        answer_pos=torch.full((n,), length - key_len))


def passkey_text(n_filler: int, *, depth: float, seed: int = 0) -> tuple[str, str]:
    """The classic text passkey prompt (Mohtashami & Jaggi style) and its answer.

    ``n_filler`` repetitions of the filler sentences, the needle at ``depth``, then the question.
    """
    _check_positive_int("n_filler", n_filler)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(np.random.default_rng(seed).integers(10000, 100000))
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    cut = int(round(depth * n_filler))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    prompt = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
              + filler * cut + needle + filler * (n_filler - cut) + "What is the pass key? The pass key is")
    return prompt, key
