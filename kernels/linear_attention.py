"""Chunked causal linear attention with an optional per-head decay (RetNet / Lightning Attention).

Definition (phi = identity, no normalisation). Per batch b and head h, with decay gamma in (0, 1]
(gamma = 1 when ``decay`` is None) and an initial state M0 (zeros when ``initial_state`` is None):

    M_t = gamma * M_{t-1} + k_t^T v_t          (Dk x Dv),   M_{-1} = M0
    o_t = q_t M_t

which unrolls to the closed form the reference implements,

    o_t = sum_{s <= t} gamma^(t-s) (q_t . k_s) v_s  +  gamma^(t+1) q_t M0
    final_state = M_{T-1} = gamma^T M0 + sum_s gamma^(T-1-s) k_s^T v_s.

This is RetNet's recurrent form (S_n = gamma S_{n-1} + K_n^T V_n, o_n = Q_n S_n) and Lightning
Attention's (kv = lambda kv + k^T v). The state M0 "arrives" one step before token 0, so token t sees
it decayed t+1 times; feeding one segment's final_state as the next segment's initial_state gives
exactly the unsplit result, which is what LASP-2 (arXiv 2502.07563) relies on when it passes the
(Dk x Dv) states between devices instead of the keys and values.

The chunked algorithm, chunk length C, chunk c covering tokens [cC, cC + L_c):

    intra:  O_c  = ((Q_c K_c^T) * Dec) V_c,        Dec[i, j] = gamma^(i-j) if j <= i else 0
    inter:  O_c += (gamma^(i+1) * Q_c) M_c,        M_c = the state before chunk c
    scan:   M_{c+1} = gamma^(L_c) M_c + (gamma^(L_c-1-j) * K_c)^T V_c

The intra and inter parts of every chunk are independent once the M_c are known, and the M_c come
from a cheap scan over per-chunk summaries: across machines that is LASP-2's single AllGather +
prefix sum. (On one CPU the kernel below simply walks the chunks in order per head, with heads in
parallel; see the note above ``_cpu_linear`` for why.)

Layout: q, k ``(B, H, T, Dk)``, v ``(B, H, T, Dv)``, decay ``(H,)``, initial_state and the returned
final_state ``(B, H, Dk, Dv)``. float32 or float64.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend, single_threaded_blas

__all__ = ["reference", "torch_chunked", "cpu", "cuda", "run", "bench_cases"]


def _check(q, k, v, decay, initial_state, chunk):
    """Validate; return (B, H, T, Dk, Dv)."""
    check_tensor("q", q, ndim=4)
    B, H, T, Dk = q.shape
    if min(B, H, T, Dk) < 1:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected (B, H, T, Dk) with every size >= 1")
    check_tensor("k", k, shape=(B, H, T, Dk), like=q)
    check_tensor("v", v, ndim=4, like=q)
    check_tensor("v", v, shape=(B, H, T, None))
    Dv = v.shape[3]
    if Dv < 1:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected (B, H, T, Dv) with Dv >= 1")
    if decay is not None:
        check_tensor("decay", decay, shape=(H,), like=q)
        if not bool(((decay > 0) & (decay <= 1)).all()):
            lo, hi = float(decay.min()), float(decay.max())
            raise ValueError(f"decay must hold gammas in (0, 1], got values in [{lo}, {hi}]")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(B, H, Dk, Dv), like=q)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    return B, H, T, Dk, Dv


def _gammas(decay, H: int, like: torch.Tensor) -> torch.Tensor:
    """Per-head gamma as float64 (H,); ones when decay is None."""
    if decay is None:
        return torch.ones(H, dtype=torch.float64, device=like.device)
    return decay.to(torch.float64)


def _powers(gamma: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """gamma[h] ** e for e = 0..n, as (H, n + 1); computed in float64, then rounded once to ``dtype``."""
    e = torch.arange(n + 1, dtype=torch.float64, device=gamma.device)
    return (gamma[:, None] ** e[None, :]).to(dtype)


# --------------------------------------------------------------------------------------------
# Reference: the closed form, quadratic in T. The simplest correct statement of the operator.
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(q, k, v, *, decay=None, initial_state=None, chunk: int = 64):
    """Causal linear attention, the specification. Returns ``(out (B,H,T,Dv), final_state (B,H,Dk,Dv))``.

    ``chunk`` is validated but unused here (the reference is the quadratic closed form); it is kept so
    that every backend takes the same arguments.
    """
    B, H, T, Dk, Dv = _check(q, k, v, decay, initial_state, chunk)
    gamma = _gammas(decay, H, q)
    t = torch.arange(T, device=q.device)
    dist = (t[:, None] - t[None, :]).to(torch.float64)  # (T, T): t - s
    causal = dist >= 0
    dec = torch.where(causal, gamma[:, None, None] ** dist.clamp(min=0), 0.0).to(q.dtype)  # (H, T, T)
    out = ((q @ k.transpose(-1, -2)) * dec) @ v
    final = (k * (gamma[:, None] ** (T - 1 - t)).to(q.dtype)[None, :, :, None]).transpose(-1, -2) @ v
    if initial_state is not None:
        out = out + (gamma[:, None] ** (t + 1)).to(q.dtype)[None, :, :, None] * (q @ initial_state)
        final = final + (gamma ** T).to(q.dtype)[None, :, None, None] * initial_state
    return out, final


@torch.no_grad()
def torch_chunked(q, k, v, *, decay=None, initial_state=None, chunk: int = 64):
    """The chunked algorithm in plain torch: the benchmark's torch baseline (same result as reference).

    A loop over chunks with three matrix products each (intra, inter, state update), as in
    Lightning Attention's reference code. It measured faster than a fully vectorised formulation
    (all chunks in one batched matmul, the scan as an (n x n) matmul of decays): 7.6 ms against
    12.1 ms CPU at B=1, H=4, T=2048, D=64, one thread. So this is the honest baseline.
    """
    B, H, T, Dk, Dv = _check(q, k, v, decay, initial_state, chunk)
    C = min(chunk, T)
    gp = _powers(_gammas(decay, H, q), C, q.dtype)[:, :, None]  # (H, C+1, 1): gamma^0 .. gamma^C
    i = torch.arange(C, device=q.device)
    dist = i[:, None] - i[None, :]
    dec = torch.where(dist >= 0, gp[:, dist.clamp(min=0), 0], torch.zeros((), dtype=q.dtype))  # (H, C, C)
    state = initial_state.clone() if initial_state is not None else q.new_zeros(B, H, Dk, Dv)
    out = q.new_empty(B, H, T, Dv)
    q_decay, k_decay = gp[:, 1:], gp[:, C - 1 - i]  # (H, C, 1): gamma^(i+1), gamma^(C-1-j)
    for t0 in range(0, T, C):
        L = min(C, T - t0)
        if L < C:  # the ragged last chunk
            dec, q_decay, k_decay = dec[:, :L, :L], q_decay[:, :L], gp[:, L - 1 - i[:L]]
        qc, kc, vc = q[:, :, t0:t0 + L], k[:, :, t0:t0 + L], v[:, :, t0:t0 + L]
        o = ((qc @ kc.transpose(-1, -2)) * dec) @ vc  # intra-chunk
        o += (qc * q_decay) @ state  # inter-chunk: gamma^(i+1) q_i M
        out[:, :, t0:t0 + L] = o
        state = gp[:, L:L + 1] * state + (kc * k_decay).transpose(-1, -2) @ vc
    return out, state


# --------------------------------------------------------------------------------------------
# Numba CPU: one prange item per (batch, head); inside it, the chunks in order with the running
# state M (Dk x Dv) kept in a small local array, exactly the loop of Lightning Attention:
#     O_c = ((Q_c K_c^T) * Dec) V_c + gamma^(i+1) (Q_c M)          (intra + inter)
#     M   = gamma^L M + (gamma^(L-1-j) K_c)^T V_c                   (state update)
# Every matrix product is np.dot on contiguous tiles (BLAS); the elementwise loops run over
# independent outputs, so they vectorise without reordering sums (fastmath stays off).
#
# Why not parallel over chunks too (the LASP-2 structure: all chunk summaries in parallel, one scan,
# then all outputs in parallel)? It needs every chunk's state in memory, (T/C) x Dk x Dv per head,
# and on this machine touching those fresh pages cost more (~3 ms at T=2048) than the parallelism
# over chunks gained while B*H already fills the cores. The notebook shows the LASP invariant with
# `initial_state` / `final_state` instead.
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def _cpu_linear(q, k, v, gp, dec, m0, has_m0, C, out, final):  # pragma: no cover (compiled)
    """gp (H, C+1): gamma^0..gamma^C per head; dec (H, C, C): gamma^(i-j) on and below the diagonal."""
    B, H, T, Dk = q.shape
    Dv = v.shape[3]
    dt = q.dtype
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        M = final[b, h]  # the running state lives in the output buffer
        for d in range(Dk):
            for e in range(Dv):
                M[d, e] = m0[b, h, d, e] if has_m0 else 0.0
        s_flat = np.empty(C * C, dtype=dt)
        inter = np.empty((C, Dv), dtype=dt)
        kw = np.empty((C, Dk), dtype=dt)
        update = np.empty((Dk, Dv), dtype=dt)
        for t0 in range(0, T, C):
            L = min(T, t0 + C) - t0
            qc, kc, vc = q[b, h, t0:t0 + L], k[b, h, t0:t0 + L], v[b, h, t0:t0 + L]
            s = s_flat[:L * L].reshape((L, L))
            np.dot(qc, kc.T, s)  # Q K^T
            for i in range(L):  # * decay mask (0 above the diagonal): contiguous, vectorises
                for j in range(L):
                    s[i, j] *= dec[h, i, j]
            o = out[b, h, t0:t0 + L]
            np.dot(s, vc, o)  # intra-chunk output
            np.dot(qc, M, inter[:L])  # Q M: the state before this chunk; row i needs gamma^(i+1)
            for i in range(L):
                g = gp[h, i + 1]
                for e in range(Dv):
                    o[i, e] += g * inter[i, e]
            for j in range(L):  # state update: M = gamma^L M + (gamma^(L-1-j) K)^T V
                g = gp[h, L - 1 - j]
                for d in range(Dk):
                    kw[j, d] = kc[j, d] * g
            np.dot(kw[:L].T, vc, update)
            g = gp[h, L]
            for d in range(Dk):
                for e in range(Dv):
                    M[d, e] = g * M[d, e] + update[d, e]


def cpu(q, k, v, *, decay=None, initial_state=None, chunk: int = 64):
    """Numba CPU version of :func:`reference` (same arguments and outputs)."""
    B, H, T, Dk, Dv = _check(q, k, v, decay, initial_state, chunk)
    C = min(chunk, T)
    gp = _powers(_gammas(decay, H, q), C, q.dtype)  # (H, C+1)
    i = torch.arange(C)
    dec = torch.where(i[:, None] >= i[None, :], gp[:, (i[:, None] - i[None, :]).clamp(min=0)], 0.0)  # (H, C, C)
    gp, dec = as_numpy(gp), as_numpy(dec.to(q.dtype))
    qn, kn, vn = as_numpy(q), as_numpy(k), as_numpy(v)
    m0 = as_numpy(initial_state) if initial_state is not None else np.zeros((1, 1, 1, 1), dtype=qn.dtype)
    out = np.empty((B, H, T, Dv), dtype=qn.dtype)
    final = np.empty((B, H, Dk, Dv), dtype=qn.dtype)
    with single_threaded_blas():
        _cpu_linear(qn, kn, vn, gp, dec, m0, initial_state is not None, C, out, final)
    return torch.from_numpy(out), torch.from_numpy(final)


# --------------------------------------------------------------------------------------------
# Numba CUDA, Lightning-style tiling. Grid (Dv tiles, B*H); block (CU_TE, CU_CHUNK) threads.
# Column e of the outputs and of the state depends only on column e of V, so each block owns
# CU_TE value columns of one head and walks the chunks in order, keeping its slice of the state
# M (Dk x CU_TE) in shared memory the whole time. Per chunk:
#   load Q, K (C x Dk) and the V columns (C x CU_TE) into shared memory;
#   thread (j, i) computes one decayed score gamma^(i-j) q_i . k_j into a shared C x C tile;
#   thread (e, i) computes out[i, e] = sum_j S[i, j] v[j, e] + gamma^(i+1) q_i . M[:, e];
#   threads (e, d...) update M[d, e] = gamma^L M[d, e] + sum_j gamma^(L-1-j) k[j, d] v[j, e].
# Float64 in shared memory for both dtypes. CU_CHUNK is this kernel's own chunk length (shared
# tiles have static sizes); `chunk` only regroups the same sums, so results agree to rounding.
# --------------------------------------------------------------------------------------------
CU_CHUNK = 16  # tokens per chunk = threads per block column (also the score tile's side)
CU_TE = 16  # value columns per block; must equal CU_CHUNK (thread (j, i) also scores S[i, j])
DK_MAX = 64  # largest Dk the CUDA kernel supports (Q, K and M tiles are static shared arrays)


@gpu.jit
def _cuda_linear(q, k, v, gp, m0, has_m0, out, final):  # pragma: no cover
    B, H, T, Dk = q.shape
    Dv = v.shape[3]
    tx, ty = gpu.threadIdx.x, gpu.threadIdx.y
    b, h = gpu.blockIdx.y // H, gpu.blockIdx.y % H
    e = gpu.blockIdx.x * CU_TE + tx  # this thread's value column
    q_s = gpu.shared.array((CU_CHUNK, DK_MAX), float64)
    k_s = gpu.shared.array((CU_CHUNK, DK_MAX), float64)
    v_s = gpu.shared.array((CU_CHUNK, CU_TE), float64)
    s_s = gpu.shared.array((CU_CHUNK, CU_CHUNK), float64)
    m_s = gpu.shared.array((DK_MAX, CU_TE), float64)
    for d in range(ty, Dk, CU_CHUNK):
        m_s[d, tx] = m0[b, h, d, e] if (has_m0 and e < Dv) else 0.0
    for t0 in range(0, T, CU_CHUNK):
        L = min(CU_CHUNK, T - t0)
        for d in range(tx, Dk, CU_TE):  # row ty of the Q and K chunk (zeros past the end)
            q_s[ty, d] = q[b, h, t0 + ty, d] if ty < L else 0.0
            k_s[ty, d] = k[b, h, t0 + ty, d] if ty < L else 0.0
        v_s[ty, tx] = v[b, h, t0 + ty, e] if (ty < L and e < Dv) else 0.0
        gpu.syncthreads()
        i, j = ty, tx  # decayed, causal score tile
        sc = 0.0
        if j <= i and i < L:
            for d in range(Dk):
                sc += q_s[i, d] * k_s[j, d]
            sc *= gp[h, i - j]
        s_s[i, j] = sc
        gpu.syncthreads()
        if ty < L and e < Dv:
            o = 0.0
            for jj in range(ty + 1):  # intra-chunk
                o += s_s[ty, jj] * v_s[jj, tx]
            inter = 0.0
            for d in range(Dk):  # inter-chunk: the state before this chunk
                inter += q_s[ty, d] * m_s[d, tx]
            out[b, h, t0 + ty, e] = o + gp[h, ty + 1] * inter
        gpu.syncthreads()  # everyone has read M; now advance it past this chunk
        for d in range(ty, Dk, CU_CHUNK):
            acc = 0.0
            for jj in range(L):
                acc += gp[h, L - 1 - jj] * k_s[jj, d] * v_s[jj, tx]
            m_s[d, tx] = gp[h, L] * m_s[d, tx] + acc
        gpu.syncthreads()
    if e < Dv:
        for d in range(ty, Dk, CU_CHUNK):
            final[b, h, d, e] = m_s[d, tx]


def cuda(q, k, v, *, decay=None, initial_state=None, chunk: int = 64):
    """Numba CUDA version of :func:`reference` (uses its own chunk length CU_CHUNK; see above)."""
    B, H, T, Dk, Dv = _check(q, k, v, decay, initial_state, chunk)
    if Dk > DK_MAX:
        raise ValueError(f"Dk={Dk}: the CUDA kernel supports at most DK_MAX={DK_MAX}")
    gp = _powers(_gammas(decay, H, q), CU_CHUNK, torch.float64)

    def dev(t):
        return gpu.as_cuda_array(t.detach()) if t.is_cuda else gpu.to_device(as_numpy(t))

    has_m0 = initial_state is not None
    m0 = initial_state if has_m0 else torch.zeros(1, 1, 1, 1, dtype=q.dtype, device=q.device)
    out = torch.empty((B, H, T, Dv), dtype=q.dtype, device=q.device)
    final = torch.empty((B, H, Dk, Dv), dtype=q.dtype, device=q.device)
    d_out, d_final = dev(out), dev(final)
    grid = (-(-Dv // CU_TE), B * H)
    _cuda_linear[grid, (CU_TE, CU_CHUNK)](dev(q), dev(k), dev(v), dev(gp), dev(m0), has_m0, d_out, d_final)
    if not q.is_cuda:
        out, final = torch.from_numpy(d_out.copy_to_host()), torch.from_numpy(d_final.copy_to_host())
    return out, final


def run(q, k, v, *, backend: str = "auto", **kwargs):
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(q, k, v, **kwargs)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
def chunked_flops(B: int, H: int, T: int, Dk: int, Dv: int, chunk: int) -> float:
    """FLOPs of the chunked algorithm: QK^T and (.)V inside chunks, the inter term, the summaries."""
    C = min(chunk, T)
    intra = T * C * (2 * Dk + 2 * Dv)  # full C x C tiles (the kernels compute the masked half too)
    inter = 2 * T * Dk * Dv
    summaries = 2 * T * Dk * Dv
    return float(B * H * (intra + inter + summaries))


def bench_cases(quick: bool = False) -> list[BenchCase]:
    """Chunked linear attention with per-head decay vs the vectorised torch chunked implementation."""
    B, H, D, C = 1, 4, 64, 64
    lengths = (512, 2048) if quick else (512, 2048, 8192)
    decay = 1.0 - torch.exp2(-5.0 - torch.arange(H, dtype=torch.float32))  # RetNet's per-head gammas
    with_cuda = torch.cuda.is_available()
    cases = []
    for T in lengths:
        def setup(T=T):
            gen = torch.Generator().manual_seed(0)
            x = {n: torch.randn(B, H, T, D, generator=gen) * D ** -0.5 for n in "qkv"}
            x["decay"] = decay.clone()
            if with_cuda:
                x.update({n + "_dev": x[n].cuda() for n in ("q", "k", "v", "decay")})
            return x

        def on_dev(fn):
            return lambda x: fn(x["q_dev"], x["k_dev"], x["v_dev"], decay=x["decay_dev"], chunk=C)

        cases.append(BenchCase(
            kernel="linear_attention",
            shape=f"decay C={C} B={B} H={H} T={T} D={D} fp32",
            setup=setup,
            torch_fn=lambda x: torch_chunked(x["q"], x["k"], x["v"], decay=x["decay"], chunk=C),
            numba_fn=lambda x: cpu(x["q"], x["k"], x["v"], decay=x["decay"], chunk=C),
            flops=chunked_flops(B, H, T, D, D, C),
            torch_label="torch_chunked (loop over chunks, 3 matmuls each)",
            cuda_fn=on_dev(cuda) if with_cuda else None,
            torch_cuda_fn=on_dev(torch_chunked) if with_cuda else None,
        ))
    return cases
