"""companion/papers/longrope.py: the monotone genetic search and the schedule helpers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.papers import longrope as lr


# ----------------------------------------------------------------------------------------------
# The GA: every mutation and crossover is monotone, in bounds and new
# ----------------------------------------------------------------------------------------------
@st.composite
def space_and_genomes(draw):
    n = draw(st.integers(2, 12))
    scale = draw(st.sampled_from([1.0, 1.5, 2.0, 4.0, 8.0]))
    space = lr.SearchSpace(scale, 2 * n if 2 * n >= 4 else 4, 128, starts=(0, 1, 4, 8))
    n = space.n_dims

    def genome():
        k = sorted(draw(st.lists(st.integers(0, space.k_max), min_size=n, max_size=n)))
        return lr.Genome(tuple(k), draw(st.sampled_from(space.starts)))

    return space, genome(), genome(), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None)
@given(case=space_and_genomes())
def test_mutation_and_crossover_keep_the_constraint(case):
    space, a, b, seed = case
    rng = np.random.default_rng(seed)
    seen = {a, b}
    for _ in range(5):
        child = lr.mutate(a, space, rng, seen)
        if child is not None:
            assert space.valid(child) and child not in seen
            assert lr.is_monotone(space.factors(child))
            seen.add(child)
        child = lr.crossover(a, b, space, rng, seen)
        if child is not None:
            assert space.valid(child) and child not in seen
            assert all(x in (p, q) for x, p, q in zip(child.k, a.k, b.k))
            seen.add(child)


def test_snap_keeps_baselines_monotone_and_on_the_grid():
    space = lr.SearchSpace(8, 32, 128)
    for m in ("pi", "ntk", "yarn"):
        g = space.snap(lr.baseline(m, 8, head_dim=32, base=1e4, original_length=128).factors.numpy())
        assert space.valid(g)
    assert space.k_max == 900  # λ ≤ 1.25·8 = 10 on a 0.01 grid


def _toy_score(target):
    return lambda scalings: [float(((s.factors.numpy() - target) ** 2).sum() + 0.01 * s.start) for s in scalings]


def test_evolve_is_reproducible_elitist_and_improves():
    space = lr.SearchSpace(4, 16, 128, starts=(0, 2, 4))
    target = np.linspace(1.2, 4.5, 8)
    seeds = [lr.baseline(m, 4, head_dim=16, base=1e4, original_length=128) for m in ("pi", "ntk", "yarn")]
    runs = [lr.evolve(_toy_score(target), space, seeds, population=12, parents=6, iterations=15, seed=s)
            for s in (3, 3, 4)]
    assert runs[0].best == runs[1].best and runs[0].curve == runs[1].curve
    assert runs[0].history != runs[2].history
    for res in runs:
        assert all(b <= a for a, b in zip(res.curve, res.curve[1:]))  # the best never gets worse
        assert res.curve[-1] < res.curve[0]
        assert all(space.valid(g) for _, g, _ in res.history)
        assert len({g for _, g, _ in res.history}) == len(res.history)  # nothing scored twice
    first = [f for it, _, f in runs[0].history if it == 0]
    assert len(first) == 12 and runs[0].best_fitness <= min(first)


def test_evolve_scores_each_generation_in_one_call():
    calls = []

    def score(scalings):
        calls.append(len(scalings))
        return [0.0] * len(scalings)

    lr.evolve(score, lr.SearchSpace(2, 16, 128), [lr.Scaling(torch.full((8,), 2.0))], population=10, parents=4,
              mutations=3, crossovers=2, iterations=4)
    assert calls == [10, 5, 5, 5, 5]


def test_factors_for_length_switches_at_the_training_length():
    short, long = lr.Scaling(torch.ones(4)), lr.Scaling(torch.full((4,), 8.0))
    assert lr.factors_for_length(128, short=short, long=long, train_len=128) is short
    assert lr.factors_for_length(129, short=short, long=long, train_len=128) is long


@pytest.mark.parametrize("call, match", [
    (lambda: lr.SearchSpace(2, 32, 128).snap(np.ones(3)), "shape"),
    (lambda: lr.SearchSpace(2, 32, 128).snap(np.ones(16), start=3), "start"),
    (lambda: lr.SearchSpace(2, 32, 128, step=0), "step"),
    (lambda: lr.factors_for_length(0, short=None, long=None, train_len=128), "n_tokens"),
    (lambda: lr.evolve(lambda s: [0.0] * len(s), lr.SearchSpace(2, 16, 128), [], population=4, parents=2), "seeds"),
    (lambda: lr.evolve(lambda s: [0.0] * len(s), lr.SearchSpace(2, 16, 128), [lr.Scaling(torch.ones(8))],
                       population=4, parents=1), "parents"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Figures: pure functions of precomputed results; the explorer's controls change the figure
# ----------------------------------------------------------------------------------------------
def _table():
    lengths = [128, 256, 512]
    table = {}
    for s in (2, 4):
        for j, m in enumerate(lr.METHODS):
            sc = (lr.baseline(m, s, head_dim=16, base=1e4, original_length=128) if m != "longrope"
                  else lr.Scaling(torch.linspace(1, 1.2 * s, 8), start=4, mscale=1.1))
            table[(m, s)] = {"scaling": sc, "ppl": np.array([10.0, 11 + j, 12 + s * j])}
    return table, lengths


def test_explorer_figure_follows_its_controls():
    table, lengths = _table()
    a = lr.explorer_figure(table, lengths, method="longrope", scale=4, train_len=128)
    b = lr.explorer_figure(table, lengths, method="pi", scale=4, train_len=128)
    c = lr.explorer_figure(table, lengths, method="longrope", scale=2, train_len=128)
    lam = lambda f: [tuple(t.y) for t in f.data if t.xaxis == "x" and "reference" not in t.name]
    assert lam(a) != lam(b) and lam(a) != lam(c)
    assert a.layout.title.text != b.layout.title.text
    with pytest.raises(ValueError, match="method"):
        lr.explorer_figure(table, lengths, method="xpos", scale=4, train_len=128)


def test_other_figures_draw_their_inputs():
    table, lengths = _table()
    scalings = {m: table[(m, 4)]["scaling"] for m in lr.METHODS}
    assert len(lr.lambda_figure(scalings).data) == 5
    curves = {m: table[(m, 4)]["ppl"] for m in lr.METHODS}
    assert len(lr.ppl_figure(lengths, curves, train_len=128, title="t").data) == 5
    grids = {m: np.full((2, 3), 0.5) for m in ("pi", "longrope")}
    fig = lr.passkey_figure(grids, [128, 256], [0.0, 0.5, 1.0])
    assert len(fig.data) == 2 and np.allclose(np.asarray(fig.data[0].z), 0.5)
    space = lr.SearchSpace(4, 16, 128)
    res = lr.evolve(lambda s: [float(x.factors.sum()) for x in s], space,
                    [lr.baseline("pi", 4, head_dim=16, base=1e4, original_length=128)], population=4, parents=2,
                    iterations=2)
    fig = lr.ga_figure({"s = 4": res})
    assert list(fig.data[1].y) == res.curve
