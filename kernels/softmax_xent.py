"""Fused row-wise log-softmax cross-entropy and KL, with an online logsumexp over the vocabulary.

For every row n of ``logits z (N, V)`` (optionally with ``ref_logits r (N, V)`` and ``targets y (N,)``)
it returns three numbers, without ever forming a softmax:

    lse[n]  = log Σ_v exp z[n, v]
    loss[n] = lse[n] − z[n, y[n]]                                   (cross-entropy; 0 where y = ignore_index)
    kl[n]   = KL(p_ref ‖ p) = Σ_v p_ref(v) (log p_ref(v) − log p(v))
            = lse[n] − lse_r[n] + Σ_v p_ref(v) (r[n, v] − z[n, v])

The last line is what makes one pass enough: Σ_v p_ref(v)(r − z) = t / s_r with
s_r = Σ exp(r − m_r) and t = Σ exp(r − m_r)(r − z), and both sums can be carried *online*: when a
new running maximum m' of r appears, multiply s_r and t by exp(m_r − m'). The same trick gives
lse of z. So each row is read once, two streams side by side, and the memory cost is O(N) instead
of the two (N, V) log-softmax tensors that ``F.cross_entropy`` + ``F.kl_div(log_softmax, log_softmax)``
allocate. This is the KL-to-reference term of unlearning objectives (ReLearn's KL-retain, NPO's
reference) and DarwinLM's KL fitness.

Conventions (shared by every backend, tested): a vocabulary entry with r = −inf has p_ref = 0 and
contributes 0 to the KL (0 · log 0 = 0); an entry with z = −inf and p_ref > 0 makes the KL +inf; a
row whose target is ``ignore_index`` has loss 0, like ``F.cross_entropy(reduction="none")``.
Sums are carried in float64 on every backend; results come back in the input dtype.

Backends: ``reference`` (torch, the specification), ``cpu`` (Numba, rows in parallel, the
vocabulary in tiles of ``TILE`` with one rescale per tile), ``cuda`` (one block per row, each
thread an online state over a strided slice of the vocabulary, merged by a shared-memory tree).
There is no backward here: training code that needs gradients uses torch autograd (see
``companion/unlearning.py``); these kernels serve loss *values* (metrics, logging, fitness).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda as gpu
from numba import float64, njit, prange

from kernels._backend import BenchCase, as_numpy, check_tensor, resolve_backend

__all__ = ["reference", "cpu", "cuda", "run", "bench_cases", "TILE"]

TILE = 256  # vocabulary entries per online-rescale step on the CPU (a tile of one row stays in L1)


def _check(logits, targets, ref_logits, ignore_index) -> None:
    check_tensor("logits", logits, ndim=2)
    n, v = logits.shape
    if v < 1:
        raise ValueError(f"logits must have at least one vocabulary column, got shape {tuple(logits.shape)}")
    if targets is not None:
        check_tensor("targets", targets, dtype=torch.int64, shape=(n,))
        if targets.device != logits.device:
            raise ValueError(f"targets is on {targets.device}, expected {logits.device} (same as logits)")
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
        if bool(bad.any()):
            raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}, got "
                             f"{targets[bad][:5].tolist()}")
    if ref_logits is not None:
        check_tensor("ref_logits", ref_logits, shape=(n, v), like=logits)
    if not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


# --------------------------------------------------------------------------------------------
# Reference: plain torch, the specification (materialises log-softmaxes; that is its job).
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(logits: torch.Tensor, targets: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
              *, ignore_index: int = -100) -> dict[str, torch.Tensor | None]:
    """Per-row ``lse``, ``loss`` (None without targets) and ``kl`` (None without ref_logits), each (N,)."""
    _check(logits, targets, ref_logits, ignore_index)
    z = logits.to(torch.float64)
    lse = torch.logsumexp(z, dim=-1)
    out: dict[str, torch.Tensor | None] = {"lse": lse, "loss": None, "kl": None}
    if targets is not None:
        valid = targets != ignore_index
        picked = z.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
        out["loss"] = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if ref_logits is not None:
        log_q = torch.log_softmax(ref_logits.to(torch.float64), dim=-1)
        log_p = z - lse[:, None]
        q = log_q.exp()
        terms = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q))  # 0·log 0 = 0
        out["kl"] = terms.sum(-1)
    return {k: None if t is None else t.to(logits.dtype) for k, t in out.items()}


# --------------------------------------------------------------------------------------------
# Numba CPU: rows in parallel; each row walks the vocabulary in tiles. Per tile: the tile's max
# (a plain reduction LLVM can vectorise), one rescale of the running sums if the max grew, then
# the exp-sums of the tile. Both streams (z and r) share the walk.
# --------------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def _cpu_rows(z, r, y, has_targets, has_ref, ignore_index, tile, lse_out, loss_out, kl_out):  # pragma: no cover
    n_rows, n_vocab = z.shape
    neg_inf = -np.inf
    for n in prange(n_rows):
        m_z, s_z = neg_inf, 0.0
        m_r, s_r, t = neg_inf, 0.0, 0.0
        for start in range(0, n_vocab, tile):
            end = min(n_vocab, start + tile)
            tile_max = neg_inf
            for v in range(start, end):
                tile_max = max(tile_max, float(z[n, v]))
            if tile_max > m_z:
                if s_z > 0.0:
                    s_z *= math.exp(m_z - tile_max)
                m_z = tile_max
            if m_z > neg_inf:
                for v in range(start, end):
                    s_z += math.exp(float(z[n, v]) - m_z)
            if has_ref:
                tile_max = neg_inf
                for v in range(start, end):
                    tile_max = max(tile_max, float(r[n, v]))
                if tile_max > m_r:
                    if s_r > 0.0:
                        scale = math.exp(m_r - tile_max)
                        s_r *= scale
                        t *= scale
                    m_r = tile_max
                if m_r > neg_inf:
                    for v in range(start, end):
                        rv = float(r[n, v])
                        e = math.exp(rv - m_r)
                        if e > 0.0:  # p_ref = 0 entries contribute nothing (0·log 0 = 0, even if z = -inf)
                            s_r += e
                            t += e * (rv - float(z[n, v]))
        lse = m_z + math.log(s_z) if m_z > neg_inf else neg_inf
        lse_out[n] = lse
        if has_targets:
            target = y[n]
            loss_out[n] = 0.0 if target == ignore_index else lse - float(z[n, target])
        if has_ref:
            lse_r = m_r + math.log(s_r) if m_r > neg_inf else neg_inf
            kl_out[n] = t / s_r - lse_r + lse


def _numpy_inputs(logits, targets, ref_logits):
    z = as_numpy(logits)
    r = as_numpy(ref_logits) if ref_logits is not None else z  # same dtype: no extra specialisation
    y = as_numpy(targets) if targets is not None else np.zeros(1, dtype=np.int64)
    return z, r, y


def _pack(logits, lse, loss, kl, has_targets, has_ref) -> dict[str, torch.Tensor | None]:
    cast = lambda a: torch.from_numpy(a).to(device=logits.device, dtype=logits.dtype)
    return {"lse": cast(lse), "loss": cast(loss) if has_targets else None, "kl": cast(kl) if has_ref else None}


def cpu(logits: torch.Tensor, targets: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
        *, ignore_index: int = -100) -> dict[str, torch.Tensor | None]:
    """Numba CPU version of :func:`reference` (same arguments, same results)."""
    _check(logits, targets, ref_logits, ignore_index)
    z, r, y = _numpy_inputs(logits, targets, ref_logits)
    n = z.shape[0]
    lse, loss, kl = np.empty(n), np.zeros(n), np.zeros(n)
    torch_threads = torch.get_num_threads()
    try:
        _cpu_rows(z, r, y, targets is not None, ref_logits is not None, ignore_index, TILE, lse, loss, kl)
    finally:
        # Numba's OpenMP threading layer calls omp_set_num_threads on the OpenMP runtime torch shares,
        # which silently raises torch's thread count (measured: tiny torch ops then cost 20x CPU time).
        torch.set_num_threads(torch_threads)
    return _pack(logits, lse, loss, kl, targets is not None, ref_logits is not None)


# --------------------------------------------------------------------------------------------
# Numba CUDA: grid = N blocks (one row each), THREADS threads per block. Thread k keeps its own
# online state (m_z, s_z, m_r, s_r, t) over vocabulary entries k, k + THREADS, ...; the block then
# merges the THREADS states pairwise in shared memory (a tree: log2(THREADS) rounds). Merging two
# states is the same rescale as a new maximum: m = max(m1, m2), s = s1·e^(m1−m) + s2·e^(m2−m).
# --------------------------------------------------------------------------------------------
THREADS = 128  # a power of two (the tree halves it)


@gpu.jit(device=True)
def _merge(m1, s1, m2, s2):  # pragma: no cover
    m = max(m1, m2)
    if m == -math.inf:
        return m, 0.0, 0.0, 0.0
    a = math.exp(m1 - m) if m1 > -math.inf else 0.0
    b = math.exp(m2 - m) if m2 > -math.inf else 0.0
    return m, s1 * a + s2 * b, a, b


@gpu.jit
def _cuda_rows(z, r, y, has_targets, has_ref, ignore_index, lse_out, loss_out, kl_out):  # pragma: no cover
    n = gpu.blockIdx.x
    k = gpu.threadIdx.x
    n_vocab = z.shape[1]
    sm_mz = gpu.shared.array(THREADS, float64)
    sm_sz = gpu.shared.array(THREADS, float64)
    sm_mr = gpu.shared.array(THREADS, float64)
    sm_sr = gpu.shared.array(THREADS, float64)
    sm_t = gpu.shared.array(THREADS, float64)
    m_z, s_z, m_r, s_r, t = -math.inf, 0.0, -math.inf, 0.0, 0.0
    for v in range(k, n_vocab, THREADS):
        x = float64(z[n, v])
        if x > m_z:
            s_z = s_z * math.exp(m_z - x) + 1.0 if m_z > -math.inf else 1.0
            m_z = x
        elif x > -math.inf:
            s_z += math.exp(x - m_z)
        if has_ref:
            q = float64(r[n, v])
            d = q - x
            if q > m_r:
                scale = math.exp(m_r - q) if m_r > -math.inf else 0.0
                s_r = s_r * scale + 1.0
                t = t * scale + d
                m_r = q
            elif q > -math.inf:
                e = math.exp(q - m_r)
                if e > 0.0:
                    s_r += e
                    t += e * d
    sm_mz[k], sm_sz[k], sm_mr[k], sm_sr[k], sm_t[k] = m_z, s_z, m_r, s_r, t
    gpu.syncthreads()
    stride = THREADS // 2
    while stride > 0:  # every thread reaches every syncthreads
        if k < stride:
            m, s, _, _ = _merge(sm_mz[k], sm_sz[k], sm_mz[k + stride], sm_sz[k + stride])
            sm_mz[k], sm_sz[k] = m, s
            if has_ref:
                m, s, a, b = _merge(sm_mr[k], sm_sr[k], sm_mr[k + stride], sm_sr[k + stride])
                sm_t[k] = sm_t[k] * a + sm_t[k + stride] * b
                sm_mr[k], sm_sr[k] = m, s
        gpu.syncthreads()
        stride //= 2
    if k == 0:
        lse = sm_mz[0] + math.log(sm_sz[0]) if sm_mz[0] > -math.inf else -math.inf
        lse_out[n] = lse
        if has_targets:
            target = y[n]
            loss_out[n] = 0.0 if target == ignore_index else lse - float64(z[n, target])
        if has_ref:
            lse_r = sm_mr[0] + math.log(sm_sr[0]) if sm_mr[0] > -math.inf else -math.inf
            kl_out[n] = sm_t[0] / sm_sr[0] - lse_r + lse


def cuda(logits: torch.Tensor, targets: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
         *, ignore_index: int = -100) -> dict[str, torch.Tensor | None]:
    """Numba CUDA version of :func:`reference`. CPU tensors are copied to the device and back."""
    _check(logits, targets, ref_logits, ignore_index)
    n = logits.shape[0]
    if logits.is_cuda:
        dev = lambda t: gpu.as_cuda_array(t.detach().contiguous())
        z = dev(logits)
        r = dev(ref_logits) if ref_logits is not None else z
        y = dev(targets) if targets is not None else gpu.to_device(np.zeros(1, dtype=np.int64))
    else:
        z, r, y = (gpu.to_device(a) for a in _numpy_inputs(logits, targets, ref_logits))
    lse, loss, kl = (gpu.device_array(n, dtype=np.float64) for _ in range(3))
    if n > 0:
        _cuda_rows[n, THREADS](z, r, y, targets is not None, ref_logits is not None, ignore_index, lse, loss, kl)
    if logits.is_cuda:
        wrap = lambda a: torch.as_tensor(a, device=logits.device).to(logits.dtype)
        return {"lse": wrap(lse), "loss": wrap(loss) if targets is not None else None,
                "kl": wrap(kl) if ref_logits is not None else None}
    return _pack(logits, lse.copy_to_host(), loss.copy_to_host(), kl.copy_to_host(), targets is not None,
                 ref_logits is not None)


def run(logits: torch.Tensor, targets: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
        *, ignore_index: int = -100, backend: str = "auto") -> dict[str, torch.Tensor | None]:
    """Dispatch: ``backend`` in {"auto", "reference", "cpu", "cuda"}; "auto" = cuda if a GPU exists."""
    impl = {"reference": reference, "cpu": cpu, "cuda": cuda}[resolve_backend(backend)]
    return impl(logits, targets, ref_logits, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------
# Benchmark cases (discovered by `python -m ci.bench`).
# --------------------------------------------------------------------------------------------
def torch_ce_kl(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What one would write in torch: per-row CE, and KL(p_ref ‖ p) from two log-softmaxes."""
    with torch.no_grad():
        loss = F.cross_entropy(x["z"], x["y"], reduction="none")
        kl = F.kl_div(F.log_softmax(x["z"], -1), F.log_softmax(x["r"], -1), log_target=True,
                      reduction="none").sum(-1)
    return loss, kl


def bench_cases(quick: bool = False) -> list[BenchCase]:
    """Per-row CE + KL at vocabulary sizes of our tiny models (512) and of small LLMs (8192), against
    ``F.cross_entropy`` + ``F.kl_div`` over two log-softmaxes. With a GPU, ``setup`` also puts copies
    on the device, so the CUDA rows time the kernel on device-resident logits (no host copies), against
    the same torch code on the GPU."""
    with_cuda = torch.cuda.is_available()
    shapes = [(4096, 512), (4096, 8192)] if not quick else [(4096, 512), (1024, 8192)]
    cases = []
    for n, v in shapes:
        def setup(n=n, v=v):
            gen = torch.Generator().manual_seed(0)
            z = torch.randn(n, v, generator=gen) * 2
            x = {"z": z, "r": z + 0.5 * torch.randn(n, v, generator=gen), "y": torch.randint(0, v, (n,), generator=gen)}
            if with_cuda:
                x.update({key + "_dev": x[key].cuda() for key in ("z", "r", "y")})
            return x

        cases.append(BenchCase(
            kernel="softmax_xent",
            shape=f"N={n} V={v} fp32 (CE + KL)",
            setup=setup,
            torch_fn=torch_ce_kl,
            numba_fn=lambda x: cpu(x["z"], x["y"], x["r"]),
            bytes=2 * n * v * 4,  # both logit matrices read once (the fused ideal)
            torch_label="F.cross_entropy + F.kl_div(log_softmax, log_softmax)",
            cuda_fn=(lambda x: cuda(x["z_dev"], x["y_dev"], x["r_dev"])) if with_cuda else None,
            torch_cuda_fn=(lambda x: torch_ce_kl({"z": x["z_dev"], "r": x["r_dev"], "y": x["y_dev"]}))
            if with_cuda else None,
        ))
    return cases
