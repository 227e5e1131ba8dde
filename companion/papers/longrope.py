"""LongRoPE: "Extending LLM Context Window Beyond 2 Million Tokens" (Ding et al., arXiv 2402.13753).

Context extension divides each RoPE frequency θ_i by a factor λ_i ≥ 1 (``companion.rope_scaling``
holds PI, NTK-aware and YaRN as λ generators). LongRoPE searches the λ_i, and the number n̂ of
initial positions left unscaled, with an evolutionary algorithm whose fitness is the perplexity
on long documents, under the constraint λ_i ≤ λ_{i+1}, starting from PI, NTK and YaRN. Then it
extends progressively (search, fine-tune briefly at the searched length, search again on the
fine-tuned model for a larger factor) and keeps separately searched short-context factors for
inputs no longer than the training length.

This module holds the search space and the genetic algorithm, the progressive schedule and the
figures. The toy model (a zoo recipe trained at 128 tokens, shared with other long-context
notebooks) and its data live in ``companion.long_context``. Each generation is scored in one folded
forward through ``kernels/rope.py`` (see ``companion.long_context`` for why and how).

Official code read for details (cited where used): microsoft/LongRoPE
``evolution/algorithms/genetic_base.py`` (the GA loop), ``evolution/algorithms/dim_mono.py``
(monotone mutation and crossover), ``evolution/default_hyper_params/dim_mono.json`` (population
64, parents 32, 16 + 16 children, 40 iterations, grid step 0.01), ``evolution/search.py`` (YaRN
seed), ``rope/longrope.py`` (λ divides the inverse frequency; "su" temperature) and
``rope/yarn.py`` (the YaRN ramp, from jquesnelle/yarn).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from companion.long_context import (  # noqa: F401 (re-exported: the notebook reaches them as lr.*)
    ShortLMConfig,
    corpus,
    load_short_lm,
    passkey_grid,
    passkey_samples,
    perplexity_curves,
    population_model,
    population_nll,
    population_passkey,
    reference_nll,
    training_batches,
)
from companion.model import TinyLM
from companion.rope_scaling import (  # noqa: F401 (re-exported)
    Scaling,
    baseline,
    check_head_dim,
    check_scale,
    is_monotone,
    longrope_mscale,
    ntk_factors,
    pi_factors,
    yarn_factors,
    yarn_mscale,
    yarn_ramp,
)

METHODS = ("none", "pi", "ntk", "yarn", "longrope")
LABELS = {"none": "no scaling", "pi": "PI", "ntk": "NTK-aware", "yarn": "YaRN", "longrope": "LongRoPE (searched)"}


# ----------------------------------------------------------------------------------------------
# The search space and the genetic algorithm
# ----------------------------------------------------------------------------------------------
# n̂ values from the paper's search space; a space keeps those below half the training length.
PAPER_STARTS = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)


@dataclass(frozen=True)
class Genome:
    """One candidate: grid indices k_i (λ_i = 1 + step·k_i, non-decreasing) and n̂. Hashable."""

    k: tuple[int, ...]
    start: int = 0


@dataclass(frozen=True)
class SearchSpace:
    """λ_i on the grid 1, 1 + step, …, max_ratio·s (paper Tab. 4: [1, 1.25·s], step 0.01) and n̂ ∈ starts.

    Genes are integer grid indices, so "monotone" and "already seen" are exact comparisons, with no
    float tolerance (the official code compares floats with ``np.allclose``). ``mscale`` defaults
    to LongRoPE's √(1 + ln s / ln L).
    """

    scale: float
    head_dim: int
    original_length: int
    step: float = 0.01
    max_ratio: float = 1.25
    starts: tuple[int, ...] = (0,)
    mscale: float | None = None

    def __post_init__(self):
        check_scale(self.scale)
        check_head_dim(self.head_dim)
        if not 0 < self.step <= 1 or self.max_ratio < 1:
            raise ValueError(f"need 0 < step <= 1 and max_ratio >= 1, got step={self.step}, "
                             f"max_ratio={self.max_ratio}")
        if not self.starts or any(not isinstance(s, int) or s < 0 for s in self.starts):
            raise ValueError(f"starts must be a non-empty tuple of ints >= 0, got {self.starts!r}")
        if self.mscale is None:
            object.__setattr__(self, "mscale", longrope_mscale(self.scale, self.original_length))

    @property
    def n_dims(self) -> int:
        return self.head_dim // 2

    @property
    def k_max(self) -> int:
        return int(round((self.max_ratio * self.scale - 1) / self.step))

    def factors(self, genome: Genome) -> np.ndarray:
        return 1.0 + self.step * np.asarray(genome.k, dtype=np.float64)

    def scaling(self, genome: Genome, name: str = "longrope") -> Scaling:
        return Scaling(torch.from_numpy(self.factors(genome)), start=genome.start, mscale=self.mscale, name=name)

    def snap(self, factors, start: int = 0) -> Genome:
        """The grid genome nearest to ``factors`` (rounding and clipping keep λ monotone)."""
        f = np.asarray(factors, dtype=np.float64)
        if f.shape != (self.n_dims,):
            raise ValueError(f"factors must have shape ({self.n_dims},), got {f.shape}")
        if start not in self.starts:
            raise ValueError(f"start={start} is not in this space's starts {self.starts}")
        k = np.clip(np.rint((f - 1.0) / self.step), 0, self.k_max).astype(int)
        return Genome(tuple(int(v) for v in k), start)

    def valid(self, genome: Genome) -> bool:
        k = genome.k
        return (len(k) == self.n_dims and all(0 <= a <= self.k_max for a in k)
                and all(a <= b for a, b in zip(k, k[1:])) and genome.start in self.starts)


def starts_for(train_len: int) -> tuple[int, ...]:
    """The paper's n̂ values that are at most half the training length (so n̂ stays in-distribution)."""
    return tuple(s for s in PAPER_STARTS if s <= train_len // 2)


def mutate(genome: Genome, space: SearchSpace, rng: np.random.Generator, seen: set[Genome], *,
           p: float = 0.3, max_tries: int = 100) -> Genome | None:
    """A new monotone genome near ``genome``, not in ``seen``; None if ``max_tries`` attempts all repeat.

    As in ``dim_mono.py::mutate``: each λ_i, with probability p, is redrawn uniformly from the grid
    between its neighbours [λ_{i−1}, λ_{i+1}] (λ_{i−1} already updated), so the result is monotone
    by construction. n̂ is redrawn from ``space.starts`` with the same probability.
    """
    n, top = space.n_dims, space.k_max
    for _ in range(max_tries):
        k = list(genome.k)
        for i in range(n):
            if rng.random() < p:
                lo = k[i - 1] if i > 0 else 0
                hi = k[i + 1] if i < n - 1 else top
                k[i] = int(rng.integers(lo, hi + 1))
        start = genome.start
        if len(space.starts) > 1 and rng.random() < p:
            start = int(space.starts[rng.integers(len(space.starts))])
        child = Genome(tuple(k), start)
        if child not in seen:
            return child
    return None


def crossover(first: Genome, second: Genome, space: SearchSpace, rng: np.random.Generator, seen: set[Genome],
              *, p: float = 0.15, max_tries: int = 20) -> Genome | None:
    """A child of ``first`` taking each gene (λ_i or n̂) from ``second`` with probability p.

    A child that breaks λ_i ≤ λ_{i+1} or was seen before is discarded; after ``max_tries``
    discards, None (the caller then mutates ``first`` instead, as ``genetic_base.py`` does).
    p = 0.15 is ``dim_mono.py``'s 0.3 × 0.5.
    """
    if first == second:
        return None
    for _ in range(max_tries):
        take = rng.random(space.n_dims + 1) < p
        k = tuple(b if t else a for a, b, t in zip(first.k, second.k, take[:-1]))
        child = Genome(k, second.start if take[-1] else first.start)
        if all(a <= b for a, b in zip(k, k[1:])) and child not in seen:
            return child
    return None


@dataclass
class SearchResult:
    """What one search leaves behind. ``history``: every genome scored, with its iteration and fitness."""

    space: SearchSpace
    best: Genome
    best_fitness: float
    curve: list[float]  # best fitness in the population after each iteration (0 = initial population)
    history: list[tuple[int, Genome, float]] = field(default_factory=list)

    @property
    def scaling(self) -> Scaling:
        return self.space.scaling(self.best)

    def all_factors(self) -> np.ndarray:
        """``(N, d/2)``: the λ of every candidate ever scored."""
        return np.stack([self.space.factors(g) for _, g, _ in self.history])


ScoreFn = Callable[[list[Scaling]], Sequence[float]]


def evolve(score: ScoreFn, space: SearchSpace, seeds: Sequence[Scaling], *, population: int = 16,
           parents: int = 8, mutations: int = 4, crossovers: int = 4, iterations: int = 10, seed: int = 0,
           p_mutate: float = 0.3, p_cross: float = 0.15) -> SearchResult:
    """LongRoPE's evolutionary search (``genetic_base.py::run_genetic_algorithm``), lower fitness = better.

    * Initial population: the seeds (snapped to the grid), then mutants of the seeds in turn.
    * Each iteration keeps the ``parents`` best (elitist), adds ``mutations`` mutants of random
      parents and ``crossovers`` children of random parent pairs, and scores all new children with
      **one** call to ``score`` (one batched pass).
    * ``score(list of Scaling) -> fitness per scaling``. Reproducible: same ``seed``, same result.

    The official defaults are population 64, parents 32, 16 + 16 children, 40 iterations.
    """
    if not 2 <= parents <= population or mutations < 0 or crossovers < 0 or iterations < 0:
        raise ValueError(f"need 2 <= parents <= population, mutations/crossovers/iterations >= 0; got "
                         f"population={population}, parents={parents}, mutations={mutations}, "
                         f"crossovers={crossovers}, iterations={iterations}")
    if not seeds:
        raise ValueError("seeds must hold at least one Scaling (the paper uses PI, NTK and YaRN)")
    rng = np.random.default_rng(seed)
    seen: set[Genome] = set()
    initial: list[Genome] = []
    for s in seeds:
        g = space.snap(s.factors.numpy(), s.start if s.start in space.starts else space.starts[0])
        if g not in seen:
            seen.add(g)
            initial.append(g)
    n_seeds = len(initial)
    for j in range(population - n_seeds):
        g = mutate(initial[j % n_seeds], space, rng, seen, p=p_mutate)
        if g is not None:
            seen.add(g)
            initial.append(g)

    def score_all(genomes: list[Genome], iteration: int) -> list[tuple[Genome, float]]:
        fits = [float(f) for f in score([space.scaling(g) for g in genomes])]
        if len(fits) != len(genomes):
            raise ValueError(f"score returned {len(fits)} values for {len(genomes)} candidates")
        history.extend((iteration, g, f) for g, f in zip(genomes, fits))
        return list(zip(genomes, fits))

    history: list[tuple[int, Genome, float]] = []
    pop = score_all(initial, 0)
    curve = [min(f for _, f in pop)]
    for it in range(1, iterations + 1):
        par = sorted(pop, key=lambda gf: gf[1])[:parents]
        kids: list[Genome] = []
        for _ in range(mutations):
            g = mutate(par[rng.integers(len(par))][0], space, rng, seen, p=p_mutate)
            if g is not None:
                seen.add(g)
                kids.append(g)
        for _ in range(crossovers):
            i, j = sorted(rng.choice(len(par), 2, replace=False).tolist())
            g = crossover(par[i][0], par[j][0], space, rng, seen, p=p_cross)
            if g is None:
                g = mutate(par[i][0], space, rng, seen, p=p_mutate)
            if g is not None:
                seen.add(g)
                kids.append(g)
        pop = par + (score_all(kids, it) if kids else [])
        curve.append(min(f for _, f in pop))
    best, best_fit = min(pop, key=lambda gf: gf[1])
    return SearchResult(space, best, best_fit, curve, history)


# ----------------------------------------------------------------------------------------------
# Searching, fine-tuning and evaluating the toy
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GAConfig:
    """Search sizes. The paper's: population 64, parents 32, 16 + 16 children, 40 iterations, fitness on
    5 PG19 documents (tier-a-verified-2 §7). Ours are a quarter of the population, a quarter of the
    iterations."""

    population: int = 16
    parents: int = 8
    mutations: int = 4
    crossovers: int = 4
    iterations: int = 10
    n_docs: int = 8  # validation documents in the fitness


def baseline_seeds(cfg: ShortLMConfig, scale: float) -> list[Scaling]:
    """The paper's initial population: PI, NTK-aware and YaRN at ``scale``."""
    return [baseline(m, scale, head_dim=cfg.head_dim, base=cfg.rope_base, original_length=cfg.train_len)
            for m in ("pi", "ntk", "yarn")]


def search(model: TinyLM, cfg: ShortLMConfig, scale: float, val_docs: torch.Tensor, ga: GAConfig, *,
           seeds: Sequence[Scaling] | None = None, length: int | None = None, mscale: float | None = None,
           seed: int = 0, backend: str = "auto") -> SearchResult:
    """Search λ (≤ 1.25·``scale``) and n̂ for inputs of ``length`` tokens (default ``scale·train_len``).

    Fitness: perplexity on the first ``ga.n_docs`` validation documents cut to ``length``, each
    generation scored in batched passes. Seeds default to PI, NTK and YaRN at ``scale``; the
    temperature defaults to LongRoPE's √(1 + ln s / ln L).
    """
    length = length or int(round(scale * cfg.train_len))
    if not 2 <= length + 1 <= val_docs.shape[1]:
        raise ValueError(f"length={length} needs documents of length+1 tokens; val_docs are {val_docs.shape[1]}")
    docs = val_docs[:ga.n_docs, :length + 1]
    space = SearchSpace(scale, cfg.head_dim, cfg.train_len, starts=starts_for(cfg.train_len),
                        mscale=mscale if mscale is not None else longrope_mscale(scale, cfg.train_len))

    def score(scalings: list[Scaling]) -> list[float]:
        return population_nll(model, docs, scalings, backend=backend).exp().tolist()

    return evolve(score, space, list(seeds) if seeds else baseline_seeds(cfg, scale), population=ga.population,
                  parents=ga.parents, mutations=ga.mutations, crossovers=ga.crossovers, iterations=ga.iterations,
                  seed=seed)


def fine_tune(model: TinyLM, cfg: ShortLMConfig, scaling: Scaling, train_stream: torch.Tensor, *, length: int,
              steps: int, lr: float, seed: int = 0) -> TinyLM:
    """A copy of ``model`` trained ``steps`` more steps on ``length``-token inputs under ``scaling``.

    The batch holds ``batch_size·train_len/length`` sequences, so a step sees as many tokens as in
    pre-training. The copy's ``rotary`` is reset to plain RoPE afterwards: a scaling is always passed
    explicitly when it is evaluated.
    """
    from companion.train import train

    tuned = copy.deepcopy(model)
    scaling.apply(tuned)
    batch = max(1, cfg.batch_size * cfg.train_len // length)
    torch.manual_seed(seed)
    train(tuned, training_batches(cfg, train_stream, length, batch_size=batch, seed=seed + 1), steps=steps,
          lr=lr, desc=f"fine-tune at {length}")
    tuned.rotary.set_scaling(None)
    tuned.eval()
    return tuned


def factors_for_length(n_tokens: int, *, short: Scaling, long: Scaling, train_len: int) -> Scaling:
    """LongRoPE's short-context recovery: the short factors up to the training length, the long ones beyond."""
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    return short if n_tokens <= train_len else long


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of precomputed results; the explorer calls explorer_figure)
# ----------------------------------------------------------------------------------------------
COLOURS = {"none": "#7f7f7f", "pi": "#1f77b4", "ntk": "#2ca02c", "yarn": "#ff7f0e", "longrope": "#d62728"}


def _colour(name: str) -> str:
    return COLOURS.get(name.split(" ")[0].split("(")[0], "#9467bd")


def lambda_figure(scalings: dict[str, Scaling], *, title: str = "Rescale factor λ_i per frequency", height=380):
    """λ_i against dim i (fast dims left), log scale: one line per scaling."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure(title, "frequency index i (θ_i = b^(−2i/d): fast → slow)", "λ_i (log scale)", height=height)
    for name, s in scalings.items():
        fig.add_trace(go.Scatter(x=np.arange(len(s.factors)), y=s.factors.numpy(), mode="lines+markers",
                                 name=LABELS.get(name, name) + (f" (n̂={s.start})" if s.start else ""),
                                 line=dict(color=_colour(name))))
    fig.update_yaxes(type="log")
    return fig


def ppl_figure(lengths: Sequence[int], curves: dict[str, np.ndarray], *, train_len: int, title: str,
               height: int = 400):
    """Perplexity against evaluation length, one line per method, with the training length marked."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure(title, "evaluation length (tokens)", "perplexity (log scale)", height=height)
    for name, ppl in curves.items():
        fig.add_trace(go.Scatter(x=list(lengths), y=np.asarray(ppl), mode="lines+markers",
                                 name=LABELS.get(name, name), line=dict(color=_colour(name))))
    fig.add_vline(x=train_len, line_dash="dot", line_color="#444", annotation_text="training length")
    fig.update_yaxes(type="log")
    fig.update_xaxes(type="log", tickvals=list(lengths))
    return fig


def passkey_figure(grids: dict[str, np.ndarray], lengths: Sequence[int], depths: Sequence[float], *,
                   title: str = "Passkey accuracy by length and needle depth", height: int = 330):
    """One heat map per method: rows = lengths, columns = needle depth, colour = accuracy."""
    import plotly.graph_objects as go

    from companion import viz

    names = list(grids)
    fig = viz.subplots(1, len(names), titles=[LABELS.get(n, n) for n in names], height=height,
                       horizontal_spacing=0.03)
    for col, name in enumerate(names, start=1):
        fig.add_trace(go.Heatmap(z=grids[name], x=[f"{d:.2f}" for d in depths], y=[str(L) for L in lengths],
                                 zmin=0, zmax=1, colorscale="Viridis", showscale=col == len(names),
                                 colorbar=dict(title="accuracy"), texttemplate="%{z:.2f}",
                                 hovertemplate="length %{y}, depth %{x}: %{z:.2f}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="depth", row=1, col=col)
    fig.update_yaxes(title_text="length", row=1, col=1)
    fig.update_yaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=True, row=1, col=1)
    fig.update_layout(title=title)
    return fig


def ga_figure(results: dict[str, SearchResult], *, title: str = "Evolutionary search: fitness per iteration",
              height: int = 400):
    """Every candidate's fitness (dots) and the population's best (line), one colour per search."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure(title, "iteration (0 = initial population)", "fitness: validation perplexity (log)",
                     height=height)
    for j, (name, res) in enumerate(results.items()):
        colour = viz.SEQUENCE[j % len(viz.SEQUENCE)]
        its = [it for it, _, _ in res.history]
        fits = [f for _, _, f in res.history]
        fig.add_trace(go.Scatter(x=np.asarray(its) + 0.15 * (j - len(results) / 2), y=fits, mode="markers",
                                 marker=dict(color=colour, size=5, opacity=0.35), name=f"{name}: candidates",
                                 legendgroup=name, showlegend=False))
        fig.add_trace(go.Scatter(x=np.arange(len(res.curve)), y=res.curve, mode="lines+markers",
                                 line=dict(color=colour, width=3), name=name, legendgroup=name))
    fig.update_yaxes(type="log")
    return fig


def explorer_figure(table: dict[tuple[str, float], dict], lengths: Sequence[int], *, method: str, scale: float,
                    train_len: int):
    """Left: λ_i of ``method`` at ``scale`` (PI at that scale dashed, for reference). Right: perplexity
    against length for every method at that scale, the chosen one bold.

    ``table[(method, scale)] = {"scaling": Scaling, "ppl": (len(lengths),) array}``.
    """
    import plotly.graph_objects as go

    from companion import viz

    if (method, scale) not in table:
        raise ValueError(f"no result for method={method!r}, scale={scale!r}; have {sorted(table)}")
    fig = viz.subplots(1, 2, titles=[f"λ_i: {LABELS.get(method, method)}, s = {scale:g}",
                                     f"perplexity against length, every method at s = {scale:g}"],
                       height=420, horizontal_spacing=0.1)
    chosen = table[(method, scale)]["scaling"]
    if ("pi", scale) in table and method != "pi":
        pi = table[("pi", scale)]["scaling"]
        fig.add_trace(go.Scatter(x=np.arange(len(pi.factors)), y=pi.factors.numpy(), name="PI (reference)",
                                 line=dict(color=_colour("pi"), dash="dash")), row=1, col=1)
    fig.add_trace(go.Scatter(x=np.arange(len(chosen.factors)), y=chosen.factors.numpy(), mode="lines+markers",
                             name=LABELS.get(method, method), line=dict(color=_colour(method), width=3)),
                  row=1, col=1)
    for (m, s), entry in table.items():
        if s != scale:
            continue
        fig.add_trace(go.Scatter(x=list(lengths), y=np.asarray(entry["ppl"]), mode="lines+markers",
                                 name=LABELS.get(m, m), showlegend=m != method,
                                 line=dict(color=_colour(m), width=4 if m == method else 1.5),
                                 opacity=1.0 if m == method else 0.5), row=1, col=2)
    fig.add_vline(x=train_len, line_dash="dot", line_color="#444", row=1, col=2)
    fig.add_vline(x=train_len * scale, line_dash="dash", line_color=_colour(method), row=1, col=2)
    fig.update_yaxes(type="log", title_text="λ_i", row=1, col=1)
    fig.update_yaxes(type="log", title_text="perplexity", row=1, col=2)
    fig.update_xaxes(title_text="frequency index i (fast → slow)", row=1, col=1)
    fig.update_xaxes(type="log", tickvals=list(lengths), title_text="evaluation length", row=1, col=2)
    fig.update_layout(title=f"{LABELS.get(method, method)} at s = {scale:g}: dotted line = training length, "
                            "dashed = target length s·L")
    return fig
