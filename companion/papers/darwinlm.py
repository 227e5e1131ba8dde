"""DarwinLM: "Evolutionary Structured Pruning of Large Language Models" (Tang, Sieberling, Kurtic, Shen,
Alistarh; arXiv 2502.07780).

Two stages.

1. **A level database** (``build_database``). For every layer, the attention output projection
   ``o_proj`` is pruned one *head* (``d_head`` input columns) at a time and the MLP ``down``
   projection one *neuron* (one input column) at a time, by greedy structured OBS (ZipLM) on the
   calibration Hessian ``H = 2XXᵀ/n`` (damped by 1% of its mean diagonal). The weights are saved
   after each *level*: level ``l`` of ``n_levels - 1`` removes ``l / (n_levels - 1)`` of the heads or
   neurons, and the last level removes the module. The greedy loop is ``kernels/obs_prune.py``.
   Pruning a head also drops its rows of q/k/v; pruning a neuron drops its row of ``up``
   (``shrink`` builds the genuinely smaller model).
2. **An evolutionary search** (``evolve``) over genomes with one level per layer and module. The
   start is the uniform genome (every layer at the target level). The level-switch mutation
   moves one layer of a group one level down and another one level up, so with evenly spaced
   levels the parameter count never changes. Selection is multistep and *training-aware*: the
   offspring are fine-tuned on a few fresh tokens before their fitness, the KL divergence from the
   dense model, is measured on fresh calibration tokens; fewer survive each stage while the token
   budgets grow.

Official code read for details (IST-DASLab/DarwinLM): ``struct_prune.py`` and
``src/struct_pruner.py`` (Hessians from the dense model's activations, block by block; one
database entry per level), ``src/fast_obc_struct.py`` (the OBS step), ``evo_struct_prune_search.py``
(mutation with ``num_flips = min(randint(1,3), randint(1,3))`` and a group chosen in proportion
to its size; offspring equal to the parent or to each other are redrawn; each candidate is
fine-tuned from the database weights with a fresh AdamW, then scored; at HEAD the parent rejoins
the last selection stage, "Elitist EA", which an earlier commit had commented out), and
``src/metrics.py::compute_kl_div`` (KL(dense ‖ candidate) per token).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.utils import skip_init

from companion import zoo
from companion.model import ModelConfig, TinyLM
from kernels import obs_prune, softmax_xent

SLUG = "darwinlm"
ZOO_FULL = "darwinlm-stories"
ZOO_SMOKE = "darwinlm-stories-smoke"
SEQ_LEN = 64


# ----------------------------------------------------------------------------------------------
# The dense model (zoo) and the token pools
# ----------------------------------------------------------------------------------------------
def _stories_tokenizer():
    from companion.tokenizer import stories_tokenizer

    return stories_tokenizer(512)


def _skeleton(d_model: int) -> TinyLM:
    """4 layers, 8 MHA heads, GELU MLP of width 4·d_model, on the stories tokenizer's vocabulary."""
    return TinyLM(ModelConfig(vocab_size=_stories_tokenizer().vocab_size, d_model=d_model, n_layers=4, n_heads=8))


def _fit(model: nn.Module, *, steps: int, batch_size: int, name: str) -> dict:
    from companion.data import lm_batches, stories
    from companion.train import evaluate_loss, train

    tok = _stories_tokenizer()
    train_ids = tok.encode_corpus(stories(4000, seed=1))
    val_ids = tok.encode_corpus(stories(400, seed=2))
    hist = train(model, lm_batches(train_ids, batch_size, SEQ_LEN, seed=0), steps=steps, lr=3e-3, desc=name)
    return {"train_loss": hist.loss[-1], "steps": steps, "batch_size": batch_size, "seq_len": SEQ_LEN,
            "val_loss": evaluate_loss(model, lm_batches(val_ids, 32, SEQ_LEN, seed=1)),
            "tokenizer": "stories_tokenizer(512)"}


@zoo.register(ZOO_FULL, version="1", skeleton=lambda: _skeleton(128),
              description="4-layer MHA LM (d=128, 8 heads, d_ff=512) on generated stories")
def _fit_darwinlm_full(model: nn.Module) -> dict:
    return _fit(model, steps=500, batch_size=16, name=ZOO_FULL)


@zoo.register(ZOO_SMOKE, version="1", skeleton=lambda: _skeleton(64),
              description="4-layer MHA LM (d=64, 8 heads, d_ff=256) on generated stories, for smoke runs")
def _fit_darwinlm_smoke(model: nn.Module) -> dict:
    return _fit(model, steps=150, batch_size=8, name=ZOO_SMOKE)


@dataclass
class Pools:
    """Disjoint token streams (1-D int64), each from its own story seed."""

    hessian: torch.Tensor  # calibration for the database (the paper: FineWeb-Edu)
    fitness: torch.Tensor  # the search's fitness tokens
    finetune: torch.Tensor  # the search's and the post-training's fine-tuning tokens
    heldout: torch.Tensor  # final evaluation only


def make_pools(*, n_hessian: int = 300, n_fitness: int = 300, n_finetune: int = 1200, n_heldout: int = 200) -> Pools:
    """Token pools from ``companion.data.stories`` (arguments: numbers of stories; ~60 tokens each)."""
    from companion.data import stories

    tok = _stories_tokenizer()
    enc = lambda n, seed: tok.encode_corpus(stories(n, seed=seed))
    return Pools(enc(n_hessian, 101), enc(n_fitness, 102), enc(n_finetune, 103), enc(n_heldout, 104))


def sample_windows(tokens: torch.Tensor, n_windows: int, rng: np.random.Generator,
                   seq_len: int = SEQ_LEN) -> torch.Tensor:
    """``(n_windows, seq_len + 1)`` random windows of ``tokens``: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    if tokens.ndim != 1 or tokens.numel() < seq_len + 2:
        raise ValueError(f"tokens must be 1-D with more than {seq_len + 1} tokens, got shape {tuple(tokens.shape)}")
    if not (isinstance(n_windows, int) and n_windows >= 1):
        raise ValueError(f"n_windows must be an int >= 1, got {n_windows!r}")
    starts = rng.integers(0, tokens.numel() - seq_len - 1, size=n_windows)
    return torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])


# ----------------------------------------------------------------------------------------------
# Stage 1: the level database (calibration Hessians + greedy structured OBS)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_hessians(model: TinyLM, windows: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Undamped ``H = 2 XᵀX / n`` (float64) of every ``o_proj`` input ``(D, D)`` and ``down`` input
    ``(d_ff, d_ff)``, from the dense model's activations on ``windows (N, T + 1)``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(_module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return accumulate

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.o_proj.register_forward_hook(hook(f"attn{i}")))
        handles.append(block.mlp.down.register_forward_hook(hook(f"mlp{i}")))
    try:
        for chunk in windows[:, :-1].split(32):
            model(chunk)
    finally:
        for h in handles:
            h.remove()
    hess = {k: 2 * sums[k] / counts[k] for k in sums}
    n = len(model.blocks)
    return [hess[f"attn{i}"] for i in range(n)], [hess[f"mlp{i}"] for i in range(n)]


def damped_inverse(H: torch.Tensor, rel_damp: float = 0.01) -> torch.Tensor:
    """``(H + rel_damp · mean(diag H) · I)⁻¹`` by Cholesky (float64)."""
    if not rel_damp > 0:
        raise ValueError(f"rel_damp must be > 0, got {rel_damp}")
    Hd = H + rel_damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(Hd))


@dataclass
class ModuleLevels:
    """One module's database: its weight at every level and the order in which structures went."""

    weights: torch.Tensor  # (n_levels, D, d_in) float64; the removed structures' columns are 0
    order: torch.Tensor  # (n_structures,) structure ids, first removed first
    block: int  # columns per structure (d_head or 1)
    removed: tuple[int, ...]  # structures removed at each level, e.g. (0, 1, ..., 8)

    def kept(self, level: int) -> torch.Tensor:
        """Bool mask ``(n_structures,)`` of the structures still present at ``level``."""
        mask = torch.ones(self.order.numel(), dtype=torch.bool)
        mask[self.order[: self.removed[level]]] = False
        return mask

    def kept_columns(self, level: int) -> torch.Tensor:
        """Indices of the input columns (of o_proj / down) still present at ``level``."""
        return torch.nonzero(self.kept(level).repeat_interleave(self.block)).flatten()


@dataclass
class Database:
    attn: list[ModuleLevels]  # one per layer
    mlp: list[ModuleLevels]
    hessians_attn: list[torch.Tensor] = field(repr=False)  # undamped, for reconstruction errors
    hessians_mlp: list[torch.Tensor] = field(repr=False)

    @property
    def n_levels(self) -> int:
        return len(self.attn[0].removed)

    @property
    def n_layers(self) -> int:
        return len(self.attn)


def even_schedule(n_structures: int, n_levels: int) -> tuple[int, ...]:
    """Structures removed at each level, evenly spaced: (0, k, 2k, ..., n_structures)."""
    if not (isinstance(n_levels, int) and n_levels >= 2) or n_structures % (n_levels - 1):
        raise ValueError(f"n_levels - 1 must divide n_structures={n_structures}, got n_levels={n_levels!r}")
    step = n_structures // (n_levels - 1)
    return tuple(range(0, n_structures + 1, step))


def build_database(model: TinyLM, windows: torch.Tensor, *, n_levels: int = 9, rel_damp: float = 0.01,
                   backend: str = "auto") -> Database:
    """Greedy structured OBS for every layer's ``o_proj`` (heads) and ``down`` (neurons)."""

    cfg = model.cfg
    if cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"head pruning here assumes MHA (n_kv_heads == n_heads), got {cfg.n_kv_heads} != "
                         f"{cfg.n_heads}")
    h_attn, h_mlp = layer_hessians(model, windows)
    attn, mlp = [], []
    for i, block in enumerate(model.blocks):
        for W, H, size, out in ((block.attn.o_proj.weight, h_attn[i], cfg.head_dim, attn),
                                (block.mlp.down.weight, h_mlp[i], 1, mlp)):
            removed = even_schedule(W.shape[1] // size, n_levels)
            res = obs_prune.run(W.detach().double(), damped_inverse(H, rel_damp), block=size, levels=removed,
                                backend=backend)
            out.append(ModuleLevels(res.weights, res.order, size, removed))
    return Database(attn, mlp, h_attn, h_mlp)


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ‖(W − Ŵ)X‖² / ‖WX‖², computed with the undamped ``H ∝ XᵀX``."""
    dW = (W - W_hat).double()
    return float(torch.trace(dW @ H @ dW.T) / torch.trace(W.double() @ H @ W.double().T))


def magnitude_levels(W: torch.Tensor, block: int, removed: Sequence[int]) -> torch.Tensor:
    """The baseline: drop the structures with the smallest column-block norm, no weight update.
    Returns ``(n_levels, D, d_in)``."""
    d_in = W.shape[1]
    norms = W.double().reshape(W.shape[0], d_in // block, block).pow(2).sum(dim=(0, 2))
    order = torch.argsort(norms)
    out = []
    for r in removed:
        W_hat = W.double().clone().reshape(W.shape[0], d_in // block, block)
        W_hat[:, order[:r], :] = 0
        out.append(W_hat.reshape(W.shape))
    return torch.stack(out)


def reconstruction_curves(model: TinyLM, db: Database) -> dict[str, np.ndarray]:
    """Relative reconstruction error per (layer, level) for OBS and for magnitude pruning:
    arrays ``(n_layers, n_levels)`` under keys ``attn_obs``, ``attn_mag``, ``mlp_obs``, ``mlp_mag``."""
    out = {k: np.zeros((db.n_layers, db.n_levels)) for k in ("attn_obs", "attn_mag", "mlp_obs", "mlp_mag")}
    for i, block in enumerate(model.blocks):
        for kind, W, levels, H in (("attn", block.attn.o_proj.weight, db.attn[i], db.hessians_attn[i]),
                                   ("mlp", block.mlp.down.weight, db.mlp[i], db.hessians_mlp[i])):
            W = W.detach().double()
            mags = magnitude_levels(W, levels.block, levels.removed)
            for lv in range(db.n_levels):
                out[f"{kind}_obs"][i, lv] = reconstruction_error(W, levels.weights[lv], H)
                out[f"{kind}_mag"][i, lv] = reconstruction_error(W, mags[lv], H)
    return out


# ----------------------------------------------------------------------------------------------
# Building a candidate: masked (same shapes, zero columns) or genuinely shrunk
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Genome:
    """One database level per layer for attention (``attn``) and for the MLP (``mlp``)."""

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    @classmethod
    def uniform(cls, n_layers: int, level: int) -> Genome:
        return cls((level,) * n_layers, (level,) * n_layers)

    def groups(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.attn, self.mlp


def _check_genome(genome: Genome, db: Database) -> None:
    for name, levels in (("attn", genome.attn), ("mlp", genome.mlp)):
        if len(levels) != db.n_layers or any(not 0 <= lv < db.n_levels for lv in levels):
            raise ValueError(f"genome.{name} must hold {db.n_layers} levels in [0, {db.n_levels - 1}], got {levels}")


def _empty_linear(d_in: int, d_out: int) -> nn.Linear:
    """A bias-free ``nn.Linear`` with uninitialised weight (``shrink`` copies the weight in); 0 widths allowed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        return skip_init(nn.Linear, d_in, d_out, bias=False)


class PrunedAttention(nn.Module):
    """Causal MHA with only ``n_heads`` heads left (0 allowed: the module is gone, output 0)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        width = n_heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (_empty_linear(d_model, width) for _ in range(3))
        self.o_proj = _empty_linear(width, d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        from companion.model import apply_rope

        if self.n_heads == 0:
            return torch.zeros_like(x)
        q, k, v = (rearrange(p(x), "b t (h d) -> b h t d", h=self.n_heads) for p in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class PrunedMLP(nn.Module):
    """GELU MLP with ``d_ff`` neurons left (0 allowed: output 0)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.up = _empty_linear(d_model, d_ff)
        self.down = _empty_linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) if self.d_ff == 0 else self.down(F.gelu(self.up(x)))


@torch.no_grad()
def masked_model(dense: TinyLM, db: Database, genome: Genome) -> TinyLM:
    """The dense architecture with every ``o_proj`` / ``down`` replaced by its level's weight:
    removed structures are zero columns, their q/k/v/up rows are still computed (and wasted)."""
    _check_genome(genome, db)
    model = copy.deepcopy(dense)
    for i, block in enumerate(model.blocks):
        block.attn.o_proj.weight.copy_(db.attn[i].weights[genome.attn[i]])
        block.mlp.down.weight.copy_(db.mlp[i].weights[genome.mlp[i]])
    return model


@torch.no_grad()
def shrink(dense: TinyLM, db: Database, genome: Genome) -> TinyLM:
    """The genuinely smaller model: per layer, only the kept heads (their q/k/v rows and o_proj
    columns) and the kept neurons (their up rows and down columns). Same function as
    :func:`masked_model`, fewer parameters and FLOPs."""
    _check_genome(genome, db)
    model = copy.deepcopy(dense)
    cfg = dense.cfg
    dtype = dense.embed.weight.dtype
    for i, block in enumerate(model.blocks):
        old_attn, old_mlp = block.attn, block.mlp
        cols = db.attn[i].kept_columns(genome.attn[i])
        attn = PrunedAttention(cfg.d_model, cols.numel() // cfg.head_dim, cfg.head_dim).to(dtype)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attn, name).weight.copy_(getattr(old_attn, name).weight[cols])
        attn.o_proj.weight.copy_(db.attn[i].weights[genome.attn[i]][:, cols])
        neurons = db.mlp[i].kept_columns(genome.mlp[i])
        mlp = PrunedMLP(cfg.d_model, neurons.numel()).to(dtype)
        mlp.up.weight.copy_(old_mlp.up.weight[neurons])
        mlp.down.weight.copy_(db.mlp[i].weights[genome.mlp[i]][:, neurons])
        block.attn, block.mlp = attn, mlp
    return model


def prunable_params(cfg: ModelConfig, db: Database, genome: Genome) -> int:
    """Parameters in the pruned modules: 4·D·d_head per kept head (q, k, v rows + o_proj
    columns) and 2·D per kept neuron (up row + down column)."""
    _check_genome(genome, db)
    n_heads = sum(cfg.n_heads - db.attn[i].removed[lv] for i, lv in enumerate(genome.attn))
    n_neurons = sum(cfg.d_ff - db.mlp[i].removed[lv] for i, lv in enumerate(genome.mlp))
    return 4 * cfg.d_model * cfg.head_dim * n_heads + 2 * cfg.d_model * n_neurons


# ----------------------------------------------------------------------------------------------
# Fitness
# ----------------------------------------------------------------------------------------------
def kl_to_dense(dense_logits: torch.Tensor, cand_logits: torch.Tensor) -> float:
    """Mean over tokens of KL(p_dense ‖ p_candidate), in nats. Both ``(..., V)``.

    Computed by the fused kernel ``kernels.softmax_xent`` (one pass per row with an online
    logsumexp, in float64), so no (tokens, V) log-softmax is ever formed."""
    if dense_logits.shape != cand_logits.shape:
        raise ValueError(f"cand_logits shape {tuple(cand_logits.shape)} != dense_logits shape "
                         f"{tuple(dense_logits.shape)}")
    V = dense_logits.shape[-1]
    rows = softmax_xent.run(cand_logits.reshape(-1, V).double(), ref_logits=dense_logits.reshape(-1, V).double())
    return float(rows["kl"].mean())


def finetune(model: nn.Module, windows: torch.Tensor, *, batch_size: int, lr: float) -> nn.Module:
    """One pass of fresh AdamW (constant lr, no weight decay) over ``windows (N, T + 1)`` in
    batches of ``batch_size``, like the official per-candidate fine-tune. In place; returns model."""
    if windows.shape[0] == 0:
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for chunk in windows.split(batch_size):
        loss = model(chunk[:, :-1], chunk[:, 1:]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def logits_of(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(chunk[:, :-1]).logits for chunk in windows.split(64)])


def candidate_fitness(dense: TinyLM, db: Database, genome: Genome, fit_windows: torch.Tensor,
                      dense_logits: torch.Tensor, ft_windows: torch.Tensor | None, *, batch_size: int,
                      lr: float) -> float:
    """KL(dense ‖ candidate) on ``fit_windows`` after an optional short fine-tune on ``ft_windows``."""
    model = shrink(dense, db, genome)
    if ft_windows is not None:
        finetune(model, ft_windows, batch_size=batch_size, lr=lr)
    return kl_to_dense(dense_logits, logits_of(model, fit_windows))


# ----------------------------------------------------------------------------------------------
# Stage 2: the evolutionary search
# ----------------------------------------------------------------------------------------------
def mutate(parent: Genome, rng: np.random.Generator, n_levels: int, step: int = 1) -> Genome:
    """Level-switch mutation: ``min(randint(1,3), randint(1,3))`` flips; each picks a group
    (attention or MLP, in proportion to its number of layers), moves one layer ``step`` levels
    down and one (possibly the same, a no-op as in the official code) ``step`` levels up."""
    groups = [list(parent.attn), list(parent.mlp)]
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    n_flips = min(int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    for _ in range(n_flips):
        levels = groups[int(rng.choice(2, p=sizes / sizes.sum()))]
        can_drop = [i for i, lv in enumerate(levels) if lv - step >= 0]
        can_raise = [i for i, lv in enumerate(levels) if lv + step <= n_levels - 1]
        if not can_drop or not can_raise:
            raise ValueError(f"no level switch is possible from {levels} with n_levels={n_levels}, step={step}")
        down, up = int(rng.choice(can_drop)), int(rng.choice(can_raise))
        levels[down] -= step
        levels[up] += step
    return Genome(tuple(groups[0]), tuple(groups[1]))


@dataclass
class SearchConfig:
    generations: int = 12
    offspring: int = 8
    survivors: tuple[int, ...] = (4, 2, 1)
    fitness_tokens: tuple[int, ...] = (1024, 2048, 4096)
    finetune_tokens: tuple[int, ...] = (1024, 2048, 4096)  # all 0 = training-free selection
    batch_size: int = 8  # sequences per fine-tuning step
    lr: float = 1e-3
    elitist: bool = True  # HEAD of the official code re-adds the parent to the last stage

    def __post_init__(self):
        n = len(self.survivors)
        if not (len(self.fitness_tokens) == len(self.finetune_tokens) == n and n >= 1):
            raise ValueError(f"survivors, fitness_tokens and finetune_tokens need one entry per stage, got "
                             f"{self.survivors}, {self.fitness_tokens}, {self.finetune_tokens}")
        if self.survivors[-1] != 1 or list(self.survivors) != sorted(self.survivors, reverse=True) \
                or self.survivors[0] > self.offspring:
            raise ValueError(f"survivors must shrink to 1 and start <= offspring={self.offspring}, got "
                             f"{self.survivors}")
        if self.generations < 1 or any(t < SEQ_LEN for t in self.fitness_tokens):
            raise ValueError(f"need generations >= 1 and fitness_tokens >= {SEQ_LEN}, got {self.generations}, "
                             f"{self.fitness_tokens}")

    @property
    def training_aware(self) -> bool:
        return any(t > 0 for t in self.finetune_tokens)

    def training_free(self) -> SearchConfig:
        """The same search with the fine-tuning removed from selection."""
        return SearchConfig(self.generations, self.offspring, self.survivors, self.fitness_tokens,
                            (0,) * len(self.survivors), self.batch_size, self.lr, self.elitist)


@dataclass
class SearchResult:
    target: int
    seed: int
    training_aware: bool
    parents: list[Genome]  # parents[g] = the search point after g generations (parents[0] is uniform)
    train_fitness: list[float]  # the selected parent's last-stage fitness (nan for generation 0)
    heldout_kl: list[float]  # one-shot KL of each parent on fixed held-out tokens
    seconds: float = 0.0

    @property
    def best(self) -> Genome:
        return self.parents[-1]


def evolve(dense: TinyLM, db: Database, pools: Pools, *, target: int, cfg: SearchConfig, seed: int,
           heldout_windows: torch.Tensor | None = None) -> SearchResult:
    """DarwinLM's search from the uniform genome at level ``target`` (see the module docstring)."""
    if not 1 <= target <= db.n_levels - 2:
        raise ValueError(f"target must be in [1, {db.n_levels - 2}] so that a level switch exists, got {target}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    parent = Genome.uniform(db.n_layers, target)
    if heldout_windows is None:
        heldout_windows = sample_windows(pools.heldout, 32, np.random.default_rng(10_000 + seed))
    heldout_dense = logits_of(dense, heldout_windows)
    oneshot = lambda g: kl_to_dense(heldout_dense, logits_of(shrink(dense, db, g), heldout_windows))
    result = SearchResult(target, seed, cfg.training_aware, [parent], [math.nan], [oneshot(parent)])
    for _ in range(cfg.generations):
        candidates: list[Genome] = []
        for _attempt in range(1000 * cfg.offspring):
            child = mutate(parent, rng, db.n_levels)
            if child != parent and child not in candidates:
                candidates.append(child)
            if len(candidates) == cfg.offspring:
                break
        fitness: list[float] = []
        for stage, (keep, n_fit, n_ft) in enumerate(zip(cfg.survivors, cfg.fitness_tokens, cfg.finetune_tokens)):
            if cfg.elitist and stage == len(cfg.survivors) - 1 and parent not in candidates:
                candidates.append(parent)
            fit_w = sample_windows(pools.fitness, n_fit // SEQ_LEN, rng)
            ft_w = sample_windows(pools.finetune, n_ft // SEQ_LEN, rng) if n_ft >= SEQ_LEN else None
            dense_logits = logits_of(dense, fit_w)
            scores = [candidate_fitness(dense, db, g, fit_w, dense_logits, ft_w, batch_size=cfg.batch_size,
                                        lr=cfg.lr) for g in candidates]
            best = np.argsort(scores, kind="stable")[:keep]
            candidates, fitness = [candidates[i] for i in best], [scores[i] for i in best]
        parent = candidates[0]
        result.parents.append(parent)
        result.train_fitness.append(fitness[0])
        result.heldout_kl.append(oneshot(parent))
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def _eval(model: nn.Module, dense_logits: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    logits = logits_of(model, windows)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return {"kl": kl_to_dense(dense_logits, logits), "ce": float(ce)}


def posttrain(dense: TinyLM, db: Database, genome: Genome, pools: Pools, *, tokens: int, batch_size: int = 8,
              lr: float = 1e-3, seed: int = 0, n_eval: int = 128) -> dict[str, float]:
    """Fine-tune the shrunk ``genome`` on ``tokens`` fine-tuning tokens (batches fixed by ``seed``,
    so every genome sees the same data) and evaluate on held-out windows. Returns ``kl`` and
    ``ce`` after, ``kl_oneshot`` before, and ``params`` (of the shrunk model)."""
    eval_w = sample_windows(pools.heldout, n_eval, np.random.default_rng(20_000))
    dense_logits = logits_of(dense, eval_w)
    model = shrink(dense, db, genome)
    before = _eval(model, dense_logits, eval_w)
    ft_w = sample_windows(pools.finetune, max(1, tokens // SEQ_LEN), np.random.default_rng(30_000 + seed))
    finetune(model, ft_w, batch_size=batch_size, lr=lr)
    return {**_eval(model, dense_logits, eval_w), "kl_oneshot": before["kl"], "params": model.num_params()}


# ----------------------------------------------------------------------------------------------
# The motivation: layers differ, and the one-shot ranking is not the post-training ranking
# ----------------------------------------------------------------------------------------------
def layer_sensitivity(dense: TinyLM, db: Database, windows: torch.Tensor,
                      levels: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """One-shot KL when only one layer's attention (``attn``) or MLP (``mlp``) is pruned to each of
    ``levels`` (default: all) and everything else stays dense: arrays ``(n_layers, n_levels)``,
    0 at level 0 and NaN at levels not measured."""
    levels = list(range(1, db.n_levels)) if levels is None else list(levels)
    if any(not 1 <= lv < db.n_levels for lv in levels):
        raise ValueError(f"levels must be in [1, {db.n_levels - 1}], got {levels}")
    dense_logits = logits_of(dense, windows)
    out = {k: np.full((db.n_layers, db.n_levels), np.nan) for k in ("attn", "mlp")}
    zero = (0,) * db.n_layers
    for i in range(db.n_layers):
        for kind in out:
            out[kind][i, 0] = 0.0
        for lv in levels:
            only = tuple(lv if k == i else 0 for k in range(db.n_layers))
            for kind, g in (("attn", Genome(only, zero)), ("mlp", Genome(zero, only))):
                out[kind][i, lv] = kl_to_dense(dense_logits, logits_of(shrink(dense, db, g), windows))
    return out


def oneshot_vs_finetuned(dense: TinyLM, db: Database, pools: Pools, *, target: int, n_genomes: int,
                         ft_tokens: int, seed: int, batch_size: int = 8, lr: float = 1e-3,
                         n_eval: int = 32) -> dict[str, np.ndarray]:
    """Random equal-size genomes (a few mutations away from uniform): their one-shot KL and their
    KL after the same short fine-tune, on the same ``n_eval`` held-out windows. Also the uniform genome."""
    rng = np.random.default_rng(seed)
    genomes = [Genome.uniform(db.n_layers, target)]
    while len(genomes) < n_genomes:
        g = genomes[0]
        for _ in range(3):
            g = mutate(g, rng, db.n_levels)
        if g not in genomes:
            genomes.append(g)
    eval_w = sample_windows(pools.heldout, n_eval, np.random.default_rng(10_000 + seed))
    ft_w = sample_windows(pools.finetune, ft_tokens // SEQ_LEN, rng)
    dense_logits = logits_of(dense, eval_w)
    before, after = [], []
    for g in genomes:
        model = shrink(dense, db, g)
        before.append(kl_to_dense(dense_logits, logits_of(model, eval_w)))
        after.append(kl_to_dense(dense_logits, logits_of(finetune(model, ft_w, batch_size=batch_size, lr=lr),
                                                         eval_w)))
    return {"oneshot": np.array(before), "finetuned": np.array(after), "is_uniform": np.arange(n_genomes) == 0}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (no ties expected)."""
    ra, rb = (np.argsort(np.argsort(np.asarray(x))).astype(float) for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra**2).sum() * (rb**2).sum()))


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of precomputed results: the notebook's explorer calls them)
# ----------------------------------------------------------------------------------------------
MODULES = (("attn", "attention (heads)"), ("mlp", "MLP (neurons)"))


def _fractions(n_levels: int) -> list[float]:
    return [lv / (n_levels - 1) for lv in range(n_levels)]


def sensitivity_figure(sens: dict[str, np.ndarray]):
    """Heatmaps: one-shot KL when a single layer's attention / MLP is pruned to each level."""
    import plotly.graph_objects as go

    from companion import viz

    n_layers, n_levels = sens["attn"].shape
    cols = [lv for lv in range(1, n_levels) if not np.isnan(sens["attn"][:, lv]).all()]
    fig = viz.subplots(1, 2, titles=[f"prune only one layer's {label}" for _, label in MODULES], height=330,
                       horizontal_spacing=0.12)
    zmax = float(np.log10(max(np.nanmax(sens["attn"]), np.nanmax(sens["mlp"]), 1e-6)))
    for col, (key, _) in enumerate(MODULES, start=1):
        z = np.log10(np.maximum(sens[key][:, cols], 1e-6))
        fig.add_trace(go.Heatmap(z=z, x=[f"{lv / (n_levels - 1):.0%}" for lv in cols],
                                 y=[f"layer {i}" for i in range(n_layers)], zmin=-4, zmax=zmax,
                                 colorscale="Viridis", showscale=col == 2,
                                 colorbar=dict(title="log10 KL"),
                                 hovertemplate="%{y}, %{x} removed: log10 KL = %{z:.2f}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="fraction removed in that layer", row=1, col=col)
    fig.update_layout(title="Not all layers are equal: KL(dense ‖ pruned) when one layer is pruned")
    return fig


def oneshot_scatter_figure(pairs: dict[str, np.ndarray]):
    """Equal-size genomes: one-shot KL (x) against KL after the same short fine-tune (y)."""
    import plotly.graph_objects as go

    from companion import viz

    rho = spearman(pairs["oneshot"], pairs["finetuned"])
    fig = viz.figure(f"One-shot ranking vs post-fine-tune ranking (Spearman ρ = {rho:.2f})",
                     "KL before fine-tuning (one-shot)", "KL after the same short fine-tune", height=380)
    uni = pairs["is_uniform"]
    for mask, name, colour in ((~uni, "random equal-size genomes", viz.PALETTE["paper"]),
                               (uni, "uniform", viz.PALETTE["baseline"])):
        fig.add_trace(go.Scatter(x=pairs["oneshot"][mask], y=pairs["finetuned"][mask], mode="markers", name=name,
                                 marker=dict(size=10 if name == "uniform" else 8, color=colour)))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def reconstruction_figure(curves: dict[str, np.ndarray]):
    """Relative reconstruction error ‖(W − Ŵ)X‖² / ‖WX‖² against level, OBS vs magnitude, per layer."""
    import plotly.graph_objects as go

    from companion import viz

    n_layers, n_levels = curves["attn_obs"].shape
    x = _fractions(n_levels)
    fig = viz.subplots(1, 2, titles=[label for _, label in MODULES], height=380)
    for col, (key, _) in enumerate(MODULES, start=1):
        for i in range(n_layers):
            colour = viz.SEQUENCE[i % len(viz.SEQUENCE)]
            for method, dash in (("obs", "solid"), ("mag", "dot")):
                fig.add_trace(go.Scatter(
                    x=x, y=curves[f"{key}_{method}"][i], line=dict(color=colour, dash=dash),
                    name=f"layer {i}, {'OBS' if method == 'obs' else 'magnitude'}", legendgroup=f"l{i}{method}",
                    showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(title_text="fraction of structures removed", tickformat=".0%", row=1, col=col)
    fig.update_yaxes(title_text="relative output error", type="log", row=1, col=1)
    fig.update_layout(title="Reconstruction error per level: OBS (solid) vs magnitude, no update (dotted)")
    return fig


def profile_heatmap_figure(result: SearchResult, n_levels: int):
    """The best candidate's fraction removed per layer (y) at every generation (x)."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.subplots(1, 2, titles=[label for _, label in MODULES], height=320, horizontal_spacing=0.1)
    gens = list(range(len(result.parents)))
    n_layers = len(result.parents[0].attn)
    for col, (key, _) in enumerate(MODULES, start=1):
        z = np.array([getattr(g, key) for g in result.parents]).T / (n_levels - 1)  # (layers, generations)
        fig.add_trace(go.Heatmap(z=z, x=gens, y=[f"layer {i}" for i in range(n_layers)], zmin=0, zmax=1,
                                 colorscale="Reds", showscale=col == 2,
                                 colorbar=dict(title="removed", tickformat=".0%"),
                                 hovertemplate="generation %{x}, %{y}: %{z:.0%} removed<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="generation", row=1, col=col)
    fig.update_layout(title=f"Sparsity profile of the search point over generations (target "
                            f"{result.target / (n_levels - 1):.0%} removed, seed {result.seed})")
    return fig


def fitness_figure(results: dict[str, SearchResult]):
    """Fitness against generation: the selected parent's last-stage fitness (dotted, noisy: fresh
    tokens each generation) and its one-shot KL on fixed held-out tokens (solid)."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure("Fitness against generation", "generation", "KL(dense ‖ candidate), nats", height=380)
    for k, (label, res) in enumerate(results.items()):
        colour = viz.SEQUENCE[k % len(viz.SEQUENCE)]
        gens = list(range(len(res.parents)))
        fig.add_trace(go.Scatter(x=gens, y=res.heldout_kl, name=f"{label}: held-out, one-shot",
                                 line=dict(color=colour)))
        fig.add_trace(go.Scatter(x=gens[1:], y=res.train_fitness[1:], name=f"{label}: selection fitness",
                                 line=dict(color=colour, dash="dot")))
    fig.update_yaxes(type="log")
    return fig


def explorer_figure(searches: dict[int, SearchResult], posttrained: dict[tuple[int, str], dict], *, target: int,
                    generation: int, n_levels: int):
    """Left: the search point's fraction removed per layer at ``generation`` (uniform: dashed).
    Right: its one-shot held-out KL over generations, with the post-training KL of the final
    searched and of the uniform configuration. ``target`` picks the search."""
    import plotly.graph_objects as go

    from companion import viz

    if target not in searches:
        raise ValueError(f"no search for target={target}; have {sorted(searches)}")
    res = searches[target]
    g = min(max(0, generation), len(res.parents) - 1)
    genome = res.parents[g]
    frac = target / (n_levels - 1)
    fig = viz.subplots(1, 2, titles=[f"per-layer profile at generation {g}", "one-shot held-out KL"], height=400,
                       horizontal_spacing=0.12)
    layers = [f"layer {i}" for i in range(len(genome.attn))]
    for (key, label), colour in zip(MODULES, (viz.PALETTE["paper"], viz.PALETTE["accent"])):
        fig.add_trace(go.Bar(x=layers, y=np.array(getattr(genome, key)) / (n_levels - 1), name=label,
                             marker_color=colour), row=1, col=1)
    fig.add_hline(y=frac, line=dict(color=viz.PALETTE["baseline"], dash="dash"), row=1, col=1)
    fig.update_yaxes(title_text="fraction removed", range=[0, 1.02], tickformat=".0%", row=1, col=1)
    gens = list(range(len(res.parents)))
    fig.add_trace(go.Scatter(x=gens, y=res.heldout_kl, name="search point", line=dict(color=viz.PALETTE["ours"]),
                             showlegend=False), row=1, col=2)
    fig.add_trace(go.Scatter(x=[g], y=[res.heldout_kl[g]], mode="markers", marker=dict(size=12, color="black"),
                             showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="generation", row=1, col=2)
    fig.update_yaxes(title_text="KL, nats", type="log", row=1, col=2)
    uni, found = posttrained.get((target, "uniform")), posttrained.get((target, "aware"))
    after = (f"; after post-training: uniform {uni['kl']:.3f}, searched {found['kl']:.3f} nats"
             if uni and found else "")
    fig.update_layout(title=f"Target {frac:.0%} of heads and neurons removed{after}", barmode="group")
    return fig


def comparison_figure(rows: dict[str, list[float]], seeds: Sequence[int]):
    """Post-training KL per seed for each configuration (``rows``: label -> one value per seed)."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure("Same size, same post-training budget: KL(dense ‖ pruned) on held-out text",
                     "configuration", "KL after post-training, nats", height=360)
    for k, seed in enumerate(seeds):
        fig.add_trace(go.Bar(x=list(rows), y=[vals[k] for vals in rows.values()], name=f"seed {seed}",
                             marker_color=viz.SEQUENCE[k % len(viz.SEQUENCE)]))
    fig.update_layout(barmode="group")
    return fig
