"""Long-context toy tools: score many RoPE scalings in one folded forward, a short-context RoPE LM
for the zoo (trained at a short length on text with long-range structure, then read past it),
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

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from companion.data import insert_copy_spans, zipf_markov
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


def _population_forwards(model: TinyLM, x: torch.Tensor, scalings: Sequence[Scaling], max_rows: int,
                         backend: str):
    """Run ``x (N, T)`` under every scaling, folded into forwards of at most ``max_rows`` sequences
    (candidates × documents). Yields ``(c0, P, d0, n, logits)``: candidates ``c0 : c0+P`` on documents
    ``d0 : d0+n``, with ``logits (P·n, T, V)`` ordered candidate-major."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    N, T = x.shape
    positions = torch.arange(T, device=x.device)
    per_cand = max(1, max_rows // N)  # candidates per forward when all docs fit
    doc_chunk = min(N, max_rows)
    for c0 in range(0, len(scalings), per_cand):
        chunk = list(scalings[c0:c0 + per_cand])
        for d0 in range(0, N, doc_chunk):
            xb = x[d0:d0 + doc_chunk]
            with population(model, chunk, positions, backend):
                logits = model(xb.repeat(len(chunk), 1)).logits
            yield c0, len(chunk), d0, xb.shape[0], logits


@torch.no_grad()
def population_nll(model: TinyLM, docs: torch.Tensor, scalings: Sequence[Scaling], *, max_rows: int = 32,
                   backend: str = "auto") -> torch.Tensor:
    """Mean next-token NLL of every scaling on ``docs (N, T+1)``: ``(P,)`` float64.

    Candidates and documents are folded into batches of at most ``max_rows`` sequences
    (candidates × documents), each one forward through :func:`population`.
    """
    if docs.ndim != 2 or docs.shape[1] < 2:
        raise ValueError(f"docs must be (N, T+1) token ids with T >= 1, got shape {tuple(docs.shape)}")
    device = next(model.parameters()).device
    x, y = docs[:, :-1].to(device), docs[:, 1:].to(device)
    N, T = x.shape
    total = torch.zeros(len(scalings), dtype=torch.float64)
    for c0, P, d0, n, logits in _population_forwards(model, x, scalings, max_rows, backend):
        nll = _token_nll(logits, y[d0:d0 + n].repeat(P, 1)).view(P, n, T).sum(dim=(1, 2))
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
    correct = torch.zeros(len(scalings), dtype=torch.float64)
    for c0, P, d0, n, logits in _population_forwards(model, x, scalings, max_rows, backend):
        pred = logits[:, -key_len:].argmax(-1).view(P, n, key_len)
        correct[c0:c0 + P] += (pred == answer[None, d0:d0 + n]).all(-1).sum(-1).double().cpu()
    return correct / len(x)


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


# ----------------------------------------------------------------------------------------------
# A zoo LM trained at a short length, for papers that read it past that length
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShortLMConfig:
    """A small RoPE LM and its data. Text: a second-order Zipf–Markov chain
    (``companion.data.zipf_markov(skip=…)``) with copy spans (a span repeats an earlier span of the
    same document, at any distance); a share of each training batch is passkey samples."""

    vocab_size: int = 512  # token vocab_size - 1 is the passkey marker; text uses the others
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4  # head dim 32: 16 RoPE frequencies
    rope_base: float = 10000.0
    train_len: int = 128
    max_len: int = 1024  # evaluation documents hold this many tokens (+1 target)
    branching: int = 16
    noise: float = 0.1
    skip: float = 0.5
    copy_prob: float = 0.5 / 16  # per position: about one copy span per two 16-token slots
    copy_len: int = 16
    passkey_frac: float = 0.25  # share of each training batch that is a passkey sample
    key_len: int = 4
    train_docs: int = 2000  # documents of max_len + 1 tokens, cut into training rows of train_len + 1
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    corpus_seed: int = 1

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, rope_base=self.rope_base)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def corpus(cfg: ShortLMConfig, n_eval_docs: int = 64) -> dict[str, torch.Tensor]:
    """``train``: rows ``(n, train_len+1)``; ``val`` and ``test``: documents ``(n_eval_docs, max_len+1)``.

    One Markov chain for all three (one ``zipf_markov`` call, so one language); copy spans go in after
    the training text is cut into rows, so a training row holds every copy's source, while evaluation
    documents copy from up to ``max_len`` tokens back: reading far back is what a longer context buys.
    """
    doc = cfg.max_len + 1
    n_docs = cfg.train_docs + 2 * n_eval_docs
    text = zipf_markov(n_docs * doc, vocab_size=cfg.vocab_size - 1, branching=cfg.branching, noise=cfg.noise,
                       skip=cfg.skip, doc_len=doc, seed=cfg.corpus_seed).view(n_docs, doc)
    rows = text[:cfg.train_docs].reshape(-1)
    rows = rows[:rows.numel() // (cfg.train_len + 1) * (cfg.train_len + 1)].view(-1, cfg.train_len + 1)
    copies = dict(copy_prob=cfg.copy_prob, copy_len=cfg.copy_len)
    evals = insert_copy_spans(text[cfg.train_docs:], seed=cfg.corpus_seed + 2, **copies)
    return {"train": insert_copy_spans(rows, seed=cfg.corpus_seed + 1, **copies),
            "val": evals[:n_eval_docs], "test": evals[n_eval_docs:]}


def training_batches(cfg: ShortLMConfig, rows: torch.Tensor, seq_len: int, *, batch_size: int | None = None,
                     seed: int = 0, pool: int = 2048) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """``batches(step) -> (x, y)``, each ``(batch, seq_len)``: training rows (concatenated when
    ``seq_len`` is longer than a row), the first ``passkey_frac`` of them replaced by passkey samples
    (haystack from the training rows, random depth) from a fixed pool. Depends only on (seed, step)."""
    B = batch_size or cfg.batch_size
    n_pk = int(round(cfg.passkey_frac * B))
    per = seq_len + 1
    joined = rows.reshape(-1)
    seqs = joined[:joined.numel() // per * per].view(-1, per)  # whole rows when seq_len = train_len
    gen = torch.Generator().manual_seed(seed)
    depths = torch.rand(16, generator=gen).tolist()
    pk = torch.cat([passkey_samples(joined, max(1, pool // 16), per, d, vocab_size=cfg.vocab_size,
                                    key_len=cfg.key_len, seed=10_000 + 97 * seed + j) for j, d in enumerate(depths)])

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        batch = seqs[torch.randint(0, len(seqs), (B,), generator=g)]
        if n_pk:
            batch[:n_pk] = pk[torch.randint(0, len(pk), (n_pk,), generator=g)]
        return batch[:, :-1], batch[:, 1:]

    return batches


def train_short_lm(model: TinyLM, cfg: ShortLMConfig, *, seed: int = 0) -> dict:
    """Train ``model`` in place at ``cfg.train_len`` with plain RoPE; returns metadata for the zoo."""
    from companion.train import train

    data = corpus(cfg)
    hist = train(model, training_batches(cfg, data["train"], cfg.train_len, seed=seed), steps=cfg.steps,
                 lr=cfg.lr, desc=f"short LM (L={cfg.train_len})")
    return {"train_loss": float(np.mean(hist.loss[-20:])), "steps": cfg.steps, "train_len": cfg.train_len}


def register_short_lm(name: str, cfg: ShortLMConfig, *, version: str = "1") -> None:
    """Register a zoo recipe: ``zoo.load(name)`` trains a :func:`population_model` with ``cfg``."""
    from companion import zoo

    zoo.register(name, version=version, skeleton=lambda: population_model(cfg.model_config()),
                 description=f"{cfg.n_layers}-layer RoPE LM (d={cfg.d_model}, head dim {cfg.head_dim}) trained at "
                             f"{cfg.train_len} tokens on copy-span text and passkeys")(
        lambda model: train_short_lm(model, cfg))


# The shared recipes: a model trained at 128 tokens, and a smaller one a cold smoke run can afford.
SHORT_LM = {"full": ShortLMConfig(),
            "smoke": ShortLMConfig(d_model=64, n_heads=2, steps=60, batch_size=8, train_docs=60)}
SHORT_LM_NAMES = {"full": "short-rope-lm", "smoke": "short-rope-lm-smoke"}
for _mode, _cfg in SHORT_LM.items():
    register_short_lm(SHORT_LM_NAMES[_mode], _cfg)


def load_short_lm(smoke: bool) -> tuple[TinyLM, ShortLMConfig]:
    """The zoo model for the run mode (trained on first use, then cached) and its config."""
    from companion import zoo

    mode = "smoke" if smoke else "full"
    return zoo.load(SHORT_LM_NAMES[mode]), SHORT_LM[mode]
