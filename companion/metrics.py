"""Shared metrics. Embedding-geometry metrics follow the Coupled Adam paper (arXiv 2502.08441, Sec. 5)
and its analysis code (flxst/coupled-adam, ``nanoGPT/analysis/isotropy.py``, ``norms.py``).

All take an embedding matrix ``E`` of shape ``(V, H)`` (one row per token) as a torch tensor and
compute in float64.
"""

from __future__ import annotations

import math

import torch


def _as_matrix(E: torch.Tensor) -> torch.Tensor:
    if not isinstance(E, torch.Tensor) or E.ndim != 2 or E.shape[0] < 2:
        raise ValueError(f"E must be a (V, H) tensor with V >= 2, got {getattr(E, 'shape', type(E))}")
    E = E.detach().to(torch.float64)
    if not torch.isfinite(E).all():
        raise ValueError("E contains NaN or inf")
    return E


def mean_vector_norm(E: torch.Tensor) -> float:
    """‖μ‖, the length of the mean embedding μ = (1/V) Σ_i e_i."""
    return _as_matrix(E).mean(0).norm().item()


def relative_mean_norm(E: torch.Tensor) -> float:
    """‖μ‖ʳ = ‖μ‖ / mean_i ‖e_i‖: 0 for a centred cloud, 1 when every e_i is the same vector."""
    E = _as_matrix(E)
    mean_len = E.norm(dim=1).mean()
    if mean_len == 0:
        raise ValueError("relative_mean_norm is undefined for an all-zero E")
    return (E.mean(0).norm() / mean_len).item()


def isotropy(E: torch.Tensor) -> float:
    """Iso(E) = min_c Z(c) / max_c Z(c), Z(c) = Σ_i exp(cᵀ e_i), c over the eigenvectors of EᵀE.

    1 means isotropic. Eigenvectors have no sign, so we take c over both ±u (the official code
    uses whatever sign ``np.linalg.eig`` returns); this makes the value well defined. Computed in
    log space, so large norms do not overflow.
    """
    E = _as_matrix(E)
    _, vecs = torch.linalg.eigh(E.T @ E)  # columns: eigenvectors (H, H)
    directions = torch.cat([vecs, -vecs], dim=1)  # (H, 2H)
    log_z = torch.logsumexp(E @ directions, dim=0)  # (2H,)
    return math.exp((log_z.min() - log_z.max()).item())


def norm_frequency_correlation(E: torch.Tensor, frequencies: torch.Tensor) -> float:
    """ρ: Pearson correlation between ‖e_i‖ and token frequency p_i (Adam makes it large)."""
    E = _as_matrix(E)
    p = torch.as_tensor(frequencies, dtype=torch.float64).flatten()
    if not torch.isfinite(p).all():
        raise ValueError("frequencies contain NaN or inf")
    if p.shape[0] != E.shape[0]:
        raise ValueError(f"frequencies has {p.shape[0]} entries, expected V={E.shape[0]}")
    norms = E.norm(dim=1)
    a, b = norms - norms.mean(), p - p.mean()
    denom = a.norm() * b.norm()
    if denom == 0:
        raise ValueError("correlation undefined: constant norms or constant frequencies")
    return (a @ b / denom).item()


def condition_ratio(E: torch.Tensor) -> float:
    """σ_min/σ_max of E, in (0, 1]; larger = better conditioned (the paper's κ column, as coded)."""
    s = torch.linalg.svdvals(_as_matrix(E))
    if s[0] == 0:
        raise ValueError("condition_ratio is undefined for an all-zero E")
    return (s[-1] / s[0]).item()


def embedding_report(E: torch.Tensor, frequencies: torch.Tensor | None = None) -> dict[str, float]:
    """All embedding-geometry metrics in one dict."""
    out = {"iso": isotropy(E), "mu_norm": mean_vector_norm(E), "mu_rel": relative_mean_norm(E),
           "cond_ratio": condition_ratio(E)}
    if frequencies is not None:
        out["rho_norm_freq"] = norm_frequency_correlation(E, frequencies)
    return out
