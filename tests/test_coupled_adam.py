"""companion/papers/coupled_adam.py: the optimizer, the exact zero-sum property, the experiment plumbing."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.model import ModelConfig, TinyLM
from companion.papers import coupled_adam as ca


def _train_pair(make_ours, make_theirs, shape=(17, 6), steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(*shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]
    out = []
    for make in (make_ours, make_theirs):
        p = nn.Parameter(start.clone())
        opt = make([p])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    return out


def test_uncoupled_groups_are_exactly_torch_adamw():
    ours, theirs = _train_pair(
        lambda ps: ca.CoupledAdam(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1))
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-15)


def test_coupled_with_one_row_is_adam():
    """With V = 1 the vocabulary mean is the element itself: Coupled Adam reduces to Adam."""
    ours, theirs = _train_pair(lambda ps: ca.CoupledAdam(ps, lr=1e-2, coupled=True),
                               lambda ps: ca.CoupledAdam(ps, lr=1e-2, coupled=False), shape=(1, 8))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(vocab=st.integers(2, 60), dim=st.integers(1, 12), steps=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_coupled_updates_sum_to_zero_whenever_gradients_do(vocab, dim, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(vocab, dim, generator=gen, dtype=torch.float64))
    start = p.detach().clone()
    opt = ca.CoupledAdam([{"params": [p], "coupled": True}], lr=0.05)
    for _ in range(steps):
        g = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
        p.grad = g - g.mean(0, keepdim=True)  # columns sum to zero, like softmax output gradients
        opt.step()
    delta = p.detach() - start
    assert delta.sum(0).abs().max() <= 1e-12 * delta.abs().sum()


def test_head_update_sum_separates_adam_from_coupled():
    adam, coupled = ca.head_update_sum("adam"), ca.head_update_sum("coupled")
    assert adam["grad_ratio"] < 1e-14 and coupled["grad_ratio"] < 1e-14  # the gradients always cancel
    assert coupled["update_ratio"] < 1e-14
    assert adam["update_ratio"] > 1e-2


def test_fused_kernel_matches_optimizer():
    assert ca.fused_matches_optimizer() < 1e-12


def test_param_groups_couple_only_the_embedding():
    model = TinyLM(ModelConfig(vocab_size=50, d_model=16, n_heads=2))
    groups = ca.coupled_param_groups(model)
    assert groups[0]["params"] == [model.embed.weight] and groups[0]["coupled"] and groups[0]["weight_decay"] == 0
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == model.num_params()
    opt = ca.make_optimizer("adam", model, lr=1e-3)
    assert not any(g["coupled"] for g in opt.param_groups)


def test_bad_arguments_raise_value_error():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="must be a \\(V, H\\) matrix"):
        ca.CoupledAdam([{"params": [p], "coupled": True}])
    with pytest.raises(ValueError, match="lr must be"):
        ca.CoupledAdam([p], lr=0)
    with pytest.raises(ValueError, match="betas"):
        ca.CoupledAdam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="kind must be"):
        ca.make_optimizer("sgd", TinyLM(ModelConfig(vocab_size=10, d_model=8, n_heads=2)), lr=1e-3)


@pytest.fixture(scope="module")
def tiny_results():
    cfg = ca.ExperimentConfig(vocab_size=64, n_tokens=20_000, d_model=16, n_heads=2, seq_len=16, batch_size=8,
                              steps=12, snapshot_every=4)
    return {(1.1, kind): ca.run_experiment(cfg, kind) for kind in ("adam", "coupled")}


def test_runs_share_data_and_init(tiny_results):
    adam, coupled = tiny_results[(1.1, "adam")], tiny_results[(1.1, "coupled")]
    torch.testing.assert_close(adam.snapshots[0], coupled.snapshots[0], rtol=0, atol=0)
    assert sorted(adam.snapshots) == [0, 4, 8, 12]
    assert adam.history.loss[0] == coupled.history.loss[0]  # same batch, same weights at step 0
    assert abs(adam.frequencies.sum().item() - 1) < 1e-12


def test_cloud_figure_is_a_pure_function_of_its_controls(tiny_results):
    """The explorer's interaction, tested without a browser: other slider values, other figures."""
    first = ca.cloud_figure(tiny_results, zipf=1.1, step=0)
    last = ca.cloud_figure(tiny_results, zipf=1.1, step=12)
    again = ca.cloud_figure(tiny_results, zipf=1.1, step=12)
    assert list(first.data[0].x) != list(last.data[0].x)
    assert list(last.data[0].x) == list(again.data[0].x)
    assert "step 12" in last.layout.annotations[0].text
    with pytest.raises(ValueError, match="available zipf exponents"):
        ca.cloud_figure(tiny_results, zipf=9.9, step=0)
    assert len(ca.drift_figure(tiny_results, zipf=1.1).data) == 4
    assert len(ca.loss_figure(tiny_results, zipf=1.1).data) == 2


def test_mean_direction_projection_puts_the_mean_on_the_x_axis():
    E = torch.randn(100, 8, dtype=torch.float64) + torch.tensor([3.0] + [0.0] * 7, dtype=torch.float64)
    xy, mu = ca.mean_direction_projection(E)
    assert abs(mu[1].item()) < 1e-12 and mu[0].item() == pytest.approx(E.mean(0).norm().item())
    assert xy[:, 0].mean().item() == pytest.approx(mu[0].item())
