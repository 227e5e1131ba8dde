"""A byte-level BPE tokenizer, trained on the lab's generated text.

Byte level means every string round-trips: the base vocabulary is the 256 byte values, and each
merge adds one token made of two existing ones. Training (Sennrich et al. 2016, GPT-2's byte
variant):

1. split text into pre-tokens (words with their leading space, numbers, punctuation, spaces);
2. count adjacent token pairs over all pre-tokens, weighted by how often each pre-token occurs;
3. merge the most frequent pair everywhere (ties: the smallest pair), record it, repeat.

Step 3 updates pair counts incrementally, touching only the words that contain the merged pair,
so training a 1k vocabulary on the stories takes about a second. Encoding applies merges in the
order they were learned. ``segments(text)`` shows how a string is cut, for the papers on
tokenization.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from companion.io import atomic_write_text
from companion.paths import data_dir

PRETOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class BPETokenizer:
    """Token ids: 0..255 bytes, then one id per merge, then the special tokens."""

    def __init__(self, merges: list[tuple[int, int]], special_tokens: Iterable[str] = ()):
        self.merges = [tuple(m) for m in merges]
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}
        self.pieces: list[bytes] = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            if not (a < len(self.pieces) and b < len(self.pieces)):
                raise ValueError(f"merge ({a}, {b}) refers to a token that does not exist yet")
            self.pieces.append(self.pieces[a] + self.pieces[b])
        special_tokens = list(special_tokens)
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens must be distinct, got {special_tokens}")
        self.special = {tok: len(self.pieces) + i for i, tok in enumerate(special_tokens)}
        self._special_re = (re.compile("(" + "|".join(map(re.escape, self.special)) + ")")
                            if self.special else None)
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces) + len(self.special)

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: str | Iterable[str], vocab_size: int,
              special_tokens: Iterable[str] = ("<|endoftext|>",)) -> BPETokenizer:
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size must be >= {256 + len(special_tokens)} (bytes + specials), "
                             f"got {vocab_size}")
        if isinstance(texts, str):
            texts = [texts]
        counts = Counter(tok for text in texts for tok in PRETOKEN.findall(text))
        words = [list(w.encode("utf-8")) for w in counts]
        freqs = list(counts.values())
        pair_count: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for wi, w in enumerate(words):
            for pair in zip(w, w[1:]):
                pair_count[pair] += freqs[wi]
                where[pair].add(wi)

        merges = []
        for new_id in range(256, 256 + n_merges):
            if not pair_count:
                break  # every pre-token is a single token already
            best = max(pair_count, key=lambda p: (pair_count[p], -p[0], -p[1]))
            merges.append(best)
            for wi in list(where[best]):
                w, f = words[wi], freqs[wi]
                for pair in zip(w, w[1:]):  # forget this word's old pairs ...
                    pair_count[pair] -= f
                    if pair_count[pair] <= 0:
                        del pair_count[pair]
                    where[pair].discard(wi)
                words[wi] = w = _merge(w, best, new_id)
                for pair in zip(w, w[1:]):  # ... and count its new ones
                    pair_count[pair] += f
                    where[pair].add(wi)
        return cls(merges, special_tokens)

    # -- encoding / decoding ---------------------------------------------------------------------
    def _encode_word(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        ids = list(word.encode("utf-8"))
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, 256 + self.ranks[pair])
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``; special tokens in the text map to their own ids."""
        out: list[int] = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for part in parts:
            if part in self.special:
                out.append(self.special[part])
            else:
                for word in PRETOKEN.findall(part):
                    out.extend(self._encode_word(word))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        inverse = {i: tok.encode("utf-8") for tok, i in self.special.items()}
        chunks = []
        for i in ids:
            i = int(i)
            if 0 <= i < len(self.pieces):
                chunks.append(self.pieces[i])
            elif i in inverse:
                chunks.append(inverse[i])
            else:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return b"".join(chunks).decode("utf-8", errors="replace")

    def encode_corpus(self, texts: Iterable[str], separator: str = "<|endoftext|>") -> torch.Tensor:
        """One flat ``(N,)`` int64 tensor: the texts encoded and joined by the separator token."""
        if separator not in self.special:
            raise ValueError(f"separator {separator!r} is not a special token of this tokenizer")
        sep = self.special[separator]
        ids: list[int] = []
        for text in texts:
            ids.extend(self.encode(text))
            ids.append(sep)
        return torch.tensor(ids, dtype=torch.int64)

    def segments(self, text: str) -> list[str]:
        """How ``text`` is cut into tokens, e.g. ['Once', ' upon', ' a', ' time', ',']."""
        return [self.decode([i]) for i in self.encode(text)]

    # -- persistence -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format": "lab-bpe-1", "merges": self.merges, "special_tokens": list(self.special)})

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("format") != "lab-bpe-1":
            raise ValueError(f"not a lab BPE file (got {type(obj).__name__} "
                             f"{obj.get('format') if isinstance(obj, dict) else ''!r})")
        return cls([tuple(m) for m in obj["merges"]], obj["special_tokens"])

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        return cls.from_json(Path(path).read_text())


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def cached_tokenizer(name: str, build: Callable[[], BPETokenizer]) -> BPETokenizer:
    """Load ``data/tokenizers/<name>.json``, or ``build()`` it and save it there (atomically).

    A cache file that does not parse is rebuilt with a warning. ``name`` must say everything
    the tokenizer depends on (vocabulary size, corpus, seed), because it is the only cache key.
    """
    path = data_dir() / "tokenizers" / f"{name}.json"
    if path.exists():
        try:
            return BPETokenizer.load(path)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            warnings.warn(f"tokenizer cache {path} is corrupt ({exc}); rebuilding", stacklevel=3)
    tok = build()
    tok.save(path)
    return tok


def stories_tokenizer(vocab_size: int = 512, *, n_stories: int = 4000, seed: int = 0) -> BPETokenizer:
    """A BPE trained on :func:`companion.data.stories`, cached under ``data/tokenizers/``."""
    from companion.data import stories

    return cached_tokenizer(f"stories-v{vocab_size}-n{n_stories}-s{seed}",
                            lambda: BPETokenizer.train(stories(n_stories, seed=seed), vocab_size))
