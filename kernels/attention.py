"""Forward attention with an online (streaming) softmax: the FlashAttention idea, on CPU and GPU.

For one query row ``q_i`` the output is a softmax-weighted average of value rows,

    o_i = sum_j  p_ij v_j,      p_ij = exp(s_ij - m_i) / l_i,      s_ij = scale * q_i . k_j

with ``m_i = max_j s_ij`` (subtracted so that exp never overflows) and ``l_i = sum_j exp(s_ij - m_i)``.
The naive way materialises the whole ``T x S`` score matrix. The *online softmax* walks the keys in
tiles and keeps, per query row, just three things: the running max ``m``, the running denominator
``l`` and the running un-normalised output ``acc``. When a new tile raises the max from ``m`` to
``m'``, everything accumulated so far was computed against the old max, so it is rescaled by
``alpha = exp(m - m')``:

    l'   = alpha * l   + sum_{j in tile} exp(s_ij - m')
    acc' = alpha * acc + sum_{j in tile} exp(s_ij - m') v_j

At the end ``o_i = acc / l`` and the row log-sum-exp is ``lse_i = m + log(l)``. Memory is
``O(tile)`` instead of ``O(T * S)``, and whole tiles that the mask hides are never touched, which
is where the sliding-window speed-up comes from.

Masks (query ``i`` sits at absolute position ``pos = q_offset + i``; key ``j`` at position ``j``):

* ``"none"``:    every key is visible;
* ``"causal"``:  key ``j`` is visible iff ``j <= pos``;
* ``"sliding"``: visible iff ``j <= pos`` and (``pos - j < window`` or ``j < n_sink``). This is the
  Lambda shape of StreamingLLM / LM-Infinite / InfiniteHiP: a band of recent keys plus a few
  "sink" tokens at the start that every query keeps.

A row that sees no key at all (possible with ``q_offset < 0``, or mask tricks in later papers)
returns zeros and ``lse = -inf``, never NaN.

Layout: ``q (B, H, T, D)``, ``k (B, H_kv, S, D)``, ``v (B, H_kv, S, D_v)``; GQA when ``H_kv < H``:
query head ``h`` reads kv head ``h // (H // H_kv)``. float32 or float64, CPU torch tensors in and out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from llvmlite import ir
from numba import cuda as gpu
from numba import float64, njit, prange, types
from numba.extending import intrinsic

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend, single_threaded_blas

__all__ = ["MASKS", "reference", "masked_reference", "dense_mask", "cpu", "cuda", "run", "bench_cases"]

MASKS = ("none", "causal", "sliding")
LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2, see _softmax_tile
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# Argument checks shared by every backend.
# --------------------------------------------------------------------------------------------
def _check_qkv(q, k, v) -> tuple[int, int, int, int, int, int, int]:
    """Validate the (q, k, v) layout; return (B, H, T, D, H_kv, S, D_v)."""
    check_tensor("q", q, ndim=4)
    B, H, T, D = q.shape
    check_tensor("k", k, ndim=4, like=q)
    check_tensor("v", v, ndim=4, like=q)
    if min(B, H, T, D) < 1:
        raise ValueError(f"q has shape {tuple(q.shape)}, expected (B, H, T, D) with every size >= 1")
    H_kv, S = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(B, None, None, D))
    if H_kv < 1 or S < 1:
        raise ValueError(f"k has shape {tuple(k.shape)}, expected (B, H_kv, S, D) with H_kv, S >= 1")
    if H % H_kv != 0:
        raise ValueError(f"H={H} (q.shape[1]) must be a multiple of H_kv={H_kv} (k.shape[1]) for GQA")
    check_tensor("v", v, shape=(B, H_kv, S, None))
    if v.shape[3] < 1:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected (B, H_kv, S, D_v) with D_v >= 1")
    return B, H, T, D, H_kv, S, v.shape[3]


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
        raise ValueError(f"scale must be a finite float > 0 (default D**-0.5), got {scale!r}")
    return float(scale)


def _check_mask(mask, window, n_sink, q_offset, T: int, S: int) -> tuple[str, int | None, int, int]:
    if mask not in MASKS:
        raise ValueError(f"mask={mask!r} is not one of {MASKS}")
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be an int >= 0, got {n_sink!r}")
    if mask == "sliding":
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 for mask='sliding', got {window!r}")
    else:
        if window is not None:
            raise ValueError(f"window={window!r} only applies to mask='sliding' (got mask={mask!r})")
        if n_sink != 0:
            raise ValueError(f"n_sink={n_sink!r} only applies to mask='sliding' (got mask={mask!r})")
    if q_offset is None:
        q_offset = S - T
    elif isinstance(q_offset, bool) or not isinstance(q_offset, int):
        raise ValueError(f"q_offset must be an int or None (default S - T), got {q_offset!r}")
    return mask, window, n_sink, q_offset


# --------------------------------------------------------------------------------------------
# Reference: plain torch, the specification.
# --------------------------------------------------------------------------------------------
def dense_mask(T: int, S: int, *, mask: str = "causal", window: int | None = None, n_sink: int = 0,
               q_offset: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``(T, S)`` boolean matrix ``visible[i, j]`` for a mask mode (True = query i sees key j).

    This is the *definition* of the masks; the kernels never build it (that is their point), but the
    reference, the benchmark's torch baseline and the notebook's mask picture all use it.
    """
    if T < 1 or S < 1:
        raise ValueError(f"T and S must be >= 1, got T={T}, S={S}")
    mask, window, n_sink, q_offset = _check_mask(mask, window, n_sink, q_offset, T, S)
    pos = q_offset + torch.arange(T, device=device)[:, None]  # (T, 1) absolute query positions
    j = torch.arange(S, device=device)[None, :]  # (1, S) key positions
    if mask == "none":
        return torch.ones(T, S, dtype=torch.bool, device=device)
    visible = j <= pos
    if mask == "sliding":
        visible &= (pos - j < window) | (j < n_sink)
    return visible


@torch.no_grad()
def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, *,
                     scale: float | None = None, return_lse: bool = False):
    """Attention with an explicit boolean mask ``visible`` broadcastable to ``(B, H, T, S)``.

    Materialises the full score matrix (that is fine for a specification). A row with no visible
    key gives ``out = 0`` and ``lse = -inf``. Shared by :func:`reference` and by
    ``kernels.block_sparse_attention.reference``.
    """
    B, H, T, D, H_kv, S, D_v = _check_qkv(q, k, v)
    scale = _check_scale(scale, D)
    if not isinstance(visible, torch.Tensor) or visible.dtype != torch.bool:
        got = visible.dtype if isinstance(visible, torch.Tensor) else type(visible).__name__
        raise ValueError(f"visible must be a bool tensor broadcastable to {(B, H, T, S)}, got {got}")
    group = H // H_kv
    k = k.repeat_interleave(group, dim=1)  # (B, H, S, D): query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, T); -inf where the row sees nothing
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # avoid (-inf) - (-inf) = NaN
    out = torch.exp(s - safe[..., None]) @ v  # masked entries: exp(-inf) = 0, so empty rows give 0
    return (out, lse) if return_lse else out


@torch.no_grad()
def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: str = "causal",
              window: int | None = None, n_sink: int = 0, q_offset: int | None = None,
              scale: float | None = None, return_lse: bool = False):
    """Masked softmax attention, the specification.

    q: (B, H, T, D); k: (B, H_kv, S, D); v: (B, H_kv, S, D_v); H % H_kv == 0.
    mask: "none" | "causal" | "sliding" (needs ``window``; keeps the first ``n_sink`` keys too).
    q_offset: absolute position of query 0 (default ``S - T``: the queries are the last T tokens).
    scale: default ``D ** -0.5``.
    Returns out (B, H, T, D_v), and lse (B, H, T) (natural log) when ``return_lse``.
    """
    _, _, T, _, _, S, _ = _check_qkv(q, k, v)
    visible = dense_mask(T, S, mask=mask, window=window, n_sink=n_sink, q_offset=q_offset, device=q.device)
    return masked_reference(q, k, v, visible, scale=scale, return_lse=return_lse)


# --------------------------------------------------------------------------------------------
# Numba CPU.
#
# Work split: one prange item = (batch b, head h, query tile of BLOCK_Q rows). Each item walks the
# key tiles its rows can see and keeps (m, l, acc) for its rows. Inside an item the two matrix
# products go to BLAS (np.dot on contiguous tiles); everything between them (mask, max, exp, sum)
# is written so that the *innermost loop runs over query rows*: each row is an independent output,
# so LLVM vectorises those loops without reordering any floating-point sum (fastmath stays off).
# To get that layout we compute the transposed score tile  St = K_tile @ Q_tile^T  (keys x queries).
# --------------------------------------------------------------------------------------------
BLOCK_Q = 64  # query rows per prange item (the vector width of the softmax loops)
BLOCK_Q_SLIDING = 32  # a query tile visits its rows' band plus (block_q - 1) keys of ragged edge:
#                       narrower tiles waste less of it (11% instead of 20% at window 256)
BLOCK_K = 128  # keys per tile: bigger tiles mean bigger GEMMs but coarser skipping (128 measured best)


@intrinsic
def _fma(typingctx, a, b, c):  # pragma: no cover (compiled)
    """a * b + c with ONE rounding (the hardware FMA instruction), like C's fmaf.

    An exact IEEE operation, not a fast-math licence: it does not reorder anything. Without it
    LLVM (fastmath off) must emit a multiply and an add, which halves the polynomial's speed.
    """
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def _float32_from_bits(typingctx, bits):  # pragma: no cover (compiled)
    """The float32 whose IEEE-754 bit pattern is the low 32 bits of the integer ``bits`` (no conversion).

    C does this with a union or memcpy; Numba has no scalar bit-cast, so we ask LLVM directly. It
    compiles to nothing at all: the same register is simply read as a float.
    """
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True, inline="always")
def _exp2_poly(x):  # pragma: no cover (compiled)
    """2**x for float32 ``x <= 0``, vectorisable (libm's expf is a scalar call that blocks SIMD).

    The standard recipe (Cephes, SLEEF and torch's own Vectorized<float>::exp do the same): split
    x = n + f with n = round(x) and f in [-0.5, 0.5]; 2**f comes from a degree-6 polynomial (max
    relative error 8e-8, below float32's epsilon 1.2e-7) and 2**n is built directly from its
    IEEE-754 bits, exponent field n + 127, i.e. the integer (n + 127) << 23 read as a float.
    Inputs below -126 (including -inf, the masked scores) give exactly 0; the true value there is
    below 1.2e-38, so the absolute error is still under float32's smallest normal number.
    """
    x = np.float32(x)  # (the float64 specialisation compiles this too, but never runs it)
    xc = x if x > np.float32(-126.0) else np.float32(-126.0)
    n = np.floor(xc + np.float32(0.5))
    f = xc - n
    y = np.float32(1.535336188319500e-4)
    y = _fma(y, f, np.float32(1.339887440266574e-3))
    y = _fma(y, f, np.float32(9.618437357674640e-3))
    y = _fma(y, f, np.float32(5.550332471162809e-2))
    y = _fma(y, f, np.float32(2.402264791363012e-1))
    y = _fma(y, f, np.float32(6.931472028550421e-1))
    y = _fma(y, f, np.float32(1.0))
    two_n = _float32_from_bits((np.int32(n) + np.int32(127)) << 23)
    return y * two_n if x >= np.float32(-126.0) else np.float32(0.0)


@njit(cache=True)
def _softmax_tile(st, kpos, hi_r, lo_r, n_sink, need_mask, m, l, alpha, shift, tmax,
                  poly_exp):  # pragma: no cover (compiled)
    """One online-softmax step. ``st`` (n_keys, n_rows) holds scores in log2 units; in place -> P.

    ``kpos[c]`` is the absolute position of the tile's key ``c`` (the keys need not be contiguous:
    block-sparse attention gathers them). Row ``r`` sees key ``j`` iff ``j <= hi_r[r]`` and
    (``j >= lo_r[r]`` or ``j < n_sink``); every mask mode of this module (and of block-sparse
    attention) is a choice of (hi_r, lo_r, n_sink). ``need_mask=False`` skips that test.
    On return ``st[c, r] = 2**(s - m_new[r])`` (0 where masked), ``l`` and ``m`` are updated and
    ``alpha[r]`` is the factor the caller must apply to its accumulated output row.

    Base 2 (as FlashAttention does): the caller folded log2(e) into the query scale, so
    exp(s) = 2**(s * log2 e) costs no extra multiply here.
    """
    nk, nq = st.shape
    for r in range(nq):
        tmax[r] = -np.inf
    for c in range(nk):  # pass 1: mask and running max.  Inner loop over rows -> SIMD
        j = kpos[c]
        if need_mask:
            for r in range(nq):
                visible = (j <= hi_r[r]) & ((j >= lo_r[r]) | (j < n_sink))
                st[c, r] = st[c, r] if visible else -np.inf
        for r in range(nq):
            x = st[c, r]
            t = tmax[r]
            tmax[r] = x if x > t else t
    for r in range(nq):  # new max per row, and the rescale factor for what came before
        m_new = max(m[r], tmax[r])
        if m_new == -np.inf:  # nothing visible yet: keep zeros, and avoid (-inf) - (-inf) = NaN
            alpha[r] = 1.0
            shift[r] = 0.0
        else:
            a = 2.0 ** (m[r] - m_new)  # m[r] = -inf gives 0: the empty past is discarded
            alpha[r] = a
            shift[r] = m_new
            m[r] = m_new
            l[r] *= a
    if poly_exp:  # pass 2 (float32): p = 2**(s - m) with the vectorised polynomial
        for c in range(nk):
            for r in range(nq):
                p = _exp2_poly(st[c, r] - shift[r])
                st[c, r] = p
                l[r] += p
    else:  # pass 2 (float64): libm exp, accurate to an ulp; speed is not the point in fp64
        for c in range(nk):
            for r in range(nq):
                p = math.exp((st[c, r] - shift[r]) * LN2)
                st[c, r] = p
                l[r] += p


@njit(cache=True)
def _accumulate(acc, alpha, pv):  # pragma: no cover (compiled)
    """acc[r, :] = alpha[r] * acc[r, :] + pv[r, :]  (the rescale and the new tile, in one pass)."""
    nq, dv = acc.shape
    for r in range(nq):
        a = alpha[r]
        for d in range(dv):
            acc[r, d] = acc[r, d] * a + pv[r, d]


@njit(cache=True)
def _finish_rows(acc, l, m, out_rows, lse_rows):  # pragma: no cover (compiled)
    """out = acc / l and lse = (m + log2 l) * ln 2; rows that saw nothing get 0 and -inf."""
    nq, dv = acc.shape
    for r in range(nq):
        if l[r] > 0.0:
            inv = 1.0 / l[r]
            for d in range(dv):
                out_rows[r, d] = acc[r, d] * inv
            lse_rows[r] = (m[r] + math.log2(l[r])) * LN2
        else:
            for d in range(dv):
                out_rows[r, d] = 0.0
            lse_rows[r] = -np.inf


@njit(parallel=True, cache=True, fastmath=False)
def _cpu_attention(q, k, v, q_offset, causal, window, n_sink, scale_log2, poly_exp, block_q, block_k,
                   out, lse):  # pragma: no cover (compiled)
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // H_kv
    n_qt = (T + block_q - 1) // block_q
    dt = q.dtype
    for item in prange(B * H * n_qt):
        bh, t = item // n_qt, item % n_qt
        b, h = bh // H, bh % H
        # Zig-zag order 0, n-1, 1, n-2, ...: under a causal mask late tiles see more keys, and
        # prange hands each thread a contiguous range of items, so this keeps the threads balanced.
        qt = t // 2 if t % 2 == 0 else n_qt - 1 - t // 2
        hk = h // group
        i0 = qt * block_q
        nq = min(T, i0 + block_q) - i0
        qs = q[b, h, i0:i0 + nq] * scale_log2  # (nq, D) contiguous copy, scores come out in log2 units
        m = np.full(nq, -np.inf, dtype=dt)
        l = np.zeros(nq, dtype=dt)
        acc = np.zeros((nq, Dv), dtype=dt)
        pv = np.empty((nq, Dv), dtype=dt)
        alpha = np.empty(nq, dtype=dt)
        shift = np.empty(nq, dtype=dt)
        tmax = np.empty(nq, dtype=dt)
        st_flat = np.empty(block_k * nq, dtype=dt)
        kpos = np.empty(block_k, dtype=np.int64)
        hi_r = np.empty(nq, dtype=np.int64)  # last visible key per row
        lo_r = np.empty(nq, dtype=np.int64)  # first visible non-sink key per row
        for r in range(nq):
            pos = q_offset + i0 + r
            hi_r[r] = pos if causal else S - 1
            lo_r[r] = hi_r[r] - window + 1
        # Keys any row of this tile can see: the sinks [0, sink_end) and the band [lo, hi).
        # The two ranges never overlap, so no key is counted twice.
        hi = min(S, hi_r[nq - 1] + 1)
        lo = max(0, lo_r[0])
        sink_end = min(n_sink, lo, hi)
        for rng in range(2):
            a0, a1 = (0, sink_end) if rng == 0 else (lo, hi)
            for j0 in range(a0, a1, block_k):
                nk = min(a1, j0 + block_k) - j0
                st = st_flat[:nk * nq].reshape((nk, nq))
                np.dot(k[b, hk, j0:j0 + nk], qs.T, st)  # St = K Q^T  (BLAS)
                # Skip the per-element mask on tiles that every row sees entirely.
                full = (j0 + nk - 1 <= hi_r[0]) and (j0 >= lo_r[nq - 1] or j0 + nk <= n_sink)
                for c in range(nk):
                    kpos[c] = j0 + c
                _softmax_tile(st, kpos[:nk], hi_r, lo_r, n_sink, not full, m, l, alpha, shift, tmax, poly_exp)
                np.dot(st.T, v[b, hk, j0:j0 + nk], pv)  # P V  (BLAS)
                _accumulate(acc, alpha, pv)
        _finish_rows(acc, l, m, out[b, h, i0:i0 + nq], lse[b, h, i0:i0 + nq])


def _mask_params(mask: str, window: int | None, S: int, T: int, q_offset: int) -> tuple[bool, int]:
    """(causal, window) for the kernels: "none" and "causal" are sliding masks with an endless window."""
    endless = S + abs(q_offset) + T + 1  # longer than any distance in this problem
    return mask != "none", (window if mask == "sliding" else endless)


def cpu(q, k, v, *, mask="causal", window=None, n_sink=0, q_offset=None, scale=None, return_lse=False,
        block_q: int | None = None, block_k: int = BLOCK_K):
    """Numba CPU version of :func:`reference` (same arguments; tile sizes are tunable).

    ``block_q`` defaults to BLOCK_Q_SLIDING for the sliding mask and BLOCK_Q otherwise.
    """
    _, _, T, D, _, S, _ = _check_qkv(q, k, v)
    scale = _check_scale(scale, D)
    mask, window, n_sink, q_offset = _check_mask(mask, window, n_sink, q_offset, T, S)
    if block_q is None:
        block_q = BLOCK_Q_SLIDING if mask == "sliding" else BLOCK_Q
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    causal, win = _mask_params(mask, window, S, T, q_offset)
    qn, kn, vn = as_numpy(q), as_numpy(k), as_numpy(v)
    out = np.empty(q.shape[:3] + (v.shape[3],), dtype=qn.dtype)
    lse = np.empty(q.shape[:3], dtype=qn.dtype)
    with single_threaded_blas():
        _cpu_attention(qn, kn, vn, q_offset, causal, win, n_sink, qn.dtype.type(scale * LOG2E),
                       qn.dtype == np.float32,
                       block_q, block_k, out, lse)
    out_t, lse_t = torch.from_numpy(out), torch.from_numpy(lse)
    return (out_t, lse_t) if return_lse else out_t


# --------------------------------------------------------------------------------------------
# Numba CUDA.
#
# Grid (query tiles, B*H); one block = TILE_Q threads = TILE_Q query rows, one row per thread.
# For each key tile the block first copies TILE_K rows of K and V into shared memory (all threads
# cooperate, adjacent threads read adjacent addresses), syncs, and then every thread scores its
# query against those TILE_K keys from fast shared memory: each K/V element is read from global
# memory once per block instead of once per query. The online softmax is the same as on the CPU,
# one tile at a time. Accumulation is in float64 for both input dtypes (simple, exact enough);
# a production kernel would use float32 and tensor cores.
# --------------------------------------------------------------------------------------------
TILE_Q = 32  # threads per block; one warp. Small enough for the simulator, valid on any GPU
TILE_K = 16  # keys staged in shared memory per step
D_MAX = 128  # largest head dim the CUDA kernel supports (shared tiles have a static size)


@gpu.jit(device=True)
def _cuda_tile_step(q_row, k_tile, v_tile, s_loc, nk, j0, row_hi, row_lo, n_sink, D, Dv, m, l,
                    acc):  # pragma: no cover
    """One thread, one query row, one staged tile of ``nk`` keys (positions j0 .. j0+nk-1).

    The same online-softmax step as the CPU's ``_softmax_tile`` but for a single row: score the
    visible keys, raise the running max, rescale ``l`` and ``acc`` by exp(m - m_new), add the tile.
    Returns the new ``(m, l)``; ``acc`` is updated in place. Shared with block-sparse attention.
    """
    t_max = -math.inf
    for c in range(nk):
        j = j0 + c
        s = -math.inf
        if j <= row_hi and (j >= row_lo or j < n_sink):
            s = 0.0
            for d in range(D):
                s += q_row[d] * k_tile[c, d]
        s_loc[c] = s
        t_max = max(t_max, s)
    m_new = max(m, t_max)
    if m_new == -math.inf:  # nothing visible yet: keep zeros (and avoid (-inf) - (-inf) = NaN)
        return m, l
    alpha = math.exp(m - m_new)
    l *= alpha
    for d in range(Dv):
        acc[d] *= alpha
    for c in range(nk):
        p = math.exp(s_loc[c] - m_new)  # exp(-inf) = 0 for masked keys
        l += p
        for d in range(Dv):
            acc[d] += p * v_tile[c, d]
    return m_new, l


@gpu.jit
def _cuda_attention(q, k, v, q_offset, causal, window, n_sink, scale, out, lse):  # pragma: no cover
    B, H, T, D = q.shape
    H_kv, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    tid = gpu.threadIdx.x
    qt = gpu.blockIdx.x
    b, h = gpu.blockIdx.y // H, gpu.blockIdx.y % H
    hk = h // (H // H_kv)
    k_tile = gpu.shared.array((TILE_K, D_MAX), float64)
    v_tile = gpu.shared.array((TILE_K, D_MAX), float64)
    q_row = gpu.local.array(D_MAX, float64)
    acc = gpu.local.array(D_MAX, float64)
    s_loc = gpu.local.array(TILE_K, float64)

    i = qt * TILE_Q + tid  # this thread's query row (may be past T in the last tile)
    active = i < T
    for d in range(D):
        q_row[d] = q[b, h, i, d] * scale if active else 0.0
    for d in range(Dv):
        acc[d] = 0.0
    m = -math.inf
    l = 0.0
    pos = q_offset + i
    row_hi = pos if causal else S - 1
    row_lo = row_hi - window + 1

    # Key range of the whole block (identical in every thread, so all threads run the same loop
    # and reach every syncthreads): sinks [0, sink_end) then the band [lo, hi).
    i_last = min(T, (qt + 1) * TILE_Q) - 1
    hi = min(S, q_offset + i_last + 1) if causal else S
    lo = max(0, q_offset + qt * TILE_Q - window + 1)
    sink_end = min(n_sink, lo, hi)
    for rng in range(2):
        a0 = 0 if rng == 0 else lo
        a1 = sink_end if rng == 0 else hi
        for j0 in range(a0, a1, TILE_K):
            nk = min(a1 - j0, TILE_K)
            for idx in range(tid, nk * D, TILE_Q):  # cooperative, coalesced loads
                k_tile[idx // D, idx % D] = k[b, hk, j0 + idx // D, idx % D]
            for idx in range(tid, nk * Dv, TILE_Q):
                v_tile[idx // Dv, idx % Dv] = v[b, hk, j0 + idx // Dv, idx % Dv]
            gpu.syncthreads()
            if active:
                m, l = _cuda_tile_step(q_row, k_tile, v_tile, s_loc, nk, j0, row_hi, row_lo, n_sink, D, Dv,
                                       m, l, acc)
            gpu.syncthreads()  # the tile is overwritten next step
    if active:
        if l > 0.0:
            for d in range(Dv):
                out[b, h, i, d] = acc[d] / l
            lse[b, h, i] = m + math.log(l)
        else:
            for d in range(Dv):
                out[b, h, i, d] = 0.0
            lse[b, h, i] = -math.inf


def _to_device(t: torch.Tensor):
    return gpu.as_cuda_array(t.detach()) if t.is_cuda else gpu.to_device(as_numpy(t))


def cuda(q, k, v, *, mask="causal", window=None, n_sink=0, q_offset=None, scale=None, return_lse=False):
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    B, H, T, D, _, S, D_v = _check_qkv(q, k, v)
    scale = _check_scale(scale, D)
    mask, window, n_sink, q_offset = _check_mask(mask, window, n_sink, q_offset, T, S)
    if max(D, D_v) > D_MAX:
        raise ValueError(f"head dims D={D}, D_v={D_v}: the CUDA kernel supports at most D_MAX={D_MAX}")
    causal, win = _mask_params(mask, window, S, T, q_offset)
    on_gpu = q.is_cuda
    out = torch.empty((B, H, T, D_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=q.dtype, device=q.device)
    d_out, d_lse = _to_device(out), _to_device(lse)
    grid = ((T + TILE_Q - 1) // TILE_Q, B * H)
    _cuda_attention[grid, TILE_Q](_to_device(q), _to_device(k), _to_device(v), q_offset, causal, win, n_sink,
                                  scale, d_out, d_lse)
    if not on_gpu:
        out = torch.from_numpy(d_out.copy_to_host())
        lse = torch.from_numpy(d_lse.copy_to_host())
    return (out, lse) if return_lse else out


def run(q, k, v, *, backend: str = "auto", **kwargs):
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(q, k, v, **kwargs)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
def _attention_flops(T: int, S: int, D: int, D_v: int, B: int, H: int, **mask_kw) -> float:
    """Useful FLOPs: 2*D (scores) + 2*D_v (P V) per *visible* (query, key) pair."""
    pairs = int(dense_mask(T, S, **mask_kw).sum())
    return float(B * H * pairs * (2 * D + 2 * D_v))


def bench_cases(quick: bool = False) -> list[BenchCase]:
    """Causal and sliding-window+sink attention at notebook shapes, against torch SDPA.

    torch gets its best CPU path for each mask: ``is_causal=True`` for causal (its flash kernel
    skips the masked half), and for sliding+sink the explicit dense boolean mask it needs (built in
    setup, so *not* timed; a real caller would pay for it too).
    """
    import torch.nn.functional as F

    with_cuda = torch.cuda.is_available()
    B, H, D, window, n_sink = 1, 4, 64, 256, 4
    lengths = (512, 2048) if quick else (512, 2048, 4096)
    cases = []
    for T in lengths:
        for mask in ("causal", "sliding"):
            kw = dict(mask=mask, window=window, n_sink=n_sink) if mask == "sliding" else dict(mask=mask)

            def setup(T=T, kw=kw):
                gen = torch.Generator().manual_seed(0)
                x = {n: torch.randn(B, H, T, D, generator=gen) for n in "qkv"}
                x["dense"] = dense_mask(T, T, **kw) if kw["mask"] == "sliding" else None
                if with_cuda:
                    x.update({n + "_dev": x[n].cuda() for n in "qkv"})
                    x["dense_dev"] = x["dense"].cuda() if x["dense"] is not None else None
                return x

            def torch_fn(x, dev=""):
                q, k, v, dense = x["q" + dev], x["k" + dev], x["v" + dev], x["dense" + dev]
                if dense is None:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

            label = f"{mask}" + (f" w={window} sink={n_sink}" if mask == "sliding" else "")
            cases.append(BenchCase(
                kernel="attention",
                shape=f"{label} B={B} H={H} T={T} D={D} fp32",
                setup=setup,
                torch_fn=torch_fn,
                numba_fn=lambda x, kw=kw: cpu(x["q"], x["k"], x["v"], **kw),
                flops=_attention_flops(T, T, D, D, B, H, **kw),
                torch_label="F.scaled_dot_product_attention" + (" (dense bool mask)" if mask == "sliding"
                                                                else " (is_causal)"),
                cuda_fn=(lambda x, kw=kw: cuda(x["q_dev"], x["k_dev"], x["v_dev"], **kw))
                if with_cuda else None,
                torch_cuda_fn=(lambda x: torch_fn(x, "_dev")) if with_cuda else None,
            ))
    return cases
