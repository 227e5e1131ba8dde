"""Attention kernels from scratch (foundations notebook, track T0): what the notebook needs around the kernels.

The kernels themselves live in ``kernels/`` (``attention``, ``block_sparse_attention``,
``linear_attention``, ``rope``), each with a torch ``reference``, a Numba ``cpu`` and a Numba ``cuda``
version. This module holds the teaching pieces:

* :func:`online_softmax` and :func:`attention_from_scratch`: the whole algorithm in a few lines of
  NumPy, so the reader can see it before meeting the optimised kernel;
* timing helpers and the length sweep whose log-log slope shows linear vs quadratic cost;
* LASP-style state passing for linear attention, and the figures.

Call :func:`use_cuda_simulator_if_no_gpu` *before* anything imports ``numba.cuda`` (that is, before
importing ``kernels``): without a GPU it switches Numba to its CUDA simulator, so the CUDA twins
run (slowly, one Python thread per CUDA thread) and can be checked against the reference.
"""

from __future__ import annotations

import contextlib
import html
import inspect
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch

MASK_LABELS = {"none": "no mask", "causal": "causal", "sliding": "sliding window + sinks"}


def use_cuda_simulator_if_no_gpu() -> str:
    """Turn on ``NUMBA_ENABLE_CUDASIM`` unless a GPU is present; return ``"gpu"`` or ``"simulator"``.

    Same rule as ``tests/conftest.py``. Numba reads the variable when ``numba.cuda`` is first imported,
    so this must run first; afterwards it raises instead of silently doing nothing.
    """
    wanted = "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None
    if wanted:
        if "numba.cuda" in sys.modules:
            raise ValueError("numba.cuda is already imported; call use_cuda_simulator_if_no_gpu() before "
                             "importing kernels (or set NUMBA_ENABLE_CUDASIM=1 before starting Python)")
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return "simulator" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else "gpu"


# ----------------------------------------------------------------------------------------------
# The algorithm from scratch (NumPy)
# ----------------------------------------------------------------------------------------------
def online_softmax(x: np.ndarray, tile: int) -> tuple[np.ndarray, list[dict]]:
    """softmax of a 1-D ``x`` read ``tile`` entries at a time, keeping only a running max and sum.

    Returns ``(p, trace)``; ``trace[i]`` holds ``m`` (running max), ``l`` (running sum of
    exp(x - m)) and ``alpha`` (the factor exp(m_old - m) that rescaled the old sum) after tile i.
    """
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D array, got shape {x.shape}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    m, l, trace = -math.inf, 0.0, []
    for start in range(0, x.size, tile):
        chunk = x[start:start + tile]
        m_new = max(m, float(chunk.max()))
        alpha = math.exp(m - m_new)  # 0 on the first tile (m = -inf)
        l = alpha * l + float(np.exp(chunk - m_new).sum())
        m = m_new
        trace.append({"end": start + chunk.size, "m": m, "l": l, "alpha": alpha})
    return np.exp(x - m) / l, trace


def attention_from_scratch(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, tile: int = 16,
                           causal: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One head of attention with the online softmax over key tiles, in NumPy.

    q (T, D), k (S, D), v (S, Dv); query i sits at position S - T + i. Returns out (T, Dv) and the
    row log-sum-exp (T,). This is the algorithm of ``kernels.attention.cpu`` without the
    engineering (query tiles, BLAS, SIMD loops, threads).
    """
    T, D = q.shape
    S = k.shape[0]
    pos = S - T + np.arange(T)
    m, l, acc = np.full(T, -np.inf), np.zeros(T), np.zeros((T, v.shape[1]))
    for j0 in range(0, S, tile):
        s = q @ k[j0:j0 + tile].T * D ** -0.5  # (T, tile) scores of this key tile
        if causal:
            s[(j0 + np.arange(s.shape[1]))[None, :] > pos[:, None]] = -np.inf
        m_new = np.maximum(m, s.max(axis=1))
        shift = np.where(np.isinf(m_new), 0.0, m_new)  # rows that saw nothing yet: avoid inf - inf
        alpha = np.exp(m - shift)  # rescale what was accumulated against the old max
        p = np.exp(s - shift[:, None])
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + p @ v[j0:j0 + tile]
        m = m_new
    seen = l > 0
    out = np.where(seen[:, None], acc / np.where(seen, l, 1.0)[:, None], 0.0)
    lse = np.where(seen, m + np.log(np.where(seen, l, 1.0)), -np.inf)
    return out, lse


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def best_time(fn: Callable[[], object], reps: int = 3, clock: Callable[[], float] = time.perf_counter) -> float:
    """Best of ``reps`` timings of ``fn()`` in seconds, after one untimed warm-up call.

    The best (not the mean) because other processes only ever add time: the minimum is the least
    disturbed measurement. ``clock=time.process_time`` measures CPU time instead of wall time.
    """
    fn()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch and Numba on one thread inside the block; the previous counts are restored after."""
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def cpu_seconds(fn: Callable[[], object], reps: int = 3) -> float:
    """Best CPU time of ``fn()`` on one thread: the measurement the scaling claims use.

    On a shared machine other programs can delay a call (wall time) but cannot add CPU time to
    our process, and one thread leaves no idle sibling thread waiting at a barrier. So CPU time on
    one thread measures the algorithm, not the scheduler.
    """
    with one_thread():
        return best_time(fn, reps, clock=time.process_time)


def qkv(T: int, *, B: int = 1, H: int = 4, D: int = 64, dtype=torch.float32, seed: int = 0):
    """Unit-normal q, k, v of shape (B, H, T, D), seeded."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, D, generator=gen, dtype=dtype) for _ in range(3))


def mask_timings(T: int, *, mask: str, window: int | None, n_sink: int, reps: int = 3,
                 seed: int = 0) -> dict[str, float]:
    """CPU seconds (one thread) for our Numba kernel and for torch SDPA with the equivalent dense mask.

    Also returns ``visible``: the fraction of the T x T score matrix the mask keeps.
    """
    import torch.nn.functional as F

    from kernels import attention

    kw = dict(mask=mask, window=window, n_sink=n_sink) if mask == "sliding" else dict(mask=mask)
    q, k, v = qkv(T, seed=seed)
    dense = attention.dense_mask(T, T, **kw)
    return {
        "numba": cpu_seconds(lambda: attention.cpu(q, k, v, **kw), reps),
        "torch": cpu_seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), reps),
        "visible": float(dense.float().mean()),
    }


def length_sweep(lengths: list[int], *, window: int, n_sink: int, reps: int = 3, seed: int = 0) -> dict:
    """CPU seconds (one thread, :func:`cpu_seconds`) per length: sliding-window vs dense causal attention.

    Both Numba and torch; torch gets its best path for each: ``is_causal=True`` (its flash kernel
    skips the masked half) and, for the sliding mask, the dense boolean mask it needs.
    """
    import torch.nn.functional as F

    from kernels import attention

    out = {"T": list(lengths), "numba sliding": [], "numba causal": [], "torch sliding (dense mask)": [],
           "torch causal": []}
    for T in lengths:
        q, k, v = qkv(T, seed=seed)
        dense = attention.dense_mask(T, T, mask="sliding", window=window, n_sink=n_sink)
        calls = {  # partial binds this T's tensors now (a lambda would see the loop's last ones)
            "numba sliding": partial(attention.cpu, q, k, v, mask="sliding", window=window, n_sink=n_sink),
            "numba causal": partial(attention.cpu, q, k, v, mask="causal"),
            "torch sliding (dense mask)": partial(F.scaled_dot_product_attention, q, k, v, attn_mask=dense),
            "torch causal": partial(F.scaled_dot_product_attention, q, k, v, is_causal=True),
        }
        for name, fn in calls.items():
            out[name].append(cpu_seconds(fn, reps))
    return out


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x): 1 for linear growth, 2 for quadratic."""
    lx, ly = np.log(np.asarray(xs, dtype=float)), np.log(np.asarray(ys, dtype=float))
    if lx.size < 2:
        raise ValueError("need at least two points to fit a slope")
    return float(np.polyfit(lx, ly, 1)[0])


# ----------------------------------------------------------------------------------------------
# Linear attention across "devices" (LASP-2's invariant on one machine)
# ----------------------------------------------------------------------------------------------
def linear_attention_in_segments(q, k, v, *, decay=None, n_segments: int = 4, backend: str = "cpu"):
    """Run linear attention on ``n_segments`` consecutive pieces of the sequence, passing the state.

    Each piece starts from the previous piece's ``final_state``, as LASP-2's devices do after their
    AllGather. Returns the concatenated outputs and the last state; they must equal one long run.
    """
    from kernels import linear_attention

    T = q.shape[2]
    if not 1 <= n_segments <= T:
        raise ValueError(f"n_segments must be in [1, T={T}], got {n_segments}")
    bounds = np.linspace(0, T, n_segments + 1).round().astype(int)
    state, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        piece = (x[:, :, a:b] for x in (q, k, v))
        out, state = linear_attention.run(*piece, decay=decay, initial_state=state, backend=backend)
        outs.append(out)
    return torch.cat(outs, dim=2), state


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def online_softmax_figure(x: np.ndarray, tile: int):
    """Scores, the running max after each tile, and softmax(x) vs the online result."""
    from companion import viz

    p, trace = online_softmax(x, tile)
    exact = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    fig = viz.subplots(1, 2, titles=(f"scores read {tile} at a time", "softmax: exact vs online"), height=380)
    idx = np.arange(x.size)
    fig.add_bar(x=idx, y=x, name="score x_j", marker_color=viz.PALETTE["baseline"], row=1, col=1)
    ends = [0] + [t["end"] for t in trace]
    fig.add_scatter(x=np.repeat(ends, 2)[1:-1] - 0.5, y=np.repeat([t["m"] for t in trace], 2), mode="lines",
                    name="running max m", line=dict(color=viz.PALETTE["ours"], width=3), row=1, col=1)
    fig.add_scatter(x=idx, y=exact, mode="lines", name="exact softmax", line=dict(color=viz.PALETTE["paper"]),
                    row=1, col=2)
    fig.add_scatter(x=idx, y=p, mode="markers", name="online softmax", marker=dict(color=viz.PALETTE["ours"]),
                    row=1, col=2)
    fig.update_xaxes(title_text="key j")
    return fig


def mask_image(T: int, *, mask: str, window: int | None, n_sink: int, cells: int = 128) -> np.ndarray:
    """Fraction of visible keys in each of ``cells x cells`` blocks of the T x T mask (for a heatmap)."""
    from kernels import attention

    kw = dict(mask=mask, window=window, n_sink=n_sink) if mask == "sliding" else dict(mask=mask)
    dense = attention.dense_mask(T, T, **kw).float()
    c = max(1, T // cells)
    n = T // c
    return dense[:n * c, :n * c].reshape(n, c, n, c).mean(dim=(1, 3)).numpy()


def mask_explorer_figure(mask: str = "sliding", window: int = 256, n_sink: int = 4, *, T: int = 2048,
                         reps: int = 3):
    """The explorer: the mask (left) and the measured time of both implementations at length T (right)."""
    from companion import viz

    window = window if mask == "sliding" else None
    n_sink = n_sink if mask == "sliding" else 0
    t = mask_timings(T, mask=mask, window=window, n_sink=n_sink, reps=reps)
    title = MASK_LABELS[mask] + (f" (window {window}, {n_sink} sinks)" if mask == "sliding" else "")
    fig = viz.subplots(1, 2, titles=(f"{title}: visible keys, T={T}", "CPU ms per call (one thread)"), height=420,
                       column_widths=[0.5, 0.5])
    fig.add_heatmap(z=mask_image(T, mask=mask, window=window, n_sink=n_sink), colorscale="Blues", zmin=0,
                    zmax=1, showscale=False, row=1, col=1)
    fig.update_yaxes(autorange="reversed", title_text="query block", row=1, col=1)
    fig.update_xaxes(title_text="key block", row=1, col=1)
    labels = ["Numba kernel (skips hidden tiles)", "torch SDPA (dense mask)"]
    fig.add_bar(x=labels, y=[1e3 * t["numba"], 1e3 * t["torch"]], marker_color=[viz.PALETTE["ours"],
                viz.PALETTE["baseline"]], text=[f"{1e3 * t['numba']:.2f}", f"{1e3 * t['torch']:.2f}"],
                showlegend=False, row=1, col=2)
    fig.update_layout(title=f"{100 * t['visible']:.1f}% of the score matrix is visible; "
                            f"torch / Numba = {t['torch'] / t['numba']:.1f}x")
    return fig


def length_sweep_figure(sweep: dict):
    """Log-log time vs T, each line labelled with its fitted slope."""
    from companion import viz

    fig = viz.figure("CPU time vs sequence length (log-log, one thread): slope 1 = linear, 2 = quadratic", "T",
                     "CPU seconds per call")
    colors = [viz.PALETTE["ours"], viz.PALETTE["accent"], viz.PALETTE["baseline"], viz.PALETTE["paper"]]
    for name, color in zip([n for n in sweep if n != "T"], colors):
        slope = loglog_slope(sweep["T"], sweep[name])
        fig.add_scatter(x=sweep["T"], y=sweep[name], mode="lines+markers", name=f"{name}: slope {slope:.2f}",
                        line=dict(color=color, dash="solid" if name.startswith("numba") else "dot"))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def bench_figure(rows: list[dict]):
    """Speed-up of each Numba kernel over its torch equivalent (the ci.bench rows), 1x marked."""
    from companion import viz

    names = [f"{r['kernel']}<br>{r['shape'].split(' B=')[0]} T={r['shape'].split('T=')[1].split()[0]}"
             for r in rows]
    fig = viz.figure("Numba CPU speed-up over the torch equivalent (same process, this machine)", "",
                     "torch time / Numba time", height=460)
    fig.add_bar(x=names, y=[r["speedup"] for r in rows], marker_color=viz.PALETTE["ours"],
                text=[f"{r['speedup']:.2f}x" for r in rows])
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="parity")
    return fig


def side_by_side(left: Callable, right: Callable, titles: tuple[str, str]) -> str:
    """HTML with the source of two functions in two columns (the CPU kernel and its CUDA twin)."""
    def source(fn):
        fn = getattr(fn, "py_func", None) or getattr(fn, "fn", None) or fn  # numba / simulator wrappers
        return html.escape(inspect.getsource(fn))

    cols = "".join(f"<div style='flex:1; min-width:0'><b>{html.escape(t)}</b><pre style='font-size:11px; "
                   f"overflow-x:auto'>{source(f)}</pre></div>" for t, f in zip(titles, (left, right)))
    return f"<div style='display:flex; gap:12px'>{cols}</div>"
