"""Greedy structured Optimal Brain Surgeon (OBS): remove whole column blocks of a weight matrix.

A linear layer ``y = W x`` with ``W: (d_row, d_col)`` sees calibration inputs with Hessian
``H = 2 X Xᵀ / n`` (``d_col x d_col``, damped). Its columns are grouped into ``count = d_col / b``
*structures* of ``b`` adjacent columns (an attention head: ``b = d_head`` columns of the output
projection; an MLP neuron: ``b = 1`` column of the down projection). With ``Hinv = H⁻¹`` and
``S`` the columns of one structure, the ZipLM / OBS step (Kurtić et al. 2023) is

    score      ρ_S = Σ_rows w_S [Hinv_SS]⁻¹ w_Sᵀ           the increase of ‖(W − Ŵ)X‖² (times 2/n)
    remove     j = argmin over the structures still alive of ρ_S
    update     W    ← W    − W[:, S]    [Hinv_SS]⁻¹ Hinv[S, :]     (keeps the output as close as possible)
    downdate   Hinv ← Hinv − Hinv[:, S] [Hinv_SS]⁻¹ Hinv[S, :]     (rank-b: now the inverse of H without S)

repeated until the largest requested level; the weights are saved after ``levels[i]`` removals.
After each step the columns ``S`` of ``W`` and the rows and columns ``S`` of ``Hinv`` are set to
exactly zero (they are zero up to rounding already), so every backend stores the same pattern.

Every backend computes in float64 (OBS in float32 loses the downdated inverse quickly) and
returns the weights in the input dtype. Official code read for details:
IST-DASLab/DarwinLM ``src/fast_obc_struct.py::FastOBCStruct.step`` (batched Cholesky of the
diagonal blocks, one rank-b downdate per removed structure).

Backends:

* ``reference``: torch, batched Cholesky of all alive diagonal blocks per step;
* ``cpu``: Numba ``prange`` over structures (factor + score), then over rows (the downdate);
* ``cuda``: one thread block per structure factors its ``b x b`` block in shared memory and
  reduces its score; the rank-b downdates are shared-memory tiled 2-D kernels. The host picks
  the argmin each step (``count`` numbers per step cross the bus).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend

__all__ = ["ObsResult", "reference", "cpu", "cuda", "run", "bench_cases"]


class ObsResult(NamedTuple):
    weights: torch.Tensor  # (n_levels, d_row, d_col): W after levels[i] removals, input dtype
    order: torch.Tensor  # (levels[-1],) int64: structure ids in the order they were removed
    losses: torch.Tensor  # (levels[-1],) float64: ρ of each structure when it was removed


def _check(weight, hinv, block, levels) -> list[int]:
    check_tensor("weight", weight, ndim=2)
    d_row, d_col = weight.shape
    check_tensor("hinv", hinv, shape=(d_col, d_col), like=weight)
    if not (isinstance(block, int) and not isinstance(block, bool) and block >= 1 and d_col % block == 0):
        raise ValueError(f"block must be a positive int that divides d_col={d_col}, got {block!r}")
    count = d_col // block
    levels = [int(v) for v in levels]
    if not levels or any(b <= a for a, b in zip(levels, levels[1:])) or levels[0] < 0 or levels[-1] > count:
        raise ValueError(f"levels must be strictly increasing ints in [0, {count}] (structures removed), "
                         f"got {levels}")
    return levels


# --------------------------------------------------------------------------------------------
# Reference: plain torch, the specification.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(weight: torch.Tensor, hinv: torch.Tensor, *, block: int, levels: Sequence[int]) -> ObsResult:
    """Greedy structured OBS. ``weight (d_row, d_col)``, ``hinv (d_col, d_col)`` = inverse of the
    damped Hessian, ``block`` columns per structure, ``levels`` = numbers of structures removed at
    which to save ``W``. See the module docstring."""
    levels = _check(weight, hinv, block, levels)
    d_row, d_col = weight.shape
    count = d_col // block
    W = weight.detach().to(torch.float64).clone()
    Hinv = hinv.detach().to(torch.float64).clone()
    alive = torch.ones(count, dtype=torch.bool, device=W.device)
    ids = torch.arange(count, device=W.device)
    saved, order, losses = [], [], []
    if levels[0] == 0:
        saved.append(W.clone())
    for step in range(levels[-1]):
        live = ids[alive]
        diag_blocks = Hinv.view(count, block, count, block)[live, :, live, :]  # (n_alive, b, b)
        chol = torch.linalg.cholesky(diag_blocks)
        w_blocks = W.view(d_row, count, block)[:, live, :].permute(1, 2, 0)  # (n_alive, b, d_row)
        y = torch.linalg.solve_triangular(chol, w_blocks, upper=False)  # L⁻¹ w_Sᵀ
        scores = y.pow(2).sum(dim=(1, 2))  # ρ_S = Σ_rows w_S (L Lᵀ)⁻¹ w_Sᵀ
        k = int(torch.argmin(scores))
        j = int(live[k])
        cols = slice(j * block, (j + 1) * block)
        u = torch.cholesky_solve(Hinv[cols, :], chol[k])  # [Hinv_SS]⁻¹ Hinv[S, :]  (b, d_col)
        W -= W[:, cols] @ u
        Hinv -= Hinv[:, cols] @ u
        W[:, cols] = 0.0
        Hinv[cols, :] = 0.0
        Hinv[:, cols] = 0.0
        alive[j] = False
        order.append(j)
        losses.append(float(scores[k]))
        if step + 1 in levels:
            saved.append(W.clone())
    return ObsResult(torch.stack(saved).to(weight.dtype), torch.tensor(order, dtype=torch.int64),
                     torch.tensor(losses, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Numba CPU: three parallel regions per removed structure (a region costs a thread barrier, so
# there are as few as the data dependencies allow):
#   A. prange over structures: Cholesky of the b x b block and the score;   then a serial argmin;
#   B. prange over columns k: copy Hinv[k, S] (the slab the downdate reads) and solve
#      U[:, k] = [Hinv_SS]⁻¹ Hinv[S, k] with the factor from A;
#   C. prange over the rows of Hinv and of W: each iteration downdates and zeroes only its own
#      row, reading the slabs and U, so no iteration reads what another one writes.
# --------------------------------------------------------------------------------------------
@njit(cache=True, fastmath=False)
def _cholesky_into(a, s0, b, out):  # pragma: no cover
    """Lower Cholesky factor of a[s0:s0+b, s0:s0+b] into out (b, b); upper part left as zeros."""
    for i in range(b):
        for k in range(i + 1):
            v = a[s0 + i, s0 + k]
            for t in range(k):
                v -= out[i, t] * out[k, t]
            if i == k:
                out[i, i] = math.sqrt(v)
            else:
                out[i, k] = v / out[k, k]


@njit(cache=True, fastmath=False)
def _downdate_row(A, slab, u, row, j0, b, removed):  # pragma: no cover
    """A[row, :] -= slab[row, :] @ u, then A[row, S] = 0 (the whole row if it is a removed one)."""
    if removed:
        A[row, :] = 0.0
        return
    for k in range(A.shape[1]):
        v = 0.0
        for t in range(b):
            v += slab[row, t] * u[t, k]
        A[row, k] -= v
    for t in range(b):
        A[row, j0 + t] = 0.0


@njit(parallel=True, cache=True, fastmath=False)
def _cpu_greedy(W, Hinv, b, levels, out_weights, order, losses):  # pragma: no cover
    d_row, d_col = W.shape
    count = d_col // b
    alive = np.ones(count, dtype=np.bool_)
    chol = np.zeros((count, b, b))
    ybuf = np.zeros((count, b))
    scores = np.empty(count)
    slab_h = np.empty((d_col, b))
    slab_w = np.empty((d_row, b))
    u = np.empty((b, d_col))
    n_saved = 0
    if levels[0] == 0:
        out_weights[0] = W
        n_saved = 1
    for step in range(levels[-1]):
        for s in prange(count):  # A. factor and score every alive structure
            if not alive[s]:
                scores[s] = np.inf
                continue
            _cholesky_into(Hinv, s * b, b, chol[s])
            acc = 0.0
            for r in range(d_row):
                for t in range(b):  # forward solve L y = w_r,S: ρ_S = Σ_r ‖y‖²
                    v = W[r, s * b + t]
                    for q in range(t):
                        v -= chol[s, t, q] * ybuf[s, q]
                    ybuf[s, t] = v / chol[s, t, t]
                    acc += ybuf[s, t] * ybuf[s, t]
            scores[s] = acc
        j = -1  # argmin, first index on ties (like torch.argmin)
        best = np.inf
        for s in range(count):
            if alive[s] and (j < 0 or scores[s] < best):
                best = scores[s]
                j = s
        order[step] = j
        losses[step] = best
        j0 = j * b
        L = chol[j]
        for k in prange(max(d_col, d_row)):  # B. slabs and U[:, k]
            if k < d_row:
                for t in range(b):
                    slab_w[k, t] = W[k, j0 + t]
            if k >= d_col:
                continue
            for t in range(b):
                slab_h[k, t] = Hinv[k, j0 + t]
            for t in range(b):  # L z = Hinv[S, k]
                v = Hinv[j0 + t, k]
                for q in range(t):
                    v -= L[t, q] * u[q, k]
                u[t, k] = v / L[t, t]
            for t in range(b - 1, -1, -1):  # Lᵀ x = z
                v = u[t, k]
                for q in range(t + 1, b):
                    v -= L[q, t] * u[q, k]
                u[t, k] = v / L[t, t]
        for i in prange(d_col + d_row):  # C. rank-b downdates, one row per iteration
            if i < d_col:
                _downdate_row(Hinv, slab_h, u, i, j0, b, j0 <= i < j0 + b)
            else:
                _downdate_row(W, slab_w, u, i - d_col, j0, b, False)
        alive[j] = False
        if n_saved < levels.shape[0] and step + 1 == levels[n_saved]:
            out_weights[n_saved] = W
            n_saved += 1


def cpu(weight: torch.Tensor, hinv: torch.Tensor, *, block: int, levels: Sequence[int]) -> ObsResult:
    """Numba CPU version of :func:`reference` (same arguments, same result)."""
    levels = _check(weight, hinv, block, levels)
    W = as_numpy(weight.detach().to(torch.float64)).copy()
    Hinv = as_numpy(hinv.detach().to(torch.float64)).copy()
    lv = np.asarray(levels, dtype=np.int64)
    out = np.empty((len(levels),) + W.shape)
    order = np.empty(levels[-1], dtype=np.int64)
    losses = np.empty(levels[-1])
    _cpu_greedy(W, Hinv, block, lv, out, order, losses)
    return ObsResult(torch.from_numpy(out).to(weight.dtype), torch.from_numpy(order), torch.from_numpy(losses))


# --------------------------------------------------------------------------------------------
# Numba CUDA. Per step:
#   _block_scores   grid = count structures, block = SCORE_THREADS. The b x b diagonal block goes
#                   to shared memory and is factored in place (right-looking, one column at a
#                   time, the trailing update spread over the threads); each thread then solves
#                   for its rows of W and the block tree-reduces the squared norms into ρ_S.
#   host argmin     over `count` scores.
#   _slabs_and_u    one thread per column k: copies Hinv[k, S] and W[k, S] (if k < d_row) into
#                   slabs and solves U[:, k] = [Hinv_SS]⁻¹ Hinv[S, k] with the stored factor.
#   _rank_b_update  A -= slab @ U with (TILE x TILE) output tiles; the tile's slab rows and U
#                   columns are staged in shared memory (b <= MAX_BLOCK).
#   _zero_structure sets W[:, S], Hinv[S, :], Hinv[:, S] to exactly 0.
# --------------------------------------------------------------------------------------------
MAX_BLOCK = 32  # largest structure (head dim) the CUDA path handles
SCORE_THREADS = 64
TILE = 16


@gpu.jit
def _block_scores(W, Hinv, b, alive, chol, scores):  # pragma: no cover
    s = gpu.blockIdx.x
    tid = gpu.threadIdx.x
    d_row = W.shape[0]
    if alive[s] == 0:
        if tid == 0:
            scores[s] = math.inf
        return
    L = gpu.shared.array((MAX_BLOCK, MAX_BLOCK), float64)
    part = gpu.shared.array(SCORE_THREADS, float64)
    s0 = s * b
    for idx in range(tid, b * b, SCORE_THREADS):
        i = idx // b
        k = idx % b
        L[i, k] = Hinv[s0 + i, s0 + k] if k <= i else 0.0
    gpu.syncthreads()
    for c in range(b):  # right-looking Cholesky, in place, lower triangle
        if tid == 0:
            L[c, c] = math.sqrt(L[c, c])
        gpu.syncthreads()
        for i in range(c + 1 + tid, b, SCORE_THREADS):
            L[i, c] = L[i, c] / L[c, c]
        gpu.syncthreads()
        for idx in range(tid, b * b, SCORE_THREADS):
            i = idx // b
            k = idx % b
            if k > c and i >= k:
                L[i, k] -= L[i, c] * L[k, c]
        gpu.syncthreads()
    for idx in range(tid, b * b, SCORE_THREADS):
        chol[s, idx // b, idx % b] = L[idx // b, idx % b]
    y = gpu.local.array(MAX_BLOCK, float64)
    acc = 0.0
    for r in range(tid, d_row, SCORE_THREADS):
        for t in range(b):
            v = W[r, s0 + t]
            for q in range(t):
                v -= L[t, q] * y[q]
            y[t] = v / L[t, t]
            acc += y[t] * y[t]
    part[tid] = acc
    gpu.syncthreads()
    stride = SCORE_THREADS // 2
    while stride > 0:  # fixed-order tree reduction: deterministic
        if tid < stride:
            part[tid] += part[tid + stride]
        gpu.syncthreads()
        stride //= 2
    if tid == 0:
        scores[s] = part[0]


@gpu.jit
def _slabs_and_u(W, Hinv, chol, j, b, slab_h, slab_w, u):  # pragma: no cover
    k = gpu.grid(1)
    d_row, d_col = W.shape
    j0 = j * b
    if k < d_row:
        for t in range(b):
            slab_w[k, t] = W[k, j0 + t]
    if k < d_col:
        for t in range(b):
            slab_h[k, t] = Hinv[k, j0 + t]
        for t in range(b):
            v = Hinv[j0 + t, k]
            for q in range(t):
                v -= chol[j, t, q] * u[q, k]
            u[t, k] = v / chol[j, t, t]
        for t in range(b - 1, -1, -1):
            v = u[t, k]
            for q in range(t + 1, b):
                v -= chol[j, q, t] * u[q, k]
            u[t, k] = v / chol[j, t, t]


@gpu.jit
def _rank_b_update(A, slab, u, b):  # pragma: no cover
    ty = gpu.threadIdx.y
    tx = gpu.threadIdx.x
    i = gpu.blockIdx.y * TILE + ty
    k = gpu.blockIdx.x * TILE + tx
    rows_tile = gpu.shared.array((TILE, MAX_BLOCK), float64)
    u_tile = gpu.shared.array((MAX_BLOCK, TILE), float64)
    for t in range(tx, b, TILE):  # stage this tile's slab rows and U columns
        rows_tile[ty, t] = slab[i, t] if i < A.shape[0] else 0.0
    for t in range(ty, b, TILE):
        u_tile[t, tx] = u[t, k] if k < A.shape[1] else 0.0
    gpu.syncthreads()
    if i < A.shape[0] and k < A.shape[1]:
        v = 0.0
        for t in range(b):
            v += rows_tile[ty, t] * u_tile[t, tx]
        A[i, k] -= v


@gpu.jit
def _zero_structure(W, Hinv, j, b):  # pragma: no cover
    k = gpu.grid(1)
    j0 = j * b
    if k < W.shape[0]:
        for t in range(b):
            W[k, j0 + t] = 0.0
    if k < Hinv.shape[0]:
        for t in range(b):
            Hinv[k, j0 + t] = 0.0
            Hinv[j0 + t, k] = 0.0


def cuda(weight: torch.Tensor, hinv: torch.Tensor, *, block: int, levels: Sequence[int]) -> ObsResult:
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    levels = _check(weight, hinv, block, levels)
    if block > MAX_BLOCK:
        raise ValueError(f"block={block} is larger than the CUDA path's MAX_BLOCK={MAX_BLOCK}; use backend='cpu'")
    on_gpu = weight.is_cuda

    def dev(t):
        t = t.detach().to(torch.float64).contiguous().clone()
        return gpu.as_cuda_array(t) if on_gpu else gpu.to_device(as_numpy(t))

    W, Hinv = dev(weight), dev(hinv)
    d_row, d_col = weight.shape
    count = d_col // block
    alive = np.ones(count, dtype=np.int32)
    alive_d = gpu.to_device(alive)
    chol = gpu.device_array((count, block, block), dtype=np.float64)
    scores = gpu.device_array(count, dtype=np.float64)
    slab_h = gpu.device_array((d_col, block), dtype=np.float64)
    slab_w = gpu.device_array((d_row, block), dtype=np.float64)
    u = gpu.device_array((block, d_col), dtype=np.float64)
    n_lin = max(d_row, d_col)
    lin_grid = (n_lin + 127) // 128
    saved, order, losses = [], [], []
    if levels[0] == 0:
        saved.append(W.copy_to_host())
    for step in range(levels[-1]):
        _block_scores[count, SCORE_THREADS](W, Hinv, block, alive_d, chol, scores)
        host_scores = scores.copy_to_host()
        j = int(np.argmin(np.where(alive == 1, host_scores, np.inf)))
        order.append(j)
        losses.append(float(host_scores[j]))
        _slabs_and_u[lin_grid, 128](W, Hinv, chol, j, block, slab_h, slab_w, u)
        grid_cols = (d_col + TILE - 1) // TILE
        _rank_b_update[(grid_cols, (d_col + TILE - 1) // TILE), (TILE, TILE)](Hinv, slab_h, u, block)
        _rank_b_update[(grid_cols, (d_row + TILE - 1) // TILE), (TILE, TILE)](W, slab_w, u, block)
        _zero_structure[lin_grid, 128](W, Hinv, j, block)
        alive[j] = 0
        alive_d.copy_to_device(alive)
        if step + 1 in levels:
            saved.append(W.copy_to_host())
    weights = torch.from_numpy(np.stack(saved)).to(weight.dtype)
    return ObsResult(weights, torch.tensor(order, dtype=torch.int64), torch.tensor(losses, dtype=torch.float64))


def run(weight: torch.Tensor, hinv: torch.Tensor, *, block: int, levels: Sequence[int],
        backend: str = "auto") -> ObsResult:
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    if impl is cuda and block > MAX_BLOCK:
        impl = cpu
    return impl(weight, hinv, block=block, levels=levels)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`): the notebook's two layer types.
# --------------------------------------------------------------------------------------------
def random_problem(d_row: int, d_col: int, *, n: int | None = None, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (d_row, d_col) and the inverse of a damped Hessian 2XXᵀ/n from n random inputs
    with correlated features (what a calibration set gives), for tests and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    n = n or 4 * d_col
    mix = torch.randn(d_col, d_col, generator=gen, dtype=torch.float64) / math.sqrt(d_col)
    X = torch.randn(n, d_col, generator=gen, dtype=torch.float64) @ (torch.eye(d_col, dtype=torch.float64) + mix)
    H = 2 * X.T @ X / n
    H += 0.01 * H.diagonal().mean() * torch.eye(d_col, dtype=torch.float64)
    W = torch.randn(d_row, d_col, generator=gen, dtype=torch.float64)
    return W.to(dtype), torch.cholesky_inverse(torch.linalg.cholesky(H)).to(dtype)


def bench_cases(quick: bool = False) -> list[BenchCase]:
    shapes = [("heads", 128, 128, 16, 8), ("neurons", 128, 512, 1, 8)]  # d_row, d_col, block, n_levels - 1
    cases = []
    for name, d_row, d_col, block, n_steps in shapes:
        count = d_col // block
        levels = list(range(0, count + 1, count // n_steps))

        def setup(d_row=d_row, d_col=d_col):
            W, Hinv = random_problem(d_row, d_col)
            return {"W": W, "Hinv": Hinv}

        # per step: block factors + scores, U, two rank-b downdates
        flops = count * (2 * d_col * d_col * block + 2 * d_row * d_col * block + count * block**3 / 3
                         + 2 * d_row * block * block)
        cases.append(BenchCase(
            kernel="obs_prune",
            shape=f"{name}: W {d_row}x{d_col} b={block} fp64",
            setup=setup,
            torch_fn=lambda x, block=block, levels=levels: reference(x["W"], x["Hinv"], block=block, levels=levels),
            numba_fn=lambda x, block=block, levels=levels: cpu(x["W"], x["Hinv"], block=block, levels=levels),
            flops=flops,
            torch_label="torch (batched cholesky)",
            cuda_fn=lambda x, block=block, levels=levels: cuda(x["W"], x["Hinv"], block=block, levels=levels),
        ))
    return cases
