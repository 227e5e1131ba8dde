"""InfiniteHiP: "Extending Language Model Context Up to 3 Million Tokens on a Single GPU"
(Lee, Park, Suh, Hwang; arXiv 2502.08910).

Three parts, each small enough to read here:

1. **Hierarchical pruning** (``kernels/hip_mask.py``): stages ``(chunk size l_c, keep k)`` score
   chunks of keys with a two-keys-per-step descent, keep the best, split them and score again. The
   survivors, the sink and the recent window become the block list of block-sparse attention. This
   module adds the stage configurations (:class:`HipConfig`) and the planted-needle toy that
   measures recall, output error and density.
2. **RoPE past the training length**: the pruning stages score with *chunk-indexed* RoPE (the key
   read for chunk slot c sits at position c, the query at ``C + window``) or *relative* RoPE (every
   key at 0, the query at ``window``); the final attention re-indexes the gathered keys contiguously
   (StreamingLLM style) so that no distance exceeds the number of keys gathered, while distances
   inside the window stay exact. :class:`HipAttention` plugs this into ``companion.model.TinyLM``.
3. **KV offloading**: the KV cache lives in host memory, a small device bank holds recently used
   tokens (page table + LRU), and during decoding stage i is recomputed only every ``refresh[i]``
   steps. :class:`LRUBank` and :func:`simulate_decode` simulate it and count hits.

Official code read for details (cited where used): ``DeepAuto-AI/hip-attention``
``src/hip_attn/v1_2/attention_metadata.py`` (stage defaults), ``attention_extend.py`` (the scan
kernel, RoPE backends, final chunk -> block conversion), ``attention_extend_bsa.py`` (streaming
re-indexing), ``mask_refresh_interval.py`` and ``uvm_gpu_cache.py`` (offload cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from companion import zoo
from companion.model import Attention, ModelConfig, TinyLM, apply_rope, rope_cos_sin
from kernels import attention as dense_attention
from kernels import block_sparse_attention, hip_mask
from kernels.hip_mask import HipMask

SLUG = "infinitehip"


# ----------------------------------------------------------------------------------------------
# 1. Stage configurations
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HipConfig:
    """Everything the pruning needs. ``stages``: ``(chunk_size, keep[, stride_q])`` per stage.

    ``block_size`` is the key/query block of the final block-sparse attention (16, 32 or 64 in our
    kernel; the official code uses the last stage's chunk size, 8). ``refresh[i]``: during decoding,
    stage i is recomputed every ``refresh[i]`` steps. Layers ``< chunk_rope_layers`` score with
    chunk-indexed RoPE, later layers with relative RoPE (paper Eq. 4-5: layers 1-3 vs the rest).
    """

    stages: tuple = ((64, 2048), (16, 512), (4, 128))
    n_sink: int = 16
    window: int = 64
    block_size: int = 16
    block_q: int = 64
    refresh: tuple[int, ...] | None = (16, 8, 4)
    chunk_rope_layers: int = 3

    def __post_init__(self):
        object.__setattr__(self, "stages", hip_mask.check_stages(self.stages))
        if self.refresh is not None:
            if len(self.refresh) != len(self.stages) or not all(isinstance(r, int) and r >= 1 for r in self.refresh):
                raise ValueError(f"refresh must hold one int >= 1 per stage ({len(self.stages)}), got {self.refresh!r}")
        if not isinstance(self.chunk_rope_layers, int) or self.chunk_rope_layers < 0:
            raise ValueError(f"chunk_rope_layers must be an int >= 0, got {self.chunk_rope_layers!r}")
        # the kernel checks the rest (sink, window, block sizes) on a tiny dummy problem
        hip_mask._check_mask_args(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), self.stages, self.n_sink,
                                  self.window, self.block_size, self.block_q, None)

    def mask_kwargs(self) -> dict:
        """Keyword arguments for ``kernels.hip_mask.run``."""
        return dict(stages=self.stages, n_sink=self.n_sink, window=self.window, block_size=self.block_size,
                    block_q=self.block_q)

    def with_(self, **changes) -> HipConfig:
        return replace(self, **changes)

    def max_gathered_keys(self) -> int:
        """An upper bound on the keys one query block gathers: sink + kept chunks + window, in whole blocks."""
        bs, l_c = self.block_size, self.stages[-1].chunk_size
        aligned = (l_c <= bs and bs % l_c == 0 and self.n_sink % l_c == 0) or (l_c % bs == 0 and self.n_sink % bs == 0)
        per_chunk = -(-l_c // bs) + (0 if aligned else 1)  # chunks start at n_sink + a multiple of l_c
        blocks = -(-self.n_sink // bs) + (self.stages[-1].keep // l_c) * per_chunk
        return bs * (blocks + -(-(self.window + self.block_q - 1) // bs) + 1)


# Paper App. F (confirmed): chunks 256/32/8, k = 32K/8K/2K (4K for layers <= 3), sink 256, stream
# 1024, b_q 64, refresh 16/8/4. Our kernel's smallest block is 16 (the paper's last chunk is 8).
PAPER_APPENDIX_F = HipConfig(stages=((256, 32768), (32, 8192), (8, 2048)), n_sink=256, window=1024,
                             block_size=16, block_q=64, refresh=(16, 8, 4))
# Code defaults, HiPAttentionArgs in attention_metadata.py: stage_k (None, 32768, 8192) are the keys
# kept *entering* each stage, second_stage_k=2048 the final ones; query stride 4, 4, 1; sink 256,
# sliding window 512. The SGLang config refreshes every 32/16/8 steps.
CODE_DEFAULT = HipConfig(stages=((256, 32768, 4), (32, 8192, 4), (8, 2048, 1)), n_sink=256, window=512,
                         block_size=16, block_q=64, refresh=(32, 16, 8))
# The toy of this notebook (paper spec scaled down): 64 -> 16 -> 4 with k = 2048/512/128.
TOY = HipConfig()


def mask(q: torch.Tensor, k: torch.Tensor, cfg: HipConfig, *, backend: str = "cpu", **kw) -> HipMask:
    """Run the hierarchical pruning of ``cfg`` (q (B, H, T, D), k (B, H_kv, S, D))."""
    return hip_mask.run(q, k, backend=backend, **cfg.mask_kwargs(), **kw)


# ----------------------------------------------------------------------------------------------
# 2. The planted-needle toy and its measurements
# ----------------------------------------------------------------------------------------------
@dataclass
class NeedleProblem:
    """Random keys plus ``n_spans`` spans whose keys lean towards the queries' shared direction.

    q (1, H, Tq, D) are the last Tq positions of a context of T keys; k, v (1, H, T, D);
    ``spans`` (H, n_spans) first position of each span.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    spans: torch.Tensor
    span_len: int
    needle_logit: float

    @property
    def T(self) -> int:
        return self.k.shape[2]

    @property
    def q_offset(self) -> int:
        return self.k.shape[2] - self.q.shape[2]


def planted_needles(T: int, *, D: int = 64, H: int = 4, n_queries: int = 256, n_spans: int = 8,
                    span_len: int = 32, needle_logit: float = 8.0, query_noise: float = 0.5, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> NeedleProblem:
    """The toy of the paper spec: keys k_j ~ N(0, I); span keys get ``+a u`` with u the queries' direction.

    Each query is ``sqrt(D) * normalise(u + query_noise * z)``, z ~ N(0, I/D), so the scaled score
    q.k/sqrt(D) of a background key is N(0, 1) and a span key's is larger by ``needle_logit`` on
    average. Spans are spread over the context, one in each of n_spans equal segments, away from the
    first sinks and the queries' window.
    """
    if not (isinstance(T, int) and T >= 4 * n_queries and n_spans * span_len < T // 2):
        raise ValueError(f"T={T} is too short for n_queries={n_queries} and {n_spans} spans of {span_len}")
    if needle_logit < 0 or query_noise < 0:
        raise ValueError(f"needle_logit and query_noise must be >= 0, got {needle_logit}, {query_noise}")
    gen = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(H, D, generator=gen, dtype=torch.float64), dim=-1)  # one direction per head
    z = torch.randn(H, n_queries, D, generator=gen, dtype=torch.float64) / math.sqrt(D)
    q = math.sqrt(D) * F.normalize(u[:, None, :] + query_noise * z, dim=-1)
    k = torch.randn(H, T, D, generator=gen, dtype=torch.float64)
    v = torch.randn(H, T, D, generator=gen, dtype=torch.float64)
    lo, hi = T // 32, T - n_queries - 256  # keep spans out of the sink region and the recent window
    seg = (hi - lo) // n_spans
    offs = (torch.rand(H, n_spans, generator=gen, dtype=torch.float64) * (seg - span_len)).long()
    spans = lo + seg * torch.arange(n_spans) + offs  # (H, n_spans)
    strength = needle_logit * math.sqrt(1 + query_noise ** 2)  # E[q_hat . u] ~ 1/sqrt(1 + noise^2)
    for h in range(H):
        for s in spans[h].tolist():
            k[h, s:s + span_len] += strength * u[h]
    return NeedleProblem(q[None].to(dtype), k[None].to(dtype), v[None].to(dtype), spans, span_len, needle_logit)


def _row_blocks(m: HipMask, n_rows: int) -> torch.Tensor:
    """The block list of each query row: (B, H, n_rows, M)."""
    rows = torch.arange(n_rows) // m.block_size
    return m.block_index[:, :, rows]


@torch.no_grad()
def topk_recall(m: HipMask, q: torch.Tensor, k: torch.Tensor, topk: int = 128) -> float:
    """Mean over heads and queries of |mask ∩ exact top-k keys| / k (causal keys only)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    k_heads = k.repeat_interleave(H // k.shape[1], dim=1)
    s = q @ k_heads.transpose(-1, -2)
    pos = m.q_offset + torch.arange(T)
    s = s.masked_fill(torch.arange(S)[None, :] > pos[:, None], float("-inf"))
    top = s.topk(min(topk, S), dim=-1).indices  # (B, H, T, topk)
    covered = ((top // m.block_size)[..., None] == _row_blocks(m, T)[..., None, :]).any(-1)
    return covered.float().mean().item()


@torch.no_grad()
def weight_covered(m: HipMask, q: torch.Tensor, k: torch.Tensor) -> float:
    """Mean over heads and queries of the dense softmax weight that falls on keys the mask reads.

    q (B, H, T, D), k (B, H_kv, S, D), no RoPE; scores scaled by 1/sqrt(D) as in the attention.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    k_heads = k.repeat_interleave(H // k.shape[1], dim=1)
    s = (q @ k_heads.transpose(-1, -2)) / math.sqrt(D)
    pos = m.q_offset + torch.arange(T)
    causal = torch.arange(S)[None, :] <= pos[:, None]
    w = s.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, H, T, S)
    blocks = _row_blocks(m, T)  # (B, H, T, M)
    read = torch.zeros(B, H, T, -(-S // m.block_size) + 1, dtype=w.dtype)
    read.scatter_(-1, torch.where(blocks >= 0, blocks, read.shape[-1] - 1), 1.0)
    per_key = read[..., :-1].repeat_interleave(m.block_size, dim=-1)[..., :S]
    return (w * per_key).sum(-1).mean().item()


def visible_pairs(m: HipMask, T: int, S: int) -> torch.Tensor:
    """(B, H, T) number of keys each query row reads under the mask (causal inside the blocks)."""
    blocks = _row_blocks(m, T)  # (B, H, T, M)
    pos = (m.q_offset + torch.arange(T))[:, None]
    start = blocks * m.block_size
    end = torch.minimum(torch.minimum(start + m.block_size, torch.tensor(S)), pos + 1)
    return torch.where(blocks >= 0, (end - start).clamp(min=0), 0).sum(-1)


def density(m: HipMask, T: int, S: int) -> float:
    """Keys read by the sparse attention / keys read by dense causal attention, over all query rows."""
    causal = (m.q_offset + torch.arange(T) + 1).sum().item() * m.block_index.shape[0] * m.block_index.shape[1]
    return visible_pairs(m, T, S).sum().item() / causal


@torch.no_grad()
def sparse_output(m: HipMask, q, k, v, *, backend: str = "cpu") -> torch.Tensor:
    """Block-sparse attention over the mask's blocks (no RoPE: the planted toy has none)."""
    return block_sparse_attention.run(q, k, v, m.block_index, backend=backend, block_size=m.block_size,
                                      q_offset=m.q_offset)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖_F / ‖want‖_F."""
    return ((got - want).norm() / want.norm()).item()


@dataclass
class NeedleResult:
    recall: float
    error: float
    density: float
    mask: HipMask = field(repr=False)


@torch.no_grad()
def evaluate(problem: NeedleProblem, cfg: HipConfig, *, dense_out: torch.Tensor | None = None,
             topk: int = 128, backend: str = "cpu") -> NeedleResult:
    """Recall of the exact top-k keys, relative output error and density of ``cfg`` on ``problem``."""
    p = problem
    m = mask(p.q, p.k, cfg, backend=backend)
    if dense_out is None:
        dense_out = dense_attention.cpu(p.q, p.k, p.v, mask="causal")
    return NeedleResult(recall=topk_recall(m, p.q, p.k, topk), error=relative_error(sparse_output(m, p.q, p.k, p.v),
                        dense_out), density=density(m, p.q.shape[2], p.T), mask=m)


@torch.no_grad()
def span_mass(problem: NeedleProblem) -> float:
    """Share of the dense attention weight that falls on the planted spans (how sparse the toy is)."""
    p = problem
    s = (p.q @ p.k.transpose(-1, -2)) / math.sqrt(p.q.shape[-1])
    pos = p.q_offset + torch.arange(p.q.shape[2])
    s = s.masked_fill(torch.arange(p.T)[None, :] > pos[:, None], float("-inf"))
    w = s.softmax(-1)
    in_span = torch.zeros(p.k.shape[1], p.T, dtype=torch.bool)
    for h in range(p.k.shape[1]):
        for s0 in p.spans[h].tolist():
            in_span[h, s0:s0 + p.span_len] = True
    return (w * in_span[None, :, None, :]).sum(-1).mean().item()


def stage1_reads(m: HipMask) -> dict:
    """Key reads per (query block, chunk) in stage 1, split into full chunks and clipped ones."""
    log = m.stages[0]
    length = log.right - log.left
    full = length == log.stage.chunk_size
    reads = log.reads
    return {"chunk_size": log.stage.chunk_size, "full_min": int(reads[full].min()), "full_max": int(reads[full].max()),
            "n_full": int(full.sum()), "formula": 2 * math.log2(log.stage.chunk_size),
            "dense_reads": log.stage.chunk_size}


def sweep(problem: NeedleProblem, base: HipConfig, *, chunk_sets, k_scales, topk: int = 128) -> list[dict]:
    """Recall, error and density for stage chunk sets x budget scales (the k of every stage times s)."""
    dense_out = dense_attention.cpu(problem.q, problem.k, problem.v, mask="causal")
    rows = []
    for chunks in chunk_sets:
        for s in k_scales:
            ks = [max(c, int(round(k * s / c)) * c) for c, (_, k, *_) in zip(chunks, base.stages)]
            cfg = base.with_(stages=tuple(zip(chunks, ks)))
            r = evaluate(problem, cfg, dense_out=dense_out, topk=topk)
            rows.append({"chunks": tuple(chunks), "k": tuple(ks), "scale": s, "recall": r.recall, "error": r.error,
                         "density": r.density})
    return rows


# ----------------------------------------------------------------------------------------------
# 3. RoPE beyond the training length
# ----------------------------------------------------------------------------------------------
def chunk_indexed_rope(head_dim: int, base: float, window: int):
    """The scan hook for chunk-indexed RoPE: key of chunk slot c at position c, query at min(pos, C + window).

    From ``attention_extend.py`` (``EXTEND_BACKEND == "streaming"`` in the scan: ``new_tsrc = idx_chunk``,
    ``new_tdst = min(pos_tdst, CHUNK_COUNT + sliding_window_size)``).
    """
    def hook(stage: int, n_slots: int, q: torch.Tensor, positions: torch.Tensor):
        q_pos = torch.clamp(positions, max=n_slots + window)
        cos_q, sin_q = rope_cos_sin(q_pos, head_dim, base, dtype=q.dtype)
        cos_k, sin_k = rope_cos_sin(torch.arange(n_slots), head_dim, base, dtype=q.dtype)
        return apply_rope(q, cos_q, sin_q), cos_k, sin_k

    return hook


def relative_rope(head_dim: int, base: float, window: int):
    """The scan hook for relative RoPE: every key at position 0, the query at ``window``.

    The official kernel puts the left key at 0, the right one at 1 and the query at window + 1; we
    drop that one-position asymmetry so the keys need no rotation at all.
    """
    def hook(stage: int, n_slots: int, q: torch.Tensor, positions: torch.Tensor):
        cos_q, sin_q = rope_cos_sin(torch.full_like(positions, window), head_dim, base, dtype=q.dtype)
        return apply_rope(q, cos_q, sin_q), None, None

    return hook


@dataclass
class GatherPlan:
    """The keys each query block reads, flattened: ``key_ids``, ``valid`` and ``positions`` (B, H, n_fqb, N).

    ``positions`` is what RoPE sees: the true position, or with streaming re-indexing the gathered
    keys packed contiguously so that the last one keeps its true position.
    """

    key_ids: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


def gather_plan(block_index: torch.Tensor, block_size: int, S: int, *, streaming: bool = True) -> GatherPlan:
    """Streaming re-indexing (``attention_extend_bsa.py``, ``EXTEND_BACKEND == "streaming"``).

    Key j gathered by a query block gets position ``last - (number of gathered keys after j)``,
    where ``last`` is the block's last gathered key. A contiguous run of keys that ends at ``last``
    (the window and the query block itself) keeps its true positions exactly; every other key moves
    closer, so no distance exceeds the number of keys gathered.
    """
    ids = block_index[..., None] * block_size + torch.arange(block_size)  # (B, H, n_fqb, M, bs)
    valid = (block_index >= 0)[..., None] & (ids < S)
    ids, valid = ids.flatten(-2), valid.flatten(-2)
    ids = torch.where(valid, ids, 0)
    if not streaming:
        return GatherPlan(ids, valid, ids)
    after = valid.flip(-1).long().cumsum(-1).flip(-1) - valid.long()  # valid keys after this one
    last = torch.where(valid, ids, -1).amax(-1, keepdim=True)
    return GatherPlan(ids, valid, torch.where(valid, last - after, 0))


@torch.no_grad()
def rope_sparse_attention(q, k, v, block_index, *, block_size: int, base: float, q_offset: int = 0,
                          streaming: bool = True) -> torch.Tensor:
    """Block-sparse attention with RoPE applied inside: queries at their true positions, keys at the
    positions of :func:`gather_plan`. q (B, H, T, d) and k (B, H_kv, S, d) are *un-rotated*.

    Returns (B, H, T, d_v). With ``streaming=False`` it equals block-sparse attention on RoPE-rotated
    q and k (a unit test checks this in float64).
    """
    B, H, T, d = q.shape
    S = k.shape[2]
    bs = block_size
    plan = gather_plan(block_index, bs, S, streaming=streaming)
    n_fqb, N = plan.key_ids.shape[2], plan.key_ids.shape[3]
    group = H // k.shape[1]
    kv_head = (torch.arange(H) // group)[None, :, None, None].expand(B, -1, n_fqb, N)
    batch = torch.arange(B)[:, None, None, None].expand(-1, H, n_fqb, N)
    k_g, v_g = k[batch, kv_head, plan.key_ids], v[batch, kv_head, plan.key_ids]  # (B, H, n_fqb, N, d)
    cos_t, sin_t = rope_cos_sin(torch.arange(max(S, q_offset + T)), d, base, dtype=q.dtype)
    k_g = apply_rope(k_g, cos_t[plan.positions], sin_t[plan.positions])
    q_pos = q_offset + torch.arange(T)
    q_r = apply_rope(q, cos_t[q_pos], sin_t[q_pos])
    q_b = F.pad(q_r, (0, 0, 0, n_fqb * bs - T)).view(B, H, n_fqb, bs, d)
    s = (q_b @ k_g.transpose(-1, -2)) / math.sqrt(d)  # (B, H, n_fqb, bs, N)
    row_pos = F.pad(q_pos, (0, n_fqb * bs - T), value=-1).view(n_fqb, bs)
    visible = plan.valid[..., None, :] & (plan.key_ids[..., None, :] <= row_pos[None, None, :, :, None])
    s = s.masked_fill(~visible, float("-inf"))
    w = torch.nan_to_num(s.softmax(-1), nan=0.0)  # padded rows see nothing
    return (w @ v_g).view(B, H, n_fqb * bs, -1)[:, :, :T]


def window_offsets_exact(m: HipMask, S: int) -> int:
    """Max |re-indexed − true| position over the keys inside each query block's recent window (0 = exact)."""
    plan = gather_plan(m.block_index, m.block_size, S, streaming=True)
    f = torch.arange(m.block_index.shape[2])
    start = m.window_start[(f * m.block_size) // m.block_q]  # (n_fqb,)
    in_window = plan.valid & (plan.key_ids >= start[None, None, :, None])
    return int((plan.positions - plan.key_ids).abs()[in_window].max())


def streaming_identity_error(*, seed: int = 0, T: int = 200, d: int = 16, window: int = 40) -> float:
    """Max |streaming − true positions| of :func:`rope_sparse_attention` (float64) on a sink-free window
    mask, where every query block reads one contiguous run of keys ending at itself: must be 0 up to rounding."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, T, d, generator=gen, dtype=torch.float64) for _ in range(3))
    starts = hip_mask.window_starts(T, window=window, block_q=32, q_offset=0)
    empty = torch.zeros(1, 2, starts.shape[0], 0, dtype=torch.int64)
    index = hip_mask.block_index_from_chunks(empty, empty, T=T, S=T, n_sink=0, window_start=starts, block_size=16,
                                             block_q=32, q_offset=0)
    kw = dict(block_size=16, base=10000.0)
    a = rope_sparse_attention(q, k, v, index, streaming=True, **kw)
    return float((a - rope_sparse_attention(q, k, v, index, streaming=False, **kw)).abs().max())


def max_relative_distance(m: HipMask, S: int, *, streaming: bool) -> int:
    """The largest query-to-key distance RoPE sees under the mask (last row of each block vs its keys)."""
    plan = gather_plan(m.block_index, m.block_size, S, streaming=streaming)
    T = (m.block_index.shape[2]) * m.block_size
    last_pos = (m.q_offset + torch.minimum((torch.arange(m.block_index.shape[2]) + 1) * m.block_size,
                                           torch.tensor(T)) - 1)
    dist = torch.where(plan.valid, last_pos[None, None, :, None] - plan.positions, 0)
    return int(dist.max())


# ----------------------------------------------------------------------------------------------
# 4. The passkey demonstration: a tiny LM trained at a short length, used far past it
# ----------------------------------------------------------------------------------------------
METHODS = ("naive", "streaming", "hip (true positions)", "infinitehip")
METHOD_LABELS = {"naive": "naive extrapolation (dense, plain RoPE)",
                 "streaming": "sink + window only (StreamingLLM-style re-indexing)",
                 "hip (true positions)": "InfiniteHiP mask, plain RoPE positions",
                 "infinitehip": "InfiniteHiP (chunk-indexed scan + streaming RoPE)"}


class HipAttention(Attention):
    """``Attention`` with the same weights but InfiniteHiP's sparse attention (and its RoPE tricks).

    ``method``: "naive" (the parent's dense causal attention), "streaming" (sink + window only),
    "hip (true positions)" (the pruned mask, keys at their true positions) or "infinitehip" (scan
    with chunk-indexed / relative RoPE, final attention with streaming re-indexing).
    """

    def __init__(self, cfg: ModelConfig, layer_index: int = 0, *, hip: HipConfig = TOY, method: str = "infinitehip",
                 backend: str = "cpu"):
        super().__init__(cfg, layer_index)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.layer_index, self.hip, self.method, self.backend = layer_index, hip, method, backend
        self.base = cfg.rope_base

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.method == "naive":
            return super().forward(x, cos, sin)
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        index = self._block_index(q, k)
        self.last_block_index = index  # kept for needle_read_rate
        y = rope_sparse_attention(q, k, v, index, block_size=self.hip.block_size, base=self.base,
                                  streaming=self.method != "hip (true positions)")
        return self.o_proj(y.transpose(1, 2).flatten(-2))

    def _block_index(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        cfg, T = self.hip, q.shape[2]
        if self.method == "streaming":
            starts = hip_mask.window_starts(T, window=cfg.window, block_q=cfg.block_q, q_offset=0)
            empty = torch.zeros(q.shape[0], q.shape[1], starts.shape[0], 0, dtype=torch.int64)
            return hip_mask.block_index_from_chunks(empty, empty, T=T, S=T, n_sink=cfg.n_sink, window_start=starts,
                                                    block_size=cfg.block_size, block_q=cfg.block_q, q_offset=0)
        if self.method == "infinitehip":
            make = chunk_indexed_rope if self.layer_index < cfg.chunk_rope_layers else relative_rope
            hook = make(self.head_dim, self.base, cfg.window)
            return mask(q, k, cfg, backend=self.backend, scan_rope=hook).block_index
        cos, sin = rope_cos_sin(torch.arange(T), self.head_dim, self.base, dtype=q.dtype)  # true positions
        return mask(apply_rope(q, cos, sin), apply_rope(k, cos, sin), cfg, backend=self.backend).block_index


def with_method(model: TinyLM, method: str, hip: HipConfig = TOY, *, backend: str = "cpu") -> TinyLM:
    """A copy of ``model`` whose attention layers run ``method`` (same weights, eval mode)."""
    make = lambda cfg, i: HipAttention(cfg, i, hip=hip, method=method, backend=backend)  # noqa: E731
    twin = TinyLM(model.cfg, attention=make)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@dataclass(frozen=True)
class PasskeySetup:
    """The passkey task and the recipe of the model that learns it.

    Token ids: filler ``0 .. vocab_size - key_vocab - 2`` (Zipf-Markov text), key tokens from the
    reserved range of ``key_vocab`` ids above it, and the marker ``vocab_size - 1``. Training mixes
    lengths ``train_length`` / 4, / 2 and / 1 at ``tokens_per_step`` tokens per step; the loss is on
    the key tokens only.
    """

    vocab_size: int = 64
    key_vocab: int = 16
    key_len: int = 2
    train_length: int = 256
    d_model: int = 64
    n_heads: int = 4
    steps: int = 800
    tokens_per_step: int = 4096
    lr: float = 6e-3

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=2, n_heads=self.n_heads)


PASSKEY_FULL = PasskeySetup()
PASSKEY_SMOKE = PasskeySetup(train_length=128, steps=30, tokens_per_step=2048)
# The LM's InfiniteHiP configuration: every query block gathers at most 224 keys (< 256, the training
# length), so streaming re-indexing never shows the model an unseen distance.
PASSKEY_HIP = HipConfig(stages=((64, 512), (16, 128), (4, 32)), n_sink=16, window=32, block_size=16, block_q=32,
                        refresh=None)


def passkey_batch(n: int, *, length: int, setup: PasskeySetup, depth: float, seed: int):
    """``(x, y, key)``: ``filler [M] key [M] filler [M] key`` samples of ``length`` tokens.

    x (n, length - 1) inputs, y the targets (-100 except the key_len answer tokens), key (n, key_len).
    ``depth`` in [0, 1] places the needle in the filler. Like ``companion.data.passkey_tokens``, but
    the key tokens have their own ids, so retrieval is a content match a 2-layer model learns fast.
    """
    from companion.data import zipf_markov

    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    hay = length - 3 - 2 * setup.key_len
    if hay < 1:
        raise ValueError(f"length={length} is too short for key_len={setup.key_len}")
    n_filler = setup.vocab_size - setup.key_vocab - 1
    rng = np.random.default_rng(seed)
    filler = zipf_markov(n * hay, vocab_size=n_filler, doc_len=max(2, hay), seed=seed).view(n, hay)
    key = torch.from_numpy(rng.integers(n_filler, n_filler + setup.key_vocab, size=(n, setup.key_len)))
    cut = int(round(depth * hay))
    m = torch.full((n, 1), setup.vocab_size - 1, dtype=torch.int64)
    tokens = torch.cat([filler[:, :cut], m, key, m, filler[:, cut:], m, key], dim=1)
    x = tokens[:, :-1]
    y = torch.full_like(x, -100)
    y[:, -setup.key_len:] = key
    return x, y, key


def _fit_passkey(setup: PasskeySetup):
    def fit(model: nn.Module) -> dict:
        from companion.train import train

        def batches(step: int):
            length = setup.train_length // (4, 2, 1)[step % 3]
            depth = float(np.random.default_rng(step).random())
            x, y, _ = passkey_batch(setup.tokens_per_step // length, length=length, setup=setup, depth=depth,
                                    seed=1 + step)
            return x, y

        hist = train(model, batches, steps=setup.steps, lr=setup.lr, desc="passkey LM")
        acc = passkey_accuracy(model, setup, length=setup.train_length, n=8)
        return {"train_loss": hist.loss[-1], "steps": setup.steps, "train_length": setup.train_length,
                "accuracy_at_train_length": acc}

    return fit


zoo.register("infinitehip-passkey", version="1", skeleton=lambda: TinyLM(PASSKEY_FULL.model_config()),
             description=f"2-layer RoPE LM trained on passkeys of <= {PASSKEY_FULL.train_length} tokens")(
    _fit_passkey(PASSKEY_FULL))
zoo.register("infinitehip-passkey-smoke", version="1", skeleton=lambda: TinyLM(PASSKEY_SMOKE.model_config()),
             description="smoke-size passkey LM (a few steps; not trained to retrieve)")(_fit_passkey(PASSKEY_SMOKE))


@torch.no_grad()
def _passkey_pass(model: TinyLM, setup: PasskeySetup, *, length: int, n: int, depths, seed: int, batch: int,
                  block_size: int | None):
    """(accuracy, needle read in any head, in every head) over the samples; the read rates need a
    HipAttention last layer and ``block_size`` (else None): does its mask let the last query block
    read the key block holding the needle's first key token?"""
    attn = model.blocks[-1].attn
    track = block_size is not None and isinstance(attn, HipAttention) and attn.method != "naive"
    hits = total = read_any = read_all = 0
    hay = length - 3 - 2 * setup.key_len
    for d_i, depth in enumerate(depths):
        x, _, key = passkey_batch(n, length=length, setup=setup, depth=depth, seed=_sample_seed(seed, d_i, length))
        key_block = (int(round(depth * hay)) + 1) // (block_size or 1)  # the key follows the first marker
        for i in range(0, n, batch):
            logits = model(x[i:i + batch]).logits[:, -setup.key_len:]
            hits += int((logits.argmax(-1) == key[i:i + batch]).all(-1).sum())
            if track:
                per_head = (attn.last_block_index[:, :, -1] == key_block).any(-1)  # (b, H)
                read_any += int(per_head.any(-1).sum())
                read_all += int(per_head.all(-1).sum())
        total += n
    reads = (read_any / total, read_all / total) if track else (None, None)
    return (hits / total, *reads)


def passkey_accuracy(model: TinyLM, setup: PasskeySetup, *, length: int, n: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9),
                     seed: int = 0, batch: int = 8) -> float:
    """Share of samples whose whole key is predicted (teacher forcing, argmax), over the given depths."""
    return _passkey_pass(model, setup, length=length, n=n, depths=depths, seed=seed, batch=batch, block_size=None)[0]


def _sample_seed(seed: int, depth_index: int, length: int) -> int:
    return 10_000 * (seed + 1) + 97 * depth_index + length


def needle_read_rate(model: TinyLM, setup: PasskeySetup, *, length: int, n: int, hip: HipConfig = TOY,
                     method: str = "infinitehip", depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0,
                     batch: int = 8, every_head: bool = False) -> float:
    """Share of the passkey samples of :func:`passkey_accuracy` whose last-layer mask lets the last query
    block read the needle's first key token, in at least one head (or in every head), same samples and seeds."""
    if method == "naive":
        raise ValueError("method 'naive' has no mask; pick one of " + ", ".join(METHODS[1:]))
    _, any_head, all_heads = _passkey_pass(with_method(model, method, hip), setup, length=length, n=n, depths=depths,
                                           seed=seed, batch=batch, block_size=hip.block_size)
    return all_heads if every_head else any_head


def passkey_table(model: TinyLM, setup: PasskeySetup, *, lengths, n: int, hip: HipConfig = TOY, methods=METHODS,
                  seed: int = 0) -> dict:
    """Accuracy per method and length, ``{method: [acc at each length]}``, plus ``"length"`` and
    ``"reads": {method: [(needle read in any head, in every head) at each length]}`` for the masked methods."""
    out = {"length": list(lengths), "reads": {}}
    for method in methods:
        twin = with_method(model, method, hip)
        rows = [_passkey_pass(twin, setup, length=L, n=n, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed=seed, batch=8,
                              block_size=hip.block_size) for L in lengths]
        out[method] = [r[0] for r in rows]
        if method != "naive":
            out["reads"][method] = [r[1:] for r in rows]
    return out


# ----------------------------------------------------------------------------------------------
# 5. KV offloading: a host store, a small device bank (page table + LRU), mask refresh intervals
# ----------------------------------------------------------------------------------------------
class LRUBank:
    """A device bank of ``capacity`` token slots in front of a host KV store (one page = one token).

    ``fetch(ids)`` serves one kernel's accesses: tokens already in the bank are hits; each missing
    token is one miss, copied from the host into the least recently used slot (slots used by this
    same call are never evicted; if the call needs more tokens than the bank holds, the overflow is
    read straight from the host). Returns the rows, always equal to the host's. The page table maps
    token -> slot, as ``uvm_gpu_cache.py`` does per kv head.
    """

    def __init__(self, host: torch.Tensor, capacity: int):
        if host.ndim != 2:
            raise ValueError(f"host must be (n_tokens, width), got shape {tuple(host.shape)}")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.host = host
        self.capacity = capacity
        self.bank = torch.zeros(capacity, host.shape[1], dtype=host.dtype)
        self.table = np.full(host.shape[0], -1, dtype=np.int64)  # token -> slot
        self.owner = np.full(capacity, -1, dtype=np.int64)  # slot -> token
        self.last_used = np.full(capacity, -1, dtype=np.int64)
        self.clock = 0
        self.hits = self.misses = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    def fetch(self, ids) -> torch.Tensor:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.host.shape[0]):
            raise ValueError(f"token ids must be in [0, {self.host.shape[0]}), got [{ids.min()}, {ids.max()}]")
        self.clock += 1
        uniq = np.unique(ids)
        resident = self.table[uniq] >= 0
        missing = uniq[~resident]
        self.misses += missing.size
        self.hits += ids.size - missing.size
        self.last_used[self.table[uniq[resident]]] = self.clock
        free = np.flatnonzero(self.last_used < self.clock)  # not touched by this call
        victims = free[np.argsort(self.last_used[free], kind="stable")][:missing.size]
        load = missing[:victims.size]
        old = self.owner[victims]
        self.table[old[old >= 0]] = -1
        self.owner[victims], self.table[load], self.last_used[victims] = load, victims, self.clock
        self.bank[torch.from_numpy(victims)] = self.host[torch.from_numpy(load)]
        rows = self.host[torch.from_numpy(ids)].clone()  # overflow rows come straight from the host
        in_bank = self.table[ids] >= 0
        rows[torch.from_numpy(in_bank)] = self.bank[torch.from_numpy(self.table[ids[in_bank]])]
        return rows


def refresh_level(step: int, refresh: tuple[int, ...] | None) -> int | None:
    """The first stage to recompute at decode ``step`` (None: reuse the whole mask).

    ``mask_refresh_interval.py``: the first stage i with ``step % refresh[i] == 0``; step 0 recomputes all.
    Without intervals every stage runs every step.
    """
    if refresh is None or step == 0:
        return 0
    return next((i for i, r in enumerate(refresh) if step % r == 0), None)


@dataclass
class DecodeStats:
    mask_hits: list[int]
    mask_accesses: list[int]
    sa_hits: list[int]
    sa_accesses: list[int]
    max_output_diff: float

    def ratio(self, which: str = "mask") -> float:
        hits, acc = (self.mask_hits, self.mask_accesses) if which == "mask" else (self.sa_hits, self.sa_accesses)
        return sum(hits) / max(1, sum(acc))


@torch.no_grad()
def simulate_decode(problem: NeedleProblem, cfg: HipConfig, *, steps: int, capacity: int,
                    refresh: tuple[int, ...] | None, head: int = 0) -> DecodeStats:
    """Decode ``steps`` tokens after a context of ``T - steps`` keys, one head, with offloaded KV.

    Step t's query is ``problem.q[:, head, t]`` at position ``T - steps + t``. The pruning reads keys
    through a *mask bank*; the sparse attention reads keys and values through an *SA bank* (two banks,
    as in the paper). ``refresh`` (or None = every stage every step) sets which stages rerun.
    ``max_output_diff`` compares every attention output computed from the banks with the host's.
    """
    p = problem
    if steps > p.q.shape[2]:
        raise ValueError(f"steps={steps} exceeds the problem's {p.q.shape[2]} queries")
    S = p.T
    context = S - steps
    k, v = p.k[:, head:head + 1], p.v[:, head:head + 1]
    host_kv = torch.cat([k[0, 0], v[0, 0]], dim=-1)
    mask_bank, sa_bank = LRUBank(k[0, 0], capacity), LRUBank(host_kv, capacity)
    stats = DecodeStats([], [], [], [], 0.0)
    cached_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kept = None
    D = k.shape[-1]
    for t in range(steps):
        pos = context + t
        q = p.q[:, head:head + 1, t:t + 1]
        starts = hip_mask.window_starts(1, window=cfg.window, block_q=cfg.block_q, q_offset=pos)
        level = refresh_level(t, refresh)
        h0, a0 = mask_bank.hits, mask_bank.accesses
        if level is not None:
            if level == 0:
                left, right = hip_mask.stage0_chunks(1, 1, cfg.n_sink, cfg.stages[0].chunk_size, starts)
            else:
                left, right = cached_inputs[level]
            k_vis = k[:, :, :pos + 1]
            left, right, logs = hip_mask.run_stages(q, k_vis, hip_mask.scan_stage_reference, left, right,
                                                    stages=cfg.stages, block_q=cfg.block_q, q_offset=pos, first=level,
                                                    return_trace=True)
            for i, log in enumerate(logs, start=level):
                cached_inputs[i] = (log.left, log.right)
                read = log.trace[log.trace >= 0]
                mask_bank.fetch(read.numpy())
            kept = (left, right)
        stats.mask_hits.append(mask_bank.hits - h0)
        stats.mask_accesses.append(mask_bank.accesses - a0)
        index = hip_mask.block_index_from_chunks(*kept, T=1, S=pos + 1, n_sink=cfg.n_sink, window_start=starts,
                                                 block_size=cfg.block_size, block_q=cfg.block_q, q_offset=pos)
        plan = gather_plan(index, cfg.block_size, pos + 1, streaming=False)
        ids = plan.key_ids[plan.valid]
        h0, a0 = sa_bank.hits, sa_bank.accesses
        rows = sa_bank.fetch(ids.numpy())
        stats.sa_hits.append(sa_bank.hits - h0)
        stats.sa_accesses.append(sa_bank.accesses - a0)
        w = torch.softmax((q[0, 0] @ rows[:, :D].T) / math.sqrt(D), dim=-1)
        w_host = torch.softmax((q[0, 0] @ k[0, 0, ids].T) / math.sqrt(D), dim=-1)
        diff = ((w @ rows[:, D:]) - (w_host @ v[0, 0, ids])).abs().max().item()
        stats.max_output_diff = max(stats.max_output_diff, diff)
    return stats


# ----------------------------------------------------------------------------------------------
# 6. Timing: mask + sparse attention against dense attention
# ----------------------------------------------------------------------------------------------
def time_vs_length(lengths, cfg: HipConfig = TOY, *, H: int = 4, D: int = 64, n_queries: int = 64, reps: int = 3,
                   seed: int = 0) -> dict:
    """CPU seconds on one thread (``attention_kernels.cpu_seconds``) for ``n_queries`` new queries on T keys.

    "dense": ``kernels.attention.cpu`` causal (Numba flash-style, no mask materialised); "mask": the
    pruning (Numba scan + torch glue); "sparse": block-sparse attention over the mask.
    """
    from companion.papers.attention_kernels import cpu_seconds

    out = {"T": list(lengths), "dense": [], "mask": [], "sparse": [], "density": []}
    for T in lengths:
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, H, n, D, generator=gen) for n in (n_queries, T, T))
        m = mask(q, k, cfg)
        out["dense"].append(cpu_seconds(lambda: dense_attention.cpu(q, k, v, mask="causal"), reps))  # noqa: B023
        out["mask"].append(cpu_seconds(lambda: mask(q, k, cfg), reps))  # noqa: B023
        out["sparse"].append(cpu_seconds(lambda: sparse_output(m, q, k, v), reps))  # noqa: B023
        out["density"].append(density(m, n_queries, T))
    return out


# ----------------------------------------------------------------------------------------------
# 7. Figures (pure functions of precomputed results; the explorer calls explorer_figure)
# ----------------------------------------------------------------------------------------------
BLOCK_KINDS = ("not read", "sink", "selected by pruning", "window")
KIND_COLOURS = ("#f4f4f4", "#2ca02c", "#d62728", "#1f77b4")


def block_kinds(m: HipMask, cfg: HipConfig, S: int, *, batch: int = 0, head: int = 0) -> np.ndarray:
    """(n_fqb, n_kb) int: 0 not read, 1 sink, 2 selected by the pruning, 3 window (for the mask picture)."""
    bs = m.block_size
    n_fqb, n_kb = m.block_index.shape[2], -(-S // bs)
    kinds = np.zeros((n_fqb, n_kb), dtype=np.int64)
    index = m.block_index[batch, head].numpy()
    for f in range(n_fqb):
        ids = index[f][index[f] >= 0]
        kinds[f, ids] = 2
        start = int(m.window_start[(f * bs) // m.block_q]) // bs
        kinds[f, ids[ids >= start]] = 3
        kinds[f, ids[ids * bs < cfg.n_sink]] = 1
    return kinds


def _span_shapes(fig, problem: NeedleProblem, head: int, *, row=None, col=None, unit: int = 1):
    for s0 in problem.spans[head].tolist():
        fig.add_vrect(x0=s0 / unit, x1=(s0 + problem.span_len) / unit, fillcolor="#ff7f0e", opacity=0.25,
                      line_width=0, row=row, col=col)


def mask_heatmap(fig, m: HipMask, cfg: HipConfig, S: int, *, head: int = 0, row=None, col=None):
    """Add the mask picture (query blocks x key positions, coloured by why a block is read) to ``fig``."""
    kinds = block_kinds(m, cfg, S, head=head)
    scale = [[i / 4, c] for i, c in enumerate(KIND_COLOURS) for i in (i, i + 1)]
    fig.add_heatmap(z=kinds, x=(np.arange(kinds.shape[1]) * m.block_size).tolist(), zmin=-0.5, zmax=3.5,
                    colorscale=[[v / 4, c] for v, c in scale], showscale=False,
                    hovertemplate="key block at %{x}<br>query block %{y}<extra></extra>", row=row, col=col)


def mask_figure(problem: NeedleProblem, m: HipMask, cfg: HipConfig, *, head: int = 0):
    """Which key blocks each query block reads; the planted spans are shaded orange."""
    from companion import viz

    fig = viz.figure(f"The final mask of head {head}: sink (green), pruning's choice (red), window (blue); "
                     "planted spans shaded", "key position", "query block (last queries)", height=360)
    mask_heatmap(fig, m, cfg, problem.T, head=head)
    _span_shapes(fig, problem, head)
    return fig


def stages_figure(problem: NeedleProblem, m: HipMask, *, head: int = 0, query_block: int = -1):
    """One row per stage: the score of every chunk (kept ones red) along the key axis, spans shaded."""
    from companion import viz

    n = len(m.stages)
    titles = [f"stage {i + 1}: chunks of {log.stage.chunk_size}, keep {log.stage.keep} keys"
              for i, log in enumerate(m.stages)]
    fig = viz.subplots(n, 1, titles=titles, height=190 * n + 60, shared_xaxes=True, vertical_spacing=0.08)
    qb = query_block % m.stages[0].left.shape[2]
    for i, log in enumerate(m.stages):
        left, right, score = log.left[0, head, qb], log.right[0, head, qb], log.score[0, head, qb]
        active = right > left
        nxt_left = m.stages[i + 1].left[0, head, qb] if i + 1 < n else m.left[0, head, qb]
        kept = torch.isin(left, nxt_left) & active
        for flag, colour, name in ((~kept & active, viz.PALETTE["baseline"], "dropped"),
                                   (kept, viz.PALETTE["ours"], "kept")):
            fig.add_scatter(x=left[flag].numpy(), y=score[flag].numpy(), mode="markers", name=name,
                            marker=dict(color=colour, size=5), showlegend=i == 0, row=i + 1, col=1)
        _span_shapes(fig, problem, head, row=i + 1, col=1)
        fig.update_yaxes(title_text="chunk score", row=i + 1, col=1)
    fig.update_xaxes(title_text="key position (chunk start)", row=n, col=1)
    fig.update_layout(title=f"Hierarchical pruning, head {head}, last query block: each stage keeps the best chunks")
    return fig


def sweep_figure(rows: list[dict], *, recall_target: float = 0.9, error_target: float = 0.05,
                 density_target: float = 0.08):
    """Recall and output error against density, one line per chunk set, points = budget scales."""
    from companion import viz

    fig = viz.subplots(1, 2, titles=("recall of the exact top-128 keys", "relative output error"), height=420)
    for i, chunks in enumerate(dict.fromkeys(r["chunks"] for r in rows)):
        sel = [r for r in rows if r["chunks"] == chunks]
        colour = viz.SEQUENCE[i % len(viz.SEQUENCE)]
        for col, key in ((1, "recall"), (2, "error")):
            fig.add_scatter(x=[100 * r["density"] for r in sel], y=[r[key] for r in sel], mode="lines+markers",
                            name="chunks " + " → ".join(map(str, chunks)), legendgroup=str(chunks),
                            showlegend=col == 1, line=dict(color=colour),
                            text=[f"k = {'/'.join(map(str, r['k']))}" for r in sel],
                            hovertemplate="%{text}<br>density %{x:.2f}%<br>%{y:.3f}<extra></extra>", row=1, col=col)
    fig.add_hline(y=recall_target, line_dash="dot", row=1, col=1)
    fig.add_hline(y=error_target, line_dash="dot", row=1, col=2)
    for col in (1, 2):
        fig.add_vline(x=100 * density_target, line_dash="dot", line_color="#999", row=1, col=col)
        fig.update_xaxes(title_text="density (% of the causal score matrix read)", type="log", row=1, col=col)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="Stage settings: more budget buys recall and accuracy at the price of density")
    return fig


def time_figure(timing: dict):
    """CPU time per call against T: dense causal attention vs pruning + block-sparse attention."""
    from companion import viz

    T = timing["T"]
    total = [a + b for a, b in zip(timing["mask"], timing["sparse"])]
    fig = viz.figure("64 new queries on T cached keys: CPU ms per call (one thread)", "T (keys)", "CPU ms")
    fig.add_scatter(x=T, y=[1e3 * t for t in timing["dense"]], mode="lines+markers", name="dense causal attention",
                    line=dict(color=viz.PALETTE["baseline"]))
    fig.add_scatter(x=T, y=[1e3 * t for t in total], mode="lines+markers", name="InfiniteHiP: mask + sparse attention",
                    line=dict(color=viz.PALETTE["ours"]),
                    text=[f"{d / s:.1f}x faster" for d, s in zip(timing["dense"], total)],
                    hovertemplate="%{y:.2f} ms (%{text})<extra></extra>")
    fig.add_scatter(x=T, y=[1e3 * t for t in timing["mask"]], mode="lines+markers", name="of which: the mask",
                    line=dict(color=viz.PALETTE["ours"], dash="dot"))
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


def passkey_figure(table: dict, *, train_length: int):
    """Passkey accuracy against the input length, one line per attention method."""
    from companion import viz

    fig = viz.figure("Passkey retrieval past the training length", "input length (tokens)", "accuracy (whole key)")
    colours = {"naive": viz.PALETTE["baseline"], "streaming": viz.PALETTE["accent"],
               "hip (true positions)": viz.PALETTE["purple"], "infinitehip": viz.PALETTE["ours"]}
    for method in [m for m in METHODS if m in table]:
        fig.add_scatter(x=table["length"], y=table[method], mode="lines+markers", name=METHOD_LABELS[method],
                        line=dict(color=colours[method]))
    fig.add_vline(x=train_length, line_dash="dot", annotation_text="training length")
    fig.update_xaxes(type="log")
    fig.update_yaxes(range=[-0.05, 1.05])
    return fig


def bank_figure(stats: dict[str, DecodeStats]):
    """Cumulative hit ratio of the mask bank and the SA bank over the decoding steps, per refresh setting."""
    from companion import viz

    fig = viz.subplots(1, 2, titles=("mask bank (keys read by the pruning)", "SA bank (keys and values attended)"),
                       height=380)
    for i, (name, s) in enumerate(stats.items()):
        colour = viz.SEQUENCE[i % len(viz.SEQUENCE)]
        for col, (hits, acc) in enumerate(((s.mask_hits, s.mask_accesses), (s.sa_hits, s.sa_accesses)), start=1):
            ratio = np.cumsum(hits) / np.maximum(1, np.cumsum(acc))
            fig.add_scatter(x=np.arange(1, len(hits) + 1), y=ratio, mode="lines", name=name, legendgroup=name,
                            showlegend=col == 1, line=dict(color=colour), row=1, col=col)
            fig.update_xaxes(title_text="decoding step", row=1, col=col)
    fig.update_yaxes(title_text="cumulative hit ratio", range=[0, 1.02])
    fig.update_layout(title="Offloaded KV cache: how often the device bank already holds the token")
    return fig


@dataclass
class ExplorerData:
    """What the explorer precomputes once: the problem, its dense output and the base configuration."""

    problem: NeedleProblem
    dense_out: torch.Tensor
    base: HipConfig


def explorer_data(problem: NeedleProblem, base: HipConfig = TOY) -> ExplorerData:
    return ExplorerData(problem, dense_attention.cpu(problem.q, problem.k, problem.v, mask="causal"), base)


def explorer_config(base: HipConfig, *, chunk: int, k1: int, k2: int, k3: int, n_sink: int, window: int) -> HipConfig:
    """Stage chunks (chunk, chunk/4, chunk/16) with k rounded to whole chunks and never growing."""
    chunks = (chunk, max(1, chunk // 4), max(1, chunk // 16))
    ks, prev = [], None
    for c, k in zip(chunks, (k1, k2, k3)):
        k = max(c, (k // c) * c)
        if prev is not None:
            k = min(k, prev)
        ks.append(k)
        prev = k
    return base.with_(stages=tuple(zip(chunks, ks)), n_sink=n_sink, window=window, refresh=None)


def explorer_figure(data: ExplorerData, *, chunk: int = 64, k1: int = 2048, k2: int = 512, k3: int = 128,
                    n_sink: int = 16, window: int = 64, head: int = 0):
    """The mask of these stage settings (left) and its recall, output error and density (right)."""
    from companion import viz

    cfg = explorer_config(data.base, chunk=chunk, k1=k1, k2=k2, k3=k3, n_sink=n_sink, window=window)
    r = evaluate(data.problem, cfg, dense_out=data.dense_out)
    stages = " → ".join(f"{s.chunk_size}:{s.keep}" for s in cfg.stages)
    fig = viz.subplots(1, 2, titles=(f"mask of head {head} (stages chunk:keep {stages})",
                                     "against the exact dense attention"), height=420, column_widths=[0.7, 0.3])
    mask_heatmap(fig, r.mask, cfg, data.problem.T, head=head, row=1, col=1)
    _span_shapes(fig, data.problem, head, row=1, col=1)
    names = ["recall of top-128", "output error", "density"]
    values = [r.recall, r.error, r.density]
    fig.add_bar(x=names, y=values, text=[f"{x:.3f}" for x in values], showlegend=False, row=1, col=2,
                marker_color=[viz.PALETTE["good"], viz.PALETTE["ours"], viz.PALETTE["paper"]])
    fig.update_xaxes(title_text="key position", row=1, col=1)
    fig.update_yaxes(title_text="query block", row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], row=1, col=2)
    return fig


def attention_profile_figure(problem: NeedleProblem, *, head: int = 0):
    """The dense attention weights of the last query over all keys (log scale), planted spans shaded."""
    from companion import viz

    p = problem
    s = (p.q[0, head, -1] @ p.k[0, head].T) / math.sqrt(p.q.shape[-1])
    w = torch.softmax(s.double(), dim=-1).numpy()
    fig = viz.figure(f"Dense attention of the last query (head {head}): {100 * span_share(p, w, head):.1f}% "
                     "of the weight sits on the 8 planted spans", "key position", "attention weight (log)", height=340)
    fig.add_scatter(x=np.arange(p.T), y=w, mode="markers", marker=dict(size=3, color=viz.PALETTE["paper"]),
                    name="attention weight")
    _span_shapes(fig, p, head)
    fig.update_yaxes(type="log")
    return fig


def span_share(problem: NeedleProblem, weights: np.ndarray, head: int) -> float:
    """Share of ``weights`` (T,) that falls on the planted spans of ``head``."""
    inside = np.zeros(problem.T, dtype=bool)
    for s0 in problem.spans[head].tolist():
        inside[s0:s0 + problem.span_len] = True
    return float(weights[inside].sum() / weights.sum())


def scan_backends_agree(*, seed: int = 0) -> dict[str, float]:
    """Max |score − reference| of the CPU and CUDA stage scans (float64), and whether every integer
    output (where the descent ended, keys read) is identical. CUDA runs small (the simulator is slow)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, scan, (T, S, C) in (("cpu", hip_mask.scan_stage_cpu, (200, 3000, 40)),
                                  ("cuda", hip_mask.scan_stage_cuda, (24, 300, 6))):
        q = torch.randn(1, 2, T, 16, generator=gen, dtype=torch.float64)
        k = torch.randn(1, 1, S, 16, generator=gen, dtype=torch.float64)
        n_qb = -(-T // 16)
        length = torch.randint(0, 65, (1, 2, n_qb, C), generator=gen)
        left = (torch.rand(1, 2, n_qb, C, generator=gen) * (S - length)).long()
        angle = torch.arange(C, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2) / 16)
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        want = hip_mask.scan_stage_reference(q, k, left, left + length, rows=16, key_cos=cos, key_sin=sin)
        got = scan(q, k, left, left + length, rows=16, key_cos=cos, key_sin=sin)
        fin = torch.isfinite(want.score)
        out[name] = float((got.score[fin] - want.score[fin]).abs().max())
        out[name + " integers equal"] = bool(torch.equal(got.best, want.best) and torch.equal(got.reads, want.reads))
    return out
