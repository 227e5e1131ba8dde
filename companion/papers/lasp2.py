"""LASP-2: "Rethinking Sequence Parallelism for Linear Attention and Its Hybrid"
(Sun, Lan, Zhong, Qu, Cheng; arXiv 2502.07563). A distributed *training* scheme.

Sequence parallelism splits one long sequence of N tokens into W equal chunks of C = N/W tokens,
one chunk per device (rank t holds tokens [tC, (t+1)C)). Causal attention then needs information
from every earlier chunk. Linear attention (feature map = identity, no normalisation) has the form

    o_i = q_i · Σ_{j≤i} k_jᵀ v_j,

so everything chunk t needs from the past is one d×d matrix per head, the memory state
M_{1:t-1} = Σ_{s<t} K_sᵀ V_s, whatever N is. This module implements, on a real process group:

* **LASP-1** (arXiv 2404.02882): a ring. Rank t waits for M_{1:t-1} from rank t-1, computes, and
  sends M_{1:t} on: W-1 point-to-point hops, each waiting for the one before it. The backward pass
  runs the same ring the other way with dM_{t+1:T} = Σ_{s>t} Q_sᵀ dO_s. We follow the naive
  LASP-1 of ``OpenNLPLab/LASP`` (``lasp/lasp_naive.py``: receive, compute, send).
* **LASP-2**: each rank computes its own M_t = K_tᵀV_t, one AllGather gives every rank all W
  states, and a prefix sum gives M_{1:t-1}. Backward: dM_t = Q_tᵀdO_t, one AllGather, a suffix sum.
  Both AllGathers run while the rank computes its intra-chunk part. Details checked against
  ``linear_moe/sequence_modeling/lasp2/lasp2_with_mask_triton_op.py`` in Linear-MoE (the official
  code): only the rank's total state is gathered; ranks < t are summed forward, ranks > t backward.
* **LASP-2H**: a hybrid model's standard softmax layers also use one AllGather, of K_t and V_t;
  each rank then attends to the keys it needs locally. Its backward returns dK, dV to their owners
  with one ReduceScatter.
* **Ring Attention**: the usual softmax baseline: K/V blocks travel round the ring (W-1 steps
  forward; K, V and the dK, dV accumulators travel together backward, W steps).

Each scheme is a ``torch.autograd.Function`` whose forward and backward are written out by hand
(no autograd through communication). The per-device linear-attention compute is
``kernels/linear_attention.py``; its ``initial_state`` is exactly the state LASP passes around.

Run it on one machine from Python with :func:`run_experiment`, or on many GPUs with torchrun::

    torchrun --standalone --nproc-per-node 8 -m companion.papers.lasp2 --backend nccl --dtype float32 \\
        --seq-lens 65536 --head-dims 64 --no-check

(``python -m torch.distributed.run`` is the same as ``torchrun``.) Rank 0 prints one line,
``LASP2_RESULT {json}``, with bytes, calls, depth, times and errors per case.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from companion.distributed import CommRecorder, dependency_depth, launch
from kernels import linear_attention as la

SCHEMES = ("lasp1", "lasp2", "lasp2h", "ring", "hybrid")
LABELS = {"lasp1": "LASP-1 (ring of states)", "lasp2": "LASP-2 (AllGather of states)",
          "lasp2h": "LASP-2H softmax layer (AllGather of K, V)", "ring": "Ring Attention (softmax)",
          "hybrid": "LASP-2H hybrid stack"}
LINEAR_SCHEMES = ("lasp1", "lasp2")
SOFTMAX_SCHEMES = ("lasp2h", "ring")
KERNELS = ("torch_chunked", "reference", "cpu", "cuda", "auto")
PHASES = ("forward", "backward")
# Modules the worker server imports once (see companion.distributed.launch): pass them to the first launch.
PRELOAD = ("companion.papers.lasp2", "kernels.linear_attention")


# ----------------------------------------------------------------------------------------------
# Per-device linear attention: kernels/linear_attention.py, forward and hand-derived backward
# ----------------------------------------------------------------------------------------------
@functools.cache
def _kernel(name: str) -> Callable:
    """The per-device causal linear attention: ``f(q, k, v, initial_state=M0) -> (out, final_state)``."""
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    return la.torch_chunked if name == "torch_chunked" else functools.partial(la.run, backend=name)


def local_forward(q, k, v, m_prev=None, *, kernel: str = "torch_chunked"):
    """Causal linear attention of one chunk that starts from the memory state ``m_prev``.

    q, k ``(B, H, C, dk)``, v ``(B, H, C, dv)``, m_prev ``(B, H, dk, dv)`` or None (zeros).
    Returns ``out (B, H, C, dv) = [(Q Kᵀ) ⊙ Ψ] V + Q m_prev`` and ``m_prev + Kᵀ V``.
    """
    return _kernel(kernel)(q.contiguous(), k.contiguous(), v.contiguous(), initial_state=m_prev)


def local_backward(q, k, v, do, m_prev=None, dm_next=None, *, kernel: str = "torch_chunked"):
    """Gradients of one chunk of causal linear attention, given the states around it.

    With S = (dO Vᵀ) ⊙ Ψ and A = (Q Kᵀ) ⊙ Ψ (Ψ the causal mask) and dM_next = Σ_{later chunks} Q_sᵀ dO_s:

        dQ = S K  + dO m_prevᵀ      dK = Sᵀ Q + V dM_nextᵀ      dV = Aᵀ dO + K dM_next

    Each line is itself a causal linear attention, so the same kernel computes it: dQ runs forward
    in time with (q, k, v) = (dO, V, K) from state m_prevᵀ; dK and dV run *backward* in time
    (flip the token axis) from the states dM_nextᵀ and dM_next. The dK call's final state is
    (dM_next + Qᵀ dO)ᵀ: exactly the state LASP-1 passes to the previous rank.

    Returns ``dq, dk, dv`` (shapes of q, k, v) and ``dm_through = dM_next + Qᵀ dO (B, H, dk, dv)``.
    """
    f = _kernel(kernel)
    flip = lambda x: x.flip(2).contiguous()  # noqa: E731
    t = lambda m: None if m is None else m.transpose(-1, -2).contiguous()  # noqa: E731
    do = do.contiguous()
    dq, _ = f(do, v.contiguous(), k.contiguous(), initial_state=t(m_prev))
    dk_rev, dm_through_t = f(flip(v), flip(do), flip(q), initial_state=t(dm_next))
    dv_rev, _ = f(flip(k), flip(q), flip(do), initial_state=None if dm_next is None else dm_next.contiguous())
    return dq, flip(dk_rev), flip(dv_rev), dm_through_t.transpose(-1, -2)


# ----------------------------------------------------------------------------------------------
# Single-device references (plain torch, differentiable by autograd)
# ----------------------------------------------------------------------------------------------
def linear_attention(q, k, v):
    """Causal linear attention on one device: ``((Q Kᵀ) ⊙ Ψ) V``. q, k, v ``(B, H, N, d)``."""
    N = q.shape[2]
    mask = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def softmax_attention(q, k, v):
    """Causal softmax attention on one device, scale 1/√d. q, k, v ``(B, H, N, d)``."""
    N, d = q.shape[2], q.shape[3]
    mask = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


# ----------------------------------------------------------------------------------------------
# LASP-1 and LASP-2 for a linear-attention layer
# ----------------------------------------------------------------------------------------------
class LASP1(torch.autograd.Function):
    """LASP-1: the memory state travels rank 0 → 1 → ... → W-1 (forward) and back (backward)."""

    @staticmethod
    def forward(ctx, q, k, v, rec: CommRecorder, kernel: str):
        rank, W = rec.rank, rec.world_size
        B, H, _, dk = q.shape
        with rec.phase("forward"):
            m_prev = None
            if rank > 0:  # wait for M_{1:t-1}: this is what serialises the ring
                m_prev = rec.recv(q.new_empty(B, H, dk, v.shape[-1]), rank - 1, label="M_{1:t-1}")
            with rec.compute("local attention"):
                out, m_through = local_forward(q, k, v, m_prev, kernel=kernel)
            if rank < W - 1:
                rec.send(m_through, rank + 1, label="M_{1:t}")
        ctx.save_for_backward(q, k, v, m_prev)
        ctx.rec, ctx.kernel = rec, kernel
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, m_prev = ctx.saved_tensors
        rec = ctx.rec
        rank, W = rec.rank, rec.world_size
        with rec.phase("backward"):
            dm_next = None
            if rank < W - 1:
                dm_next = rec.recv(q.new_empty(*q.shape[:2], q.shape[-1], v.shape[-1]), rank + 1,
                                   label="dM_{t+1:T}")
            with rec.compute("local backward"):
                dq, dk, dv, dm_through = local_backward(q, k, v, do, m_prev, dm_next, kernel=ctx.kernel)
            if rank > 0:
                rec.send(dm_through, rank - 1, label="dM_{t:T}")
        return dq, dk, dv, None, None


class LASP2(torch.autograd.Function):
    """LASP-2: one AllGather of the W states M_t = K_tᵀV_t forward, one of dM_t = Q_tᵀdO_t backward."""

    @staticmethod
    def forward(ctx, q, k, v, rec: CommRecorder, kernel: str):
        rank = rec.rank
        with rec.phase("forward"):
            with rec.compute("M_t = K_tᵀV_t"):
                m_t = k.transpose(-1, -2) @ v
            gather = rec.all_gather(m_t, label="M_t", async_op=True)
            with rec.compute("intra-chunk (overlaps the AllGather)"):
                out_intra, _ = local_forward(q, k, v, kernel=kernel)
            states = gather.wait()
            with rec.compute("prefix sum + inter-chunk"):
                m_prev = torch.stack(states[:rank]).sum(0) if rank > 0 else torch.zeros_like(m_t)
                out = out_intra + q @ m_prev
        ctx.save_for_backward(q, k, v, m_prev)
        ctx.rec, ctx.kernel = rec, kernel
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, m_prev = ctx.saved_tensors
        rec = ctx.rec
        rank, W = rec.rank, rec.world_size
        with rec.phase("backward"):
            with rec.compute("dM_t = Q_tᵀdO_t"):
                dm_t = q.transpose(-1, -2) @ do
            gather = rec.all_gather(dm_t, label="dM_t", async_op=True)
            with rec.compute("intra-chunk backward (overlaps the AllGather)"):
                dq, dk, dv, _ = local_backward(q, k, v, do, kernel=ctx.kernel)
            states = gather.wait()
            with rec.compute("suffix sum + inter-chunk"):
                dm_next = torch.stack(states[rank + 1:]).sum(0) if rank < W - 1 else torch.zeros_like(dm_t)
                dq = dq + do @ m_prev.transpose(-1, -2)
                dk = dk + v @ dm_next.transpose(-1, -2)
                dv = dv + k @ dm_next
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------
# Softmax attention in blocks (online softmax), for LASP-2H's softmax layers and Ring Attention
# ----------------------------------------------------------------------------------------------
def _block_scores(q, k, diagonal: bool):
    """Scaled scores of a query block against a key block; the diagonal block is causally masked."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if diagonal:
        C = q.shape[2]
        upper = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(upper, float("-inf"))
    return s


def _online_update(state, q, k, v, diagonal: bool):
    """Fold one key/value block into the running (max m, sum l, weighted sum acc) of online softmax."""
    m, l, acc = state
    s = _block_scores(q, k, diagonal)
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))
    p = torch.exp(s - m_new)
    corr = torch.exp(m - m_new)
    return m_new, l * corr + p.sum(-1, keepdim=True), acc * corr + p @ v


def _online_start(q, dv: int):
    B, H, C, _ = q.shape
    return (q.new_full((B, H, C, 1), float("-inf")), q.new_zeros(B, H, C, 1), q.new_zeros(B, H, C, dv))


def _block_grads(q, k, v, do, lse, delta, diagonal: bool):
    """Gradients through one block: P = exp(S - lse), dS = P ⊙ (dO Vᵀ - delta), delta = rowsum(dO ⊙ O)."""
    p = torch.exp(_block_scores(q, k, diagonal) - lse)
    ds = p * (do @ v.transpose(-1, -2) - delta) / math.sqrt(q.shape[-1])
    return ds @ k, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ do


class AllGatherSoftmax(torch.autograd.Function):
    """LASP-2H's softmax layer: one AllGather of (K_t, V_t) forward, one ReduceScatter of (dK, dV) backward."""

    @staticmethod
    def forward(ctx, q, k, v, rec: CommRecorder):
        rank = rec.rank
        with rec.phase("forward"):
            gather = rec.all_gather(torch.stack([k, v]), label="K_t, V_t", async_op=True)
            with rec.compute("diagonal block (overlaps the AllGather)"):
                state = _online_update(_online_start(q, v.shape[-1]), q, k, v, diagonal=True)
            kv = gather.wait()
            with rec.compute("blocks s < t"):
                for s in range(rank):
                    state = _online_update(state, q, kv[s][0], kv[s][1], diagonal=False)
                m, l, acc = state
                out, lse = acc / l, m + torch.log(l)
        earlier = torch.stack(kv[:rank]) if rank > 0 else q.new_zeros(0)
        ctx.save_for_backward(q, k, v, out, lse, earlier)
        ctx.rec = rec
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, earlier = ctx.saved_tensors
        rec = ctx.rec
        rank, W = rec.rank, rec.world_size
        with rec.phase("backward"):
            with rec.compute("block gradients"):
                delta = (do * out).sum(-1, keepdim=True)
                dq = torch.zeros_like(q)
                chunks = [torch.zeros(2, *k.shape, dtype=k.dtype, device=k.device) for _ in range(W)]
                for s in range(rank + 1):
                    k_s, v_s = (k, v) if s == rank else (earlier[s][0], earlier[s][1])
                    dq_s, dk_s, dv_s = _block_grads(q, k_s, v_s, do, lse, delta, diagonal=s == rank)
                    dq += dq_s
                    chunks[s] = torch.stack([dk_s, dv_s])
            mine = rec.reduce_scatter(chunks, label="dK, dV")
        return dq, mine[0], mine[1], None


class RingAttention(torch.autograd.Function):
    """Ring Attention: K/V blocks circulate; each rank folds in the blocks it may attend to.

    Forward: W-1 ring steps of (K, V), each overlapped with one block of compute. Backward: the
    block's K, V and its dK, dV accumulators travel together for W-1 steps; a last step carries the
    finished dK, dV home (as in the common ring-flash-attention design).
    """

    @staticmethod
    def forward(ctx, q, k, v, rec: CommRecorder):
        rank, W = rec.rank, rec.world_size
        state = _online_start(q, v.shape[-1])
        kv = torch.stack([k, v])
        with rec.phase("forward"):
            for step in range(W):
                s = (rank - step) % W  # the block this rank holds now
                if step < W - 1:
                    nxt = rec.sendrecv(kv, (rank + 1) % W, torch.empty_like(kv), (rank - 1) % W,
                                       label="K, V", async_op=True)
                with rec.compute(f"block {s}"):
                    if s <= rank:  # later blocks are masked out by causality: nothing to do
                        state = _online_update(state, q, kv[0], kv[1], diagonal=s == rank)
                if step < W - 1:
                    kv = nxt.wait()
            m, l, acc = state
            out, lse = acc / l, m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rec = rec
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        rec = ctx.rec
        rank, W = rec.rank, rec.world_size
        delta = (do * out).sum(-1, keepdim=True)
        dq = torch.zeros_like(q)
        buf = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])  # K, V, dK, dV of the block held
        with rec.phase("backward"):
            for step in range(W):
                s = (rank - step) % W
                with rec.compute(f"block {s}"):
                    if s <= rank:
                        dq_s, dk_s, dv_s = _block_grads(q, buf[0], buf[1], do, lse, delta, diagonal=s == rank)
                        dq += dq_s
                        buf[2] += dk_s
                        buf[3] += dv_s
                if step < W - 1:
                    buf = rec.sendrecv(buf, (rank + 1) % W, torch.empty_like(buf), (rank - 1) % W,
                                       label="K, V, dK, dV")
                elif W == 1:  # a ring of one: the gradients are already home
                    home = buf[2:]
                else:  # the block now held belongs to rank + 1: send its gradients home
                    home = rec.sendrecv(buf[2:], (rank + 1) % W, torch.empty_like(buf[2:]), (rank - 1) % W,
                                        label="dK, dV")
        return dq, home[0], home[1], None


def sequence_parallel_attention(scheme: str, q, k, v, rec: CommRecorder, *, kernel: str = "torch_chunked"):
    """Causal attention of this rank's chunk under ``scheme`` in lasp1/lasp2 (linear) or lasp2h/ring (softmax).

    q, k, v ``(B, H, C, d)``: the tokens [rank·C, (rank+1)·C) of the global sequence.
    """
    if scheme == "lasp1":
        return LASP1.apply(q, k, v, rec, kernel)
    if scheme == "lasp2":
        return LASP2.apply(q, k, v, rec, kernel)
    if scheme == "lasp2h":
        return AllGatherSoftmax.apply(q, k, v, rec)
    if scheme == "ring":
        return RingAttention.apply(q, k, v, rec)
    raise ValueError(f"scheme must be one of {SCHEMES[:4]}, got {scheme!r}")


# ----------------------------------------------------------------------------------------------
# A small hybrid stack (LASP-2H end to end): linear layers use LASP-2, softmax layers AllGather K/V
# ----------------------------------------------------------------------------------------------
def _rmsnorm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def hybrid_forward(x, weights, pattern: str, attend: Callable, heads: int):
    """Pre-norm residual stack; layer i is linear attention if pattern[i] == "L", softmax if "S".

    x ``(B, T, D)`` (T = all tokens on one device, or this rank's chunk); weights ``(L, 4, D, D)``
    (Wq, Wk, Wv, Wo per layer); ``attend(kind, q, k, v)`` does the attention on ``(B, H, T, d)``.
    The projections act token by token, so only ``attend`` ever needs other ranks' tokens.
    """
    B, T, D = x.shape
    d = D // heads
    split = lambda y: y.view(B, T, heads, d).transpose(1, 2)  # noqa: E731
    for kind, (wq, wk, wv, wo) in zip(pattern, weights):
        h = _rmsnorm(x)
        q, k, v = split(h @ wq) * d ** -0.5, split(h @ wk) * d ** -0.5, split(h @ wv)
        o = attend(kind, q, k, v)
        x = x + o.transpose(1, 2).reshape(B, T, D) @ wo
    return x


# ----------------------------------------------------------------------------------------------
# Deterministic inputs: the same global sequence whatever W is
# ----------------------------------------------------------------------------------------------
ATOM = 16  # tokens per seeded block: any chunk boundary can be generated on its own


def _tokens(seed: int, salt: int, start: int, stop: int, lead: tuple[int, ...], width: int, dtype, device):
    """Tokens [start, stop) of a seeded random sequence, shape ``(*lead, stop - start, width)``."""
    a0, a1 = start // ATOM, -(-stop // ATOM)
    blocks = [torch.randn(*lead, ATOM, width, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed * 1_000_003 + salt * 100_003 + a))
              for a in range(a0, a1)]
    return torch.cat(blocks, dim=-2)[..., start - a0 * ATOM: stop - a0 * ATOM, :].to(dtype=dtype, device=device)


@dataclass(frozen=True)
class Case:
    """One measurement: a scheme at sequence length N, head dim d, batch B, H heads."""

    scheme: str
    N: int
    d: int
    B: int = 2
    H: int = 2
    check: bool = True  # compare outputs and gradients with the single-device reference
    pattern: str = "LLLS"  # layers of the hybrid stack (1 softmax layer in 4, as in the paper's hybrids)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        for name in ("N", "d", "B", "H"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.pattern or set(self.pattern) - {"L", "S"}:
            raise ValueError(f"pattern must be a non-empty string of 'L' and 'S', got {self.pattern!r}")


def case_inputs(case: Case, seed: int, start: int, stop: int, dtype=torch.float64, device="cpu") -> dict:
    """Leaf inputs and the upstream gradient for tokens [start, stop) of ``case``.

    Attention cases: q, k ``(B, H, T, d)`` scaled by d^-1/2, v and the upstream gradient ``grad``.
    Hybrid: x ``(B, T, H·d)``, ``grad``, and the fixed layer weights ``(L, 4, D, D)``.
    """
    B, H, d = case.B, case.H, case.d
    tok = functools.partial(_tokens, seed, start=start, stop=stop, dtype=dtype, device=device)
    if case.scheme == "hybrid":
        D = H * d
        g = torch.Generator().manual_seed(seed + 7)
        w = torch.randn(len(case.pattern), 4, D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
        return {"x": tok(salt=5, lead=(B,), width=D), "grad": tok(salt=6, lead=(B,), width=D),
                "weights": w.to(dtype=dtype, device=device)}
    return {"q": tok(salt=1, lead=(B, H), width=d) * d ** -0.5, "k": tok(salt=2, lead=(B, H), width=d) * d ** -0.5,
            "v": tok(salt=3, lead=(B, H), width=d), "grad": tok(salt=4, lead=(B, H), width=d)}


def _leaves(case: Case, inputs: dict) -> dict:
    names = ("x",) if case.scheme == "hybrid" else ("q", "k", "v")
    return {n: inputs[n].detach().clone().requires_grad_(True) for n in names}


def reference_run(case: Case, seed: int) -> tuple[torch.Tensor, dict]:
    """Single-device output and gradients (plain autograd) for the whole sequence of ``case``."""
    inputs = case_inputs(case, seed, 0, case.N)
    leaves = _leaves(case, inputs)
    if case.scheme == "hybrid":
        attend = lambda kind, q, k, v: (linear_attention if kind == "L" else softmax_attention)(q, k, v)  # noqa: E731
        out = hybrid_forward(leaves["x"], inputs["weights"], case.pattern, attend, case.H)
    else:
        out = (linear_attention if case.scheme in LINEAR_SCHEMES else softmax_attention)(**leaves)
    _backward(out, inputs["grad"])
    return out.detach(), {n: t.grad for n, t in leaves.items()}


# ----------------------------------------------------------------------------------------------
# The suite that every rank runs, and its summary
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SuiteConfig:
    cases: tuple[Case, ...]
    seed: int = 0
    reps: int = 3  # timed repetitions (after ``warmup`` untimed ones)
    warmup: int = 1
    kernel: str = "torch_chunked"
    dtype: str = "float64"
    device: str = "cpu"  # "cuda": each rank uses GPU LOCAL_RANK

    def __post_init__(self):
        if not self.cases:
            raise ValueError("cases must hold at least one Case")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError(f"need reps >= 1 and warmup >= 0, got reps={self.reps}, warmup={self.warmup}")


def _one_step(case: Case, leaves: dict, inputs: dict, rec: CommRecorder, kernel: str) -> torch.Tensor:
    """Forward then backward of one case on this rank. Returns the output."""
    if case.scheme == "hybrid":
        def attend(kind, q, k, v):
            return sequence_parallel_attention("lasp2" if kind == "L" else "lasp2h", q, k, v, rec, kernel=kernel)

        out = hybrid_forward(leaves["x"], inputs["weights"], case.pattern, attend, case.H)
    else:
        out = sequence_parallel_attention(case.scheme, leaves["q"], leaves["k"], leaves["v"], rec, kernel=kernel)
    _backward(out, inputs["grad"])
    return out


def _backward(out: torch.Tensor, grad: torch.Tensor) -> None:
    """``out.backward(grad)``, written as a scalar loss: the same gradients, and it avoids the sympy
    import that torch makes on the first non-scalar ``backward`` (seconds, in every fresh worker)."""
    (out * grad).sum().backward()


def run_suite(rank: int, world_size: int, cfg: SuiteConfig) -> list[dict]:
    """What every rank runs (inside a process group): each case, ``warmup + reps`` times.

    Returns one plain dict per case: per-phase byte/call totals, the communication log and compute
    spans of the last repetition (times relative to its start), the step times, and, for checked
    cases, this rank's output and gradients (NumPy) for the parent to compare with the reference.
    """
    device = torch.device("cpu")
    sync = None
    if cfg.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        sync = torch.cuda.synchronize
    dtype = getattr(torch, cfg.dtype)
    rec = CommRecorder(sync=sync)
    payloads = []
    for case in cfg.cases:
        if case.N % world_size:
            raise ValueError(f"N={case.N} must be divisible by the world size {world_size}")
        C = case.N // world_size
        inputs = case_inputs(case, cfg.seed, rank * C, (rank + 1) * C, dtype, device)
        times = []
        for rep in range(cfg.warmup + cfg.reps):
            rec.reset()
            leaves = _leaves(case, inputs)
            dist.barrier()
            if sync:
                sync()
            t0 = time.perf_counter()
            out = _one_step(case, leaves, inputs, rec, cfg.kernel)
            if sync:
                sync()
            if rep >= cfg.warmup:
                times.append(time.perf_counter() - t0)
        log = rec.export()
        for e in log["events"]:
            e["t_issue"], e["t_done"] = e["t_issue"] - t0, e["t_done"] - t0
        for s in log["spans"]:
            s["t_start"], s["t_end"] = s["t_start"] - t0, s["t_end"] - t0
        payload = {"case": asdict(case), "rank": rank, "times": times, "log": log, "itemsize": dtype.itemsize,
                   "totals": {ph: rec.summary(ph) for ph in PHASES}}
        if case.check:
            payload["out"] = out.detach().cpu().numpy()
            payload["grads"] = {n: t.grad.detach().cpu().numpy() for n, t in leaves.items()}
        payloads.append(payload)
    return payloads


@dataclass
class CaseResult:
    """One case on W ranks, summarised. Per-rank lists are in rank order."""

    case: Case
    W: int
    itemsize: int
    bytes_sent: dict[str, list[int]]  # phase -> per rank
    bytes_recv: dict[str, list[int]]
    collectives: dict[str, list[int]]
    p2p_calls: dict[str, list[int]]
    depth: dict[str, int]  # phase -> longest chain of dependent communications
    time_s: float  # median over reps of the slowest rank's forward + backward
    times: list[float]  # per rep, slowest rank
    err_out: float | None = None  # max |output - reference|
    err_grad: float | None = None  # max over inputs of max |grad - reference grad|
    logs: list[dict] = field(default_factory=list)  # per rank: {"events": [...], "spans": [...]}

    @property
    def label(self) -> str:
        return LABELS[self.case.scheme]

    def max_bytes_sent(self, phase: str | None = None) -> int:
        phases = PHASES if phase is None else (phase,)
        return max(sum(self.bytes_sent[p][r] for p in phases) for r in range(self.W))

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("logs")
        return out


def summarize(case: Case, per_rank: Sequence[dict], *, seed: int, reference: dict | None = None) -> CaseResult:
    """Combine the W payloads of one case; compare with the single-device reference if checked.

    ``reference`` is a cache ``{(scheme kind, N, d, ...): (out, grads)}`` shared across calls.
    """
    import numpy as np

    W = len(per_rank)
    logs = [p["log"] for p in per_rank]
    per_phase = lambda key: {ph: [p["totals"][ph][key] for p in per_rank] for ph in PHASES}  # noqa: E731
    times = [max(p["times"][i] for p in per_rank) for i in range(len(per_rank[0]["times"]))]
    result = CaseResult(case=case, W=W, itemsize=per_rank[0]["itemsize"], bytes_sent=per_phase("bytes_sent"),
                        bytes_recv=per_phase("bytes_recv"), collectives=per_phase("collectives"),
                        p2p_calls=per_phase("p2p_calls"),
                        depth={ph: max(dependency_depth([lg["events"] for lg in logs], ph)) for ph in PHASES},
                        time_s=statistics.median(times), times=times, logs=logs)
    if case.check and "out" in per_rank[0]:
        kind = {"lasp1": "linear", "lasp2": "linear", "lasp2h": "softmax", "ring": "softmax"}.get(case.scheme, "hybrid")
        key = (kind, case.N, case.d, case.B, case.H, case.pattern if kind == "hybrid" else "", seed)
        cache = reference if reference is not None else {}
        if key not in cache:
            cache[key] = reference_run(case, seed)
        ref_out, ref_grads = cache[key]
        axis = 1 if case.scheme == "hybrid" else 2  # the token axis
        out = np.concatenate([p["out"] for p in per_rank], axis=axis)
        result.err_out = float(np.abs(out - ref_out.numpy()).max())
        result.err_grad = max(float(np.abs(np.concatenate([p["grads"][n] for p in per_rank], axis=axis)
                                           - g.numpy()).max()) for n, g in ref_grads.items())
    return result


def run_experiment(world_size: int, cases: Sequence[Case], *, seed: int = 0, reps: int = 3, warmup: int = 1,
                   kernel: str = "torch_chunked", timeout_s: float = 300.0, start_method: str = "forkserver",
                   reference: dict | None = None) -> list[CaseResult]:
    """Start ``world_size`` gloo workers on this machine, run every case on them, summarise.

    One process group serves all the cases (starting a group is the slow part). ``reference``: a
    dict to cache the single-device references in, to share them between calls with different W.
    """
    cfg = SuiteConfig(cases=tuple(cases), seed=seed, reps=reps, warmup=warmup, kernel=kernel)
    per_rank = launch(run_suite, world_size, args=(cfg,), timeout_s=timeout_s, start_method=start_method,
                      preload=PRELOAD)
    cache = reference if reference is not None else {}
    return [summarize(case, [per_rank[r][i] for r in range(world_size)], seed=seed, reference=cache)
            for i, case in enumerate(cfg.cases)]


def expected_bytes_sent(scheme: str, phase: str, W: int, *, N: int, d: int, B: int = 2, H: int = 2,
                        itemsize: int = 8, pattern: str = "LLLS") -> list[int]:
    """What each rank should send in one pass, from the algorithms above (the recorder must agree).

    LASP-2: every rank sends its d×d state to W-1 peers: (W-1)·B·H·d²·itemsize, whatever N is.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    state = B * H * d * d * itemsize  # one d×d memory state per (batch, head)
    block = B * H * (N // W) * d * itemsize  # one chunk of K (or V)
    if scheme == "lasp1":  # the last rank sends nothing forward, the first nothing backward
        return [0 if r == (W - 1 if phase == "forward" else 0) else state for r in range(W)]
    if scheme == "lasp2":
        return [(W - 1) * state] * W
    if scheme == "lasp2h":  # AllGather of (K, V) forward, ReduceScatter of (dK, dV) backward
        return [(W - 1) * 2 * block] * W
    if scheme == "ring":
        if phase == "forward":
            return [(W - 1) * 2 * block] * W
        return [(W - 1) * 4 * block + (2 * block if W > 1 else 0)] * W
    if scheme == "hybrid":
        per_layer = [expected_bytes_sent("lasp2" if kind == "L" else "lasp2h", phase, W, N=N, d=d, B=B, H=H,
                                         itemsize=itemsize) for kind in pattern]
        return [sum(layer[r] for layer in per_layer) for r in range(W)]
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of the results)
# ----------------------------------------------------------------------------------------------
COLOURS = {"lasp1": "#7f7f7f", "lasp2": "#d62728", "lasp2h": "#1f77b4", "ring": "#ff7f0e", "hybrid": "#9467bd"}


def find_result(results: Sequence[CaseResult], scheme: str, W: int, N: int, d: int) -> CaseResult:
    for r in results:
        if r.case.scheme == scheme and r.W == W and r.case.N == N and r.case.d == d:
            return r
    have = sorted({(r.case.scheme, r.W, r.case.N, r.case.d) for r in results})
    raise ValueError(f"no result for scheme={scheme!r}, W={W}, N={N}, d={d}; have {have}")


def results_table(results: Sequence[CaseResult], *, checked_only: bool = False):
    """An HTML table: errors against one device, bytes and calls of the busiest rank, depth, time."""
    from html import escape

    from IPython.display import HTML

    head = ["scheme", "W", "N", "d", "max err out", "max err grad", "bytes sent fwd", "bytes sent bwd",
            "collectives f/b", "p2p calls f/b", "depth f/b", "time (ms)"]
    fmt = lambda x: "–" if x is None else f"{x:.1e}"  # noqa: E731
    rows = []
    for r in results:
        if checked_only and r.err_out is None:
            continue
        cells = [r.case.scheme, r.W, r.case.N, r.case.d, fmt(r.err_out), fmt(r.err_grad),
                 max(r.bytes_sent["forward"]), max(r.bytes_sent["backward"]),
                 f"{max(r.collectives['forward'])}/{max(r.collectives['backward'])}",
                 f"{max(r.p2p_calls['forward'])}/{max(r.p2p_calls['backward'])}",
                 f"{r.depth['forward']}/{r.depth['backward']}", f"{r.time_s * 1e3:.1f}"]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    return HTML("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def timeline_figure(results: Sequence[CaseResult], *, W: int, N: int, d: int,
                    schemes: Sequence[str] = ("lasp1", "lasp2")):
    """Per rank, computation and communication against time for one forward + backward pass.

    Each scheme gets a panel; each rank two lanes: "compute" (local work) and "comm" (from issuing
    a call to its completion, so a long comm bar over a compute bar is overlap, and a comm bar
    alone is a rank waiting).
    """
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.subplots(len(schemes), 1, titles=[LABELS[s] for s in schemes], height=260 * len(schemes) + 60,
                       vertical_spacing=0.14, shared_xaxes=True)
    shown = set()
    for row, scheme in enumerate(schemes, start=1):
        res = find_result(results, scheme, W, N, d)
        for rank, log in enumerate(res.logs):
            lanes = [("compute", s["t_start"], s["t_end"], s["label"], s["phase"]) for s in log["spans"]]
            lanes += [("comm", e["t_issue"], e["t_done"], f"{e['op']} {e['label']}", e["phase"]) for e in log["events"]]
            for lane, t0, t1, text, phase in lanes:
                key = f"{lane} · {phase}"
                colour = {"compute · forward": viz.PALETTE["paper"], "compute · backward": viz.PALETTE["cyan"],
                          "comm · forward": viz.PALETTE["ours"], "comm · backward": viz.PALETTE["accent"]}[key]
                fig.add_trace(go.Bar(
                    y=[f"rank {rank} {lane}"], x=[max(t1 - t0, 0.0) * 1e3], base=[t0 * 1e3], orientation="h",
                    marker_color=colour, name=key, legendgroup=key, showlegend=key not in shown,
                    hovertext=f"rank {rank}: {text} ({(t1 - t0) * 1e3:.2f} ms)", hoverinfo="text"), row=row, col=1)
                shown.add(key)
        fig.update_yaxes(autorange="reversed", row=row, col=1)
    fig.update_xaxes(title_text="time since the step started (ms)", row=len(schemes), col=1)
    fig.update_layout(barmode="overlay", title=f"Communication against computation: W={W}, N={N}, d={d}")
    return fig


def bytes_figure(results: Sequence[CaseResult], *, W: int, d: int,
                 schemes: Sequence[str] = ("lasp2", "lasp1", "lasp2h", "ring")):
    """Bytes sent per device (forward + backward, the busiest rank) against N, with the formulas dashed."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure(f"Bytes sent per device in one training step (W={W}, d={d}, fp64)",
                     "sequence length N", "bytes sent by the busiest rank", height=420)
    for scheme in schemes:
        rows = sorted((r for r in results if r.case.scheme == scheme and r.W == W and r.case.d == d),
                      key=lambda r: r.case.N)
        if not rows:
            continue
        Ns = [r.case.N for r in rows]
        fig.add_trace(go.Scatter(x=Ns, y=[r.max_bytes_sent() for r in rows], mode="markers+lines",
                                 name=f"{LABELS[scheme]} (measured)", line=dict(color=COLOURS[scheme])))
        c = rows[0].case
        formula = [max(a + b for a, b in zip(*(expected_bytes_sent(scheme, ph, W, N=n, d=d, B=c.B, H=c.H)
                                               for ph in PHASES))) for n in Ns]
        fig.add_trace(go.Scatter(x=Ns, y=formula, mode="lines", name=f"{scheme} formula",
                                 line=dict(color=COLOURS[scheme], dash="dot"), showlegend=False))
    Ns = sorted({r.case.N for r in results if r.W == W and r.case.d == d})
    fig.update_xaxes(type="log", tickvals=Ns, ticktext=[str(n) for n in Ns])
    fig.update_yaxes(type="log")
    return fig


def explorer_figure(results: Sequence[CaseResult], *, W: int, N: int, d: int,
                    schemes: Sequence[str] = ("lasp1", "lasp2", "lasp2h", "ring")):
    """Three panels for one (W, N, d): bytes per device, communication calls and depth, measured time."""
    import plotly.graph_objects as go

    from companion import viz

    rows = [find_result(results, s, W, N, d) for s in schemes]
    names = list(schemes)
    fig = viz.subplots(1, 3, titles=["bytes sent per device (fwd + bwd)", "calls and dependency depth (fwd + bwd)",
                                     "measured time per step (ms)"], height=400, horizontal_spacing=0.09)
    fig.add_trace(go.Bar(x=names, y=[r.max_bytes_sent() for r in rows], marker_color=[COLOURS[s] for s in schemes],
                         showlegend=False, text=[f"{r.max_bytes_sent() / 1024:.1f} KiB" for r in rows],
                         textposition="outside"), row=1, col=1)
    for label, values, colour in (
            ("collective calls", [sum(max(r.collectives[p]) for p in PHASES) for r in rows], viz.PALETTE["paper"]),
            ("point-to-point calls (busiest rank)", [sum(max(r.p2p_calls[p]) for p in PHASES) for r in rows],
             viz.PALETTE["baseline"]),
            ("dependency depth", [sum(r.depth[p] for p in PHASES) for r in rows], viz.PALETTE["ours"])):
        fig.add_trace(go.Bar(x=names, y=values, name=label, marker_color=colour), row=1, col=2)
    fig.add_trace(go.Bar(x=names, y=[r.time_s * 1e3 for r in rows], marker_color=[COLOURS[s] for s in schemes],
                         showlegend=False, text=[f"{r.time_s * 1e3:.1f}" for r in rows], textposition="outside"),
                  row=1, col=3)
    fig.update_layout(barmode="group", title=f"W={W} ranks, N={N} tokens, head dim d={d} "
                                             f"(B={rows[0].case.B}, H={rows[0].case.H})",
                      legend=dict(orientation="h", y=-0.15))
    return fig


# ----------------------------------------------------------------------------------------------
# Command line: python -m companion.papers.lasp2 (under torchrun, or it starts its own gloo workers)
# ----------------------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m companion.papers.lasp2",
        description="Sequence-parallel LASP-1 / LASP-2 / LASP-2H / Ring Attention: check against one device, "
                    "count bytes and calls, time. Under torchrun each process is one rank; without torchrun it "
                    "starts --world-size gloo workers itself. Rank 0 prints one JSON line.")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--schemes", default="lasp1,lasp2,lasp2h,ring,hybrid")
    # (no option may be a prefix of one of torchrun's, e.g. --n or --d: torchrun's parser rejects those)
    p.add_argument("--seq-lens", default="256,1024", help="comma-separated sequence lengths N")
    p.add_argument("--head-dims", default="16", help="comma-separated head dimensions d")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernel", choices=KERNELS, default="torch_chunked")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the single-device reference (large N)")
    p.add_argument("--tol", type=float, default=None, help="max error allowed (default 1e-10 fp64, 1e-3 fp32)")
    p.add_argument("--world-size", type=int, default=2, help="workers to start when not under torchrun")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    cases = tuple(Case(s, N=n, d=d, B=args.batch, H=args.heads, check=not args.no_check)
                  for d in ints(args.head_dims) for n in ints(args.seq_lens) for s in args.schemes.split(","))
    cfg = SuiteConfig(cases=cases, seed=args.seed, reps=args.reps, kernel=args.kernel, dtype=args.dtype,
                      device="cuda" if args.backend == "nccl" else "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun: we are one rank
        dist.init_process_group(args.backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        try:
            mine = run_suite(rank, world, cfg)
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(mine, gathered, dst=0)
        finally:
            dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        if args.backend != "gloo":
            raise SystemExit("--backend nccl needs torchrun: torchrun --nproc-per-node <GPUs> "
                             "-m companion.papers.lasp2 --backend nccl ...")
        world = args.world_size
        gathered = launch(run_suite, world, args=(cfg,), preload=PRELOAD)
    cache: dict = {}
    results = [summarize(c, [gathered[r][i] for r in range(world)], seed=args.seed, reference=cache)
               for i, c in enumerate(cases)]
    tol = args.tol if args.tol is not None else (1e-10 if args.dtype == "float64" else 1e-3)
    worst = max([r.err_out for r in results if r.err_out is not None] +
                [r.err_grad for r in results if r.err_grad is not None] + [0.0])
    report = {"world_size": world, "backend": args.backend, "dtype": args.dtype, "kernel": args.kernel,
              "max_error": worst, "tol": tol, "cases": [r.to_json() for r in results]}
    line = json.dumps(report)
    print("LASP2_RESULT " + line, flush=True)
    for r in results:
        err = "" if r.err_out is None else f"  err out {r.err_out:.1e} grad {r.err_grad:.1e}"
        print(f"{r.case.scheme:>7} W={world} N={r.case.N:<6} d={r.case.d:<3} sent/rank {r.max_bytes_sent():>10} B  "
              f"collectives f/b {max(r.collectives['forward'])}/{max(r.collectives['backward'])}  "
              f"depth f/b {r.depth['forward']}/{r.depth['backward']}  {r.time_s * 1e3:8.2f} ms{err}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
