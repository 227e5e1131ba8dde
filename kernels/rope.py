"""Rotary position embedding with per-frequency rescaling, batched over many factor vectors.

Convention "rotate_half" (HF LLaMA): for a head dim D, frequency i (0 <= i < D/2) rotates the pair
of dims (i, i + D/2) by the angle

    angle(pos, i) = pos * inv_freq_i / lambda_i     if pos >= start   (the rescaled positions)
                  = pos * inv_freq_i                 if pos <  start   (the first n-hat positions)
    inv_freq_i    = base ** (-2 i / D)

and the output is ``x * cos(angle) * mscale + rotate_half(x) * sin(angle) * mscale`` with
``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``. The rescaling methods differ only in the
factors ``lambda`` and the attention temperature ``mscale``:

* no scaling: lambda_i = 1, mscale = 1;
* Position Interpolation: lambda_i = s for every i (all positions squeezed by s);
* NTK-aware: lambda_i = s ** (2i / (D - 2)) (equivalent to raising the base);
* YaRN: lambda_i ramps from 1 (high frequencies) to s (low frequencies), mscale = 0.1 ln s + 1;
* LongRoPE (arXiv 2402.13753): lambda_i found by evolutionary search, plus ``start`` = n-hat, the
  number of initial positions left unscaled, and mscale = sqrt(1 + ln s / ln L_orig).

LongRoPE's search scores a *population* of candidate factor vectors. ``factors`` may therefore be
``(P, D/2)``: the output gains a leading axis of size P, one rotated copy of ``x`` per candidate, so
one pass (and one batched attention after it) scores the whole population.

Angles are computed in float64 whatever the dtype of ``x``: at position 2048 an angle near 2048 rad
has a float32 spacing of 2.4e-4 rad, an error that grows with the context length being studied.
Only cos and sin are rounded to the input dtype.

Shapes: x ``(..., T, D)``, D even; positions ``(T,)`` int >= 0; factors ``(D/2,)`` or ``(P, D/2)``,
every entry >= 1. Returns ``(..., T, D)``, or ``(P, ..., T, D)`` for a population.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend

__all__ = ["reference", "cos_sin", "inv_freq", "rotate_half", "cpu", "cuda", "run", "bench_cases"]


def _check(x, positions, base, factors, start, mscale) -> tuple[int, int, int]:
    """Validate; return (T, D, P) with P = 0 when there is no population axis."""
    check_tensor("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (..., T, D), got shape {tuple(x.shape)}")
    T, D = x.shape[-2], x.shape[-1]
    if D < 2 or D % 2 != 0:
        raise ValueError(f"the head dim D = x.shape[-1] must be even and >= 2, got D={D}")
    if T < 1 or x.numel() == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected every size >= 1")
    check_tensor("positions", positions, shape=(T,), dtype=(torch.int32, torch.int64))
    if positions.device != x.device:
        raise ValueError(f"positions is on {positions.device}, expected {x.device} (same as x)")
    if int(positions.min()) < 0:
        raise ValueError(f"positions must be >= 0, got min {int(positions.min())}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not (1.0 < base < math.inf):
        raise ValueError(f"base must be a finite number > 1, got {base!r}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"start (n-hat) must be an int >= 0, got {start!r}")
    if isinstance(mscale, bool) or not isinstance(mscale, (int, float)) or not (0.0 < mscale < math.inf):
        raise ValueError(f"mscale must be a finite number > 0, got {mscale!r}")
    P = 0
    if factors is not None:
        check_tensor("factors", factors, like=x)
        if factors.ndim not in (1, 2) or factors.shape[-1] != D // 2 or factors.numel() == 0:
            raise ValueError(f"factors has shape {tuple(factors.shape)}, expected (D/2,) = ({D // 2},) "
                             f"or (P, D/2) = (P, {D // 2})")
        if not bool(torch.isfinite(factors).all()) or float(factors.min()) < 1.0:
            low = float(factors.min())
            raise ValueError(f"factors must be finite and >= 1 (1 = no scaling), got min {low}")
        P = factors.shape[0] if factors.ndim == 2 else 0
    return T, D, P


def inv_freq(D: int, base: float = 10000.0) -> torch.Tensor:
    """``base ** (-2 i / D)`` for i = 0 .. D/2 - 1, float64 ``(D/2,)``."""
    return base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` for ``x = cat(x1, x2)`` (last axis): multiplication by i in each (i, i + D/2) pair."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def cos_sin(positions: torch.Tensor, D: int, *, base: float = 10000.0, factors: torch.Tensor | None = None,
            start: int = 0, mscale: float = 1.0, dtype: torch.dtype = torch.float64):
    """The rotation tables: ``cos, sin`` of shape ``(P, T, D)`` (P = 1 without a population), times mscale.

    Angles in float64; the tables are rounded once to ``dtype``. Each half of the last axis holds the same
    D/2 frequencies, the rotate_half layout.
    """
    pos = positions.to(torch.float64)
    w = inv_freq(D, base).to(positions.device)  # (D/2,)
    lam = torch.ones(1, D // 2, dtype=torch.float64, device=positions.device) if factors is None \
        else factors.to(torch.float64).reshape(-1, D // 2)  # (P, D/2)
    plain = pos[:, None] * w[None, :]  # (T, D/2)
    scaled = pos[None, :, None] * (w[None, None, :] / lam[:, None, :])  # (P, T, D/2)
    angle = torch.where((positions >= start)[None, :, None], scaled, plain[None])
    cos = (torch.cos(angle) * mscale).to(dtype)
    sin = (torch.sin(angle) * mscale).to(dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


# --------------------------------------------------------------------------------------------
# Reference: plain torch, the specification (and, vectorised as it is, the benchmark's baseline).
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(x: torch.Tensor, positions: torch.Tensor, *, base: float = 10000.0,
              factors: torch.Tensor | None = None, start: int = 0, mscale: float = 1.0) -> torch.Tensor:
    """Rotary embedding of ``x (..., T, D)``; a ``(P, D/2)`` ``factors`` gives ``(P, ..., T, D)``."""
    T, D, P = _check(x, positions, base, factors, start, mscale)
    cos, sin = cos_sin(positions, D, base=base, factors=factors, start=start, mscale=mscale, dtype=x.dtype)
    expand = (cos.shape[0],) + (1,) * (x.ndim - 2) + (T, D)  # (P, 1, ..., 1, T, D): broadcast over x's batch
    cos, sin = cos.view(expand), sin.view(expand)
    out = x * cos  # (P, ..., T, D): one copy of x per candidate
    out.addcmul_(rotate_half(x), sin)  # in place: one temporary fewer
    return out if P else out[0]


# --------------------------------------------------------------------------------------------
# Numba CPU: one prange item per (candidate p, block of ROWS positions). It builds that block's
# cos/sin table (ROWS x D/2) and applies it to every batch/head row, writing each output element
# exactly once; nothing of size P x N x T x D exists except the output (torch's broadcasting
# materialises several such temporaries).
#
# The table uses RoPE's own defining property: the rotation for position p0 + r is the rotation
# for p0 followed by the rotation for r, i.e.
#     cos((p0 + r) w) = cos(p0 w) cos(r w) - sin(p0 w) sin(r w)
#     sin((p0 + r) w) = sin(p0 w) cos(r w) + cos(p0 w) sin(r w).
# The "step" rotations cos/sin(r w) for r < ROWS are computed once per frequency set, so a block of
# consecutive positions costs D/2 libm cos/sin pairs (for p0) instead of ROWS * D/2. libm trig is
# scalar and ~20x dearer than the 6 vectorised multiply-adds that replace it. Blocks that are not
# consecutive, or that straddle ``start``, fall back to direct cos/sin. Both paths agree with the
# reference to about one rounding of the angle pos * w (~1e-13 at position 4096).
# --------------------------------------------------------------------------------------------
ROWS = 32  # positions per prange item: the cos/sin block (ROWS x D/2) stays in L1


@njit(parallel=True, cache=True, fastmath=False)
def _cpu_rope(x, positions, w, lam, start, mscale, out):  # pragma: no cover (compiled)
    N, T, D = x.shape
    P = lam.shape[0]
    half = D // 2
    # Frequencies: set p < P is candidate p's (w / lambda_p), set P is the unscaled w (pos < start).
    freq = np.empty((P + 1, half))
    for p in range(P):
        for i in range(half):
            freq[p, i] = w[i] / lam[p, i]
    freq[P] = w
    step_c = np.empty((P + 1, ROWS, half))  # cos(r * freq), sin(r * freq) for r = 0 .. ROWS-1
    step_s = np.empty((P + 1, ROWS, half))
    for fr in prange((P + 1) * ROWS):
        f, r = fr // ROWS, fr % ROWS
        for i in range(half):
            step_c[f, r, i] = math.cos(r * freq[f, i])
            step_s[f, r, i] = math.sin(r * freq[f, i])

    n_blocks = (T + ROWS - 1) // ROWS
    for item in prange(P * n_blocks):
        p, blk = item // n_blocks, item % n_blocks
        t0 = blk * ROWS
        nt = min(T, t0 + ROWS) - t0
        cs = np.empty((nt, half), dtype=x.dtype)
        sn = np.empty((nt, half), dtype=x.dtype)
        p0 = positions[t0]
        consecutive = True
        for r in range(nt):
            consecutive = consecutive and positions[t0 + r] == p0 + r
        one_set = p0 >= start or p0 + nt - 1 < start  # every row scaled, or every row unscaled
        if consecutive and one_set:  # fast path: base rotation x step rotations
            f = p if p0 >= start else P
            for i in range(half):
                c0 = math.cos(p0 * freq[f, i])
                s0 = math.sin(p0 * freq[f, i])
                for r in range(nt):
                    cs[r, i] = (c0 * step_c[f, r, i] - s0 * step_s[f, r, i]) * mscale
                    sn[r, i] = (s0 * step_c[f, r, i] + c0 * step_s[f, r, i]) * mscale
        else:  # any positions: one cos/sin per (row, frequency)
            for r in range(nt):
                pos = positions[t0 + r]
                f = p if pos >= start else P
                for i in range(half):
                    cs[r, i] = math.cos(pos * freq[f, i]) * mscale
                    sn[r, i] = math.sin(pos * freq[f, i]) * mscale
        for n in range(N):
            for r in range(nt):
                xr = x[n, t0 + r]
                o = out[p, n, t0 + r]
                c = cs[r]
                s = sn[r]
                for i in range(half):  # independent outputs: vectorises
                    x1 = xr[i]
                    x2 = xr[i + half]
                    o[i] = x1 * c[i] - x2 * s[i]
                    o[i + half] = x2 * c[i] + x1 * s[i]


def _lam(factors, D: int) -> np.ndarray:
    if factors is None:
        return np.ones((1, D // 2))
    return as_numpy(factors.to(torch.float64).reshape(-1, D // 2))


def cpu(x, positions, *, base=10000.0, factors=None, start=0, mscale=1.0) -> torch.Tensor:
    """Numba CPU version of :func:`reference` (same arguments, same output)."""
    T, D, P = _check(x, positions, base, factors, start, mscale)
    xn = as_numpy(x).reshape(-1, T, D)  # (N, T, D): every leading axis is just "more rows"
    lam = _lam(factors, D)
    out = np.empty((lam.shape[0],) + xn.shape, dtype=xn.dtype)
    _cpu_rope(xn, as_numpy(positions.long()), as_numpy(inv_freq(D, base)), lam, start, float(mscale), out)
    res = torch.from_numpy(out).reshape((lam.shape[0],) + tuple(x.shape))
    return res if P else res[0]


# --------------------------------------------------------------------------------------------
# Numba CUDA: grid (position tiles, P); one block of CU_THREADS threads. The block first fills a
# shared-memory table of cos/sin for its CU_ROWS positions (each entry computed once), syncs, then
# streams over all N batch/head rows applying the table: the trigonometry is shared by every head.
# --------------------------------------------------------------------------------------------
CU_ROWS = 8  # positions per block
CU_THREADS = 64
HALF_MAX = 128  # largest D/2 (head dim 256) the shared tables hold


@gpu.jit
def _cuda_rope(x, positions, w, lam, start, mscale, out):  # pragma: no cover
    N, T, D = x.shape
    half = D // 2
    p = gpu.blockIdx.y
    t0 = gpu.blockIdx.x * CU_ROWS
    tid = gpu.threadIdx.x
    cs = gpu.shared.array((CU_ROWS, HALF_MAX), float64)
    sn = gpu.shared.array((CU_ROWS, HALF_MAX), float64)
    nt = min(T - t0, CU_ROWS)
    for idx in range(tid, nt * half, CU_THREADS):
        r, i = idx // half, idx % half
        pos = positions[t0 + r]
        angle = pos * (w[i] / lam[p, i]) if pos >= start else pos * w[i]
        cs[r, i] = math.cos(angle) * mscale
        sn[r, i] = math.sin(angle) * mscale
    gpu.syncthreads()
    for n in range(N):
        for idx in range(tid, nt * half, CU_THREADS):  # adjacent threads, adjacent dims: coalesced
            r, i = idx // half, idx % half
            x1 = x[n, t0 + r, i]
            x2 = x[n, t0 + r, i + half]
            c = cs[r, i]
            s = sn[r, i]
            out[p, n, t0 + r, i] = x1 * c - x2 * s
            out[p, n, t0 + r, i + half] = x2 * c + x1 * s


def cuda(x, positions, *, base=10000.0, factors=None, start=0, mscale=1.0) -> torch.Tensor:
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    T, D, P = _check(x, positions, base, factors, start, mscale)
    if D // 2 > HALF_MAX:
        raise ValueError(f"D={D}: the CUDA kernel supports D/2 <= HALF_MAX={HALF_MAX}")

    def dev(t):
        return gpu.as_cuda_array(t.detach()) if t.is_cuda else gpu.to_device(as_numpy(t))

    x3 = x.reshape(-1, T, D).contiguous()  # (N, T, D)
    lam = (torch.ones(1, D // 2, dtype=torch.float64, device=x.device) if factors is None
           else factors.to(torch.float64).reshape(-1, D // 2))  # (P, D/2)
    n_pop = lam.shape[0]
    out = torch.empty((n_pop,) + tuple(x3.shape), dtype=x.dtype, device=x.device)
    d_out = dev(out)
    grid = (-(-T // CU_ROWS), n_pop)
    w = inv_freq(D, base).to(x.device)
    _cuda_rope[grid, CU_THREADS](dev(x3), dev(positions.long()), dev(w), dev(lam), start, float(mscale),
                                 d_out)
    if not x.is_cuda:
        out = torch.from_numpy(d_out.copy_to_host())
    out = out.reshape((n_pop,) + tuple(x.shape))
    return out if P else out[0]


def run(x, positions, *, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(x, positions, **kwargs)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
def bench_cases(quick: bool = False) -> list[BenchCase]:
    """A LongRoPE-style population (P=16 factor vectors, n-hat=8) applied to q of one layer."""
    B, H, D, P = 1, 4, 64, 16
    lengths = (512, 2048) if quick else (512, 2048, 8192)
    with_cuda = torch.cuda.is_available()
    cases = []
    for T in lengths:
        def setup(T=T):
            gen = torch.Generator().manual_seed(0)
            factors = 1.0 + 7.0 * torch.rand(P, D // 2, generator=gen).sort(dim=-1).values  # monotone, [1, 8]
            x = {"x": torch.randn(B, H, T, D, generator=gen), "pos": torch.arange(T), "factors": factors}
            if with_cuda:
                x.update({n + "_dev": x[n].cuda() for n in ("x", "pos", "factors")})
            return x

        kw = dict(start=8, mscale=1.2)

        def on_dev(fn, kw=kw):
            return lambda x: fn(x["x_dev"], x["pos_dev"], factors=x["factors_dev"], **kw)

        cases.append(BenchCase(
            kernel="rope",
            shape=f"P={P} B={B} H={H} T={T} D={D} fp32",
            setup=setup,
            torch_fn=lambda x, kw=kw: reference(x["x"], x["pos"], factors=x["factors"], **kw),
            numba_fn=lambda x, kw=kw: cpu(x["x"], x["pos"], factors=x["factors"], **kw),
            bytes=float(P * B * H * T * D * 4 + B * H * T * D * 4),  # write P copies, read x
            torch_label="torch eager (float64 angles, broadcast x*cos + rotate_half(x)*sin)",
            cuda_fn=on_dev(cuda) if with_cuda else None,
            torch_cuda_fn=on_dev(reference) if with_cuda else None,
        ))
    return cases
