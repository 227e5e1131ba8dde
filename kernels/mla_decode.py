"""Absorbed Multi-head Latent Attention (MLA) decode over a compressed KV cache.

DeepSeek-style MLA (and a TransMLA-converted model) caches, per token, one latent ``c_t`` (R dims,
``kv_lora_rank``) and one shared RoPE key ``k_pe,t`` (P dims), instead of H_kv keys and values.
Head h would decompress them with its up-projections, ``k_nope = W_UK,h c_t`` and ``v = W_UV,h c_t``
(both d dims). Decoding one new token never needs to: the up-projections are *absorbed*,

    q_lat,h = W_UK,hᵀ q_nope,h                                   (R,)    once per step
    s_h,t   = scale · (q_lat,hᵀ c_t + q_pe,hᵀ k_pe,t)            == scale · (q_nope,hᵀ k_nope,t + q_pe,hᵀ k_pe,t)
    o_lat,h = Σ_t softmax_t(s_h,t) c_t                           (R,)    online softmax over the cache
    o_h     = W_UV,h o_lat,h                                     (d,)    once per step

so the step streams the compressed cache once, for all heads (the cache is shared by every head,
like multi-query attention). :func:`explicit_reference` is the decompress-then-attend version; the
two are equal in exact arithmetic, which the tests check in fp64.

Layout (B batch, H query heads, T cached tokens, R latent rank, P RoPE dims, d value dims):
``q_lat (B, H, R)``, ``q_pe (B, H, P)``, ``c_cache (B, T, R)``, ``pe_cache (B, T, P)`` (already
rotated by position), ``w_uv (H, d, R)``; output ``(B, H, d)``. float32 or float64.

Backends: ``reference`` (torch matmuls), ``cpu`` (Numba, the cache split into chunks that threads
process in parallel, each keeping a running max/denominator/accumulator per head, then a merge:
the flash-decoding pattern), ``cuda`` (Numba CUDA: one block per (batch, group of heads, cache
chunk), tiles of tokens, shared-memory reductions, then a merge kernel that also applies W_UV).

The GQA baseline for the benchmark lives here too: :func:`gqa_reference` (grouped torch einsums
over the GQA cache), :func:`gqa_sdpa` (torch SDPA with ``enable_gqa``) and :func:`gqa_cpu` (the same
Numba structure as :func:`cpu`, over K and V caches).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, gpu_available, resolve_backend

__all__ = ["reference", "explicit_reference", "absorb_query", "cpu", "cuda", "run", "gqa_reference", "gqa_sdpa",
           "gqa_cpu",
           "kv_bytes_per_token", "bench_cases"]

MAX_R = 1024  # largest latent rank the CUDA kernel holds in shared memory (DeepSeek-V3 uses 512)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _check(q_lat, q_pe, c_cache, pe_cache, w_uv, scale) -> tuple[int, int, int, int, int, int]:
    """Validate shapes, dtypes and devices; return (B, H, R, P, T, d)."""
    check_tensor("q_lat", q_lat, ndim=3)
    B, H, R = q_lat.shape
    if min(B, H, R) < 1:
        raise ValueError(f"q_lat has shape {tuple(q_lat.shape)}, expected (B, H, R) with every size >= 1")
    check_tensor("q_pe", q_pe, ndim=3, shape=(B, H, None), like=q_lat)
    P = q_pe.shape[2]
    check_tensor("c_cache", c_cache, ndim=3, shape=(B, None, R), like=q_lat)
    T = c_cache.shape[1]
    if T < 1:
        raise ValueError(f"c_cache has shape {tuple(c_cache.shape)}, expected (B, T, R) with T >= 1")
    check_tensor("pe_cache", pe_cache, ndim=3, shape=(B, T, P), like=q_lat)
    check_tensor("w_uv", w_uv, ndim=3, shape=(H, None, R), like=q_lat)
    if w_uv.shape[1] < 1:
        raise ValueError(f"w_uv has shape {tuple(w_uv.shape)}, expected (H, d, R) with d >= 1")
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return B, H, R, P, T, w_uv.shape[1]


# --------------------------------------------------------------------------------------------
# References: plain torch, the specification.
# --------------------------------------------------------------------------------------------
def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_lat,h = W_UK,hᵀ q_nope,h. ``q_nope (B, H, d_k)``, ``w_uk (H, d_k, R)`` -> ``(B, H, R)``."""
    check_tensor("q_nope", q_nope, ndim=3)
    check_tensor("w_uk", w_uk, ndim=3, shape=(q_nope.shape[1], q_nope.shape[2], None), like=q_nope)
    return torch.einsum("bhd,hdr->bhr", q_nope, w_uk)


@torch.no_grad()
def reference(q_lat, q_pe, c_cache, pe_cache, w_uv, *, scale: float) -> torch.Tensor:
    """Absorbed MLA decode in torch: scores over the latent cache, softmax, Σ p·c, then W_UV."""
    _check(q_lat, q_pe, c_cache, pe_cache, w_uv, scale)
    scores = (torch.einsum("bhr,btr->bht", q_lat, c_cache) + torch.einsum("bhp,btp->bht", q_pe, pe_cache)) * scale
    out_lat = torch.einsum("bht,btr->bhr", torch.softmax(scores, dim=-1), c_cache)
    return torch.einsum("bhr,hdr->bhd", out_lat, w_uv)


@torch.no_grad()
def explicit_reference(q_nope, q_pe, c_cache, pe_cache, w_uk, w_uv, *, scale: float) -> torch.Tensor:
    """The same step without absorption: decompress every cached token into per-head keys and values
    (k_nope = W_UK,h c_t, v = W_UV,h c_t), append the shared RoPE key, and attend as usual."""
    B, H, _ = q_nope.shape
    _check(absorb_query(q_nope, w_uk), q_pe, c_cache, pe_cache, w_uv, scale)
    k_nope = torch.einsum("btr,hdr->bhtd", c_cache, w_uk)  # (B, H, T, d_k)
    v = torch.einsum("btr,hdr->bhtd", c_cache, w_uv)  # (B, H, T, d)
    k_pe = pe_cache[:, None].expand(B, H, *pe_cache.shape[1:])  # one RoPE key shared by all heads
    q = torch.cat([q_nope, q_pe], dim=-1)[:, :, None]  # (B, H, 1, d_k + P)
    k = torch.cat([k_nope, k_pe], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[:, :, 0]


# --------------------------------------------------------------------------------------------
# Numba CPU: split the cache into chunks (parallel), online softmax per head inside a chunk,
# then merge the chunks' (max, denominator, accumulator) and apply W_UV.
# --------------------------------------------------------------------------------------------
@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(a, b):  # pragma: no cover
    """Σ a_j b_j. Only this reduction may be reordered ("reassoc", "contract"), so LLVM can vectorise
    it instead of waiting on one add chain (10x at R = 576 here); no nnan/ninf, so inf stays exact."""
    total = 0.0
    for j in range(a.shape[0]):
        total += a[j] * b[j]
    return total


@njit(cache=True, fastmath=False)
def _online_tile(scores, n, values, m_old, l_old, acc):  # pragma: no cover
    """Fold one tile into a running softmax state: ``scores[:n]`` with their value rows
    ``values (n, R)`` into (max ``m_old``, sum ``l_old``, ``acc (R,)`` updated in place).
    Returns the new (max, sum). Shared by the MLA and the GQA decode kernels."""
    m_new = max(m_old, scores[:n].max())
    alpha = 0.0 if m_old == -np.inf else math.exp(m_old - m_new)  # rescale what came before
    l_run = l_old * alpha
    for j in range(acc.shape[0]):
        acc[j] *= alpha
    for i in range(n):
        p = math.exp(scores[i] - m_new)
        l_run += p
        for j in range(acc.shape[0]):
            acc[j] += p * values[i, j]
    return m_new, l_run


@njit(cache=True, fastmath=False)
def _merge_and_project(part_m, part_l, part_acc, b, h, w_uv, out):  # pragma: no cover
    """Merge one (b, h)'s chunk partials: o_lat = Σ_s e^{m_s - m} acc_s / Σ_s e^{m_s - m} l_s; out = W_UV o_lat."""
    n_split, R = part_acc.shape[1], part_acc.shape[3]
    m = -np.inf
    for s in range(n_split):
        m = max(m, part_m[b, s, h])
    lat = np.zeros(R)
    l_total = 0.0
    for s in range(n_split):
        if part_m[b, s, h] == -np.inf:  # an empty chunk contributes nothing
            continue
        w = math.exp(part_m[b, s, h] - m)
        l_total += w * part_l[b, s, h]
        for j in range(R):
            lat[j] += w * part_acc[b, s, h, j]
    for e in range(w_uv.shape[1]):
        total = 0.0
        for j in range(R):
            total += w_uv[h, e, j] * lat[j]
        out[b, h, e] = total / l_total


@njit(parallel=True, cache=True, fastmath=False)
def _mla_cpu(q_lat, q_pe, c, pe, w_uv, scale, n_split, tile):  # pragma: no cover
    B, H, R = q_lat.shape
    T = c.shape[1]
    chunk = (T + n_split - 1) // n_split
    dtype = q_lat.dtype  # softmax state in the input precision: float32 exp is ~3x cheaper than float64
    part_m = np.full((B, n_split, H), -np.inf, dtype=dtype)
    part_l = np.zeros((B, n_split, H), dtype=dtype)
    part_acc = np.zeros((B, n_split, H, R), dtype=dtype)
    for job in prange(B * n_split):
        b, s = job // n_split, job % n_split
        t_lo, t_hi = s * chunk, min(T, (s + 1) * chunk)
        scores = np.empty(tile, dtype=dtype)
        for t0 in range(t_lo, t_hi, tile):  # a tile of tokens stays in cache while every head reads it
            n = min(tile, t_hi - t0)
            for h in range(H):
                for i in range(n):
                    scores[i] = (_dot(q_lat[b, h], c[b, t0 + i]) + _dot(q_pe[b, h], pe[b, t0 + i])) * scale
                m, l_run = _online_tile(scores, n, c[b, t0:t0 + n], part_m[b, s, h], part_l[b, s, h],
                                        part_acc[b, s, h])
                part_m[b, s, h], part_l[b, s, h] = m, l_run
    out = np.empty((B, H, w_uv.shape[1]), dtype=q_lat.dtype)
    for bh in prange(B * H):
        _merge_and_project(part_m, part_l, part_acc, bh // H, bh % H, w_uv, out)
    return out


def _n_split(batch: int, length: int, tile: int, target_jobs: int = 16) -> int:
    """Enough cache chunks to keep every thread busy, but each chunk at least one tile long."""
    return max(1, min(-(-target_jobs // batch), -(-length // tile)))


def cpu(q_lat, q_pe, c_cache, pe_cache, w_uv, *, scale: float, tile: int = 64) -> torch.Tensor:
    """Numba CPU version of :func:`reference` (same arguments, same result)."""
    B, _, _, _, T, _ = _check(q_lat, q_pe, c_cache, pe_cache, w_uv, scale)
    arrays = [as_numpy(t) for t in (q_lat, q_pe, c_cache, pe_cache, w_uv)]
    return torch.from_numpy(_mla_cpu(*arrays, float(scale), _n_split(B, T, tile), tile))


# --------------------------------------------------------------------------------------------
# Numba CUDA, FlashMLA-flavoured.
#   1. _mla_partial: grid (B · head groups, cache chunks), block (TILE_T, HEADS_PER_BLOCK).
#      Thread (tx, ty) scores token t0+tx for head ty of the group; a shared-memory tree finds
#      the tile max and the sum of exp per head; then thread (tx, ty) owns latent dims
#      j = tx, tx+TILE_T, ... of head ty's accumulator (coalesced reads of the cached rows).
#      The heads of a block read the same cached tile, so it comes from L1/L2 after the first.
#   2. _mla_merge: one block per (b, h) merges the chunks and applies W_UV.
# --------------------------------------------------------------------------------------------
TILE_T = 32
HEADS_PER_BLOCK = 4
MERGE_THREADS = 128


@gpu.jit
def _mla_partial(q_lat, q_pe, c, pe, scale, chunk, part_m, part_l, part_acc):  # pragma: no cover
    B, H, R = q_lat.shape
    P, T = q_pe.shape[2], c.shape[1]
    n_groups = (H + HEADS_PER_BLOCK - 1) // HEADS_PER_BLOCK
    b, g, s = gpu.blockIdx.x // n_groups, gpu.blockIdx.x % n_groups, gpu.blockIdx.y
    tx, ty = gpu.threadIdx.x, gpu.threadIdx.y
    h = g * HEADS_PER_BLOCK + ty
    s_p = gpu.shared.array((HEADS_PER_BLOCK, TILE_T), float64)
    s_red = gpu.shared.array((HEADS_PER_BLOCK, TILE_T), float64)
    s_acc = gpu.shared.array((HEADS_PER_BLOCK, MAX_R), float64)
    s_m = gpu.shared.array(HEADS_PER_BLOCK, float64)
    s_l = gpu.shared.array(HEADS_PER_BLOCK, float64)
    for j in range(tx, R, TILE_T):
        s_acc[ty, j] = 0.0
    if tx == 0:
        s_m[ty] = -math.inf
        s_l[ty] = 0.0
    gpu.syncthreads()
    t_lo = s * chunk
    t_hi = min(T, t_lo + chunk)
    for t0 in range(t_lo, t_hi, TILE_T):  # same trip count for every thread of the block
        t = t0 + tx
        score = -math.inf
        if h < H and t < t_hi:
            dot = 0.0
            for j in range(R):
                dot += q_lat[b, h, j] * c[b, t, j]
            for j in range(P):
                dot += q_pe[b, h, j] * pe[b, t, j]
            score = dot * scale
        s_p[ty, tx] = score
        s_red[ty, tx] = score
        gpu.syncthreads()
        stride = TILE_T // 2
        while stride > 0:  # tile max per head
            if tx < stride:
                s_red[ty, tx] = max(s_red[ty, tx], s_red[ty, tx + stride])
            gpu.syncthreads()
            stride //= 2
        m_old = s_m[ty]
        m_new = max(m_old, s_red[ty, 0])
        p = 0.0 if score == -math.inf else math.exp(score - m_new)
        alpha = 0.0 if m_old == -math.inf else math.exp(m_old - m_new)
        gpu.syncthreads()  # everyone has read s_red[ty, 0] before it is overwritten
        s_p[ty, tx] = p
        s_red[ty, tx] = p
        gpu.syncthreads()
        stride = TILE_T // 2
        while stride > 0:  # tile sum of exp per head
            if tx < stride:
                s_red[ty, tx] += s_red[ty, tx + stride]
            gpu.syncthreads()
            stride //= 2
        if h < H:
            n = min(TILE_T, t_hi - t0)
            for j in range(tx, R, TILE_T):
                acc = s_acc[ty, j] * alpha
                for i in range(n):
                    acc += s_p[ty, i] * c[b, t0 + i, j]
                s_acc[ty, j] = acc
        gpu.syncthreads()
        if tx == 0:
            s_l[ty] = s_l[ty] * alpha + s_red[ty, 0]
            s_m[ty] = m_new
        gpu.syncthreads()
    if h < H:
        for j in range(tx, R, TILE_T):
            part_acc[b, h, s, j] = s_acc[ty, j]
        if tx == 0:
            part_m[b, h, s] = s_m[ty]
            part_l[b, h, s] = s_l[ty]


@gpu.jit
def _mla_merge(part_m, part_l, part_acc, w_uv, out):  # pragma: no cover
    H, n_split, R = part_acc.shape[1], part_acc.shape[2], part_acc.shape[3]
    b, h = gpu.blockIdx.x // H, gpu.blockIdx.x % H
    tid = gpu.threadIdx.x
    s_lat = gpu.shared.array(MAX_R, float64)
    m = -math.inf
    for s in range(n_split):
        m = max(m, part_m[b, h, s])
    l_total = 0.0
    for s in range(n_split):
        if part_m[b, h, s] != -math.inf:
            l_total += math.exp(part_m[b, h, s] - m) * part_l[b, h, s]
    for j in range(tid, R, MERGE_THREADS):
        acc = 0.0
        for s in range(n_split):
            if part_m[b, h, s] != -math.inf:
                acc += math.exp(part_m[b, h, s] - m) * part_acc[b, h, s, j]
        s_lat[j] = acc / l_total
    gpu.syncthreads()
    for e in range(tid, w_uv.shape[1], MERGE_THREADS):
        total = 0.0
        for j in range(R):
            total += w_uv[h, e, j] * s_lat[j]
        out[b, h, e] = total


def cuda(q_lat, q_pe, c_cache, pe_cache, w_uv, *, scale: float) -> torch.Tensor:
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    B, H, R, _, T, d = _check(q_lat, q_pe, c_cache, pe_cache, w_uv, scale)
    if R > MAX_R:
        raise ValueError(f"q_lat has latent rank R={R}; the CUDA kernel supports R <= {MAX_R}")
    on_gpu = q_lat.is_cuda

    def dev(t):
        return gpu.as_cuda_array(t.detach().contiguous()) if on_gpu else gpu.to_device(as_numpy(t))

    args = [dev(t) for t in (q_lat, q_pe, c_cache, pe_cache)]
    n_groups = -(-H // HEADS_PER_BLOCK)
    n_split = max(1, min(-(-T // TILE_T), -(-256 // (B * n_groups))))  # ~256 blocks when the cache is long
    chunk = -(-T // n_split)
    part_m = gpu.device_array((B, H, n_split), dtype=np.float64)
    part_l = gpu.device_array((B, H, n_split), dtype=np.float64)
    part_acc = gpu.device_array((B, H, n_split, R), dtype=np.float64)
    _mla_partial[(B * n_groups, n_split), (TILE_T, HEADS_PER_BLOCK)](*args, float(scale), chunk, part_m, part_l,
                                                                      part_acc)
    if on_gpu:
        out = torch.empty((B, H, d), dtype=q_lat.dtype, device=q_lat.device)
        _mla_merge[B * H, MERGE_THREADS](part_m, part_l, part_acc, dev(w_uv), gpu.as_cuda_array(out))
        return out
    out = gpu.device_array((B, H, d), dtype=as_numpy(q_lat[:1, :1, :1]).dtype)
    _mla_merge[B * H, MERGE_THREADS](part_m, part_l, part_acc, dev(w_uv), out)
    return torch.from_numpy(out.copy_to_host())


def run(q_lat, q_pe, c_cache, pe_cache, w_uv, *, scale: float, backend: str = "auto") -> torch.Tensor:
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(q_lat, q_pe, c_cache, pe_cache, w_uv, scale=scale)


# --------------------------------------------------------------------------------------------
# The GQA baseline: the same decode step for a GQA cache (H_kv keys and values per token).
# --------------------------------------------------------------------------------------------
def _check_gqa(q, k_cache, v_cache, scale) -> tuple[int, int, int, int, int]:
    check_tensor("q", q, ndim=3)
    B, H, D = q.shape
    check_tensor("k_cache", k_cache, ndim=4, shape=(B, None, None, D), like=q)
    H_kv, T = k_cache.shape[1], k_cache.shape[2]
    if H_kv < 1 or T < 1 or H % H_kv:
        raise ValueError(f"k_cache has shape {tuple(k_cache.shape)}, expected (B, H_kv, T, D) with T >= 1 and "
                         f"H_kv dividing H={H}")
    check_tensor("v_cache", v_cache, ndim=4, shape=(B, H_kv, T, None), like=q)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    return B, H, H_kv, T, v_cache.shape[3]


@torch.no_grad()
def gqa_reference(q, k_cache, v_cache, *, scale: float) -> torch.Tensor:
    """GQA decode in torch, grouped so K and V are never repeated per query head.

    ``q (B, H, D)``, ``k_cache (B, H_kv, T, D)``, ``v_cache (B, H_kv, T, D_v)`` -> ``(B, H, D_v)``.
    """
    B, H, H_kv, _, _ = _check_gqa(q, k_cache, v_cache, scale)
    q_groups = q.reshape(B, H_kv, H // H_kv, q.shape[2])  # query heads grouped by the kv head they read
    scores = torch.einsum("bkgd,bktd->bkgt", q_groups, k_cache) * scale
    return torch.einsum("bkgt,bktd->bkgd", torch.softmax(scores, dim=-1), v_cache).reshape(B, H, -1)


@torch.no_grad()
def gqa_sdpa(q, k_cache, v_cache, *, scale: float) -> torch.Tensor:
    """The same with ``F.scaled_dot_product_attention(..., enable_gqa=True)`` (on CPU it repeats K and V)."""
    _check_gqa(q, k_cache, v_cache, scale)
    return F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, scale=scale, enable_gqa=True)[:, :, 0]


@njit(parallel=True, cache=True, fastmath=False)
def _gqa_cpu(q, k, v, scale, n_split, tile):  # pragma: no cover
    B, H, D = q.shape
    H_kv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // H_kv
    chunk = (T + n_split - 1) // n_split
    dtype = q.dtype
    part_m = np.full((B, n_split, H), -np.inf, dtype=dtype)
    part_l = np.zeros((B, n_split, H), dtype=dtype)
    part_acc = np.zeros((B, n_split, H, Dv), dtype=dtype)
    for job in prange(B * H_kv * n_split):
        b, kv, s = job // (H_kv * n_split), (job // n_split) % H_kv, job % n_split
        t_lo, t_hi = s * chunk, min(T, (s + 1) * chunk)
        scores = np.empty(tile, dtype=dtype)
        for t0 in range(t_lo, t_hi, tile):
            n = min(tile, t_hi - t0)
            for h in range(kv * group, (kv + 1) * group):  # the query heads that share this kv head
                for i in range(n):
                    scores[i] = _dot(q[b, h], k[b, kv, t0 + i]) * scale
                m, l_run = _online_tile(scores, n, v[b, kv, t0:t0 + n], part_m[b, s, h], part_l[b, s, h],
                                        part_acc[b, s, h])
                part_m[b, s, h], part_l[b, s, h] = m, l_run
    out = np.empty((B, H, Dv), dtype=q.dtype)
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        m = -np.inf
        for s in range(n_split):
            m = max(m, part_m[b, s, h])
        l_total = 0.0
        for j in range(Dv):
            out[b, h, j] = 0.0
        for s in range(n_split):
            if part_m[b, s, h] == -np.inf:
                continue
            w = math.exp(part_m[b, s, h] - m)
            l_total += w * part_l[b, s, h]
            for j in range(Dv):
                out[b, h, j] += w * part_acc[b, s, h, j]
        for j in range(Dv):
            out[b, h, j] /= l_total
    return out


def gqa_cpu(q, k_cache, v_cache, *, scale: float, tile: int = 64) -> torch.Tensor:
    """Numba CPU GQA decode, built exactly like :func:`cpu` (chunks in parallel, online softmax, merge)."""
    B, _, H_kv, T, _ = _check_gqa(q, k_cache, v_cache, scale)
    arrays = [as_numpy(t) for t in (q, k_cache, v_cache)]
    return torch.from_numpy(_gqa_cpu(*arrays, float(scale), _n_split(B * H_kv, T, tile), tile))


def kv_bytes_per_token(*, kind: str, n_layers: int = 1, bytes_per_float: int = 2, n_kv_heads: int = 0,
                       head_dim: int = 0, kv_rank: int = 0, rope_dim: int = 0) -> int:
    """Cache bytes per token: GQA stores 2·H_kv·d floats per layer, MLA stores R + P."""
    if kind == "gqa":
        floats = 2 * n_kv_heads * head_dim
    elif kind == "mla":
        floats = kv_rank + rope_dim
    else:
        raise ValueError(f"kind must be 'gqa' or 'mla', got {kind!r}")
    if floats < 1 or n_layers < 1 or bytes_per_float < 1:
        raise ValueError(f"need a non-empty cache: floats={floats}, n_layers={n_layers}, "
                         f"bytes_per_float={bytes_per_float}")
    return floats * n_layers * bytes_per_float


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
# name: (B, H, H_kv, d, R, P, T). "toy" is one layer of the notebook's converted model; "llama2-7b"
# is one layer of LLaMA-2-7B (MHA, 32 heads of 128) against TransMLA's 512 + 64 cache.
BENCH_SHAPES = {
    "toy": (8, 8, 2, 16, 16, 16, 4096),
    "llama2-7b": (1, 32, 32, 128, 512, 64, 8192),
}


def decode_inputs(B, H, H_kv, d, R, P, T, *, dtype=torch.float32, seed=0) -> dict:
    """Random decode-step inputs for both caches at one shape (and CUDA copies when a GPU exists)."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    x = {"q_lat": mk(B, H, R), "q_pe": mk(B, H, P), "c_cache": mk(B, T, R), "pe_cache": mk(B, T, P),
         "w_uv": mk(H, d, R) / math.sqrt(R), "q": mk(B, H, d), "k_cache": mk(B, H_kv, T, d),
         "v_cache": mk(B, H_kv, T, d), "scale": d ** -0.5}
    if gpu_available() and torch.cuda.is_available():
        x["cuda"] = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return x


def _mla(fn, x):
    return fn(x["q_lat"], x["q_pe"], x["c_cache"], x["pe_cache"], x["w_uv"], scale=x["scale"])


def _gqa(fn, x):
    return fn(x["q"], x["k_cache"], x["v_cache"], scale=x["scale"])


def bench_cases(quick: bool = False) -> list[BenchCase]:
    cases = []
    for name, (B, H, H_kv, d, R, P, T) in BENCH_SHAPES.items():
        T = min(T, 2048) if quick else T
        setup = lambda B=B, H=H, H_kv=H_kv, d=d, R=R, P=P, T=T: decode_inputs(B, H, H_kv, d, R, P, T)
        mla_bytes = kv_bytes_per_token(kind="mla", kv_rank=R, rope_dim=P, bytes_per_float=4)
        gqa_bytes = kv_bytes_per_token(kind="gqa", n_kv_heads=H_kv, head_dim=d, bytes_per_float=4)
        shape = f"{name} B={B} H={H} T={T} fp32"
        cases.append(BenchCase(
            kernel="mla_decode", shape=f"{shape} R+P={R}+{P}", setup=setup,
            torch_fn=lambda x: _mla(reference, x), numba_fn=lambda x: _mla(cpu, x),
            cuda_fn=lambda x: _mla(cuda, x["cuda"]), torch_cuda_fn=lambda x: _mla(reference, x["cuda"]),
            bytes=B * T * mla_bytes, flops=2 * B * H * T * (2 * R + P), torch_label="torch absorbed (einsum)",
            notes={"kv_bytes_per_token_per_layer": mla_bytes}))
        cases.append(BenchCase(
            kernel="mla_decode:gqa_baseline", shape=f"{shape} H_kv={H_kv} d={d}", setup=setup,
            torch_fn=lambda x: _gqa(gqa_reference, x), numba_fn=lambda x: _gqa(gqa_cpu, x),
            torch_cuda_fn=lambda x: _gqa(gqa_reference, x["cuda"]),
            cuda_fn=lambda x: _gqa(gqa_sdpa, x["cuda"]),  # no Numba CUDA GQA kernel: SDPA is the GPU baseline
            bytes=B * T * gqa_bytes, flops=2 * B * H * T * 2 * d, torch_label="torch grouped einsum",
            notes={"kv_bytes_per_token_per_layer": gqa_bytes, "cuda_column": "torch SDPA on CUDA"}))
    return cases
