"""companion/papers/context_length_scaling.py: the exact Bayes floor, the generator, the batched
learners against one-model references, the batched optimizer, training, PCA/ID and the figures."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.papers import context_length_scaling as cls

SMALL = cls.Arch(kind="mlp", hidden=16, n_in=12, n_tasks=5)
SMALL_BI = cls.Arch(kind="bimlp", hidden=16, bottleneck=6, head_hidden=8, n_in=12, n_tasks=5)


# ----------------------------------------------------------------------------------------------
# The task and its Bayes floor
# ----------------------------------------------------------------------------------------------
def test_task_table_is_the_official_one():
    assert len(cls.TASKS) == 50
    ls = [l for l, _ in cls.TASKS]
    assert ls == sorted(ls) and ls[0] == 21 and ls[-1] == 522
    assert all(1 <= a < l for l, a in cls.TASKS)
    assert sum(l > 100 for l in ls) == 7  # these 7 tasks always have random labels


def test_bayes_floor_reproduces_the_spec_values():
    spec = {27: 0.471, 32: 0.388, 36: 0.333, 43: 0.263, 63: 0.166, 94: 0.097}
    for ctl, value in spec.items():
        assert abs(cls.bayes_risk(ctl) - value) < 5e-4
    assert cls.bayes_risk(0) == cls.LN2 and cls.bayes_risk(20) == cls.LN2
    assert cls.bayes_risk(100) == pytest.approx(7 / 50 * math.log(2), abs=1e-15)
    assert cls.bayes_risk(600) == cls.bayes_risk(100)  # bits past 100 do not exist: labels are coins


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_bayes_floor_equals_bruteforce_enumeration(data):
    n_bits = data.draw(st.integers(2, 9))
    n_tasks = data.draw(st.integers(1, 6))
    tasks = []
    for _ in range(n_tasks):
        l = data.draw(st.integers(2, n_bits + 3))  # l > n_bits: a random-label task
        tasks.append((l, data.draw(st.integers(1, l - 1))))
    ctl = data.draw(st.integers(0, n_bits))
    exact = cls.bayes_risk(ctl, tasks, n_bits)
    assert abs(exact - cls.bayes_risk_bruteforce(ctl, tasks, n_bits)) <= 1e-12


def test_bayes_floor_rejects_bad_input():
    with pytest.raises(ValueError, match="ctl"):
        cls.bayes_risk(-1)
    with pytest.raises(ValueError, match="ctl"):
        cls.bayes_risk(3.5)
    with pytest.raises(ValueError, match="tasks"):
        cls.bayes_risk(5, [(3, 3)])
    with pytest.raises(ValueError, match="n_bits"):
        cls.bayes_risk_bruteforce(2, [(3, 1)], 20)


def test_generator_labels_tasks_and_splits():
    d = cls.make_xor_bits(2000, seed=3)
    assert d.bits.shape == (2000, 100) and d.bits.dtype == torch.uint8
    assert torch.equal(d.task, torch.arange(2000) % 50)
    for i in range(0, 2000, 7):
        l, a = cls.TASKS[i % 50]
        if l <= 100:
            assert d.label[i].item() == (d.bits[i, a - 1] ^ d.bits[i, l - 1]).item()
    coins = d.label[d.task >= 43]  # tasks with l > 100
    assert 0.4 < coins.mean().item() < 0.6
    again = cls.make_xor_bits(2000, seed=3)
    assert torch.equal(again.bits, d.bits) and torch.equal(again.label, d.label)
    assert not torch.equal(cls.make_xor_bits(2000, seed=3, split="val").bits, d.bits)
    assert torch.equal(d.head(100).bits, d.bits[:100])
    with pytest.raises(ValueError, match="split"):
        cls.make_xor_bits(10, seed=0, split="dev")
    with pytest.raises(ValueError, match="n must be"):
        cls.make_xor_bits(0, seed=0)


def test_bayes_predictor_scores_exactly_the_floor_on_generated_data():
    """The Bayes rule (certain where bit l is visible, 1/2 elsewhere) on real samples, in fp64."""
    d = cls.make_xor_bits(5000, seed=1)  # 100 samples of every task
    for ctl in (27, 43, 94):
        visible = torch.tensor([l <= ctl for l, _ in cls.TASKS])[d.task]
        p = torch.where(visible, d.label.double(), torch.full_like(d.label.double(), 0.5))
        loss = F.binary_cross_entropy(p, d.label.double()).item()
        assert abs(loss - cls.bayes_risk(ctl)) < 1e-12


# ----------------------------------------------------------------------------------------------
# Batched learners and optimizer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", [SMALL, SMALL_BI], ids=["mlp", "bimlp"])
def test_batched_models_equal_one_model_references_fp64(arch):
    assert cls.batched_matches_single(arch, ctls=(1, 5, 12, 12)) < 1e-12


def test_init_matches_nn_linear_bounds_and_masks_rows():
    params = cls.init_params(SMALL, [4, 12], seed=0)
    assert params["W_bits"][0, 4:].abs().max() == 0
    assert params["W_bits"][0, :4].abs().max() <= 1 / math.sqrt(4 + 5)
    assert params["W_bits"][1].abs().max() <= 1 / math.sqrt(12 + 5)
    assert params["W_bits"][1].abs().max() > 0.5 / math.sqrt(12 + 5)
    assert params["W2"].abs().max() <= 1 / math.sqrt(16)


def test_masked_bits_get_no_gradient_and_do_not_change_the_output():
    params = {k: v.double().requires_grad_() for k, v in cls.init_params(SMALL, [5], seed=1).items()}
    mask = cls.bit_mask([5], 12, torch.float64)
    bits = torch.randint(0, 2, (1, 30, 12)).double()
    task = torch.randint(0, 5, (1, 30))
    out = cls.forward(SMALL, params, mask, bits, task)
    out.sum().backward()
    assert params["W_bits"].grad[0, 5:].abs().max() == 0
    flipped = bits.clone()
    flipped[..., 5:] = 1 - flipped[..., 5:]
    assert torch.equal(cls.forward(SMALL, params, mask, flipped, task), out)


def test_batched_adamw_equals_torch_adamw_with_clipping_per_model():
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,)}
    start = {k: torch.randn(2, *s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    grads = [{k: 3 * torch.randn(2, *s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
             for _ in range(4)]
    ours = {k: v.clone() for k, v in start.items()}
    m, v = ({k: torch.zeros_like(t) for k, t in start.items()} for _ in range(2))
    for step, g in enumerate(grads, start=1):
        cls.adamw_step(ours, g, m, v, step=step, lr=1e-2, weight_decay=0.1, clip=1.0)
    for model in range(2):
        ps = [torch.nn.Parameter(start[k][model].clone()) for k in shapes]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
        for g in grads:
            for p, k in zip(ps, shapes, strict=True):
                p.grad = g[k][model].clone()
            torch.nn.utils.clip_grad_norm_(ps, max_norm=1.0)
            opt.step()
        for p, k in zip(ps, shapes, strict=True):
            torch.testing.assert_close(ours[k][model], p.detach(), rtol=1e-12, atol=1e-14)


def test_arch_and_config_reject_bad_values():
    with pytest.raises(ValueError, match="kind"):
        cls.Arch(kind="cnn")
    with pytest.raises(ValueError, match="hidden"):
        cls.Arch(hidden=0)
    with pytest.raises(ValueError, match="batch_size"):
        cls.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        cls.TrainConfig(lr=0)
    with pytest.raises(ValueError, match="ctls"):
        cls.init_params(SMALL, [13], seed=0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
TINY_TASKS = [(4, 1), (6, 2), (9, 3)]


def _tiny_data(n_train, seeds=(0,)):
    return cls.make_datasets(list(seeds), n_train, 600, 900, tasks=TINY_TASKS)


def test_training_reaches_the_floor_when_every_bit_is_visible_and_not_otherwise():
    arch = cls.Arch(kind="mlp", hidden=32, n_in=9, n_tasks=3)
    train, val, test = _tiny_data(6000)
    cfg = cls.TrainConfig(batch_size=100, lr=3e-3, max_epochs=12, patience=12)
    res = cls.train_models(arch, [9, 3], [0, 0], train, val, test, cfg)
    assert res.test_loss[0] < 0.15  # every label is a function of the 9 visible bits
    assert res.test_loss[1] > math.log(2) - 0.02  # with 3 bits no far bit is visible: coin flips
    assert res.test_task_loss.shape == (2, 3)
    assert np.allclose(res.test_task_loss.mean(1), res.test_loss, atol=1e-9)  # balanced test set


def test_training_keeps_the_best_epoch_and_stops_early():
    arch = cls.Arch(kind="mlp", hidden=16, n_in=9, n_tasks=3)
    train, val, test = _tiny_data(300, seeds=(0, 1))
    cfg = cls.TrainConfig(batch_size=50, lr=1e-2, max_epochs=40, patience=2)
    res = cls.train_models(arch, [9, 9, 3], [0, 1, 1], train, val, test, cfg)
    assert (res.best_epoch <= res.epochs_run).all() and (res.epochs_run - res.best_epoch <= 2).all()
    assert res.epochs_run.min() < 40  # 300 samples: something overfits and stops
    for m in range(3):
        assert res.val_loss[m] == min(res.val_curve[m])
    mask = cls.bit_mask(res.ctls, arch.n_in)
    again = cls.evaluate(arch, res.params, mask, val, res.seed_index)
    np.testing.assert_allclose(again, res.val_loss, rtol=0, atol=1e-6)  # the best params (fp32, other batch)
    assert res.sample_passes > 0 and res.seconds > 0


def test_train_models_rejects_mismatched_inputs():
    arch = cls.Arch(kind="mlp", hidden=16, n_in=9, n_tasks=3)
    train, val, test = _tiny_data(200)
    with pytest.raises(ValueError, match="seed_index"):
        cls.train_models(arch, [9], [1], train, val, test, cls.TrainConfig())


def test_run_grid_shapes_and_argmin():
    grid = cls.run_grid([21, 24], [100, 200], [0, 1], arch=cls.Arch(hidden=8, n_in=24),
                        cfg=cls.TrainConfig(batch_size=100, max_epochs=1), n_val=100, n_test=100, progress=False)
    assert grid.loss.shape == grid.val_loss.shape == (2, 2, 2) and grid.task_loss.shape == (2, 2, 2, 50)
    assert set(grid.argmin_ctl()) <= {21, 24} and grid.argmin_ctl_per_seed().shape == (2, 2)
    with pytest.raises(ValueError, match="sizes"):
        cls.run_grid([21], [10], [0], arch=cls.Arch(hidden=8, n_in=24), cfg=cls.TrainConfig())


# ----------------------------------------------------------------------------------------------
# Intrinsic dimension and fits
# ----------------------------------------------------------------------------------------------
def test_pca_and_intrinsic_dimension_count_the_directions():
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    feats = latent @ torch.randn(3, 10, generator=gen, dtype=torch.float64) + 5.0  # rank 3, shifted
    eig = cls.pca_eigenvalues(feats)
    assert eig.shape == (10,) and (np.diff(eig) <= 1e-12).all()
    assert cls.intrinsic_dimension(eig) == 3
    assert cls.intrinsic_dimension([1.0, 0.5, 0.004, 0.003]) == 3  # 0.003 < 0.0035 * 1.0
    with pytest.raises(ValueError, match="eigvals"):
        cls.intrinsic_dimension([0.0, 0.0])
    with pytest.raises(ValueError, match="features"):
        cls.pca_eigenvalues(torch.zeros(1, 3))


def test_model_features_have_the_official_widths():
    params = cls.init_params(SMALL, [4, 12], seed=0)
    data = [cls.make_xor_bits(20, seed=0, tasks=TINY_TASKS + [(10, 4), (11, 5)])]
    assert cls.model_features(SMALL, params, [4, 12], [0, 0], data, 20).shape == (2, 20, 8)
    params_bi = cls.init_params(SMALL_BI, [4, 12], seed=0)
    assert cls.model_features(SMALL_BI, params_bi, [4, 12], [0, 0], data, 20).shape == (2, 20, 6)


def test_linear_and_power_law_fits():
    x = np.array([1.0, 2.0, 5.0, 7.0])
    assert cls.linear_fit(x, 3 * x - 2) == pytest.approx((3.0, -2.0, 1.0), abs=1e-12)
    ctx = np.array([8, 16, 32, 64, 128, 256, 512], dtype=float)
    fit = cls.fit_bayes_risk_curve(ctx, 2.0 + 6.0 / ctx**0.7)
    assert fit["C0"] == pytest.approx(2.0, abs=1e-6) and fit["gamma"] == pytest.approx(0.7, abs=1e-6)
    assert fit["r2"] > 1 - 1e-12


def test_llama_numbers_are_the_transcribed_ones():
    assert len(cls.LLAMA_CTX) == len(cls.LLAMA_CE) == 12
    assert [round(v, 3) for v in cls.LLAMA_CE] == [3.953, 3.539, 3.283, 2.996, 2.839, 2.652, 2.531, 2.362, 2.218,
                                                   2.147, 2.127, 2.084]
    assert list(cls.LLAMA_CTX) == sorted(cls.LLAMA_CTX) and list(cls.LLAMA_CE) == sorted(cls.LLAMA_CE, reverse=True)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _fake_grid():
    rng = np.random.default_rng(0)
    ctls, sizes = [24, 43, 94], [1000, 4000]
    task_loss = rng.uniform(0, math.log(2), size=(2, 3, 2, 50))
    return cls.GridResult(ctls, sizes, [0, 1], task_loss.mean(-1), task_loss, np.ones((2, 3, 2), dtype=int))


def _fake_id():
    rng = np.random.default_rng(1)
    ids = np.array([[3, 8, 12], [4, 9, 13]])
    eig = np.sort(rng.uniform(1e-5, 1, size=(2, 3, 8)), axis=-1)[..., ::-1]
    return cls.IDResult([21, 23, 25], [0, 1], 1000, "mlp", 0.7 - 0.02 * ids, ids, ids + 50, eig / eig[..., :1],
                        0.7 - 0.02 * ids)


def test_explorer_figure_follows_its_controls():
    grid = _fake_grid()
    base = cls.loss_explorer_figure(grid, size=1000, n_tasks=50)
    other_size = cls.loss_explorer_figure(grid, size=4000, n_tasks=50)
    fewer = cls.loss_explorer_figure(grid, size=1000, n_tasks=10)
    assert list(base.data[1].y) != list(other_size.data[1].y)
    assert list(base.data[0].y) != list(fewer.data[0].y)  # the Bayes floor of the first 10 tasks
    assert len(fewer.data[-1].y) == 10  # heatmap rows
    with pytest.raises(ValueError, match="size"):
        cls.loss_explorer_figure(grid, size=123)
    with pytest.raises(ValueError, match="n_tasks"):
        cls.loss_explorer_figure(grid, size=1000, n_tasks=0)


def test_other_figures_build():
    grid, res = _fake_grid(), _fake_id()
    assert len(cls.bayes_floor_figure([24, 43]).data) == 3
    assert cls.loss_curves_figure(grid).layout.title.text.startswith("Loss against")
    assert cls.loss_curves_figure(grid, n_tasks=16, highlight=1000).data
    assert cls.argmin_figure(grid).data
    assert len(cls.spectrum_figure(res).data) == 3
    assert "R²" in cls.id_figure(res).layout.annotations[1].text
    assert cls.llama_figure().data
