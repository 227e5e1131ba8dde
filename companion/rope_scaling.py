"""RoPE context extension as per-frequency rescale factors: PI, NTK-aware, YaRN and LongRoPE's format.

RoPE rotates the pair of dims (i, i + d/2) of every query and key by the angle n·θ_i at position n,
θ_i = b^(−2i/d). A model trained on L tokens has only seen angles n·θ_i with n < L. To read
L′ = s·L tokens, each method divides θ_i by a factor λ_i ≥ 1 and may scale cos and sin by a
temperature; they differ only in the choice of λ:

* **PI** (Chen et al. 2023, arXiv 2306.15595): λ_i = s for every i.
* **NTK-aware** (bloc97, 2023): base b → b·s^(d/(d−2)), i.e. λ_i = s^(2i/(d−2)).
* **YaRN** (Peng et al. 2023, arXiv 2309.00071): λ = 1 for dims that turn more than β_fast times
  within L, λ = s for dims that turn less than β_slow times, a ramp in between; temperature
  0.1·ln s + 1.
* **LongRoPE** (Ding et al. 2024, arXiv 2402.13753): searched λ, plus n̂ initial positions left
  unscaled; temperature √(1 + ln s / ln L). See ``companion.papers.longrope``.

A :class:`Scaling` bundles (λ, n̂, temperature) in the convention of ``kernels.rope`` and
``companion.model.Rotary``: positions n ≥ n̂ use θ_i/λ_i, positions n < n̂ keep θ_i, and cos and sin
are multiplied by the temperature at every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BASELINES = ("none", "pi", "ntk", "yarn")


def check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale < math.inf:
        raise ValueError(f"scale must be a finite number >= 1 (target length / training length), got {scale!r}")
    return float(scale)


def check_head_dim(head_dim: int) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 4, got {head_dim!r}")
    return head_dim


# λ_i divides θ_i = base^(-2i/d), i = 0 .. d/2 - 1.
def pi_factors(scale: float, head_dim: int) -> torch.Tensor:
    """Position Interpolation: λ_i = s for every i. ``(head_dim/2,)`` float64."""
    return torch.full((check_head_dim(head_dim) // 2,), check_scale(scale), dtype=torch.float64)


def ntk_factors(scale: float, head_dim: int) -> torch.Tensor:
    """NTK-aware scaling: base b → b·s^(d/(d−2)), so λ_i = θ_i/θ′_i = s^(2i/(d−2)). ``(head_dim/2,)``.

    The exponent d/(d−2) is chosen so that the slowest dim (i = d/2 − 1) is interpolated by exactly
    s, while the fastest (i = 0) is untouched.
    """
    d = check_head_dim(head_dim)
    i = torch.arange(d // 2, dtype=torch.float64)
    return check_scale(scale) ** (2 * i / (d - 2))


def yarn_ramp(head_dim: int, base: float, original_length: int, beta_fast: float = 32.0,
              beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN's γ_i ∈ [0, 1], ``(head_dim/2,)``: 1 = keep dim i (extrapolate), 0 = interpolate by s.

    Dim i turns r_i = L / (2π·b^(2i/d)) times over the training length L. The official code
    (jquesnelle/yarn, copied in microsoft/LongRoPE ``rope/yarn.py``) finds the dims where
    r = β_fast and r = β_slow, i(r) = d·ln(L/(2πr)) / (2 ln b), floors the first, ceils the second,
    clamps both to [0, d−1], and ramps linearly *in the dim index* between them.
    """
    d = check_head_dim(head_dim)
    if not base > 1 or not original_length >= 1 or not beta_fast > beta_slow > 0:
        raise ValueError(f"need base > 1, original_length >= 1, beta_fast > beta_slow > 0; got base={base}, "
                         f"original_length={original_length}, beta_fast={beta_fast}, beta_slow={beta_slow}")

    def dim_of(rotations: float) -> float:
        return d * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_of(beta_fast)), 0)
    high = min(math.ceil(dim_of(beta_slow)), d - 1)
    if low == high:
        high += 0.001  # the official guard against a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return 1 - ramp


def yarn_factors(scale: float, head_dim: int, *, base: float, original_length: int, beta_fast: float = 32.0,
                 beta_slow: float = 1.0) -> torch.Tensor:
    """YaRN: blend the inverse frequencies, θ′_i = γ_i·θ_i + (1−γ_i)·θ_i/s, so λ_i = 1/(γ_i + (1−γ_i)/s).

    (LongRoPE's ``evolution/search.py`` seeds its search with the blend of the *factors*,
    γ_i·1 + (1−γ_i)·s, which differs inside the ramp; we keep YaRN's own definition.)
    """
    gamma = yarn_ramp(head_dim, base, original_length, beta_fast, beta_slow)
    return 1.0 / (gamma + (1 - gamma) / check_scale(scale))


def yarn_mscale(scale: float) -> float:
    """YaRN's attention temperature on cos and sin: 0.1·ln s + 1 (1 for s ≤ 1)."""
    s = check_scale(scale)
    return 0.1 * math.log(s) + 1.0


def longrope_mscale(scale: float, original_length: int) -> float:
    """LongRoPE's ("su") temperature: √(1 + ln s / ln L) (``rope/longrope.py::_calc_mscale_su``)."""
    s = check_scale(scale)
    if not isinstance(original_length, int) or original_length < 2:
        raise ValueError(f"original_length must be an int >= 2, got {original_length!r}")
    return math.sqrt(1 + math.log(s) / math.log(original_length))


@dataclass(frozen=True)
class Scaling:
    """One RoPE rescaling: factors λ ``(d/2,)`` float64, n̂ = ``start``, temperature ``mscale``.

    Positions n ≥ start use θ_i/λ_i, positions n < start keep θ_i (the convention of
    ``kernels.rope`` and ``companion.model.Rotary``); cos and sin are multiplied by ``mscale``.
    """

    factors: torch.Tensor
    start: int = 0
    mscale: float = 1.0
    name: str = ""

    def __post_init__(self):
        f = torch.as_tensor(self.factors, dtype=torch.float64)
        if f.ndim != 1 or f.numel() < 1 or not bool(torch.isfinite(f).all()) or float(f.min()) < 1:
            raise ValueError(f"factors must be a 1-D vector of finite numbers >= 1, got {self.factors}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"start (n̂) must be an int >= 0, got {self.start!r}")
        if not 0 < self.mscale < math.inf:
            raise ValueError(f"mscale must be a finite number > 0, got {self.mscale!r}")
        object.__setattr__(self, "factors", f)

    def apply(self, model) -> None:
        """Set this scaling on a :class:`companion.model.TinyLM`'s ``rotary`` (the plain torch path)."""
        model.rotary.set_scaling(self.factors, self.start, self.mscale)


def baseline(method: str, scale: float, *, head_dim: int, base: float, original_length: int) -> Scaling:
    """``method`` in {"none", "pi", "ntk", "yarn"} at length factor ``scale`` as a :class:`Scaling`.

    PI and NTK-aware come without a temperature (their papers have none); YaRN with 0.1·ln s + 1.
    """
    if method == "none":
        return Scaling(torch.ones(check_head_dim(head_dim) // 2, dtype=torch.float64), name="none")
    if method == "pi":
        return Scaling(pi_factors(scale, head_dim), name="pi")
    if method == "ntk":
        return Scaling(ntk_factors(scale, head_dim), name="ntk")
    if method == "yarn":
        return Scaling(yarn_factors(scale, head_dim, base=base, original_length=original_length),
                       mscale=yarn_mscale(scale), name="yarn")
    raise ValueError(f"method must be one of {BASELINES}, got {method!r}")


def is_monotone(factors) -> bool:
    """True when λ_0 ≤ λ_1 ≤ … (LongRoPE's search constraint)."""
    f = np.asarray(factors, dtype=np.float64)
    return bool(np.all(np.diff(f) >= 0))

