"""A tiny decoder-only language model: pre-norm, RoPE, grouped-query attention.

Read it top to bottom; it is meant to take fifteen minutes. The pieces:

* ``ModelConfig``: sizes. ``n_kv_heads`` makes the same model MHA (= n_heads), GQA (a divisor of
  n_heads) or MQA (= 1).
* ``rope_cos_sin`` / ``apply_rope``: rotary position embedding in the "rotate_half" convention
  (frequency i rotates the pair of dims (i, i + d/2)), with optional per-frequency scale factors
  λ_i, a start position n̂ and a temperature, which is all PI, NTK, YaRN and LongRoPE need.
* ``Attention``: causal grouped-query attention. **The hook:** ``TinyLM(cfg, attention=factory)``
  builds every layer's attention with ``factory(cfg, layer_index)`` instead, so a paper can swap in
  MLA, linear, cross-layer or sparse attention. Any module with ``forward(x, cos, sin) -> y`` fits.
* ``Block`` = x + attn(norm(x)), then x + mlp(norm(x)).
* ``TinyLM.forward(idx, targets)`` returns logits, the loss and, on request, every hidden state.

Shapes: B batch, T time, D model width, H query heads, K kv heads, d head dim, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (MHA); 1 -> MQA; a divisor of n_heads -> GQA
    d_ff: int | None = None  # None -> 4 * d_model
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 0 and math.isfinite(self.rope_base)):
            raise ValueError(f"rope_base must be a finite number > 0, got {self.rope_base!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    base: float = 10000.0,
    *,
    factors: torch.Tensor | None = None,
    start: int = 0,
    mscale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each ``(T, head_dim)``, for integer ``positions (T,)``.

    Frequency i (of head_dim/2) is θ_i = base^(-2i/head_dim). With ``factors`` λ (head_dim/2,),
    positions ≥ ``start`` use θ_i/λ_i (positions < start keep θ_i, LongRoPE's n̂). ``mscale``
    multiplies both tables (an attention temperature: logits scale by mscale²).
    """
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=positions.device) * 2 / head_dim)
    pos = positions.to(torch.float64)[:, None]  # (T, 1)
    angles = pos * inv_freq  # (T, half)
    if factors is not None:
        if factors.shape != (half,):
            raise ValueError(f"factors must have shape ({half},), got {tuple(factors.shape)}")
        scaled = pos * (inv_freq / factors.to(torch.float64).to(positions.device))
        angles = torch.where(pos >= start, scaled, angles)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim): pair (i, i + half) shares θ_i
    return (angles.cos() * mscale).to(dtype), (angles.sin() * mscale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last axis (the 90° rotation of each (i, i + d/2) pair)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., T, d)`` by position: x·cos + rotate_half(x)·sin."""
    return x * cos + rotate_half(x) * sin


class Rotary(nn.Module):
    """Holds the RoPE settings of a model; papers rescale it with ``set_scaling``.

    The scaling is plain attributes, not buffers: it is not part of ``state_dict`` (a checkpoint
    or zoo model always loads with plain RoPE; set the scaling again after loading)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.factors: torch.Tensor | None = None
        self.start, self.mscale = 0, 1.0

    def set_scaling(self, factors: torch.Tensor | None = None, start: int = 0, mscale: float = 1.0) -> None:
        """Per-frequency factors λ (head_dim/2,), ≥ 1 to interpolate; None restores plain RoPE."""
        if factors is not None:
            factors = torch.as_tensor(factors, dtype=torch.float64)
            if factors.shape != (self.head_dim // 2,) or not bool((factors > 0).all() & factors.isfinite().all()):
                raise ValueError(f"factors must be {self.head_dim // 2} finite positive numbers, got {factors}")
        if not (start >= 0 and mscale > 0 and math.isfinite(mscale)):
            raise ValueError(f"need start >= 0 and mscale > 0, got start={start}, mscale={mscale}")
        self.factors, self.start, self.mscale = factors, start, mscale

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(positions, self.head_dim, self.base, factors=self.factors, start=self.start,
                            mscale=self.mscale, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The transformer
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Attention(nn.Module):
    """Causal grouped-query attention: H query heads share K key/value heads in groups of H/K."""

    def __init__(self, cfg: ModelConfig, layer_index: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), cos/sin: (T, d) -> (B, T, D)."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.k_proj(x), "b t (k d) -> b k t d", k=self.n_kv_heads)
        v = rearrange(self.v_proj(x), "b t (k d) -> b k t d", k=self.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: nn.Module):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = attention
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LMOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # mean cross-entropy over targets != -100
    hidden: list[torch.Tensor] | None  # n_layers + 1 residual streams, each (B, T, D); last is pre-norm


AttentionFactory = Callable[[ModelConfig, int], nn.Module]


class TinyLM(nn.Module):
    """The model. Note: every nn.Linear and nn.Embedding, including those inside a custom
    attention module built by ``attention``, gets the GPT-2 init here; load or set custom weights
    after construction."""

    def __init__(self, cfg: ModelConfig, attention: AttentionFactory | None = None):
        super().__init__()
        self.cfg = cfg
        make_attention = attention or Attention
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, make_attention(cfg, i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink the residual-branch outputs
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> LMOutput:
        """idx: (B, T) token ids; targets: (B, T) or None; positions: (T,) default 0..T-1."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        elif positions.shape != (T,):
            raise ValueError(f"positions must have shape ({T},), got {tuple(positions.shape)}")

        x = self.embed(idx)
        cos, sin = self.rotary(positions, x.dtype)
        hidden = [x] if return_hidden else None
        for block in self.blocks:
            x = block(x, cos, sin)
            if hidden is not None:
                hidden.append(x)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return LMOutput(logits, loss, hidden)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 generator: torch.Generator | None = None, stop_token: int | None = None) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens to ``idx (B, T)``; greedy when temperature == 0.

        No KV cache: recomputing the prefix is fine at this size and keeps the model simple.
        """
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        for _ in range(max_new_tokens):
            logits = self(idx).logits[:, -1, :]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if stop_token is not None and bool((nxt == stop_token).all()):
                break
        return idx

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        return n - self.embed.weight.numel() if exclude_embedding else n
