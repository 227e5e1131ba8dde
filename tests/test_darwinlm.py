"""companion/papers/darwinlm.py: database, shrinking, mutation, fitness, search, figures.

A tiny untrained MHA model (2 layers, d=32, 8 heads of 4, d_ff=64) on random tokens keeps
this file fast; the trained zoo models are exercised by the notebook.
"""

import copy

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.model import ModelConfig, TinyLM
from companion.papers import darwinlm as dl

VOCAB = 50


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=8, d_ff=64)).to(dtype).eval()


def _pools(seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda n: torch.randint(0, VOCAB, (n,), generator=gen)
    return dl.Pools(mk(4000), mk(4000), mk(8000), mk(3000))


@pytest.fixture(scope="module")
def setup64():
    """(dense fp64 model, pools, database built with the torch reference)."""
    model, pools = _model(torch.float64), _pools()
    windows = dl.sample_windows(pools.hessian, 64, np.random.default_rng(0))
    return model, pools, dl.build_database(model, windows, backend="reference")


@pytest.fixture(scope="module")
def setup32():
    model, pools = _model(torch.float32), _pools()
    windows = dl.sample_windows(pools.hessian, 64, np.random.default_rng(0))
    return model, pools, dl.build_database(model, windows, backend="reference")


genomes = st.tuples(st.tuples(st.integers(0, 8), st.integers(0, 8)),
                    st.tuples(st.integers(0, 8), st.integers(0, 8))).map(lambda t: dl.Genome(*t))


# ---------------------------------------------------------------------------------------------- database
def test_database_levels_span_dense_to_removed(setup64):
    model, _, db = setup64
    assert db.n_levels == 9 and db.n_layers == 2
    for i, block in enumerate(model.blocks):
        assert torch.equal(db.attn[i].weights[0], block.attn.o_proj.weight.detach())
        assert torch.equal(db.mlp[i].weights[0], block.mlp.down.weight.detach())
        assert db.attn[i].weights[-1].abs().max() == 0 and db.mlp[i].weights[-1].abs().max() == 0
        assert db.attn[i].removed == tuple(range(9)) and db.mlp[i].removed == tuple(range(0, 65, 8))
        assert int(db.attn[i].kept(3).sum()) == 5 and db.attn[i].kept_columns(3).numel() == 5 * 4
        assert sorted(db.mlp[i].order.tolist()) == list(range(64))


def test_database_cpu_backend_matches_reference(setup64):
    model, pools, db = setup64
    windows = dl.sample_windows(pools.hessian, 64, np.random.default_rng(0))
    other = dl.build_database(model, windows, backend="cpu")
    for a, b in zip(db.attn + db.mlp, other.attn + other.mlp):
        assert torch.equal(a.order, b.order)
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-10)


def test_obs_beats_magnitude_and_curves_are_anchored(setup64):
    model, _, db = setup64
    curves = dl.reconstruction_curves(model, db)
    for kind in ("attn", "mlp"):
        obs, mag = curves[f"{kind}_obs"], curves[f"{kind}_mag"]
        assert np.allclose(obs[:, 0], 0) and np.allclose(mag[:, 0], 0)  # nothing removed
        assert np.allclose(obs[:, -1], 1) and np.allclose(mag[:, -1], 1)  # everything removed: Ŵ = 0
        assert (obs <= mag + 1e-12).all()


def test_hessians_match_explicit_inputs():
    model = _model(torch.float64)
    windows = torch.randint(0, VOCAB, (3, 9))
    captured = []
    handle = model.blocks[1].mlp.down.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    model(windows[:, :-1])
    handle.remove()
    X = captured[0].reshape(-1, 64)
    _, h_mlp = dl.layer_hessians(model, windows)
    torch.testing.assert_close(h_mlp[1], 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-14)


def test_damped_inverse_and_schedule_errors():
    H = torch.eye(3, dtype=torch.float64) * 2
    torch.testing.assert_close(dl.damped_inverse(H, 0.5), torch.eye(3, dtype=torch.float64) / 3)
    with pytest.raises(ValueError, match="rel_damp"):
        dl.damped_inverse(H, 0.0)
    with pytest.raises(ValueError, match="n_levels"):
        dl.even_schedule(10, 4)
    with pytest.raises(ValueError, match="MHA"):
        gqa = TinyLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=8, n_kv_heads=2))
        dl.build_database(gqa, torch.randint(0, VOCAB, (2, 9)))


# ---------------------------------------------------------------------------------------------- shrinking
@settings(max_examples=15, deadline=None)
@given(genome=genomes)
def test_shrunk_model_equals_masked_model_fp64(setup64, genome):
    model, pools, db = setup64
    x = dl.sample_windows(pools.heldout, 3, np.random.default_rng(1))[:, :-1]
    masked, small = dl.masked_model(model, db, genome), dl.shrink(model, db, genome)
    torch.testing.assert_close(small(x).logits, masked(x).logits, rtol=0, atol=1e-12)
    fixed = model.num_params() - dl.prunable_params(model.cfg, db, dl.Genome.uniform(2, 0))
    assert small.num_params() == fixed + dl.prunable_params(model.cfg, db, genome)


def test_shrink_really_removes_rows_and_columns(setup64):
    model, _, db = setup64
    small = dl.shrink(model, db, dl.Genome((2, 8), (4, 0)))
    assert small.blocks[0].attn.q_proj.weight.shape == (24, 32) and small.blocks[0].attn.o_proj.weight.shape == (32, 24)
    assert small.blocks[1].attn.n_heads == 0
    assert small.blocks[0].mlp.up.weight.shape == (32, 32) and small.blocks[1].mlp.down.weight.shape == (32, 64)
    assert model.blocks[0].attn.q_proj.weight.shape == (32, 32)  # the dense model is untouched


def test_bad_genome_raises(setup64):
    model, _, db = setup64
    with pytest.raises(ValueError, match="genome.attn"):
        dl.shrink(model, db, dl.Genome((0, 9), (0, 0)))
    with pytest.raises(ValueError, match="genome.mlp"):
        dl.masked_model(model, db, dl.Genome((0, 0), (0,)))


# ---------------------------------------------------------------------------------------------- mutation
@settings(max_examples=40, deadline=None)
@given(genome=genomes, seed=st.integers(0, 10_000))
def test_mutation_conserves_parameters_exactly(setup64, genome, seed):
    model, _, db = setup64
    levels = genome.attn + genome.mlp
    if all(lv == 0 for lv in genome.attn) and all(lv == 0 for lv in genome.mlp) or all(lv == 8 for lv in levels):
        return
    rng = np.random.default_rng(seed)
    try:
        child = dl.mutate(genome, rng, 9)
    except ValueError:  # a group with every layer at 0 or at 8 admits no switch
        return
    assert dl.prunable_params(model.cfg, db, child) == dl.prunable_params(model.cfg, db, genome)
    moved = sum(abs(a - b) for a, b in zip(child.attn + child.mlp, levels))
    assert moved <= 2 * 3 and moved % 2 == 0


def test_uneven_levels_break_conservation():
    """The correction in the spec: the switch conserves size only with evenly spaced levels."""
    removed = (0, 1, 3, 4)  # structures removed at levels 0..3: uneven gaps
    before = removed[2] + removed[2]  # two layers at level 2
    after = removed[1] + removed[3]  # one switched down, one up
    assert before != after


def test_mutate_is_seeded_and_raises_when_stuck():
    g = dl.Genome.uniform(3, 4)
    assert dl.mutate(g, np.random.default_rng(5), 9) == dl.mutate(g, np.random.default_rng(5), 9)
    with pytest.raises(ValueError, match="no level switch"):
        dl.mutate(dl.Genome.uniform(3, 0), np.random.default_rng(0), 9)


# ---------------------------------------------------------------------------------------------- fitness
def test_kl_to_dense():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    assert dl.kl_to_dense(a, a) == pytest.approx(0, abs=1e-12)
    p, q = a.double().softmax(-1), b.double().softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert dl.kl_to_dense(a, b) == pytest.approx(want, rel=1e-12)
    assert dl.kl_to_dense(a, b) > 0
    with pytest.raises(ValueError, match="cand_logits shape"):
        dl.kl_to_dense(a, b[:, :4])


def test_finetune_changes_weights_and_empty_is_noop(setup32):
    model, pools, _ = setup32
    m = copy.deepcopy(model)
    dl.finetune(m, torch.zeros(0, 9, dtype=torch.long), batch_size=4, lr=1e-3)
    assert torch.equal(m.embed.weight, model.embed.weight)
    dl.finetune(m, dl.sample_windows(pools.finetune, 8, np.random.default_rng(0)), batch_size=4, lr=1e-3)
    assert not torch.equal(m.embed.weight, model.embed.weight) and not m.training


def test_sample_windows_errors():
    with pytest.raises(ValueError, match="tokens must be 1-D"):
        dl.sample_windows(torch.zeros(2, 100, dtype=torch.long), 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_windows"):
        dl.sample_windows(torch.zeros(100, dtype=torch.long), 0, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------- search
TINY = dl.SearchConfig(generations=2, offspring=3, survivors=(2, 1), fitness_tokens=(128, 256),
                       finetune_tokens=(128, 128), batch_size=2)


def test_search_keeps_size_and_is_deterministic(setup32):
    model, pools, db = setup32
    res = dl.evolve(model, db, pools, target=4, cfg=TINY, seed=3)
    again = dl.evolve(model, db, pools, target=4, cfg=TINY, seed=3)
    assert res.parents == again.parents and res.heldout_kl == again.heldout_kl
    assert len(res.parents) == len(res.heldout_kl) == len(res.train_fitness) == 3
    assert res.parents[0] == dl.Genome.uniform(2, 4) and res.training_aware
    size = dl.prunable_params(model.cfg, db, res.parents[0])
    assert all(dl.prunable_params(model.cfg, db, g) == size for g in res.parents)
    free = dl.evolve(model, db, pools, target=4, cfg=TINY.training_free(), seed=3)
    assert not free.training_aware and len(free.parents) == 3


def test_search_config_validation(setup32):
    with pytest.raises(ValueError, match="one entry per stage"):
        dl.SearchConfig(survivors=(2, 1), fitness_tokens=(128,), finetune_tokens=(0, 0))
    with pytest.raises(ValueError, match="survivors must"):
        dl.SearchConfig(offspring=4, survivors=(8, 1), fitness_tokens=(128, 128), finetune_tokens=(0, 0))
    with pytest.raises(ValueError, match="survivors must"):
        dl.SearchConfig(survivors=(2, 4, 1), fitness_tokens=(128,) * 3, finetune_tokens=(0,) * 3)
    model, pools, db = setup32
    with pytest.raises(ValueError, match="target must"):
        dl.evolve(model, db, pools, target=8, cfg=TINY, seed=0)


def test_posttrain_is_fair_and_deterministic(setup32):
    model, pools, db = setup32
    g = dl.Genome((3, 5), (4, 4))
    a = dl.posttrain(model, db, g, pools, tokens=256, batch_size=2, n_eval=4)
    b = dl.posttrain(model, db, g, pools, tokens=256, batch_size=2, n_eval=4)
    assert a == b and a["params"] == dl.shrink(model, db, g).num_params()
    assert a["kl"] != a["kl_oneshot"]


def test_sensitivity_and_oneshot_pairs(setup32):
    model, pools, db = setup32
    sens = dl.layer_sensitivity(model, db, dl.sample_windows(pools.heldout, 2, np.random.default_rng(0)),
                                levels=(4, 8))
    assert sens["attn"].shape == (2, 9) and (sens["attn"][:, [4, 8]] > 0).all() and (sens["mlp"][:, 0] == 0).all()
    pairs = dl.oneshot_vs_finetuned(model, db, pools, target=4, n_genomes=3, ft_tokens=128, seed=0, batch_size=2)
    assert pairs["oneshot"].shape == (3,) and pairs["is_uniform"].tolist() == [True, False, False]
    assert dl.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert dl.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------- figures
@pytest.fixture(scope="module")
def searches(setup32):
    model, pools, db = setup32
    res = {t: dl.evolve(model, db, pools, target=t, cfg=TINY, seed=0) for t in (3, 5)}
    post = {(t, kind): {"kl": 0.1 * t + (kind == "aware")} for t in (3, 5) for kind in ("uniform", "aware")}
    return res, post


def test_explorer_figure_follows_its_controls(searches):
    res, post = searches
    base = dl.explorer_figure(res, post, target=3, generation=0, n_levels=9)
    assert isinstance(base, go.Figure)
    for other in (dict(target=5, generation=0), dict(target=3, generation=2)):
        fig = dl.explorer_figure(res, post, n_levels=9, **other)
        assert fig.to_json() != base.to_json()
    with pytest.raises(ValueError, match="no search for target"):
        dl.explorer_figure(res, post, target=4, generation=0, n_levels=9)


def test_other_figures_build(setup64, searches):
    model, pools, db = setup64
    res, _ = searches
    figs = [dl.reconstruction_figure(dl.reconstruction_curves(model, db)),
            dl.sensitivity_figure({"attn": np.random.rand(2, 9), "mlp": np.random.rand(2, 9)}),
            dl.oneshot_scatter_figure({"oneshot": np.array([0.1, 0.2, 0.3]), "finetuned": np.array([0.1, 0.3, 0.2]),
                                       "is_uniform": np.array([True, False, False])}),
            dl.profile_heatmap_figure(res[3], 9), dl.fitness_figure({"aware": res[3], "other": res[5]}),
            dl.comparison_figure({"uniform": [0.2, 0.3], "searched": [0.1, 0.2]}, seeds=[0, 1])]
    assert all(isinstance(f, go.Figure) and len(f.data) > 0 for f in figs)
