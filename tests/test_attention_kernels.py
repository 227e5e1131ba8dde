"""companion/papers/attention_kernels.py: the from-scratch algorithms, the helpers and the explorer."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.papers import attention_kernels as ak
from kernels import attention, linear_attention


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), tile=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_online_softmax_equals_softmax(n, tile, seed):
    x = np.random.default_rng(seed).normal(scale=5.0, size=n)
    p, trace = ak.online_softmax(x, tile)
    exact = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(p, exact, rtol=1e-12, atol=1e-15)
    assert len(trace) == -(-n // tile) and trace[-1]["m"] == x.max() and trace[0]["alpha"] == 0.0


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 30), extra=st.integers(0, 20), D=st.integers(1, 8), tile=st.integers(1, 40),
       causal=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_from_scratch_equals_reference(T, extra, D, tile, causal, seed):
    rng = np.random.default_rng(seed)
    S = T + extra
    q, k, v = rng.normal(size=(T, D)), rng.normal(size=(S, D)), rng.normal(size=(S, 3))
    out, lse = ak.attention_from_scratch(q, k, v, tile=tile, causal=causal)
    want, want_lse = attention.reference(*(torch.from_numpy(a)[None, None] for a in (q, k, v)),
                                         mask="causal" if causal else "none", return_lse=True)
    np.testing.assert_allclose(out, want[0, 0].numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse[0, 0].numpy(), rtol=1e-12, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="tile must be"):
        ak.online_softmax(np.ones(3), 0)
    with pytest.raises(ValueError, match="1-D"):
        ak.online_softmax(np.ones((2, 2)), 2)
    with pytest.raises(ValueError, match="two points"):
        ak.loglog_slope([1], [1])
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match="n_segments"):
        ak.linear_attention_in_segments(q, q, q, n_segments=5)


def test_loglog_slope_recovers_powers():
    T = np.array([256, 512, 1024, 2048])
    assert ak.loglog_slope(T, 3e-6 * T) == pytest.approx(1.0)
    assert ak.loglog_slope(T, 1e-9 * T**2) == pytest.approx(2.0)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("n_segments", [1, 3, 4])
def test_linear_attention_in_segments_is_exact(decay, n_segments):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 45, 8, generator=gen, dtype=torch.float64) * 8 ** -0.5 for _ in range(3))
    gamma = torch.tensor([0.9, 0.99], dtype=torch.float64) if decay else None
    out, state = ak.linear_attention_in_segments(q, k, v, decay=gamma, n_segments=n_segments)
    want, want_state = linear_attention.reference(q, k, v, decay=gamma)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, want_state, rtol=1e-12, atol=1e-12)


def test_mask_image_is_block_fraction():
    img = ak.mask_image(64, mask="causal", window=None, n_sink=0, cells=8)
    assert img.shape == (8, 8)
    assert np.allclose(np.diag(img), (8 * 9 / 2) / 64)  # diagonal blocks are half (plus diagonal) visible
    assert img[0, 7] == 0 and img[7, 0] == 1


def test_explorer_figure_changes_with_its_controls():
    """The explorer's interaction without a browser: other control values give another figure."""
    base = ak.mask_explorer_figure("sliding", 64, 4, T=256, reps=1)
    z = lambda fig: np.asarray(fig.data[0].z)
    for other in (dict(mask="causal"), dict(mask="none"), dict(window=128), dict(n_sink=0)):
        kw = {"mask": "sliding", "window": 64, "n_sink": 4, **other}
        fig = ak.mask_explorer_figure(**kw, T=256, reps=1)
        assert not np.array_equal(z(fig), z(base)), other
        assert len(fig.data[1].y) == 2 and all(t > 0 for t in fig.data[1].y)


def test_length_sweep_and_figures_have_every_series():
    sweep = ak.length_sweep([128, 256], window=32, n_sink=2, reps=1)
    assert sweep["T"] == [128, 256] and all(len(v) == 2 and min(v) > 0 for k, v in sweep.items() if k != "T")
    assert len(ak.length_sweep_figure(sweep).data) == 4
    assert len(ak.online_softmax_figure(np.arange(10.0), 3).data) == 4  # scores, max, exact, online


def test_bench_figure_and_side_by_side():
    rows = [{"kernel": "attention", "shape": "causal B=1 H=4 T=512 D=64 fp32", "speedup": 1.5}]
    fig = ak.bench_figure(rows)
    assert list(fig.data[0].y) == [1.5]
    html = ak.side_by_side(attention._softmax_tile, attention._cuda_tile_step, ("cpu", "cuda"))
    assert "def _softmax_tile" in html and "def _cuda_tile_step" in html


def test_simulator_switch_reports_state():
    assert ak.use_cuda_simulator_if_no_gpu() in ("gpu", "simulator")  # numba.cuda is imported by now
