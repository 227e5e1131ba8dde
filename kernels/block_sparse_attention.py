"""Block-sparse attention: each query block attends only to a *list* of key blocks.

Cut the queries and the keys into blocks of ``block_size`` tokens (16, 32 or 64). For query block
``qb`` the caller names the key blocks it may read, ``block_index[b, h, qb, :]`` (padded with -1).
Inside the listed blocks the usual causal rule can still apply token by token. Everything else is
skipped, never computed, so the cost is proportional to the number of listed blocks, not to T*S.

This is the last stage of InfiniteHiP (arXiv 2502.08910): its hierarchical pruning picks, per query
block, the sink blocks, the recent window and the top-k key blocks, and then runs exactly this
kernel ("paged block-sparse FlashAttention"). MInference, Quest and the other sparse-attention
papers use the same primitive with a different selection rule.

The algorithm is the online softmax of :mod:`kernels.attention`; only the set of key tiles differs.
The CPU kernel even reuses that module's tile step, gathering the listed blocks into one contiguous
buffer so that the matrix products stay large. Duplicated block ids are rejected with a
``ValueError`` (silently de-duplicating would hide a bug in the caller's selection code).

Layout: ``q (B, H, T, D)``, ``k (B, H_kv, S, D)``, ``v (B, H_kv, S, D_v)``, GQA as in attention;
``block_index`` int ``(B, H, ceil(T / block_size), max_k_blocks)``. T and S need not be multiples
of ``block_size``: the last block of each is simply shorter.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend, single_threaded_blas
from kernels.attention import (
    BLOCK_K,
    D_MAX,
    LOG2E,
    TILE_K,
    _accumulate,
    _check_qkv,
    _check_scale,
    _cuda_tile_step,
    _finish_rows,
    _softmax_tile,
    _to_device,
    masked_reference,
)

__all__ = ["BLOCK_SIZES", "reference", "dense_mask", "cpu", "cuda", "run", "bench_cases"]

BLOCK_SIZES = (16, 32, 64)


def _check(q, k, v, block_index, block_size, q_offset, scale):
    """Validate everything; return (B, H, T, D, H_kv, S, D_v, q_offset, scale)."""
    B, H, T, D, H_kv, S, D_v = _check_qkv(q, k, v)
    if block_size not in BLOCK_SIZES or isinstance(block_size, bool):
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    n_qb, n_kb = -(-T // block_size), -(-S // block_size)
    check_tensor("block_index", block_index, ndim=4, dtype=(torch.int32, torch.int64))
    if block_index.shape[:3] != (B, H, n_qb) or block_index.shape[3] < 1:
        raise ValueError(f"block_index has shape {tuple(block_index.shape)}, expected "
                         f"(B, H, ceil(T/block_size), max_k_blocks) = ({B}, {H}, {n_qb}, >=1)")
    if block_index.device != q.device:
        raise ValueError(f"block_index is on {block_index.device}, expected {q.device} (same as q)")
    lo, hi = int(block_index.min()), int(block_index.max())
    if lo < -1 or hi >= n_kb:
        raise ValueError(f"block_index holds ids in [{lo}, {hi}], expected -1 (padding) or 0..{n_kb - 1} "
                         f"(S={S} keys in blocks of {block_size})")
    ids = block_index.sort(dim=-1).values
    dup = (ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)
    if dup.any():
        where = tuple(int(i) for i in dup.nonzero()[0][:3])
        raise ValueError(f"block_index lists a key block twice for (b, h, query block) = {where}; "
                         "each listed block must be unique (duplicates would be counted twice)")
    if q_offset is None:
        q_offset = S - T
    elif isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise ValueError(f"q_offset must be an int or None (default S - T), got {q_offset!r}")
    return B, H, T, D, H_kv, S, D_v, q_offset, _check_scale(scale, D)


# --------------------------------------------------------------------------------------------
# Reference: build the dense token mask from the block list, then plain masked attention.
# --------------------------------------------------------------------------------------------
def dense_mask(block_index: torch.Tensor, T: int, S: int, *, block_size: int, causal: bool = True,
               q_offset: int | None = None) -> torch.Tensor:
    """The ``(B, H, T, S)`` boolean mask that ``block_index`` describes (True = visible).

    ``visible[b, h, i, j]`` iff key block ``j // block_size`` is listed for query block
    ``i // block_size`` and, when ``causal``, ``j <= q_offset + i`` (default ``q_offset = S - T``).
    """
    B, H, n_qb, _ = block_index.shape
    n_kb = -(-S // block_size)
    q_offset = S - T if q_offset is None else q_offset
    blocks = torch.zeros(B, H, n_qb, n_kb + 1, dtype=torch.bool, device=block_index.device)
    ids = torch.where(block_index < 0, n_kb, block_index).long()  # padding goes to a spare column
    blocks.scatter_(-1, ids, True)
    blocks = blocks[..., :n_kb]  # (B, H, n_qb, n_kb) block-level mask
    visible = blocks.repeat_interleave(block_size, dim=2)[:, :, :T]  # block rows -> token rows
    visible = visible.repeat_interleave(block_size, dim=3)[..., :S]  # block columns -> token columns
    if causal:
        pos = q_offset + torch.arange(T, device=block_index.device)[:, None]
        visible = visible & (torch.arange(S, device=block_index.device)[None, :] <= pos)
    return visible


@torch.no_grad()
def reference(q, k, v, block_index, *, block_size: int, causal: bool = True, q_offset: int | None = None,
              scale: float | None = None, return_lse: bool = False):
    """Block-sparse attention, the specification (dense mask + masked softmax).

    q: (B, H, T, D); k: (B, H_kv, S, D); v: (B, H_kv, S, D_v); block_index: int (B, H, n_q_blocks,
    max_k_blocks), -1 = padding. Returns out (B, H, T, D_v) [, lse (B, H, T)]. A query row that sees
    no key (no listed block, or all listed keys in its future) gets zeros and lse = -inf.
    """
    _, _, T, _, _, S, _, q_offset, scale = _check(q, k, v, block_index, block_size, q_offset, scale)
    visible = dense_mask(block_index, T, S, block_size=block_size, causal=causal, q_offset=q_offset)
    return masked_reference(q, k, v, visible, scale=scale, return_lse=return_lse)


# --------------------------------------------------------------------------------------------
# Numba CPU: one prange item per (b, h, query block). The listed key blocks are copied into one
# contiguous buffer (with their absolute positions in `kpos`), then processed BLOCK_K keys at a
# time with attention's online-softmax tile step. Gathering costs one copy of the listed K/V rows,
# which is small next to the 2 * block_size FLOPs each copied element then takes part in.
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def _cpu_block_sparse(q, k, v, block_index, block_size, q_offset, causal, scale_log2, poly_exp, block_k,
                      out, lse):  # pragma: no cover (compiled)
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // H_kv
    n_qb, max_kb = block_index.shape[2], block_index.shape[3]
    dt = q.dtype
    far = S + abs(q_offset) + T + 1  # "no lower bound": blocks replace the sliding window here
    for item in prange(B * H * n_qb):
        b, h, qb = item // (H * n_qb), (item // n_qb) % H, item % n_qb
        hk = h // group
        i0 = qb * block_size
        nq = min(T, i0 + block_size) - i0
        qs = q[b, h, i0:i0 + nq] * scale_log2
        hi_r = np.empty(nq, dtype=np.int64)
        lo_r = np.empty(nq, dtype=np.int64)
        for r in range(nq):
            hi_r[r] = q_offset + i0 + r if causal else S - 1
            lo_r[r] = -far
        # Gather the listed blocks (skipping padding, and blocks entirely in every row's future).
        kbuf = np.empty((max_kb * block_size, D), dtype=dt)
        vbuf = np.empty((max_kb * block_size, Dv), dtype=dt)
        kpos = np.empty(max_kb * block_size, dtype=np.int64)
        n = 0
        for t in range(max_kb):
            kb = block_index[b, h, qb, t]
            if kb < 0 or kb * block_size > hi_r[nq - 1]:
                continue
            for j in range(kb * block_size, min(S, (kb + 1) * block_size)):
                kbuf[n] = k[b, hk, j]
                vbuf[n] = v[b, hk, j]
                kpos[n] = j
                n += 1
        m = np.full(nq, -np.inf, dtype=dt)
        l = np.zeros(nq, dtype=dt)
        acc = np.zeros((nq, Dv), dtype=dt)
        pv = np.empty((nq, Dv), dtype=dt)
        alpha = np.empty(nq, dtype=dt)
        shift = np.empty(nq, dtype=dt)
        tmax = np.empty(nq, dtype=dt)
        st_flat = np.empty(block_k * nq, dtype=dt)
        for c0 in range(0, n, block_k):
            nk = min(n, c0 + block_k) - c0
            st = st_flat[:nk * nq].reshape((nk, nq))
            np.dot(kbuf[c0:c0 + nk], qs.T, st)
            latest = kpos[c0]
            for c in range(c0, c0 + nk):
                latest = max(latest, kpos[c])
            need_mask = latest > hi_r[0]  # some key is in the future of the first row
            _softmax_tile(st, kpos[c0:c0 + nk], hi_r, lo_r, 0, need_mask, m, l, alpha, shift, tmax, poly_exp)
            np.dot(st.T, vbuf[c0:c0 + nk], pv)
            _accumulate(acc, alpha, pv)
        _finish_rows(acc, l, m, out[b, h, i0:i0 + nq], lse[b, h, i0:i0 + nq])


def cpu(q, k, v, block_index, *, block_size: int, causal: bool = True, q_offset: int | None = None,
        scale: float | None = None, return_lse: bool = False, block_k: int = BLOCK_K):
    """Numba CPU version of :func:`reference` (``block_k``: gathered keys per matrix product)."""
    _, _, _, _, _, _, _, q_offset, scale = _check(q, k, v, block_index, block_size, q_offset, scale)
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1:
        raise ValueError(f"block_k must be an int >= 1, got {block_k!r}")
    qn, kn, vn = as_numpy(q), as_numpy(k), as_numpy(v)
    out = np.empty(q.shape[:3] + (v.shape[3],), dtype=qn.dtype)
    lse = np.empty(q.shape[:3], dtype=qn.dtype)
    with single_threaded_blas():
        _cpu_block_sparse(qn, kn, vn, as_numpy(block_index.long()), block_size, q_offset, bool(causal),
                          qn.dtype.type(scale * LOG2E), qn.dtype == np.float32, block_k, out, lse)
    out_t, lse_t = torch.from_numpy(out), torch.from_numpy(lse)
    return (out_t, lse_t) if return_lse else out_t


# --------------------------------------------------------------------------------------------
# Numba CUDA: grid (query blocks, B*H); one block of `block_size` threads, one query row each.
# For every listed key block, the block stages TILE_K keys at a time in shared memory and each
# thread runs attention's `_cuda_tile_step` on its row. Which blocks to visit is read from
# block_index, the same value for all threads, so every thread reaches every syncthreads.
# --------------------------------------------------------------------------------------------
@gpu.jit
def _cuda_block_sparse(q, k, v, block_index, block_size, q_offset, causal, scale, out,
                       lse):  # pragma: no cover
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    tid = gpu.threadIdx.x
    nthreads = gpu.blockDim.x
    qb = gpu.blockIdx.x
    b, h = gpu.blockIdx.y // H, gpu.blockIdx.y % H
    hk = h // (H // H_kv)
    k_tile = gpu.shared.array((TILE_K, D_MAX), float64)
    v_tile = gpu.shared.array((TILE_K, D_MAX), float64)
    q_row = gpu.local.array(D_MAX, float64)
    acc = gpu.local.array(D_MAX, float64)
    s_loc = gpu.local.array(TILE_K, float64)

    i = qb * block_size + tid
    active = i < T
    for d in range(D):
        q_row[d] = q[b, h, i, d] * scale if active else 0.0
    for d in range(Dv):
        acc[d] = 0.0
    m = -math.inf
    l = 0.0
    row_hi = q_offset + i if causal else S - 1
    row_lo = -(S + abs(q_offset) + T + 1)  # no window: the block list is the only restriction
    for t in range(block_index.shape[3]):
        kb = block_index[b, h, qb, t]
        if kb < 0:
            continue  # uniform across the block: every thread skips together
        for j0 in range(kb * block_size, min(S, (kb + 1) * block_size), TILE_K):
            nk = min(min(S, (kb + 1) * block_size) - j0, TILE_K)
            for idx in range(tid, nk * D, nthreads):
                k_tile[idx // D, idx % D] = k[b, hk, j0 + idx // D, idx % D]
            for idx in range(tid, nk * Dv, nthreads):
                v_tile[idx // Dv, idx % Dv] = v[b, hk, j0 + idx // Dv, idx % Dv]
            gpu.syncthreads()
            if active:
                m, l = _cuda_tile_step(q_row, k_tile, v_tile, s_loc, nk, j0, row_hi, row_lo, 0, D, Dv, m, l,
                                       acc)
            gpu.syncthreads()
    if active:
        if l > 0.0:
            for d in range(Dv):
                out[b, h, i, d] = acc[d] / l
            lse[b, h, i] = m + math.log(l)
        else:
            for d in range(Dv):
                out[b, h, i, d] = 0.0
            lse[b, h, i] = -math.inf


def cuda(q, k, v, block_index, *, block_size: int, causal: bool = True, q_offset: int | None = None,
         scale: float | None = None, return_lse: bool = False):
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    B, H, T, D, _, S, D_v, q_offset, scale = _check(q, k, v, block_index, block_size, q_offset, scale)
    if max(D, D_v) > D_MAX:
        raise ValueError(f"head dims D={D}, D_v={D_v}: the CUDA kernel supports at most D_MAX={D_MAX}")
    out = torch.empty((B, H, T, D_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=q.dtype, device=q.device)
    d_out, d_lse = _to_device(out), _to_device(lse)
    grid = (block_index.shape[2], B * H)
    _cuda_block_sparse[grid, block_size](_to_device(q), _to_device(k), _to_device(v),
                                         _to_device(block_index.long()), block_size, q_offset, bool(causal),
                                         scale, d_out, d_lse)
    if not q.is_cuda:
        out, lse = torch.from_numpy(d_out.copy_to_host()), torch.from_numpy(d_lse.copy_to_host())
    return (out, lse) if return_lse else out


def run(q, k, v, block_index, *, backend: str = "auto", **kwargs):
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(q, k, v, block_index, **kwargs)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
def infinitehip_like_index(B: int, H: int, T: int, block_size: int, *, n_sink_blocks: int = 1,
                           n_local_blocks: int = 2, n_top_blocks: int = 2, seed: int = 0) -> torch.Tensor:
    """An InfiniteHiP-shaped selection: sink blocks + the most recent blocks + a few random earlier ones.

    Returns int64 ``(B, H, ceil(T/block_size), n_sink_blocks + n_local_blocks + n_top_blocks)``; -1 pads
    rows near the start, where fewer distinct blocks exist. Used by the benchmark and the tests.
    """
    n_qb = -(-T // block_size)
    width = n_sink_blocks + n_local_blocks + n_top_blocks
    gen = torch.Generator().manual_seed(seed)
    index = torch.full((B, H, n_qb, width), -1, dtype=torch.int64)
    for qb in range(n_qb):
        chosen = list(range(min(n_sink_blocks, qb + 1)))
        chosen += [j for j in range(max(0, qb - n_local_blocks + 1), qb + 1) if j not in chosen]
        middle = [j for j in range(qb + 1) if j not in chosen]
        for b in range(B):
            for h in range(H):
                pick = [middle[i] for i in torch.randperm(len(middle), generator=gen)[:n_top_blocks].tolist()]
                row = chosen + pick
                index[b, h, qb, :len(row)] = torch.tensor(row)
    return index


def bench_cases(quick: bool = False) -> list[BenchCase]:
    """Block-sparse attention vs torch SDPA with the equivalent dense boolean mask (built in setup)."""
    import torch.nn.functional as F

    B, H, D, bs = 1, 4, 64, 64
    lengths = (512, 2048) if quick else (512, 2048, 4096)
    with_cuda = torch.cuda.is_available()
    cases = []
    for T in lengths:
        index = infinitehip_like_index(B, H, T, bs)

        def setup(T=T, index=index):
            gen = torch.Generator().manual_seed(0)
            x = {n: torch.randn(B, H, T, D, generator=gen) for n in "qkv"}
            x["index"] = index
            x["dense"] = dense_mask(index, T, T, block_size=bs, causal=True)
            if with_cuda:
                x.update({n + "_dev": x[n].cuda() for n in ("q", "k", "v", "index", "dense")})
            return x

        pairs = int(dense_mask(index, T, T, block_size=bs, causal=True).sum())
        cases.append(BenchCase(
            kernel="block_sparse_attention",
            shape=f"bs={bs} sink1+local2+top2 B={B} H={H} T={T} D={D} fp32",
            setup=setup,
            torch_fn=lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["dense"]),
            numba_fn=lambda x: cpu(x["q"], x["k"], x["v"], x["index"], block_size=bs),
            flops=float(pairs * 4 * D),
            torch_label="F.scaled_dot_product_attention (dense bool mask)",
            notes={"density": pairs / (B * H * T * T)},
            cuda_fn=(lambda x: cuda(x["q_dev"], x["k_dev"], x["v_dev"], x["index_dev"], block_size=bs))
            if with_cuda else None,
            torch_cuda_fn=(lambda x: F.scaled_dot_product_attention(x["q_dev"], x["k_dev"], x["v_dev"],
                                                                    attn_mask=x["dense_dev"]))
            if with_cuda else None,
        ))
    return cases
