"""TransMLA: "Multi-head Latent Attention Is All You Need" (Meng et al., arXiv 2502.07864).

Convert a trained GQA model into DeepSeek-style Multi-head Latent Attention (MLA), one inspectable
step at a time, then compress its KV cache. Shapes: B batch, T time, D model width, H query heads,
K kv heads, d head dim, D_L = K·d the latent width, r the RoPE dims kept, R = r_kv the latent rank.

0. :func:`to_latent`, exact. GQA's ``k_proj``/``v_proj`` already map x to a D_L-dim latent; head h
   reads kv head h // (H/K), which is an up-projection W_up,h ∈ R^{d×D_L} made of identity blocks.
   Absorb it into the query, q̃_h = W_up,hᵀ q_h, and every head attends over the *same* latent key.
1. :func:`rorope`, exact when ``freqfold=1`` and RoPE stays on every dim. Per RoPE frequency, one
   orthogonal U (a PCA of the keys over the K heads, shared by the real and imaginary parts)
   commutes with the position rotation, so it can be folded into ``k_proj`` and ``k_up``. It packs
   the key energy into the first "chunk" of r dims. FreqFold PCAs ``freqfold`` adjacent frequencies
   together (more concentration, but those frequencies are then treated as equal: approximate).
2. :func:`partial_rope`, the approximation: keep RoPE on the first r latent dims only.
3. :func:`balance_kv`, exact: rescale the position-free keys against the values before the PCA.
4. :func:`low_rank_kv`: a joint PCA of [K_nope, V] to rank r_kv gives DeepSeek's ``kv_a_proj_with_mqa``
   (x -> [c_kv (r_kv) | k_pe (r)]) and ``kv_b_proj`` (c_kv -> per head [k_nope (d) | v (d)]).
5. :func:`recovery_finetune`: train the converted model briefly.

Official code read for details (github.com/fxmeng/TransMLA): ``transmla/partial_rope.py``
(``__insert_kv_up_proj__``, ``joint_complex_pca``, ``rotate_k_proj``: which components go to which
frequency, ``cos[..., ::collapse]``), ``transmla/lora_qkv.py`` (BKV ratio from mean column norms,
the [K_nope, V] PCA, q_rope = k_up_ropeᵀ q, softmax scale d^-1/2) and ``transmla/converter.py``
(defaults: kv_lora_rank 512, qk_mqa_dim 64, balance ratio 1; calibration 128 x 256 tokens).

**Layout note.** ``companion.model`` uses the rotate-half RoPE layout (frequency i rotates dims
(i, i + d/2)), as HF LLaMA does, so the "real" part of frequency i is dim i and the "imaginary"
part is dim i + d/2 of each head. The converted latent key keeps that layout per *chunk* of r dims:
chunk m's pair p is dims (p, p + r/2), rotated at frequency ``layout.freq[m, p]``.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from companion import zoo
from companion.model import Attention, ModelConfig, TinyLM, apply_rope

SMOKE_MODEL, FULL_MODEL = "transmla-gqa-smoke", "stories-gqa"


# ----------------------------------------------------------------------------------------------
# The GQA models we convert
# ----------------------------------------------------------------------------------------------
def _gqa_skeleton() -> TinyLM:
    from companion.tokenizer import stories_tokenizer

    vocab = stories_tokenizer(512).vocab_size
    return TinyLM(ModelConfig(vocab_size=vocab, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2))


@zoo.register(SMOKE_MODEL, version="1", skeleton=_gqa_skeleton,
              description="stories-gqa's architecture, trained briefly (a cheap stand-in for smoke runs)")
def _fit_smoke_gqa(model: nn.Module) -> dict:
    from companion.data import lm_batches, stories
    from companion.tokenizer import stories_tokenizer
    from companion.train import train

    tokens = stories_tokenizer(512).encode_corpus(stories(1000, seed=1))
    hist = train(model, lm_batches(tokens, 16, 64, seed=0), steps=120, lr=3e-3, desc=SMOKE_MODEL)
    return {"train_loss": hist.loss[-1], "steps": 120, "tokenizer": "stories_tokenizer(512)"}


def load_gqa(smoke: bool) -> TinyLM:
    """The GQA model to convert: ``stories-gqa`` (full) or its cheap stand-in (smoke)."""
    return zoo.load(SMOKE_MODEL if smoke else FULL_MODEL)


STORY_SEEDS = {"train": 1, "calibration": 5, "test": 3}  # the zoo trains on seed 1 and validates on seed 2


def story_windows(split: str, n_windows: int, seq_len: int = 128) -> torch.Tensor:
    """``(n_windows, seq_len + 1)`` token windows of generated stories (inputs and shifted targets).

    ``split`` picks the story seed: "calibration" and "test" are stories the model never saw.
    """
    from companion.data import lm_batches, stories
    from companion.tokenizer import stories_tokenizer

    if split not in STORY_SEEDS:
        raise ValueError(f"split must be one of {sorted(STORY_SEEDS)}, got {split!r}")
    n_stories = max(50, n_windows * seq_len // 50)  # a story is ~60 tokens
    tokens = stories_tokenizer(512).encode_corpus(stories(n_stories, seed=STORY_SEEDS[split]))
    x, y = lm_batches(tokens, n_windows, seq_len, seed=STORY_SEEDS[split])(0)
    return torch.cat([x, y[:, -1:]], dim=1)


# ----------------------------------------------------------------------------------------------
# Where RoPE acts inside a latent key
# ----------------------------------------------------------------------------------------------
@dataclass
class RopeLayout:
    """A latent of ``n_chunks · chunk_dim`` dims, rotate-half layout inside each chunk.

    Pair p of chunk m is dims (p, p + chunk_dim/2) of that chunk and turns at the model's
    frequency ``freq[m, p]`` (an index into its θ table). Only the first ``rope_chunks`` chunks are
    rotated by position; the rest are position-free ("NoPE").
    """

    chunk_dim: int
    freq: torch.Tensor  # (n_chunks, chunk_dim // 2) int64
    rope_chunks: int

    @property
    def n_chunks(self) -> int:
        return self.freq.shape[0]

    @property
    def rope_dim(self) -> int:
        return self.rope_chunks * self.chunk_dim

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``rope_dim`` dims of ``x (..., T, ≥rope_dim)``; ``cos/sin (T, d)`` are the model's."""
        n = self.rope_dim
        if n == 0:
            return x
        idx = self.freq[:self.rope_chunks].to(cos.device)  # (rope_chunks, chunk_dim/2)
        half = cos.shape[-1] // 2
        c, s = cos[:, :half][:, idx], sin[:, :half][:, idx]  # (T, rope_chunks, chunk_dim/2)
        c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)
        rotated = apply_rope(x[..., :n].unflatten(-1, (self.rope_chunks, self.chunk_dim)), c, s)
        return torch.cat([rotated.flatten(-2), x[..., n:]], dim=-1)

    def kept(self, rope_chunks: int) -> RopeLayout:
        return RopeLayout(self.chunk_dim, self.freq.clone(), rope_chunks)


def gqa_layout(n_kv_heads: int, head_dim: int) -> RopeLayout:
    """The latent of a GQA model: one chunk per kv head, pair p at frequency p, RoPE everywhere."""
    freq = torch.arange(head_dim // 2).repeat(n_kv_heads, 1)
    return RopeLayout(head_dim, freq, n_kv_heads)


# ----------------------------------------------------------------------------------------------
# Step 0: GQA -> latent MHA (exact)
# ----------------------------------------------------------------------------------------------
class LatentAttention(nn.Module):
    """MHA over one shared latent key and value: the form steps 0-3 work on.

    score_h(t, s) = RoPE(q̃_h,t) · RoPE(c_k,s) / √d with q̃_h = W_up,hᵀ q_h (the absorbed query,
    D_L dims), c_k = ``k_proj(x)`` and values v_h = W_vup,h ``v_proj(x)``. ``k_up, v_up: (H, d, D_L)``.
    """

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                 k_up: torch.Tensor, v_up: torch.Tensor, layout: RopeLayout):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.k_up, self.v_up = nn.Parameter(k_up), nn.Parameter(v_up)
        self.layout = layout
        self.n_heads, self.head_dim, self.latent_dim = k_up.shape

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        q_lat = torch.einsum("bhtd,hdl->bhtl", q, self.k_up)  # (B, H, T, D_L)
        c_k = self.k_proj(x)[:, None]  # (B, 1, T, D_L): one key for every head
        q_lat, c_k = self.layout.apply(q_lat, cos, sin), self.layout.apply(c_k, cos, sin)
        v = torch.einsum("btl,hdl->bhtd", self.v_proj(x), self.v_up)
        y = F.scaled_dot_product_attention(q_lat, c_k.expand_as(q_lat), v, is_causal=True,
                                           scale=self.head_dim ** -0.5)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


def _copy_linear(w: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype, device=w.device)
    layer.weight.data.copy_(w)
    return layer


def check_gqa(attn: nn.Module) -> tuple[int, int, int]:
    """(H, K, d) of a GQA attention module, or a ValueError saying what is missing."""
    if not isinstance(attn, Attention):
        raise ValueError(f"attn must be a GQA companion.model.Attention (q/k/v/o projections), got "
                         f"{type(attn).__name__}; a model without GQA structure cannot be converted")
    H, K, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    for name, want in (("q_proj", H * d), ("k_proj", K * d), ("v_proj", K * d)):
        layer = getattr(attn, name)
        if layer.bias is not None or layer.weight.shape[0] != want:
            raise ValueError(f"attn.{name} must be a bias-free Linear with {want} outputs, got "
                             f"{tuple(layer.weight.shape)} (bias={layer.bias is not None})")
    return H, K, d


def replicated_up_projection(n_heads: int, n_kv_heads: int, head_dim: int, **like) -> torch.Tensor:
    """W_up ``(H, d, K·d)``: head h's block is the identity on kv head h // (H/K), zeros elsewhere."""
    eye = torch.eye(n_kv_heads * head_dim, **like).reshape(n_kv_heads, head_dim, n_kv_heads * head_dim)
    return eye.repeat_interleave(n_heads // n_kv_heads, dim=0).clone()


def to_latent(attn: Attention) -> LatentAttention:
    """Step 0: rewrite one GQA layer as latent MHA, exactly (same weights, up-projections inserted)."""
    H, K, d = check_gqa(attn)
    w = attn.k_proj.weight
    up = replicated_up_projection(H, K, d, dtype=w.dtype, device=w.device)
    return LatentAttention(_copy_linear(attn.q_proj.weight), _copy_linear(attn.k_proj.weight),
                           _copy_linear(attn.v_proj.weight), _copy_linear(attn.o_proj.weight), up, up.clone(),
                           gqa_layout(K, d))


# ----------------------------------------------------------------------------------------------
# Step 1: RoRoPE (+ FreqFold)
# ----------------------------------------------------------------------------------------------
def check_rope_split(head_dim: int, freqfold: int, rope_dim: int) -> int:
    """Validate (freqfold, rope_dim) for a head of ``head_dim``; return collapse = head_dim / rope_dim."""
    if not (isinstance(rope_dim, int) and rope_dim >= 2 and rope_dim % 2 == 0 and head_dim % rope_dim == 0):
        raise ValueError(f"rope_dim must be an even divisor of head_dim={head_dim}, got {rope_dim!r}")
    collapse = head_dim // rope_dim
    if not (isinstance(freqfold, int) and freqfold >= 1 and (head_dim // 2) % freqfold == 0
            and freqfold % collapse == 0):
        raise ValueError(f"freqfold must divide head_dim/2={head_dim // 2} and be a multiple of "
                         f"collapse=head_dim/rope_dim={collapse}, got {freqfold!r}")
    return collapse


def joint_complex_pca(keys: torch.Tensor, n_kv_heads: int, head_dim: int, freqfold: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One PCA per group of ``freqfold`` adjacent frequencies, real and imaginary parts pooled.

    ``keys (N, K·d)`` are pre-RoPE latent keys. For group a, each token gives two vectors of
    length K·freqfold (its real parts, then its imaginary parts, over kv heads j and frequencies
    a·freqfold + b, ordered (j, b)); M_a = Σ (re reᵀ + im imᵀ). A common phase e^{iφ} leaves M_a
    unchanged, which is why one U_a may act on both parts. Returns eigenvalues ``(G, K·ff)``
    (descending) and eigenvectors ``(G, K·ff, K·ff)`` (columns), G = d/2/freqfold, in fp64.
    (The official code adds 0.01·mean(diag) to M_a first; that shifts eigenvalues, not eigenvectors.)
    """
    n, half = keys.shape[0], head_dim // 2
    z = keys.double().reshape(n, n_kv_heads, 2, half // freqfold, freqfold)  # (N, j, re/im, a, b)
    z = z.permute(3, 0, 2, 1, 4).reshape(half // freqfold, 2 * n, n_kv_heads * freqfold)
    evals, evecs = torch.linalg.eigh(z.mT @ z)
    order = evals.argsort(dim=-1, descending=True)
    return evals.gather(-1, order), evecs.gather(-1, order[:, None, :].expand_as(evecs))


def rorope_rotation(evecs: torch.Tensor, n_kv_heads: int, head_dim: int, freqfold: int, rope_dim: int
                    ) -> tuple[torch.Tensor, RopeLayout]:
    """The orthogonal ``R (D_L, D_L)`` with c_new = R c, and the new latent's :class:`RopeLayout`.

    New layout: chunks of ``rope_dim``. Group a has ``slots = freqfold/collapse`` pairs in every
    chunk; its k-th principal component (by energy) goes to chunk k // slots, pair
    a·slots + k % slots, which turns at frequency pair·collapse (official: ``cos[..., ::collapse]``).
    So chunk 0 collects the top components of every group. Real parts map to real parts, imaginary
    to imaginary, with the same U.
    """
    collapse = check_rope_split(head_dim, freqfold, rope_dim)
    half, slots, chunk_half = head_dim // 2, freqfold // collapse, rope_dim // 2
    latent = n_kv_heads * head_dim
    R = torch.zeros(latent, latent, dtype=torch.float64)
    for a in range(half // freqfold):
        for k in range(n_kv_heads * freqfold):
            m, p = k // slots, a * slots + k % slots
            for part in (0, 1):  # 0 = real (first half), 1 = imaginary (second half)
                new = m * rope_dim + part * chunk_half + p
                for j in range(n_kv_heads):
                    old = j * head_dim + part * half + a * freqfold + torch.arange(freqfold)
                    R[new, old] = evecs[a, j * freqfold:(j + 1) * freqfold, k]
    freq = (torch.arange(chunk_half) * collapse).repeat(latent // rope_dim, 1)
    return R, RopeLayout(rope_dim, freq, latent // rope_dim)


def rorope(attn: LatentAttention, keys: torch.Tensor, *, freqfold: int, rope_dim: int | None = None
           ) -> tuple[LatentAttention, dict]:
    """Step 1: rotate the latent key so chunk 0 holds most energy. RoPE stays on every chunk.

    ``keys (N, D_L)`` are this layer's pre-RoPE latent keys on calibration text. Exact when
    ``freqfold == 1`` and ``rope_dim == head_dim``. Returns the new layer and stats (energies).
    """
    if attn.layout.n_chunks * attn.layout.chunk_dim != attn.latent_dim or attn.layout.chunk_dim != attn.head_dim:
        raise ValueError("rorope expects a freshly converted layer (to_latent), one chunk per kv head")
    K, d = attn.latent_dim // attn.head_dim, attn.head_dim
    rope_dim = d if rope_dim is None else rope_dim
    check_rope_split(d, freqfold, rope_dim)
    evals, evecs = joint_complex_pca(keys, K, d, freqfold)
    R, layout = rorope_rotation(evecs, K, d, freqfold, rope_dim)
    R = R.to(attn.k_proj.weight)
    new = copy.deepcopy(attn)
    new.k_proj.weight.data = R @ attn.k_proj.weight.data
    new.k_up.data = attn.k_up.data @ R.T  # q̃ -> R q̃, so q̃ᵀc is unchanged
    new.layout = layout
    before, after = energy_per_dim(keys), energy_per_dim(keys.to(R) @ R.T)
    return new, {"energy_before": before, "energy_after": after, "eigenvalues": evals,
                 "kept_fraction": float(after[:rope_dim].sum() / after.sum())}


def energy_per_dim(keys: torch.Tensor) -> torch.Tensor:
    """Mean square of each latent dim over tokens: ``keys (N, D_L) -> (D_L,)`` (fp64)."""
    return keys.double().pow(2).mean(dim=0)


# ----------------------------------------------------------------------------------------------
# Steps 2 and 3: partial RoPE, BKV
# ----------------------------------------------------------------------------------------------
def partial_rope(attn: LatentAttention, rope_chunks: int = 1) -> LatentAttention:
    """Step 2: keep RoPE on the first ``rope_chunks`` chunks only (the paper keeps one)."""
    if not 0 <= rope_chunks <= attn.layout.n_chunks:
        raise ValueError(f"rope_chunks must be in [0, {attn.layout.n_chunks}], got {rope_chunks}")
    new = copy.deepcopy(attn)
    new.layout = attn.layout.kept(rope_chunks)
    return new


def balance_kv(attn: LatentAttention, x: torch.Tensor, *, target_ratio: float = 1.0
               ) -> tuple[LatentAttention, float]:
    """Step 3 (BKV): scale K_nope so its mean column norm is ``target_ratio`` × that of V.

    ``x (N, D)`` are the layer's calibration inputs. K_nope is divided by ratio and ``k_up``'s
    matching columns are multiplied by it, so scores are unchanged; only the PCA of step 4 sees
    the change. Returns the new layer and the ratio applied.
    """
    r = attn.layout.rope_dim
    with torch.no_grad():
        k_nope, v = attn.k_proj(x)[:, r:], attn.v_proj(x)
    if k_nope.shape[1] == 0:  # RoPE on every dim: nothing to balance
        return copy.deepcopy(attn), 1.0
    ratio = float(k_nope.norm(dim=0).mean() / (v.norm(dim=0).mean() * target_ratio))
    new = copy.deepcopy(attn)
    new.k_proj.weight.data[r:] /= ratio
    new.k_up.data[..., r:] *= ratio
    return new, ratio


# ----------------------------------------------------------------------------------------------
# Step 4: joint low rank -> DeepSeek MLA
# ----------------------------------------------------------------------------------------------
class MLAAttention(nn.Module):
    """DeepSeek-style MLA (no query LoRA): cache [c_kv (R) | k_pe (r)] per token.

    q_proj: x -> per head [q_nope (d) | q_pe (r)]; kv_a_proj: x -> [c_kv (R) | k_pe (r)];
    kv_b_proj: c_kv -> per head [k_nope (d) | v (d)]. score = (q_nopeᵀk_nope + RoPE(q_pe)ᵀRoPE(k_pe))/√d.
    ``forward`` decompresses (training/prefill); :meth:`decode_last` runs the absorbed kernel.
    """

    def __init__(self, q_proj: nn.Linear, kv_a_proj: nn.Linear, kv_b_proj: nn.Linear, o_proj: nn.Linear,
                 layout: RopeLayout, n_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.kv_a_proj, self.kv_b_proj, self.o_proj = q_proj, kv_a_proj, kv_b_proj, o_proj
        self.layout, self.n_heads, self.head_dim = layout, n_heads, head_dim
        self.rope_dim = layout.rope_dim
        self.kv_rank = kv_a_proj.weight.shape[0] - self.rope_dim

    @property
    def cache_floats_per_token(self) -> int:
        return self.kv_rank + self.rope_dim

    def _queries(self, x, cos, sin):
        q = rearrange(self.q_proj(x), "b t (h e) -> b h t e", h=self.n_heads)
        q_nope, q_pe = q.split([self.head_dim, self.rope_dim], dim=-1)
        return q_nope, self.layout.apply(q_pe, cos, sin)

    def cache(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA stores: ``c_kv (B, T, R)`` and the rotated ``k_pe (B, T, r)``."""
        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return c_kv, self.layout.apply(k_pe, cos, sin)

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK, W_UV, each ``(H, d, R)``, read out of ``kv_b_proj``."""
        w = self.kv_b_proj.weight.reshape(self.n_heads, 2, self.head_dim, self.kv_rank)
        return w[:, 0], w[:, 1]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D), decompressing every cached token (the training path)."""
        B, T, _ = x.shape
        q_nope, q_pe = self._queries(x, cos, sin)
        c_kv, k_pe = self.cache(x, cos, sin)
        kv = rearrange(self.kv_b_proj(c_kv), "b t (h e) -> b h t e", h=self.n_heads)
        k_nope, v = kv.split([self.head_dim, self.head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(B, self.n_heads, T, self.rope_dim)], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim ** -0.5)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))

    @torch.no_grad()
    def decode_last(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "reference"
                    ) -> torch.Tensor:
        """The output at the last position of ``x (B, T, D)``, computed as one absorbed decode step over
        the compressed cache of all T tokens (``kernels.mla_decode``). Returns ``(B, D)``."""
        from kernels import mla_decode

        c_kv, k_pe = self.cache(x, cos, sin)
        q_nope, q_pe = self._queries(x[:, -1:], cos[-1:], sin[-1:])
        w_uk, w_uv = self.up_projections()
        q_lat = mla_decode.absorb_query(q_nope[:, :, 0].contiguous(), w_uk.contiguous())
        o = mla_decode.run(q_lat, q_pe[:, :, 0].contiguous(), c_kv.contiguous(), k_pe.contiguous(),
                           w_uv.contiguous(), scale=self.head_dim ** -0.5, backend=backend)
        return self.o_proj(o.flatten(1))


def kv_pca(attn: LatentAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the calibration [K_nope, V] ``(N, 2·D_L − r)``: eigenvalues (desc) and eigenvectors (fp64)."""
    r = attn.layout.rope_dim
    with torch.no_grad():
        kv = torch.cat([attn.k_proj(x)[:, r:], attn.v_proj(x)], dim=-1).double()
    evals, evecs = torch.linalg.eigh(kv.T @ kv)
    order = evals.argsort(descending=True)
    return evals[order], evecs[:, order]


def max_kv_rank(attn: LatentAttention) -> int:
    return 2 * attn.latent_dim - attn.layout.rope_dim


def low_rank_kv(attn: LatentAttention, x: torch.Tensor, kv_rank: int,
                pca: tuple[torch.Tensor, torch.Tensor] | None = None) -> MLAAttention:
    """Step 4: keep ``kv_rank`` principal directions of [K_nope, V] and build the MLA layer.

    ``x (N, D)`` are calibration inputs (only used when ``pca`` is not given). Exact at
    ``kv_rank = 2·D_L − r``; :class:`ValueError` above it (there is nothing more to keep).
    """
    r, D_L, H, d = attn.layout.rope_dim, attn.latent_dim, attn.n_heads, attn.head_dim
    if not (isinstance(kv_rank, int) and 1 <= kv_rank <= max_kv_rank(attn)):
        raise ValueError(f"kv_rank must be an int in [1, 2·D_L − r = {max_kv_rank(attn)}] (D_L={D_L}, r={r}), "
                         f"got {kv_rank!r}")
    _, evecs = pca if pca is not None else kv_pca(attn, x)
    dtype = attn.k_proj.weight.dtype
    U = evecs[:, :kv_rank].to(dtype)  # (2·D_L − r, R)
    wk, wv, wq = attn.k_proj.weight.data, attn.v_proj.weight.data, attn.q_proj.weight.data
    kv_a = torch.cat([U.T @ torch.cat([wk[r:], wv]), wk[:r]])  # (R + r, D): [c_kv | k_pe]
    k_b = attn.k_up.data[..., r:] @ U[:D_L - r]  # (H, d, R)
    v_b = attn.v_up.data @ U[D_L - r:]  # (H, d, R)
    kv_b = torch.stack([k_b, v_b], dim=1).reshape(H * 2 * d, kv_rank)
    wq_heads = wq.reshape(H, d, -1)
    q_pe = torch.einsum("hdr,hdD->hrD", attn.k_up.data[..., :r], wq_heads)  # q_pe,h = k_up_rope,hᵀ q_h
    q_new = torch.cat([wq_heads, q_pe], dim=1).reshape(H * (d + r), -1)
    layout = RopeLayout(attn.layout.chunk_dim, attn.layout.freq[:attn.layout.rope_chunks].clone(),
                        attn.layout.rope_chunks)
    return MLAAttention(_copy_linear(q_new), _copy_linear(kv_a), _copy_linear(kv_b),
                        _copy_linear(attn.o_proj.weight.data), layout, H, d)


# ----------------------------------------------------------------------------------------------
# Whole-model plumbing
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_inputs(model: TinyLM, windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Each layer's attention input (after its RMSNorm) on ``windows (B, T + 1)``, as a list of
    ``(B·T, D)``, and the model's perplexity on those windows (the same forward pass)."""
    captured: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(0, 1)))
             for b in model.blocks]
    try:
        loss = model(windows[:, :-1], windows[:, 1:]).loss
    finally:
        for h in hooks:
            h.remove()
    return captured, math.exp(loss.item())


def _with_attention(model: TinyLM, layers: list[nn.Module]) -> TinyLM:
    new = copy.deepcopy(model)
    for block, attn in zip(new.blocks, layers):
        block.attn = attn
    return new


def latent_model(model: TinyLM) -> TinyLM:
    """Step 0 on every layer (a copy; ``model`` is untouched)."""
    for i, block in enumerate(model.blocks):
        try:
            check_gqa(block.attn)
        except ValueError as exc:
            raise ValueError(f"model.blocks[{i}]: {exc}") from None
    return _with_attention(model, [to_latent(b.attn) for b in model.blocks])


@dataclass
class Converted:
    """A model after steps 0-3, ready for step 4 at any rank, and what the steps measured."""

    model: TinyLM  # latent MHA with RoRoPE (+ partial RoPE, + BKV)
    calib_inputs: list[torch.Tensor]  # each layer's calibration inputs, re-captured after steps 1-2
    pcas: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: the [K_nope, V] PCA of step 4
    calib_ppl: float  # perplexity of ``model`` on the calibration windows
    rorope_stats: list[dict] = field(default_factory=list)
    bkv_ratios: list[float] = field(default_factory=list)

    @property
    def max_kv_rank(self) -> int:
        return max_kv_rank(self.model.blocks[0].attn)

    def mla(self, kv_rank: int) -> TinyLM:
        """Step 4 at ``kv_rank``: the DeepSeek-format model."""
        return _with_attention(self.model, [low_rank_kv(b.attn, x, kv_rank, p) for b, x, p in
                                            zip(self.model.blocks, self.calib_inputs, self.pcas)])


def convert(model: TinyLM, calib: torch.Tensor, *, freqfold: int = 1, rope_dim: int | None = None,
            partial: bool = True, balance: bool = True, inputs: list[torch.Tensor] | None = None) -> Converted:
    """Steps 0-3 on every layer, calibrated like the official converter, on ``calib (B, T + 1)`` windows.

    The RoRoPE PCA uses keys of the *original* model (pass its ``inputs`` from
    :func:`attention_inputs` to reuse them); BKV and step 4's PCA use inputs re-captured from the
    partial-RoPE model (``partial_rope.py`` then ``lora_qkv.py``). Work in fp64 for exactness.
    """
    lat = latent_model(model)
    if inputs is None:
        inputs, _ = attention_inputs(model, calib)
    stats, layers = [], []
    for block, x in zip(lat.blocks, inputs):
        new, st = rorope(block.attn, block.attn.k_proj(x).detach(), freqfold=freqfold, rope_dim=rope_dim)
        layers.append(partial_rope(new) if partial else new)
        stats.append(st)
    rotated = _with_attention(lat, layers)
    inputs, ppl = attention_inputs(rotated, calib)
    ratios = []
    if balance:
        layers = []
        for block, x in zip(rotated.blocks, inputs):
            new, ratio = balance_kv(block.attn, x)
            layers.append(new)
            ratios.append(ratio)
        rotated = _with_attention(rotated, layers)
    pcas = [kv_pca(b.attn, x) for b, x in zip(rotated.blocks, inputs)]
    return Converted(rotated, inputs, pcas, ppl, stats, ratios)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def logits_and_ppl(model: TinyLM, windows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits ``(B, T, V)`` and perplexity on ``windows (B, T + 1)`` (inputs, then shifted targets)."""
    out = model(windows[:, :-1], windows[:, 1:])
    return out.logits, math.exp(out.loss.item())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖_F / ‖ref‖_F."""
    return ((a - ref).norm() / ref.norm()).item()


@torch.no_grad()
def decode_matches_explicit(model: TinyLM, windows: torch.Tensor, backend: str = "reference") -> float:
    """Max |absorbed decode − explicit decompression| at the last position of every MLA layer's input."""
    worst = 0.0
    cos, sin = model.rotary(torch.arange(windows.shape[1] - 1), model.embed.weight.dtype)
    for block, x in zip(model.blocks, attention_inputs_3d(model, windows)):
        explicit = block.attn(x, cos, sin)[:, -1]
        absorbed = block.attn.decode_last(x, cos, sin, backend=backend)
        worst = max(worst, max_abs_diff(absorbed, explicit))
    return worst


def attention_inputs_3d(model: TinyLM, windows: torch.Tensor) -> list[torch.Tensor]:
    """Like :func:`attention_inputs` but keeping the batch axis: a list of ``(B, T, D)``."""
    return [x.unflatten(0, (windows.shape[0], -1)) for x in attention_inputs(model, windows)[0]]


@dataclass
class Sweep:
    """Logit error and perplexity of the converted model over (freqfold, partial RoPE, BKV, kv rank)."""

    gqa_ppl: float
    latent_dim: int
    n_layers: int
    rows: list[dict] = field(default_factory=list)  # freqfold, partial, balance, kv_rank, cache_floats, ...
    converted: dict[tuple[int, bool, bool], Converted] = field(default_factory=dict)  # (ff, partial, balance)

    @property
    def rorope_stats(self) -> dict[int, list[dict]]:
        """freqfold -> per-layer RoRoPE stats."""
        return {ff: conv.rorope_stats for (ff, _, _), conv in self.converted.items()}

    @property
    def calib_ppl(self) -> dict[int, float]:
        """freqfold -> calibration perplexity of the partial-RoPE model (before step 4)."""
        return {ff: conv.calib_ppl for (ff, partial, _), conv in self.converted.items() if partial}

    def curve(self, freqfold: int, partial: bool, balance: bool = True) -> dict[str, np.ndarray]:
        rows = sorted((r for r in self.rows if r["freqfold"] == freqfold and r["partial"] == partial
                       and r["balance"] == balance), key=lambda r: r["kv_rank"])
        if not rows:
            raise ValueError(f"no sweep rows for freqfold={freqfold}, partial={partial}, balance={balance}; "
                             f"have (freqfold, partial, balance) in {sorted(self.converted)}")
        return {k: np.array([r[k] for r in rows]) for k in ("kv_rank", "logit_error", "ppl", "cache_floats")}


def grid(freqfolds: list[int]) -> list[tuple[int, bool, bool]]:
    """Settings (freqfold, partial RoPE, BKV) for every freqfold, partial RoPE on and off, with BKV."""
    return [(ff, partial, True) for ff in freqfolds for partial in (True, False)]


def sweep(model: TinyLM, calib: torch.Tensor, test: torch.Tensor, *, settings: list[tuple[int, bool, bool]],
          kv_ranks: list[int], rope_dim: int | None = None, result: Sweep | None = None) -> Sweep:
    """Convert at every (freqfold, partial, balance) setting and kv rank; measure against ``model``.

    ``model`` should be fp64. Ranks above a setting's 2·D_L − r are skipped (infeasible). Pass
    ``result`` to add settings to an earlier sweep.
    """
    ref_logits, ref_ppl = logits_and_ppl(model, test)
    cfg = model.cfg
    result = result or Sweep(gqa_ppl=ref_ppl, latent_dim=cfg.n_kv_heads * cfg.head_dim, n_layers=cfg.n_layers)
    inputs, _ = attention_inputs(model, calib)
    for ff, partial, balance in settings:
        conv = convert(model, calib, freqfold=ff, rope_dim=rope_dim, partial=partial, balance=balance,
                       inputs=inputs)
        result.converted[(ff, partial, balance)] = conv
        for rank in kv_ranks:
            if rank > conv.max_kv_rank:
                continue
            mla = conv.mla(rank)
            logits, ppl = logits_and_ppl(mla, test)
            result.rows.append({"freqfold": ff, "partial": partial, "balance": balance, "kv_rank": rank,
                                "cache_floats": mla.blocks[0].attn.cache_floats_per_token,
                                "logit_error": relative_error(logits, ref_logits), "ppl": ppl})
    return result


def choose_freqfold(calib_ppl: dict[int, float], *, collapse: int = 1) -> int:
    """The official "auto" rule (at the repo's HEAD): start at freqfold = collapse and double while
    the partial-RoPE model's perplexity improves. ``calib_ppl``: freqfold -> perplexity (we score on
    calibration text, never the test split). Stops at the largest freqfold it was given."""
    if collapse not in calib_ppl:
        raise ValueError(f"calib_ppl must contain freqfold = collapse = {collapse}, got {sorted(calib_ppl)}")
    best = collapse
    while 2 * best in calib_ppl and calib_ppl[2 * best] < calib_ppl[best]:
        best *= 2
    return best


# ----------------------------------------------------------------------------------------------
# Step 5: recovery fine-tune
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _pretraining_tokens() -> torch.Tensor:
    """The stories the zoo's GQA models were trained on (seed 1), encoded once per process."""
    from companion.data import stories
    from companion.tokenizer import stories_tokenizer

    return stories_tokenizer(512).encode_corpus(stories(4000, seed=STORY_SEEDS["train"]))


def recovery_finetune(model: TinyLM, *, steps: int, batch_size: int, seq_len: int, lr: float,
                      test: torch.Tensor, eval_every: int, desc: str = "recovery") -> tuple[TinyLM, dict]:
    """Train a float32 copy of ``model`` on the stories it was pretrained on (seed 1).

    Returns the trained copy and {step: test perplexity}, including step 0.
    """
    from companion.data import lm_batches
    from companion.train import train

    tokens = _pretraining_tokens()
    student = copy.deepcopy(model).float()
    test_ppl = lambda m: {"ppl": logits_and_ppl(m, test)[1]}
    curve = {0: test_ppl(student)["ppl"]}
    hist = train(student, lm_batches(tokens, batch_size, seq_len, seed=7), steps=steps, lr=lr,
                 eval_every=eval_every, eval_fn=test_ppl, desc=desc)
    curve.update({step: value for step, value in hist.eval["ppl"]})
    return student, curve


def gap_closed(ppl_before: float, ppl_after: float, ppl_target: float) -> float:
    """Fraction of the perplexity gap (before − target) that fine-tuning removed."""
    if ppl_before <= ppl_target:
        raise ValueError(f"no gap to close: ppl_before={ppl_before} <= ppl_target={ppl_target}")
    return (ppl_before - ppl_after) / (ppl_before - ppl_target)


# ----------------------------------------------------------------------------------------------
# Decode benchmark
# ----------------------------------------------------------------------------------------------
def decode_benchmark(shape: tuple[int, ...], *, backends: list[str], min_time: float = 0.3) -> dict[str, float]:
    """Median seconds per decode step at ``shape = (B, H, H_kv, d, R, P, T)``, fp32.

    Backends: "mla-cpu" (Numba), "mla-torch" (absorbed einsums), "gqa-cpu" (Numba, same
    structure), "gqa-torch" (grouped einsums over the GQA cache), "gqa-sdpa" (torch SDPA with
    ``enable_gqa``). Compile time is excluded.
    """
    from ci.bench import time_call
    from kernels import mla_decode as k

    fns = {"mla-cpu": lambda x: k._mla(k.cpu, x), "mla-torch": lambda x: k._mla(k.reference, x),
           "gqa-cpu": lambda x: k._gqa(k.gqa_cpu, x), "gqa-torch": lambda x: k._gqa(k.gqa_reference, x),
           "gqa-sdpa": lambda x: k._gqa(k.gqa_sdpa, x)}
    unknown = [b for b in backends if b not in fns]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {sorted(fns)}")
    x = k.decode_inputs(*shape)
    times = {}
    for name in backends:
        fns[name](x)  # compile or warm up
        times[name] = time_call(fns[name], lambda: x, min_time=min_time, max_reps=30)
    return times


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of precomputed results)
# ----------------------------------------------------------------------------------------------
def energy_figure(stats: dict[int, list[dict]], *, layer: int, freqfold: int, rope_dim: int, n_kv_heads: int):
    """Key energy per latent dim before and after RoRoPE (one layer, one freqfold), kept dims shaded."""
    import plotly.graph_objects as go

    from companion import viz

    if freqfold not in stats:
        raise ValueError(f"no RoRoPE stats for freqfold={freqfold}; have {sorted(stats)}")
    st = stats[freqfold][layer]
    before, after = st["energy_before"].numpy(), st["energy_after"].numpy()
    dims = np.arange(len(before))
    fig = viz.subplots(1, 2, titles=[f"before: GQA heads (head 0 holds {before[:rope_dim].sum() / before.sum():.0%})",
                                     f"after RoRoPE, freqfold {freqfold} (chunk 0 holds {st['kept_fraction']:.0%})"],
                       height=380, shared_yaxes=True)
    for col, energy in ((1, before), (2, after)):
        colours = [viz.PALETTE["ours"] if i < rope_dim else viz.PALETTE["baseline"] for i in dims]
        fig.add_trace(go.Bar(x=dims, y=energy, marker_color=colours, showlegend=False), row=1, col=col)
        fig.add_vrect(x0=-0.5, x1=rope_dim - 0.5, fillcolor=viz.PALETTE["ours"], opacity=0.06, line_width=0,
                      row=1, col=col)
    fig.update_xaxes(title_text="latent key dim")
    fig.update_yaxes(title_text="mean key² (calibration)", row=1, col=1)
    fig.update_layout(title=f"Layer {layer}: key energy per dim; red = the {rope_dim} dims that keep RoPE "
                            f"(uniform share 1/{n_kv_heads} = {1 / n_kv_heads:.0%})")
    return fig


def explorer_figure(result: Sweep, *, kv_rank: int, freqfold: int, partial_rope: bool, bytes_per_float: int = 2):
    """Logit error and perplexity against r_kv for one (freqfold, partial RoPE) setting, the chosen
    rank marked, and the KV cache per token of GQA vs this MLA."""
    import plotly.graph_objects as go

    from companion import viz

    curve = result.curve(freqfold, partial_rope)
    gqa_floats = 2 * result.latent_dim
    fig = viz.subplots(1, 3, titles=["relative logit error vs GQA", "test perplexity", "KV cache per token"],
                       height=400, horizontal_spacing=0.09)
    colour = viz.PALETTE["ours"] if partial_rope else viz.PALETTE["purple"]
    label = "partial RoPE" if partial_rope else "RoPE on every dim"
    fig.add_trace(go.Scatter(x=curve["kv_rank"], y=curve["logit_error"], mode="lines+markers", name=label,
                             line=dict(color=colour)), row=1, col=1)
    fig.add_trace(go.Scatter(x=curve["kv_rank"], y=curve["ppl"], mode="lines+markers", showlegend=False,
                             line=dict(color=colour)), row=1, col=2)
    fig.add_hline(y=result.gqa_ppl, line_dash="dot", line_color=viz.PALETTE["baseline"],
                  annotation_text=f"GQA {result.gqa_ppl:.2f}", row=1, col=2)
    feasible = kv_rank in set(curve["kv_rank"].tolist())
    if feasible:
        i = curve["kv_rank"].tolist().index(kv_rank)
        for col, key in ((1, "logit_error"), (2, "ppl")):
            fig.add_trace(go.Scatter(x=[kv_rank], y=[curve[key][i]], mode="markers", showlegend=False,
                                     marker=dict(size=14, symbol="circle-open", color="black")), row=1, col=col)
        mla_floats = int(curve["cache_floats"][i])
        title = (f"r_kv = {kv_rank}, freqfold {freqfold}, {label}: logit error {curve['logit_error'][i]:.3f}, "
                 f"ppl {curve['ppl'][i]:.2f} (GQA {result.gqa_ppl:.2f})")
    else:
        mla_floats = 0
        title = (f"r_kv = {kv_rank} is infeasible with {label}: at most "
                 f"{int(curve['kv_rank'].max())} (2·D_L − r)")
    layer_bytes = bytes_per_float * result.n_layers
    fig.add_trace(go.Bar(x=["GQA", "MLA"], y=[gqa_floats * layer_bytes, mla_floats * layer_bytes],
                         marker_color=[viz.PALETTE["baseline"], colour], showlegend=False,
                         text=[f"{gqa_floats * layer_bytes} B", f"{mla_floats * layer_bytes} B" if feasible else "n/a"],
                         textposition="outside"), row=1, col=3)
    fig.update_xaxes(title_text="r_kv", row=1, col=1)
    fig.update_xaxes(title_text="r_kv", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(title_text=f"bytes/token ({result.n_layers} layers, {8 * bytes_per_float}-bit)", row=1, col=3,
                     range=[0, gqa_floats * layer_bytes * 1.25])
    fig.update_layout(title=title, legend=dict(x=0.0, y=-0.25, orientation="h"))
    return fig


def sweep_figure(result: Sweep, *, freqfolds: list[int], no_bkv_freqfold: int | None = None):
    """Logit error and perplexity against r_kv for every freqfold (partial RoPE), plus no-BKV."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.subplots(1, 2, titles=["relative logit error vs GQA", "test perplexity"], height=400)
    for i, ff in enumerate(freqfolds):
        curve = result.curve(ff, True)
        colour = viz.SEQUENCE[i % len(viz.SEQUENCE)]
        for col, key in ((1, "logit_error"), (2, "ppl")):
            fig.add_trace(go.Scatter(x=curve["kv_rank"], y=curve[key], mode="lines+markers", name=f"freqfold {ff}",
                                     legendgroup=str(ff), showlegend=col == 1, line=dict(color=colour)),
                          row=1, col=col)
    if no_bkv_freqfold is not None:
        curve = result.curve(no_bkv_freqfold, True, balance=False)
        for col, key in ((1, "logit_error"), (2, "ppl")):
            fig.add_trace(go.Scatter(x=curve["kv_rank"], y=curve[key], mode="lines", name=f"freqfold "
                                     f"{no_bkv_freqfold}, no BKV", legendgroup="nobkv", showlegend=col == 1,
                                     line=dict(color="black", dash="dash")), row=1, col=col)
    fig.add_hline(y=result.gqa_ppl, line_dash="dot", line_color=viz.PALETTE["baseline"],
                  annotation_text="GQA", row=1, col=2)
    fig.update_xaxes(title_text="r_kv (latent rank; cache = r_kv + r floats per token and layer)")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title="Compressing [K_nope, V] jointly: error falls as r_kv grows")
    return fig


def cache_bytes_figure(rows: list[tuple[str, int, int]]):
    """Bars of KV-cache bytes per token: ``rows`` = (label, GQA/MHA bytes, MLA bytes)."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.subplots(1, len(rows), titles=[r[0] for r in rows], height=360)
    for col, (_label, base, mla) in enumerate(rows, start=1):
        fig.add_trace(go.Bar(x=["original", "MLA"], y=[base, mla], showlegend=False,
                             marker_color=[viz.PALETTE["baseline"], viz.PALETTE["ours"]],
                             text=[f"{base:,} B", f"{mla:,} B ({mla / base:.1%})"], textposition="outside"),
                      row=1, col=col)
        fig.update_yaxes(range=[0, base * 1.25], row=1, col=col)
    fig.update_yaxes(title_text="KV bytes per token (all layers, 16-bit)", row=1, col=1)
    fig.update_layout(title="KV cache per token: original vs converted")
    return fig


def finetune_figure(curves: dict[str, dict[int, float]], *, gqa_ppl: float):
    """Test perplexity during recovery fine-tuning (MLA and the GQA control)."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure("Recovery fine-tuning: test perplexity", "fine-tuning step", "perplexity", height=360)
    colours = {"MLA": viz.PALETTE["ours"], "GQA control": viz.PALETTE["baseline"]}
    for name, curve in curves.items():
        steps = sorted(curve)
        fig.add_trace(go.Scatter(x=steps, y=[curve[s] for s in steps], mode="lines+markers", name=name,
                                 line=dict(color=colours.get(name))))
    fig.add_hline(y=gqa_ppl, line_dash="dot", line_color=viz.PALETTE["baseline"],
                  annotation_text=f"GQA before fine-tuning {gqa_ppl:.2f}")
    return fig
