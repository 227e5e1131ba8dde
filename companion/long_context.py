"""Long-context toy tools: score many RoPE scalings in one folded forward, synthetic long-range text,
passkeys, and the perplexity / passkey sweeps that context-extension notebooks plot.

**Scoring a population in one pass.** To compare P rescalings (a LongRoPE generation, or PI/NTK/
YaRN side by side) we fold them into the batch axis: row block p of a (P·B, T) batch belongs to
scaling p, and :class:`PopulationAttention` rotates that block's queries and keys with scaling p's
λ, n̂ and temperature through ``kernels.rope.run``. Per-layer pre-RoPE q/k cannot be computed once
and reused, because every layer after the first sees inputs that already depend on the scaling.
Layer 0 is the exception: its input is the token embedding, identical for every scaling, so it
projects q/k/v once for B rows and calls the kernel with a ``(P, d/2)`` factor matrix, the
kernel's population axis, which returns all P rotated copies in one call. Deeper layers call the
kernel once per block. Softmax attention, MLPs and the loss then run once on the folded batch.
Outside a ``population(...)`` block the layer is exactly :class:`companion.model.Attention` (same
parameters, same code), so training and the single-scaling reference use plain torch autograd.

Shapes: P scalings, B (or N) sequences, T positions, d head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from companion.model import Attention, ModelConfig, TinyLM
from companion.rope_scaling import Scaling


@dataclass
class Population:
    """The candidates of one folded forward: P scalings for rows (p·B … p·B + B − 1), positions (T,)."""

    scalings: list[Scaling]
    positions: torch.Tensor
    backend: str = "auto"


class PopulationAttention(Attention):
    """:class:`companion.model.Attention` that, inside :func:`population`, rotates each candidate's
    rows with its own (λ, n̂, mscale) through ``kernels.rope``. Same parameters as ``Attention``."""

    def __init__(self, cfg: ModelConfig, layer_index: int = 0):
        super().__init__(cfg, layer_index)
        self.layer_index, self.rope_base = layer_index, cfg.rope_base
        self.population: Population | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), or (P·B, T, D) inside ``population(...)``; cos/sin: (T, d) -> (same shape as x)."""
        pop = self.population
        if pop is None:
            return super().forward(x, cos, sin)
        P = len(pop.scalings)
        B = x.shape[0] // P
        if self.layer_index == 0:  # identical input for every candidate: project once, rotate P ways
            q, k, v = self._project(x[:B])
            q, k = self._rotate_shared(q, pop), self._rotate_shared(k, pop)  # (P, B, heads, T, d)
            v = v.expand(P, *v.shape)
        else:
            q, k, v = (rearrange(t, "(p b) h t d -> p b h t d", p=P) for t in self._project(x))
            q, k = self._rotate_each(q, pop), self._rotate_each(k, pop)
        q, k, v = (rearrange(t, "p b h t d -> (p b) h t d") for t in (q, k, v))
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))

    def _project(self, x):
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.k_proj(x), "b t (k d) -> b k t d", k=self.n_kv_heads)
        v = rearrange(self.v_proj(x), "b t (k d) -> b k t d", k=self.n_kv_heads)
        return q, k, v

    @staticmethod
    def _backend(x: torch.Tensor, pop: Population) -> str:
        if pop.backend != "auto":
            return pop.backend
        return "cuda" if x.is_cuda else "cpu"

    def _rotate_shared(self, x: torch.Tensor, pop: Population) -> torch.Tensor:
        """x (B, h, T, d) -> (P, B, h, T, d): one kernel call per distinct (n̂, mscale), with the
        kernel's population axis carrying every candidate of that group."""
        from kernels import rope

        out = torch.empty((len(pop.scalings),) + tuple(x.shape), dtype=x.dtype, device=x.device)
        groups: dict[tuple[int, float], list[int]] = {}
        for p, s in enumerate(pop.scalings):
            groups.setdefault((s.start, s.mscale), []).append(p)
        for (start, mscale), members in groups.items():
            lam = torch.stack([pop.scalings[p].factors for p in members]).to(x.dtype)
            out[members] = rope.run(x, pop.positions, factors=lam, start=start, mscale=mscale,
                                    base=self.rope_base, backend=self._backend(x, pop)).to(x.device)
        return out

    def _rotate_each(self, x: torch.Tensor, pop: Population) -> torch.Tensor:
        """x (P, B, h, T, d) -> same: block p rotated with candidate p's scaling (one call each)."""
        from kernels import rope

        return torch.stack([
            rope.run(x[p], pop.positions, factors=s.factors.to(x.dtype), start=s.start, mscale=s.mscale,
                     base=self.rope_base, backend=self._backend(x, pop)).to(x.device)
            for p, s in enumerate(pop.scalings)])


def population_model(cfg: ModelConfig) -> TinyLM:
    """A :class:`TinyLM` whose attention layers can score a population (state dict = plain TinyLM's)."""

    return TinyLM(cfg, attention=PopulationAttention)


@contextmanager
def population(model: TinyLM, scalings: Sequence[Scaling], positions: torch.Tensor, backend: str = "auto"):
    """Inside this block, ``model`` expects a (P·B, T) batch, row block p scored with ``scalings[p]``."""
    layers = [b.attn for b in model.blocks]
    if not all(isinstance(a, PopulationAttention) for a in layers):
        raise ValueError("model must be built by population_model(cfg) to score a population")
    if not scalings:
        raise ValueError("scalings must hold at least one Scaling")
    pop = Population(list(scalings), positions, backend)
    for a in layers:
        a.population = pop
    try:
        yield pop
    finally:
        for a in layers:
            a.population = None


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, T, V), (N, T) -> (N, T) per-token negative log-likelihood."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@torch.no_grad()
def population_nll(model: TinyLM, docs: torch.Tensor, scalings: Sequence[Scaling], *, max_rows: int = 32,
                   backend: str = "auto") -> torch.Tensor:
    """Mean next-token NLL of every scaling on ``docs (N, T+1)``: ``(P,)`` float64.

    Candidates and documents are folded into batches of at most ``max_rows`` sequences
    (candidates × documents), each one forward through :func:`population`.
    """
    if docs.ndim != 2 or docs.shape[1] < 2:
        raise ValueError(f"docs must be (N, T+1) token ids with T >= 1, got shape {tuple(docs.shape)}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    device = next(model.parameters()).device
    x, y = docs[:, :-1].to(device), docs[:, 1:].to(device)
    N, T = x.shape
    positions = torch.arange(T, device=device)
    per_cand = max(1, max_rows // N)  # candidates per forward when all docs fit
    doc_chunk = min(N, max_rows)
    total = torch.zeros(len(scalings), dtype=torch.float64)
    for c0 in range(0, len(scalings), per_cand):
        chunk = list(scalings[c0:c0 + per_cand])
        for d0 in range(0, N, doc_chunk):
            xb, yb = x[d0:d0 + doc_chunk], y[d0:d0 + doc_chunk]
            P, n = len(chunk), xb.shape[0]
            with population(model, chunk, positions, backend):
                logits = model(xb.repeat(P, 1)).logits
            nll = _token_nll(logits, yb.repeat(P, 1)).view(P, n, T).sum(dim=(1, 2))
            total[c0:c0 + P] += nll.double().cpu()
    return total / (N * T)


@torch.no_grad()
def reference_nll(model: TinyLM, docs: torch.Tensor, scaling: Scaling) -> float:
    """The same NLL, one candidate, through the plain torch path (``model.rotary.set_scaling``)."""
    device = next(model.parameters()).device
    old = (model.rotary.factors, model.rotary.start, model.rotary.mscale)
    scaling.apply(model)
    try:
        out = model(docs[:, :-1].to(device), docs[:, 1:].to(device))
    finally:
        model.rotary.set_scaling(*old)
    return float(out.loss)


@torch.no_grad()
def population_passkey(model: TinyLM, tokens: torch.Tensor, key_len: int, scalings: Sequence[Scaling], *,
                       max_rows: int = 32, backend: str = "auto") -> torch.Tensor:
    """Passkey accuracy of every scaling: ``(P,)``, the fraction of samples whose ``key_len`` answer
    tokens (the last ones of ``tokens (N, L)``) are all the model's argmax, given the prefix."""
    device = next(model.parameters()).device
    x = tokens[:, :-1].to(device)
    answer = tokens[:, -key_len:].to(device)
    N, T = x.shape
    positions = torch.arange(T, device=device)
    per_cand = max(1, max_rows // N)
    doc_chunk = min(N, max_rows)
    correct = torch.zeros(len(scalings), dtype=torch.float64)
    for c0 in range(0, len(scalings), per_cand):
        chunk = list(scalings[c0:c0 + per_cand])
        for d0 in range(0, N, doc_chunk):
            xb, ab = x[d0:d0 + doc_chunk], answer[d0:d0 + doc_chunk]
            P, n = len(chunk), xb.shape[0]
            with population(model, chunk, positions, backend):
                pred = model(xb.repeat(P, 1)).logits[:, -key_len:].argmax(-1).view(P, n, key_len)
            correct[c0:c0 + P] += (pred == ab[None]).all(-1).sum(-1).double().cpu()
    return correct / N



def markov_text(n_docs: int, doc_len: int, *, vocab_size: int, branching: int = 16, noise: float = 0.1,
                skip: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``(n_docs, doc_len)`` tokens from a Zipf–Markov chain with a skip-bigram: token t follows
    token t−1 (a successor table S1) or, with probability ``skip``, token t−2 (a table S2).

    Each token has ``branching`` successors in each table, drawn from a Zipf unigram law and chosen
    with probability ∝ 1/(rank+1); with probability ``noise`` the next token is a fresh unigram
    draw. ``skip = 0`` is the first-order chain of ``companion.data.zipf_markov``. With ``skip > 0``
    the model needs an attention head at distance 2, a pattern that lives in the fast RoPE dims:
    exactly what Position Interpolation blurs.
    """
    from companion.data import zipf_probs

    if n_docs < 1 or doc_len < 3 or branching < 1 or not 0 <= noise <= 1 or not 0 <= skip <= 1:
        raise ValueError(f"need n_docs >= 1, doc_len >= 3, branching >= 1, noise and skip in [0, 1]; got "
                         f"{n_docs}, {doc_len}, {branching}, {noise}, {skip}")
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(zipf_probs(vocab_size, 1.1))
    draw = lambda n: np.minimum(np.searchsorted(cdf, rng.random(n)), vocab_size - 1)
    tables = draw(2 * vocab_size * branching).reshape(2, vocab_size, branching)  # S1, S2
    rank_cdf = np.cumsum(1.0 / np.arange(1, branching + 1))
    rank_cdf /= rank_cdf[-1]
    docs = np.empty((n_docs, doc_len), dtype=np.int64)
    docs[:, :2] = draw(2 * n_docs).reshape(n_docs, 2)
    for t in range(2, doc_len):
        use_skip = rng.random(n_docs) < skip
        prev = np.where(use_skip, docs[:, t - 2], docs[:, t - 1])
        k = np.minimum(np.searchsorted(rank_cdf, rng.random(n_docs)), branching - 1)
        nxt = tables[use_skip.astype(int), prev, k]
        fresh = rng.random(n_docs) < noise
        nxt[fresh] = draw(int(fresh.sum()))
        docs[:, t] = nxt
    return torch.from_numpy(docs)


def insert_copies(docs: torch.Tensor, *, prob: float, length: int, seed: int) -> torch.Tensor:
    """A copy of ``docs (N, T)`` in which, at every slot t = 2·length, 3·length, … (with probability
    ``prob``), the next ``length`` tokens repeat a span that starts anywhere earlier in the same row.

    Unlike ``zipf_markov(copy_prob=…)`` we apply this per row, so that training rows of
    ``train_len + 1`` tokens hold every copy's source, while long evaluation documents copy from
    up to 1024 tokens back: the model learns to copy, and reading far back is what a longer
    context is good for.
    """
    if not 0 <= prob <= 1 or length < 1:
        raise ValueError(f"need prob in [0, 1] and length >= 1, got prob={prob}, length={length}")
    out = docs.clone()
    N, T = out.shape
    rng = np.random.default_rng(seed)
    rows = torch.arange(N)
    for t in range(2 * length, T - length + 1, length):
        pick = torch.from_numpy(rng.random(N) < prob)
        src = torch.from_numpy(rng.integers(0, t - length + 1, size=N))
        span = src[:, None] + torch.arange(length)  # (N, length)
        out[pick, t:t + length] = out[rows[:, None], span][pick]
    return out


def passkey_samples(filler: torch.Tensor, n: int, length: int, depth: float, *, vocab_size: int, key_len: int,
                    seed: int) -> torch.Tensor:
    """``(n, length)`` passkey sequences: ``text… M k_1…k_L text… M k_1…k_L``.

    The haystack is real corpus text (random windows of the 1-D ``filler`` stream), the key L =
    ``key_len`` random text tokens, and the marker M = ``vocab_size − 1`` occurs only before the
    needle and as the query, so retrieval is one induction step: find the earlier M, copy what
    followed it. (``companion.data.passkey_tokens`` also closes the needle with a second M, which
    makes "what followed M" ambiguous for a 2-layer model; its haystack is also a different Markov
    chain for every seed.) ``depth`` ∈ [0, 1] places the needle from the start to the end.
    """
    hay = length - 2 - 2 * key_len
    if key_len < 1 or hay < 1 or not 0 <= depth <= 1:
        raise ValueError(f"need key_len >= 1, length > 2 + 2·key_len and depth in [0, 1]; got key_len={key_len}, "
                         f"length={length}, depth={depth}")
    if filler.ndim != 1 or filler.numel() <= hay:
        raise ValueError(f"filler must be a 1-D token stream longer than {hay}, got shape {tuple(filler.shape)}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, filler.numel() - hay, (n,), generator=gen)
    text = torch.stack([filler[s:s + hay] for s in starts.tolist()])
    key = torch.randint(0, vocab_size - 1, (n, key_len), generator=gen)
    marker = torch.full((n, 1), vocab_size - 1, dtype=torch.long)
    cut = int(round(depth * hay))
    return torch.cat([text[:, :cut], marker, key, text[:, cut:], marker, key], dim=1)


def perplexity_curves(model: TinyLM, scalings: dict[str, Scaling], docs: torch.Tensor, lengths: Sequence[int], *,
                      backend: str = "auto") -> dict[str, np.ndarray]:
    """Perplexity of every scaling at every length on ``docs`` cut to that length: name -> ``(len(lengths),)``.

    All scalings of one length are scored together (one folded population)."""
    names = list(scalings)
    table = np.stack([population_nll(model, docs[:, :L + 1], [scalings[n] for n in names], backend=backend)
                      .exp().numpy() for L in lengths], axis=1)
    return {n: table[i] for i, n in enumerate(names)}


def passkey_grid(model: TinyLM, filler: torch.Tensor, scalings: dict[str, Scaling], lengths: Sequence[int],
                 depths: Sequence[float], *, n: int, vocab_size: int, key_len: int, seed: int = 0,
                 backend: str = "auto") -> dict[str, np.ndarray]:
    """Passkey accuracy: name -> ``(len(lengths), len(depths))``; the same samples for every scaling."""
    names = list(scalings)
    grid = np.zeros((len(names), len(lengths), len(depths)))
    for a, L in enumerate(lengths):
        for b, d in enumerate(depths):
            tokens = passkey_samples(filler, n, L, float(d), vocab_size=vocab_size, key_len=key_len,
                                     seed=seed * 7919 + 31 * a + b)
            grid[:, a, b] = population_passkey(model, tokens, key_len, [scalings[m] for m in names],
                                               backend=backend).numpy()
    return {m: grid[i] for i, m in enumerate(names)}
