"""Fused Coupled-Adam step for an embedding matrix: the *reduce-then-map* kernel pattern.

Coupled Adam (Stollenwerk & Stollenwerk, arXiv 2502.08441) replaces Adam's per-element second
moment of the embedding matrix E (V x H) by its mean over the vocabulary axis. One step is

    m    <- b1 m + (1 - b1) g                          map      (V x H)
    v    <- b2 v + (1 - b2) g^2                        map      (V x H)
    vbar <- avg_scale * mean_i v[i, :]                 REDUCE   (H,)   <- the only coupling
    E    <- E (1 - lr wd) - lr/bc1 * m / (sqrt(vbar)/sqrt(bc2) + eps)    map (V x H)

so a fused kernel is two passes over memory: pass 1 updates m, v and accumulates column sums of
v; pass 2 uses the (H,) reduction to update E. ``exp_avg_sq`` stays *uncoupled* in memory and is
averaged on the fly each step, as in the official optimizer (flxst/coupled-adam,
``nanoGPT/coupled_adam.py``); because the mean is linear this equals an EMA of the mean.

All backends update ``param``, ``exp_avg`` and ``exp_avg_sq`` in place and return ``None``,
like an optimizer step. Shapes: every tensor is ``(V, H)``, float32 or float64.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, copy_back, resolve_backend

__all__ = ["reference", "cpu", "cuda", "run", "bench_cases"]


def _check(param, grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, avg_scale) -> None:
    check_tensor("param", param, ndim=2)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_tensor(name, t, shape=tuple(param.shape), like=param)
    if not (isinstance(step, int) and step >= 1):
        raise ValueError(f"step must be an int >= 1 (1 for the first update), got {step!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if avg_scale <= 0:
        raise ValueError(f"avg_scale must be > 0, got {avg_scale}")


def _bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


# --------------------------------------------------------------------------------------------
# Reference: plain torch, the specification.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    avg_scale: float = 1.0,
) -> None:
    """One in-place Coupled-Adam step. All tensors ``(V, H)``; ``step`` counts from 1."""
    _check(param, grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, avg_scale)
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    v_bar = avg_scale * exp_avg_sq.mean(dim=0, keepdim=True)  # (1, H): the coupling
    denom = v_bar.sqrt() / bc2_sqrt + eps
    param.mul_(1 - lr * weight_decay).addcdiv_(exp_avg, denom, value=-lr / bc1)


# --------------------------------------------------------------------------------------------
# Numba CPU: pass 1 (map + partial column sums per row chunk), tiny reduce, pass 2 (map).
# Rows are split into chunks so each thread walks contiguous memory (row-major E).
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def _cpu_step(p, g, m, v, lr, b1, b2, eps, wd, avg_scale, bc1, bc2_sqrt, n_chunks):  # pragma: no cover
    n_rows, n_cols = p.shape
    rows_per_chunk = (n_rows + n_chunks - 1) // n_chunks
    partial = np.zeros((n_chunks, n_cols), dtype=p.dtype)
    for c in prange(n_chunks):  # pass 1: moments, and this chunk's column sums of v
        for i in range(c * rows_per_chunk, min(n_rows, (c + 1) * rows_per_chunk)):
            for j in range(n_cols):
                gij = g[i, j]
                m[i, j] = b1 * m[i, j] + (1.0 - b1) * gij
                vij = b2 * v[i, j] + (1.0 - b2) * gij * gij
                v[i, j] = vij
                partial[c, j] += vij
    denom = np.empty(n_cols, dtype=p.dtype)  # reduce: (n_chunks, H) -> (H,)
    for j in range(n_cols):
        total = 0.0
        for c in range(n_chunks):
            total += partial[c, j]
        denom[j] = math.sqrt(avg_scale * total / n_rows) / bc2_sqrt + eps
    step_size = lr / bc1
    decay = 1.0 - lr * wd
    for i in prange(n_rows):  # pass 2: the update
        for j in range(n_cols):
            p[i, j] = p[i, j] * decay - step_size * m[i, j] / denom[j]


def cpu(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.95, eps=1e-8,
        weight_decay=0.0, avg_scale=1.0) -> None:
    """Numba CPU version of :func:`reference` (same arguments, same in-place effect)."""
    _check(param, grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, avg_scale)
    arrays = [as_numpy(t) for t in (param, grad, exp_avg, exp_avg_sq)]
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)
    n_chunks = max(1, min(64, param.shape[0] // 64))
    _cpu_step(*arrays, lr, beta1, beta2, eps, weight_decay, avg_scale, bc1, bc2_sqrt, n_chunks)
    for dst, src in zip((param, exp_avg, exp_avg_sq), (arrays[0], arrays[2], arrays[3])):
        if dst.data_ptr() != src.ctypes.data:  # as_numpy had to copy: write the result back
            copy_back(dst, src)


# --------------------------------------------------------------------------------------------
# Numba CUDA: three small kernels.
#   1. moments_and_partial_sums: grid (col tiles, row chunks); block (TILE_COLS, TILE_ROWS).
#      Each thread walks rows ty, ty+TILE_ROWS, ... of its chunk; the block then tree-reduces
#      its TILE_ROWS partial sums in shared memory and writes one partial per (chunk, column).
#   2. column_denominators: one thread per column sums the chunk partials (deterministic,
#      no atomics) and forms sqrt(vbar)/sqrt(bc2) + eps.
#   3. update: a plain 2-D map.
# --------------------------------------------------------------------------------------------
TILE_COLS = 32  # one warp across columns: adjacent threads touch adjacent addresses (coalesced)
TILE_ROWS = 8
ROWS_PER_CHUNK = 256

# `gpu` is numba.cuda under a short name (the public function below is called `cuda`). It must be a
# module-level global: the CUDA simulator swaps module globals, not closure variables.
@gpu.jit
def _moments_and_partial_sums(g, m, v, b1, b2, partial):  # pragma: no cover
    n_rows, n_cols = m.shape
    tx, ty = gpu.threadIdx.x, gpu.threadIdx.y
    j = gpu.blockIdx.x * TILE_COLS + tx
    row0 = gpu.blockIdx.y * ROWS_PER_CHUNK
    acc = 0.0
    if j < n_cols:
        for i in range(row0 + ty, min(n_rows, row0 + ROWS_PER_CHUNK), TILE_ROWS):
            gij = g[i, j]
            m[i, j] = b1 * m[i, j] + (1.0 - b1) * gij
            vij = b2 * v[i, j] + (1.0 - b2) * gij * gij
            v[i, j] = vij
            acc += vij
    tile = gpu.shared.array((TILE_ROWS, TILE_COLS), float64)
    tile[ty, tx] = acc
    gpu.syncthreads()
    stride = TILE_ROWS // 2
    while stride > 0:  # tree reduction over the block's rows; every thread reaches syncthreads
        if ty < stride:
            tile[ty, tx] += tile[ty + stride, tx]
        gpu.syncthreads()
        stride //= 2
    if ty == 0 and j < n_cols:
        partial[gpu.blockIdx.y, j] = tile[0, tx]


@gpu.jit
def _column_denominators(partial, n_rows, avg_scale, bc2_sqrt, eps, denom):  # pragma: no cover
    j = gpu.grid(1)
    if j < denom.shape[0]:
        total = 0.0
        for c in range(partial.shape[0]):  # fixed order: deterministic, no atomics
            total += partial[c, j]
        denom[j] = math.sqrt(avg_scale * total / n_rows) / bc2_sqrt + eps


@gpu.jit
def _update(p, m, denom, step_size, decay):  # pragma: no cover
    i, j = gpu.grid(2)
    if i < p.shape[0] and j < p.shape[1]:
        p[i, j] = p[i, j] * decay - step_size * m[i, j] / denom[j]


def cuda(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.95, eps=1e-8,
         weight_decay=0.0, avg_scale=1.0) -> None:
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    _check(param, grad, exp_avg, exp_avg_sq, step, beta1, beta2, eps, avg_scale)
    on_gpu = param.is_cuda

    def dev(t):
        return gpu.as_cuda_array(t.detach()) if on_gpu else gpu.to_device(as_numpy(t))

    p, g, m, v = (dev(t) for t in (param, grad, exp_avg, exp_avg_sq))
    n_rows, n_cols = param.shape
    n_chunks = (n_rows + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    partial = gpu.device_array((n_chunks, n_cols), dtype=np.float64)
    denom = gpu.device_array(n_cols, dtype=as_numpy(param[:1, :1]).dtype)
    bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)

    col_tiles = (n_cols + TILE_COLS - 1) // TILE_COLS
    _moments_and_partial_sums[(col_tiles, n_chunks), (TILE_COLS, TILE_ROWS)](g, m, v, beta1, beta2, partial)
    _column_denominators[(n_cols + 127) // 128, 128](partial, n_rows, avg_scale, bc2_sqrt, eps, denom)
    grid2d = ((n_rows + 15) // 16, (n_cols + 15) // 16)
    _update[grid2d, (16, 16)](p, m, denom, lr / bc1, 1.0 - lr * weight_decay)
    if not on_gpu:
        for dst, src in ((param, p), (exp_avg, m), (exp_avg_sq, v)):
            copy_back(dst, src.copy_to_host())


def run(param, grad, exp_avg, exp_avg_sq, *, backend: str = "auto", **hyper) -> None:
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    impl(param, grad, exp_avg, exp_avg_sq, **hyper)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
def _torch_adamw_like(x: dict) -> None:
    """What a user would otherwise run: torch's foreach ops for the same step."""
    reference(x["p"], x["g"], x["m"], x["v"], step=3, lr=1e-3)


def bench_cases(quick: bool = False) -> list[BenchCase]:
    shapes = [(1024, 64), (4096, 256)] if quick else [(1024, 64), (4096, 256), (50304, 768)]
    cases = []
    for n_rows, n_cols in shapes:
        def setup(n_rows=n_rows, n_cols=n_cols):
            gen = torch.Generator().manual_seed(0)
            mk = lambda: torch.randn(n_rows, n_cols, generator=gen)
            return {"p": mk(), "g": mk(), "m": mk() * 0.1, "v": mk().abs() * 0.01}

        cases.append(BenchCase(
            kernel="coupled_adam_step",
            shape=f"V={n_rows} H={n_cols} fp32",
            setup=setup,
            torch_fn=_torch_adamw_like,
            numba_fn=lambda x: cpu(x["p"], x["g"], x["m"], x["v"], step=3, lr=1e-3),
            bytes=7 * n_rows * n_cols * 4,  # read p,g,m,v + write p,m,v (fused ideal)
            torch_label="torch foreach ops",
            cuda_fn=lambda x: cuda(x["p"], x["g"], x["m"], x["v"], step=3, lr=1e-3),
        ))
    return cases
