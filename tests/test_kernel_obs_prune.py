"""kernels/obs_prune.py: the OBS identities, and every backend against the torch reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import obs_prune as k


def _problem(d_row, count, block, seed=0, dtype=torch.float64):
    return k.random_problem(d_row, count * block, seed=seed, dtype=dtype)


def _assert_same(got: k.ObsResult, want: k.ObsResult, atol=1e-10):
    assert torch.equal(got.order, want.order)
    torch.testing.assert_close(got.weights, want.weights, rtol=0, atol=atol)
    torch.testing.assert_close(got.losses, want.losses, rtol=1e-10, atol=atol)


def _least_squares(W, H, keep_cols):
    """argmin over Ŵ with Ŵ[:, removed] = 0 of tr((W − Ŵ) H (W − Ŵ)ᵀ): Ŵ_K = W H[:, K] H[K, K]⁻¹."""
    out = torch.zeros_like(W)
    if keep_cols.numel():
        out[:, keep_cols] = W @ H[:, keep_cols] @ torch.linalg.inv(H[keep_cols][:, keep_cols])
    return out


@pytest.mark.parametrize("block", [1, 3])
def test_saved_weights_are_the_least_squares_optimum_for_the_kept_set(block):
    """Sequential OBS updates compose exactly: at every level W equals the joint optimum."""
    W, Hinv = _problem(6, 5, block, seed=1)
    H = torch.linalg.inv(Hinv)
    res = k.reference(W, Hinv, block=block, levels=list(range(6)))
    for level, W_hat in enumerate(res.weights):
        removed = res.order[:level]
        keep = torch.tensor([c for c in range(5 * block) if c // block not in set(removed.tolist())],
                            dtype=torch.long)
        torch.testing.assert_close(W_hat, _least_squares(W, H, keep), rtol=0, atol=1e-10)
        err = torch.trace((W - W_hat) @ H @ (W - W_hat).T)  # the losses add up to the output error
        torch.testing.assert_close(res.losses[:level].sum(), err, rtol=1e-10, atol=1e-12)
    assert res.weights[-1].abs().max() == 0  # everything removed: exactly zero


def test_first_removal_is_the_cheapest_single_structure():
    W, Hinv = _problem(4, 6, 2, seed=3)
    H = torch.linalg.inv(Hinv)
    costs = []
    for s in range(6):
        keep = torch.tensor([c for c in range(12) if c // 2 != s])
        dW = W - _least_squares(W, H, keep)
        costs.append(torch.trace(dW @ H @ dW.T).item())
    res = k.reference(W, Hinv, block=2, levels=[0, 1])
    assert int(res.order[0]) == min(range(6), key=costs.__getitem__)
    assert res.losses[0].item() == pytest.approx(min(costs), rel=1e-10)


@settings(max_examples=20, deadline=None)
@given(d_row=st.integers(1, 12), count=st.integers(1, 7), block=st.integers(1, 4), seed=st.integers(0, 2**16),
       data=st.data())
def test_cpu_matches_reference_fp64(d_row, count, block, seed, data):
    levels = sorted(data.draw(st.sets(st.integers(0, count), min_size=1, max_size=count + 1)))
    W, Hinv = _problem(d_row, count, block, seed)
    _assert_same(k.cpu(W, Hinv, block=block, levels=levels), k.reference(W, Hinv, block=block, levels=levels))


def test_cpu_matches_reference_at_notebook_shapes():
    for d_row, d_col, block in [(64, 64, 8), (64, 256, 1)]:
        W, Hinv = k.random_problem(d_row, d_col, seed=5)
        count = d_col // block
        levels = list(range(0, count + 1, count // 8))
        _assert_same(k.cpu(W, Hinv, block=block, levels=levels),
                     k.reference(W, Hinv, block=block, levels=levels), atol=1e-9)


def test_fp32_inputs_return_fp32_close_to_fp64():
    W, Hinv = _problem(5, 4, 2, seed=2)
    want = k.reference(W, Hinv, block=2, levels=[0, 2, 4])
    for backend in ("reference", "cpu"):
        got = k.run(W.float(), Hinv.float(), block=2, levels=[0, 2, 4], backend=backend)
        assert got.weights.dtype == torch.float32
        torch.testing.assert_close(got.weights, want.weights.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d_row,count,block", [(3, 4, 2), (1, 3, 1), (18, 2, 3)])  # 18 rows: two 16-row tiles
def test_cuda_matches_reference(d_row, count, block):
    W, Hinv = _problem(d_row, count, block, seed=4)
    levels = list(range(count + 1))
    _assert_same(k.cuda(W, Hinv, block=block, levels=levels), k.reference(W, Hinv, block=block, levels=levels))


def test_cuda_partial_levels_and_fp32():
    W, Hinv = _problem(4, 3, 2, seed=6)
    got = k.cuda(W.float(), Hinv.float(), block=2, levels=[1, 2])
    want = k.reference(W, Hinv, block=2, levels=[1, 2])
    assert got.weights.shape == (2, 4, 6) and got.weights.dtype == torch.float32
    torch.testing.assert_close(got.weights, want.weights.float(), rtol=1e-4, atol=1e-4)


def test_removed_columns_are_exactly_zero():
    W, Hinv = _problem(5, 6, 2, seed=7)
    res = k.cpu(W, Hinv, block=2, levels=[0, 2, 5])
    for level, n_removed in zip(res.weights, (0, 2, 5)):
        for s in res.order[:n_removed].tolist():
            assert level[:, 2 * s:2 * s + 2].abs().max() == 0


def test_bad_inputs_raise_value_error():
    W, Hinv = _problem(3, 4, 2)
    with pytest.raises(ValueError, match="block must"):
        k.run(W, Hinv, block=3, levels=[1])
    with pytest.raises(ValueError, match="levels must"):
        k.run(W, Hinv, block=2, levels=[2, 1])
    with pytest.raises(ValueError, match="levels must"):
        k.run(W, Hinv, block=2, levels=[5])
    with pytest.raises(ValueError, match="hinv has shape"):
        k.run(W, Hinv[:4, :4], block=2, levels=[1])
    with pytest.raises(ValueError, match="hinv has dtype"):
        k.run(W, Hinv.float(), block=2, levels=[1])
    with pytest.raises(ValueError, match="backend="):
        k.run(W, Hinv, block=2, levels=[1], backend="tpu")
    with pytest.raises(ValueError, match="MAX_BLOCK"):
        k.cuda(*k.random_problem(2, 66), block=33, levels=[1])


def test_bench_cases_describe_the_notebook_layers():
    cases = k.bench_cases(quick=True)
    assert [c.shape.split(":")[0] for c in cases] == ["heads", "neurons"]
    x = cases[0].setup()  # the heads case is cheap: run it through both sides
    _assert_same(cases[0].numba_fn(x), cases[0].torch_fn(x), atol=1e-9)
