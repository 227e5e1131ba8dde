"""Hierarchical token pruning (InfiniteHiP, arXiv 2502.08910): which key blocks each query block reads.

Attention in a trained LM is sparse: a query puts almost all of its weight on a few keys. InfiniteHiP
finds those keys without scoring all of them. The candidate keys of a query block (everything
except the first ``n_sink`` "sink" keys and the recent ``window``) are cut into chunks. A **stage**
``(chunk_size l_c, keep k)`` gives every chunk one score and keeps the best ``k / l_c`` chunks; the
next stage splits the survivors into smaller chunks and scores again. After the last stage the
surviving chunks, the sink and the window become the block list of
:mod:`kernels.block_sparse_attention`.

**The score of a chunk** ``[L, R)`` is found by a top-1 descent that reads only two keys per step:

    while R - L > 1:
        M = (L + R) // 2
        a, b = K[(L + M) // 2], K[(M + R) // 2]          # the middle key of each half
        sa, sb = max_r q_r . a,  max_r q_r . b            # max over the block's query rows
        (L, R, win) = (L, M, sa) if sa > sb else (M, R, sb)
        score = max(score, win)

so a chunk of ``l_c = 2**n`` keys costs ``2 n = 2 log2(l_c)`` key reads instead of ``l_c``. The
descent ends on one key; only its score is used, and the whole chunk survives or not. (A chunk of
one key is read once.) Details follow the official Triton kernel
``chunk_controllable_sampling_mask_cuda`` in ``hip_attn/v1_2/attention_extend.py``: the middle key of
each branch is read (the paper's Alg. 3 reads the first), ``sa > sb`` is strict (ties go right),
the chunk keeps the maximum winning score over the steps, and the reduction over queries is a max.
The code also takes a max over all heads (``HIP_HEAD_REDUCE``); we keep one mask per head.

**RoPE hook.** Beyond the training length the scores should not depend on unseen distances, so the
paper scores chunks with *chunk-indexed* RoPE: the key read for chunk slot ``c`` is rotated as if it
sat at position ``c``. The kernels accept ``key_cos, key_sin (C, D)`` tables for that rotation
(rotate_half convention); the caller rotates the queries. The policy (which layer, which positions)
lives in ``companion.papers.infinitehip``; :func:`reference` and friends take it as ``scan_rope``.

Backends: ``reference`` (torch, vectorised over every chunk at once, and the only one that can
return the trace of keys read), ``cpu`` (Numba, one ``prange`` item per query block) and ``cuda``
(Numba CUDA, one thread per chunk, query rows staged in shared memory). They run the same pipeline;
only the stage scan differs. Layout: ``q (B, H, T, D)``, ``k (B, H_kv, S, D)``; GQA as in
:mod:`kernels.attention`; query ``i`` sits at position ``q_offset + i`` (default ``S - T``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend
from kernels.block_sparse_attention import BLOCK_SIZES

__all__ = ["Stage", "ScanResult", "HipMask", "scan_stage_reference", "scan_stage_cpu", "scan_stage_cuda",
           "stage0_chunks", "keep_top", "split_chunks", "run_stages", "block_index_from_chunks", "window_starts",
           "reference", "cpu", "cuda", "run", "bench_cases"]

D_MAX = 128  # largest head dim of the CUDA kernel (static local arrays)
Q_TILE = 16  # query rows staged in shared memory per step (CUDA)
CHUNK_THREADS = 32  # chunks per CUDA block, one thread each


class Stage(NamedTuple):
    """One pruning stage: score chunks of ``chunk_size`` keys, keep the best ``keep`` keys' worth.

    ``stride_q`` > 1 scores with the mean of each group of ``stride_q`` consecutive queries instead
    of every query (the official code uses 4 for its first two stages).
    """

    chunk_size: int
    keep: int
    stride_q: int = 1


class ScanResult(NamedTuple):
    """The output of one stage scan; every tensor is ``(B, H, n_qb, C)`` except ``trace``.

    ``score``: the chunk's score (-inf for an empty chunk); ``best``: the key the descent ended on
    (-1 if empty); ``reads``: key vectors read (int32); ``trace``: ``(B, H, n_qb, C, steps, 2)`` key
    indices read at each step (-1 = none), only from the reference with ``return_trace=True``.
    """

    score: torch.Tensor
    best: torch.Tensor
    reads: torch.Tensor
    trace: torch.Tensor | None = None


@dataclass
class StageLog:
    """What one stage saw and did: its input chunks ``[left, right)`` and their scores (B, H, n_qb, C)."""

    stage: Stage
    left: torch.Tensor
    right: torch.Tensor
    score: torch.Tensor
    reads: torch.Tensor
    trace: torch.Tensor | None


@dataclass
class HipMask:
    """The result of the pruning pipeline.

    ``block_index (B, H, ceil(T / block_size), M)``: the key blocks each query block of
    ``block_size`` rows reads, sorted, padded with -1 (the input of block_sparse_attention).
    ``left, right (B, H, n_qb, K)``: the chunks kept by the last stage (empty chunks have
    left == right). ``window_start (n_qb,)``: first key of each scan block's recent window.
    ``stages``: one :class:`StageLog` per stage.
    """

    block_index: torch.Tensor
    block_size: int
    block_q: int
    q_offset: int
    left: torch.Tensor
    right: torch.Tensor
    window_start: torch.Tensor
    stages: list[StageLog]


# A scan_rope hook: (stage index, number of chunk slots C, q (B, H, T, D), positions (T,))
#   -> (rotated q, key_cos (C, D) or None, key_sin (C, D) or None)
ScanRope = Callable[[int, int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None,
                                                                   torch.Tensor | None]]


# --------------------------------------------------------------------------------------------
# Argument checks.
# --------------------------------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_stages(stages) -> tuple[Stage, ...]:
    """Validate a stage list; return it as a tuple of :class:`Stage`."""
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or len(stages) == 0:
        raise ValueError(f"stages must be a non-empty sequence of (chunk_size, keep[, stride_q]), got {stages!r}")
    out = []
    for i, s in enumerate(stages):
        try:
            s = Stage(*s)
        except TypeError as exc:
            raise ValueError(f"stages[{i}] = {s!r} is not (chunk_size, keep[, stride_q])") from exc
        if not all(_is_int(v) and v >= 1 for v in s):
            raise ValueError(f"stages[{i}] = {tuple(s)}: chunk_size, keep and stride_q must be ints >= 1")
        if s.keep % s.chunk_size:
            raise ValueError(f"stages[{i}]: keep={s.keep} must be a multiple of chunk_size={s.chunk_size}")
        if i > 0 and out[-1].chunk_size % s.chunk_size:
            raise ValueError(f"stages[{i}]: chunk_size={s.chunk_size} must divide the previous stage's "
                             f"chunk_size={out[-1].chunk_size} (survivors are split into equal sub-chunks)")
        out.append(s)
    return tuple(out)


def _check_mask_args(q, k, stages, n_sink, window, block_size, block_q, q_offset):
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, like=q)
    B, H, T, D = q.shape
    if min(B, H, T, D) < 1:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected (B, H, T, D) with every size >= 1")
    check_tensor("k", k, shape=(B, None, None, D))
    H_kv, S = k.shape[1], k.shape[2]
    if H_kv < 1 or S < 1 or H % H_kv:
        raise ValueError(f"k has shape {tuple(k.shape)}: need S >= 1 and H={H} a multiple of H_kv={H_kv}")
    stages = check_stages(stages)
    for name, val, lo in (("n_sink", n_sink, 0), ("window", window, 1)):
        if not _is_int(val) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    if block_size not in BLOCK_SIZES or isinstance(block_size, bool):
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (block_sparse_attention's), got {block_size!r}")
    if not _is_int(block_q) or block_q < 1 or block_q % block_size:
        raise ValueError(f"block_q must be a positive multiple of block_size={block_size}, got {block_q!r}")
    for i, s in enumerate(stages):
        if block_q % s.stride_q:
            raise ValueError(f"stages[{i}].stride_q={s.stride_q} must divide block_q={block_q}")
    if q_offset is None:
        q_offset = S - T
    if not _is_int(q_offset) or not 0 <= q_offset <= S - T:
        raise ValueError(f"q_offset must be an int in [0, S - T] = [0, {S - T}] (default S - T), got {q_offset!r}")
    return stages, int(q_offset)


def _check_scan_args(q, k, left, right, rows, key_cos, key_sin):
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4, like=q)
    B, H, Tr, D = q.shape
    check_tensor("k", k, shape=(B, None, None, D))
    if H % k.shape[1]:
        raise ValueError(f"H={H} (q.shape[1]) must be a multiple of H_kv={k.shape[1]} (k.shape[1])")
    if not _is_int(rows) or rows < 1:
        raise ValueError(f"rows (query rows per block) must be an int >= 1, got {rows!r}")
    n_qb = -(-Tr // rows)
    check_tensor("left", left, ndim=4, dtype=torch.int64, shape=(B, H, n_qb, None))
    check_tensor("right", right, shape=tuple(left.shape), dtype=torch.int64)
    if left.numel() and (int(left.min()) < 0 or int(right.max()) > k.shape[2]):
        raise ValueError(f"chunks must lie in [0, S={k.shape[2]}], got left.min()={int(left.min())}, "
                         f"right.max()={int(right.max())}")
    if (key_cos is None) != (key_sin is None):
        raise ValueError("give both key_cos and key_sin, or neither")
    if key_cos is not None:
        if D % 2:
            raise ValueError(f"RoPE needs an even head dim, got D={D}")
        check_tensor("key_cos", key_cos, shape=(left.shape[3], D), like=q)
        check_tensor("key_sin", key_sin, shape=(left.shape[3], D), like=q)
    return B, H, Tr, D, n_qb


# --------------------------------------------------------------------------------------------
# One stage scan. Reference: torch, every chunk of every query block advanced in lock step.
# --------------------------------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@torch.no_grad()
def scan_stage_reference(q, k, left, right, *, rows: int, key_cos=None, key_sin=None,
                         return_trace: bool = False) -> ScanResult:
    """Score every chunk ``[left, right)`` of every query block by the two-keys-per-step descent.

    q: (B, H, Tr, D) query rows, ``rows`` consecutive rows per block; k: (B, H_kv, S, D);
    left, right: int64 (B, H, n_qb, C); key_cos, key_sin: (C, D) rotation of a key read for slot c.
    """
    B, H, Tr, D, n_qb = _check_scan_args(q, k, left, right, rows, key_cos, key_sin)
    C = left.shape[3]
    pad = n_qb * rows - Tr
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(B, H, n_qb, rows, D)
    row_ok = (torch.arange(n_qb * rows) < Tr).view(n_qb, 1, rows)  # (n_qb, 1, rows) broadcasts over chunks
    k_heads = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S, D)

    def read(idx):  # idx (B, H, n_qb, C) -> max over the block's rows of q . key(idx), rotated per slot
        keys = k_heads.gather(2, idx.reshape(B, H, -1, 1).expand(-1, -1, -1, D)).view(B, H, n_qb, C, D)
        if key_cos is not None:
            keys = keys * key_cos + _rotate_half(keys) * key_sin
        s = torch.einsum("bhqrd,bhqcd->bhqcr", q_blocks, keys)
        return s.masked_fill(~row_ok, float("-inf")).amax(-1)

    L, R = left.clone(), right.clone()
    score = torch.full(L.shape, float("-inf"), dtype=q.dtype)
    reads = torch.zeros(L.shape, dtype=torch.int32)
    trace = []
    while True:
        pair = R - L > 1
        single = (R - L == 1) & (reads == 0)
        if not bool((pair | single).any()):
            break
        M = (L + R) // 2
        ia = torch.where(pair, (L + M) // 2, torch.where(single, L, 0))
        ib = torch.where(pair, (M + R) // 2, 0)
        sa, sb = read(ia), read(ib)
        go_left = sa > sb
        win = torch.where(go_left, sa, sb)
        score = torch.where(pair, torch.maximum(score, win), torch.where(single, sa, score))
        R = torch.where(pair & go_left, M, R)
        L = torch.where(pair & ~go_left, M, L)
        reads += 2 * pair + single
        if return_trace:
            trace.append(torch.stack([torch.where(pair | single, ia, -1), torch.where(pair, ib, -1)], -1))
    best = torch.where(reads > 0, L, -1)
    tr = None
    if return_trace:
        tr = torch.stack(trace, dim=-2) if trace else torch.full(L.shape + (0, 2), -1, dtype=torch.int64)
    return ScanResult(score, best, reads, tr)


# --------------------------------------------------------------------------------------------
# Numba CPU: one prange item per (b, h, query block); it walks its chunks one after the other.
# A key read is scored against the block's rows with the rows as the inner loop (q stored
# transposed), so the loop vectorises without reordering any sum (fastmath stays off).
# --------------------------------------------------------------------------------------------
def _load_key(k, b, hk, j, c, key_cos, key_sin, use_rope, out):  # pragma: no cover (compiled)
    """out[:] = key j of (b, hk), rotated for chunk slot c when use_rope. Plain Python that both
    compilers accept: ``njit`` turns it into the CPU helper and ``cuda.jit(device=True)`` into the
    CUDA one below, so the two backends cannot drift apart on RoPE."""
    D = k.shape[3]
    half = D // 2
    for d in range(D):
        x = k[b, hk, j, d]
        if use_rope:
            rh = -k[b, hk, j, d + half] if d < half else k[b, hk, j, d - half]
            x = x * key_cos[c, d] + rh * key_sin[c, d]
        out[d] = x


_cpu_load_key = njit(cache=True)(_load_key)


@njit(cache=True)
def _cpu_read(qT, nr, k, b, hk, j, c, key_cos, key_sin, use_rope, kv, s):  # pragma: no cover (compiled)
    """max over the block's rows r of q_r . key_j (key rotated for chunk slot c when use_rope)."""
    D = k.shape[3]
    _cpu_load_key(k, b, hk, j, c, key_cos, key_sin, use_rope, kv)
    for r in range(nr):
        s[r] = 0.0
    for d in range(D):
        x = kv[d]
        for r in range(nr):
            s[r] += qT[d, r] * x
    m = -np.inf
    for r in range(nr):
        m = max(m, s[r])
    return m


@njit(parallel=True, cache=True, fastmath=False)
def _cpu_scan(q, k, left, right, rows, key_cos, key_sin, use_rope, score, best,
              reads):  # pragma: no cover (compiled)
    B, H, Tr, D = q.shape
    group = H // k.shape[1]
    n_qb, C = left.shape[2], left.shape[3]
    for item in prange(B * H * n_qb):
        b, h, qb = item // (H * n_qb), (item // n_qb) % H, item % n_qb
        hk = h // group
        r0 = qb * rows
        nr = min(Tr, r0 + rows) - r0
        qT = np.empty((D, nr), dtype=q.dtype)
        for r in range(nr):
            for d in range(D):
                qT[d, r] = q[b, h, r0 + r, d]
        kv = np.empty(D, dtype=q.dtype)
        s = np.empty(nr, dtype=q.dtype)
        for c in range(C):
            lo, hi = left[b, h, qb, c], right[b, h, qb, c]
            sc = -np.inf
            n = 0
            if hi - lo == 1:
                sc = _cpu_read(qT, nr, k, b, hk, lo, c, key_cos, key_sin, use_rope, kv, s)
                n = 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                sa = _cpu_read(qT, nr, k, b, hk, (lo + mid) // 2, c, key_cos, key_sin, use_rope, kv, s)
                sb = _cpu_read(qT, nr, k, b, hk, (mid + hi) // 2, c, key_cos, key_sin, use_rope, kv, s)
                n += 2
                if sa > sb:
                    hi = mid
                    w = sa
                else:
                    lo = mid
                    w = sb
                sc = max(sc, w)
            score[b, h, qb, c] = sc
            best[b, h, qb, c] = lo if n > 0 else -1
            reads[b, h, qb, c] = n


def _rope_tables(q, key_cos, key_sin):
    if key_cos is None:
        empty = np.zeros((1, 1), dtype=as_numpy(q).dtype)
        return empty, empty, False
    return as_numpy(key_cos), as_numpy(key_sin), True


def scan_stage_cpu(q, k, left, right, *, rows: int, key_cos=None, key_sin=None) -> ScanResult:
    """Numba CPU version of :func:`scan_stage_reference` (no trace)."""
    B, H, _, _, n_qb = _check_scan_args(q, k, left, right, rows, key_cos, key_sin)
    qn = as_numpy(q)
    shape = tuple(left.shape)
    score = np.empty(shape, dtype=qn.dtype)
    best = np.empty(shape, dtype=np.int64)
    reads = np.empty(shape, dtype=np.int32)
    cos_n, sin_n, use_rope = _rope_tables(q, key_cos, key_sin)
    _cpu_scan(qn, as_numpy(k), as_numpy(left), as_numpy(right), rows, cos_n, sin_n, use_rope, score, best, reads)
    return ScanResult(torch.from_numpy(score), torch.from_numpy(best), torch.from_numpy(reads))


# --------------------------------------------------------------------------------------------
# Numba CUDA: grid (chunk tiles, B*H*n_qb); one thread per chunk. At every step each thread loads
# its (at most) two keys into registers, the block stages its query rows Q_TILE at a time in shared
# memory, and each thread takes the max over rows. Every thread runs the same number of steps
# (n_iter, from the host) so that all reach every syncthreads; finished chunks just idle.
# --------------------------------------------------------------------------------------------
_cuda_load_key = gpu.jit(device=True)(_load_key)


@gpu.jit
def _cuda_scan(q, k, left, right, rows, key_cos, key_sin, use_rope, n_iter, score, best, reads):  # pragma: no cover
    B, H, Tr, D = q.shape
    group = H // k.shape[1]
    n_qb, C = left.shape[2], left.shape[3]
    tid = gpu.threadIdx.x
    c = gpu.blockIdx.x * gpu.blockDim.x + tid
    item = gpu.blockIdx.y
    b, h, qb = item // (H * n_qb), (item // n_qb) % H, item % n_qb
    hk = h // group
    r0 = qb * rows
    nr = min(Tr, r0 + rows) - r0
    q_tile = gpu.shared.array((Q_TILE, D_MAX), float64)
    ka = gpu.local.array(D_MAX, float64)
    kb = gpu.local.array(D_MAX, float64)
    valid = c < C
    lo = left[b, h, qb, c] if valid else 0
    hi = right[b, h, qb, c] if valid else 0
    sc = -math.inf
    n = 0
    for _ in range(n_iter):
        mode = 0  # 0: idle, 1: read one key (a chunk of length 1), 2: a descent step
        if hi - lo > 1:
            mode = 2
        elif hi - lo == 1 and n == 0:
            mode = 1
        mid = (lo + hi) // 2
        if mode == 2:
            _cuda_load_key(k, b, hk, (lo + mid) // 2, c, key_cos, key_sin, use_rope, ka)
            _cuda_load_key(k, b, hk, (mid + hi) // 2, c, key_cos, key_sin, use_rope, kb)
        elif mode == 1:
            _cuda_load_key(k, b, hk, lo, c, key_cos, key_sin, use_rope, ka)
        sa = -math.inf
        sb = -math.inf
        for t0 in range(0, nr, Q_TILE):  # nr is the same for every thread of the block
            nt = min(Q_TILE, nr - t0)
            gpu.syncthreads()  # the previous tile is no longer read
            for idx in range(tid, nt * D, gpu.blockDim.x):
                q_tile[idx // D, idx % D] = q[b, h, r0 + t0 + idx // D, idx % D]
            gpu.syncthreads()
            if mode > 0:
                for r in range(nt):
                    s = 0.0
                    for d in range(D):
                        s += q_tile[r, d] * ka[d]
                    sa = max(sa, s)
                    if mode == 2:
                        s = 0.0
                        for d in range(D):
                            s += q_tile[r, d] * kb[d]
                        sb = max(sb, s)
        if mode == 2:
            n += 2
            if sa > sb:
                hi = mid
                sc = max(sc, sa)
            else:
                lo = mid
                sc = max(sc, sb)
        elif mode == 1:
            n += 1
            sc = sa
    if valid:
        score[b, h, qb, c] = sc
        best[b, h, qb, c] = lo if n > 0 else -1
        reads[b, h, qb, c] = n


def scan_stage_cuda(q, k, left, right, *, rows: int, key_cos=None, key_sin=None) -> ScanResult:
    """Numba CUDA version of :func:`scan_stage_reference` (float64 arithmetic; CPU tensors in and out)."""
    from kernels.attention import _to_device

    B, H, _, D, n_qb = _check_scan_args(q, k, left, right, rows, key_cos, key_sin)
    if D > D_MAX:
        raise ValueError(f"head dim D={D}: the CUDA kernel supports at most D_MAX={D_MAX}")
    C = left.shape[3]
    shape = tuple(left.shape)
    score = torch.empty(shape, dtype=q.dtype, device=q.device)
    best = torch.empty(shape, dtype=torch.int64, device=q.device)
    reads = torch.empty(shape, dtype=torch.int32, device=q.device)
    if C == 0:
        return ScanResult(score, best, reads)
    longest = int((right - left).max())
    n_iter = max(1, math.ceil(math.log2(longest))) if longest > 1 else 1
    if key_cos is None:
        key_cos = key_sin = torch.zeros(1, 1, dtype=q.dtype, device=q.device)
        use_rope = False
    else:
        use_rope = True
    outs = [_to_device(t) for t in (score, best, reads)]
    grid = (-(-C // CHUNK_THREADS), B * H * n_qb)
    _cuda_scan[grid, CHUNK_THREADS](_to_device(q), _to_device(k), _to_device(left), _to_device(right), rows,
                                    _to_device(key_cos), _to_device(key_sin), use_rope, n_iter, *outs)
    if not q.is_cuda:
        score, best, reads = (torch.from_numpy(o.copy_to_host()) for o in outs)
    return ScanResult(score, best, reads)


# --------------------------------------------------------------------------------------------
# The pipeline (shared by every backend): stage-0 chunks, scan, keep top-k, split, ..., block list.
# --------------------------------------------------------------------------------------------
def _query_rows(q: torch.Tensor, block_q: int, stride_q: int) -> torch.Tensor:
    """Mean of each group of ``stride_q`` consecutive queries; groups never cross a block boundary."""
    if stride_q == 1:
        return q
    B, H, T, D = q.shape
    n = -(-T // stride_q)
    padded = torch.nn.functional.pad(q, (0, 0, 0, n * stride_q - T)).view(B, H, n, stride_q, D)
    count = torch.full((n,), stride_q, dtype=q.dtype)
    count[-1] = T - (n - 1) * stride_q
    return padded.sum(3) / count[:, None]


def stage0_chunks(B: int, H: int, n_sink: int, chunk: int, window_start: torch.Tensor):
    """Stage-0 chunks ``(B, H, n_qb, C)``: a grid from n_sink in steps of ``chunk``, clipped to each block's window."""
    n_qb = window_start.shape[0]
    n_chunks = -(-max(0, int(window_start.max()) - n_sink) // chunk)
    left = n_sink + chunk * torch.arange(n_chunks, dtype=torch.int64)
    right = torch.minimum(left + chunk, window_start[:, None])  # (n_qb, C)
    left = left.expand(n_qb, n_chunks)
    right = torch.maximum(right, left)  # past the window start: empty
    return left.expand(B, H, -1, -1).contiguous(), right.expand(B, H, -1, -1).contiguous()


def keep_top(left, right, score, n_keep: int):
    """The ``n_keep`` best chunks of each block, sorted by position, empty ones (left == right) last."""
    if left.shape[-1] > n_keep:
        idx = score.topk(n_keep, dim=-1).indices
        left, right, score = left.gather(-1, idx), right.gather(-1, idx), score.gather(-1, idx)
    right = torch.where(torch.isinf(score) & (score < 0), left, right)  # never-scored chunks carry nothing
    order = torch.where(right > left, left, torch.iinfo(torch.int64).max).argsort(dim=-1, stable=True)
    return left.gather(-1, order), right.gather(-1, order)


def split_chunks(left, right, old: int, new: int):
    """Each chunk into old/new sub-chunks of ``new`` keys (clipped to the parent, possibly empty)."""
    offs = new * torch.arange(old // new, dtype=torch.int64)
    sub_left = left[..., None] + offs
    sub_right = torch.minimum(sub_left + new, right[..., None])
    sub_right = torch.maximum(sub_right, sub_left)
    return sub_left.flatten(-2), sub_right.flatten(-2)


def _compact_unique(ids: torch.Tensor, n_kb: int) -> torch.Tensor:
    """Sort each row, drop duplicates and -1s, pad with -1 to the longest row."""
    x = torch.where(ids < 0, n_kb, ids).sort(dim=-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, n_kb, x).sort(dim=-1).values
    width = max(1, int((x < n_kb).sum(-1).max()))
    x = x[..., :width]
    return torch.where(x >= n_kb, -1, x)


def block_index_from_chunks(left, right, *, T, S, n_sink, window_start, block_size, block_q, q_offset):
    """Sink blocks + the kept chunks' blocks + the window blocks, for every query block of block_size rows."""
    B, H, _, K = left.shape
    bs = block_size
    n_fqb, n_kb = -(-T // bs), -(-S // bs)
    f = torch.arange(n_fqb)
    last_pos = q_offset + torch.minimum((f + 1) * bs, torch.tensor(T)) - 1  # last query position of each block
    scan_block = (f * bs) // block_q
    # window: from the scan block's window start to the block's own last key
    first_w = window_start[scan_block] // bs
    n_w = int((last_pos // bs - first_w).max()) + 1
    w_ids = first_w[:, None] + torch.arange(n_w)
    w_ids = torch.where(w_ids <= (last_pos // bs)[:, None], w_ids, -1)
    # sinks: blocks holding keys 0 .. n_sink-1 (never past the query block itself)
    s_ids = torch.arange(-(-n_sink // bs))
    s_ids = torch.where(s_ids[None, :] <= (last_pos // bs)[:, None], s_ids[None, :], -1)
    # kept chunks: every block a chunk touches (a chunk may straddle a block boundary)
    span = -(-int((right - left).max()) // bs) + 1 if K else 0
    c_ids = (left // bs)[..., None] + torch.arange(span)
    c_ids = torch.where((c_ids <= ((right - 1) // bs)[..., None]) & (right > left)[..., None], c_ids, -1)
    c_ids = c_ids.flatten(-2)[:, :, scan_block]  # (B, H, n_fqb, K * span)
    parts = [s_ids.expand(B, H, -1, -1), c_ids, w_ids.expand(B, H, -1, -1)]
    return _compact_unique(torch.cat(parts, dim=-1), n_kb)


def window_starts(T: int, *, window: int, block_q: int, q_offset: int) -> torch.Tensor:
    """First key of the recent window of each scan block: ``max(0, first query position - window + 1)``."""
    n_qb = -(-T // block_q)
    return torch.clamp(q_offset + block_q * torch.arange(n_qb) - window + 1, min=0)


@torch.no_grad()
def run_stages(q, k, scan, left, right, *, stages, block_q, q_offset, scan_rope=None, first: int = 0,
               return_trace: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[StageLog]]:
    """Stages ``first, first+1, ...`` starting from the chunks ``[left, right)`` of stage ``first``.

    Returns the chunks kept by the last stage (sorted, empty ones last) and one log per stage run.
    Starting at ``first > 0`` with a cached input is how decoding skips the early stages
    (``mask_refresh_interval.py`` in the official code).
    """
    positions = q_offset + torch.arange(q.shape[2])
    logs = []
    for i in range(first, len(stages)):
        stage = stages[i]
        if i > first:
            left, right = split_chunks(left, right, stages[i - 1].chunk_size, stage.chunk_size)
        q_i, key_cos, key_sin = (q, None, None) if scan_rope is None else scan_rope(i, left.shape[-1], q, positions)
        rows = _query_rows(q_i, block_q, stage.stride_q)
        kw = dict(rows=block_q // stage.stride_q, key_cos=key_cos, key_sin=key_sin)
        res = scan(rows, k, left, right, return_trace=True, **kw) if return_trace else scan(rows, k, left, right, **kw)
        logs.append(StageLog(stage, left, right, res.score, res.reads, res.trace))
        left, right = keep_top(left, right, res.score, stage.keep // stage.chunk_size)
    return left, right, logs


@torch.no_grad()
def _pipeline(q, k, scan, *, stages, n_sink, window, block_size, block_q, q_offset, scan_rope,
              return_trace=False) -> HipMask:
    B, H, T, _ = q.shape
    starts = window_starts(T, window=window, block_q=block_q, q_offset=q_offset)
    left, right = stage0_chunks(B, H, n_sink, stages[0].chunk_size, starts)
    left, right, logs = run_stages(q, k, scan, left, right, stages=stages, block_q=block_q, q_offset=q_offset,
                                   scan_rope=scan_rope, return_trace=return_trace)
    index = block_index_from_chunks(left, right, T=T, S=k.shape[2], n_sink=n_sink, window_start=starts,
                                    block_size=block_size, block_q=block_q, q_offset=q_offset)
    return HipMask(index, block_size, block_q, q_offset, left, right, starts, logs)


def reference(q, k, *, stages, n_sink: int = 0, window: int = 64, block_size: int = 16, block_q: int = 64,
              q_offset: int | None = None, scan_rope: ScanRope | None = None, return_trace: bool = False) -> HipMask:
    """The pruning pipeline with the torch stage scan (the specification).

    q: (B, H, T, D); k: (B, H_kv, S, D); stages: [(chunk_size, keep[, stride_q]), ...] with each
    chunk size dividing the previous one; n_sink, window: keys always kept (the first n_sink, and
    from ``first position of the scan block - window + 1`` on); block_size: key/query block of the
    returned block list; block_q: query rows per scan block. ``return_trace`` keeps the keys read.
    """
    stages, q_offset = _check_mask_args(q, k, stages, n_sink, window, block_size, block_q, q_offset)
    return _pipeline(q, k, scan_stage_reference, stages=stages, n_sink=n_sink, window=window,
                     block_size=block_size, block_q=block_q, q_offset=q_offset, scan_rope=scan_rope,
                     return_trace=return_trace)


def cpu(q, k, *, stages, n_sink: int = 0, window: int = 64, block_size: int = 16, block_q: int = 64,
        q_offset: int | None = None, scan_rope: ScanRope | None = None) -> HipMask:
    """:func:`reference` with the Numba CPU stage scan."""
    stages, q_offset = _check_mask_args(q, k, stages, n_sink, window, block_size, block_q, q_offset)
    return _pipeline(q, k, scan_stage_cpu, stages=stages, n_sink=n_sink, window=window, block_size=block_size,
                     block_q=block_q, q_offset=q_offset, scan_rope=scan_rope)


def cuda(q, k, *, stages, n_sink: int = 0, window: int = 64, block_size: int = 16, block_q: int = 64,
         q_offset: int | None = None, scan_rope: ScanRope | None = None) -> HipMask:
    """:func:`reference` with the Numba CUDA stage scan (the glue between stages stays in torch on the CPU)."""
    stages, q_offset = _check_mask_args(q, k, stages, n_sink, window, block_size, block_q, q_offset)
    return _pipeline(q, k, scan_stage_cuda, stages=stages, n_sink=n_sink, window=window, block_size=block_size,
                     block_q=block_q, q_offset=q_offset, scan_rope=scan_rope)


def run(q, k, *, backend: str = "auto", **kwargs) -> HipMask:
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(q, k, **kwargs)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
TOY_STAGES = (Stage(64, 2048), Stage(16, 512), Stage(4, 128))  # the toy of the paper spec: 64 -> 16 -> 4


def bench_cases(quick: bool = False) -> list[BenchCase]:
    """Mask + block-sparse attention against dense causal attention, for 64 new queries on T cached keys.

    The decoding-style setting of the paper's headline (one query block after a long context). The
    dense baseline is ``kernels.attention.cpu(mask="causal")``: our Numba flash-style kernel, which
    never materialises a mask (torch SDPA's ``is_causal`` aligns the triangle top-left, wrong here).
    """
    from kernels import attention, block_sparse_attention

    B, H, D, Tq = 1, 4, 64, 64
    cfg = dict(stages=TOY_STAGES, n_sink=16, window=64, block_size=16, block_q=64)
    lengths = (4096,) if quick else (4096, 16384, 65536)
    cases = []
    for S in lengths:
        def setup(S=S):
            gen = torch.Generator().manual_seed(0)
            return {"q": torch.randn(B, H, Tq, D, generator=gen), "k": torch.randn(B, H, S, D, generator=gen),
                    "v": torch.randn(B, H, S, D, generator=gen)}

        def sparse(x):
            mask = cpu(x["q"], x["k"], **cfg)
            return block_sparse_attention.cpu(x["q"], x["k"], x["v"], mask.block_index, block_size=16)

        cases.append(BenchCase(
            kernel="hip_mask",
            shape=f"mask+sparse Tq={Tq} S={S} H={H} D={D}",
            setup=setup,
            torch_fn=lambda x: attention.cpu(x["q"], x["k"], x["v"], mask="causal"),
            numba_fn=sparse,
            flops=None,
            torch_label="dense causal attention (kernels.attention.cpu, Numba)",
            notes={"dense_pairs": B * H * Tq * S},
        ))
    return cases
