"""Coupled Adam: "Better Embeddings with Coupled Adam" (Stollenwerk & Stollenwerk, arXiv 2502.08441).

The mechanism in three lines. With logits ℓ_i = e_iᵀh and loss −log p_t, the gradient of output
embedding i is g_i = (p_i − δ_it)·h, so Σ_i g_i = (Σ_i p_i − 1)·h = 0: SGD never moves the mean
embedding μ. Adam divides each g_i by its own √v̂_i, and v̂_i is tiny for rare tokens, so
Σ_i Δe_i ≠ 0 and the whole cloud drifts along a common direction (anisotropy). Coupled Adam
uses one second moment per hidden dimension, averaged over the vocabulary: then every row of a
column is divided by the same number and the updates sum to zero again.

This module holds the optimizer (:class:`CoupledAdam`), the parameter grouping that couples only
the embedding matrix, and the experiment the notebook runs. Official code read for details:
flxst/coupled-adam ``nanoGPT/coupled_adam.py`` (the moment stays uncoupled in memory; the mean is
taken on the fly) and ``nanoGPT/model.py::configure_optimizers`` (embeddings get weight decay 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from companion.data import lm_batches, zipf_markov
from companion.metrics import isotropy, relative_mean_norm
from companion.model import ModelConfig, TinyLM
from companion.train import History, evaluate_loss, train


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def adam_update(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay, coupled, avg_scale=1.0):
    """One AdamW update of ``p`` in place. ``coupled=True`` is the paper's change (one line)."""
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if coupled:
        v = avg_scale * v.mean(dim=0, keepdim=True)  # <- Coupled Adam: average over the vocabulary
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    p.mul_(1 - lr * weight_decay).addcdiv_(m, denom, value=-lr / (1 - beta1**step))


class CoupledAdam(torch.optim.Optimizer):
    """AdamW in which param groups with ``coupled=True`` share their second moment across rows.

    A coupled parameter must be a ``(V, H)`` matrix (rows = tokens). Other groups are plain AdamW
    (decoupled weight decay), so one optimizer can train the whole model::

        CoupledAdam(coupled_param_groups(model, weight_decay=0.1), lr=3e-3)

    ``fused=True`` runs coupled groups through the Numba kernel ``kernels.coupled_adam_step``.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, *,
                 coupled=False, avg_scale=1.0, fused=False):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0 or avg_scale <= 0:
            raise ValueError(f"need eps > 0, weight_decay >= 0, avg_scale > 0; got {eps}, {weight_decay}, "
                             f"{avg_scale}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, coupled=coupled,
                        avg_scale=avg_scale, fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["coupled"]:
                for p in group["params"]:
                    if p.ndim != 2:
                        raise ValueError(f"a coupled parameter must be a (V, H) matrix, got shape "
                                         f"{tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)  # stored uncoupled, as in the official code
                state["step"] += 1
                hyper = dict(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"])
                if group["coupled"] and group["fused"]:
                    from kernels import coupled_adam_step

                    coupled_adam_step.run(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                          avg_scale=group["avg_scale"], backend="cpu" if p.device.type == "cpu"
                                          else "auto", **hyper)
                else:
                    adam_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], coupled=group["coupled"],
                                avg_scale=group["avg_scale"], **hyper)
        return loss


def coupled_param_groups(model: nn.Module, *, weight_decay: float = 0.1, embedding_decay: float = 0.0,
                         embeddings: list[nn.Parameter] | None = None) -> list[dict]:
    """Three groups: the embedding matrix (coupled, decay ``embedding_decay``), other matrices
    (decay ``weight_decay``), and vectors such as norm gains (no decay). ``embeddings`` defaults to
    ``model.embed.weight`` (tied to the LM head in :class:`~companion.model.TinyLM`)."""
    if embeddings is None:
        if not hasattr(model, "embed"):
            raise ValueError("model has no .embed; pass embeddings=[...] explicitly")
        embeddings = [model.embed.weight]
    emb_ids = {id(p) for p in embeddings}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in emb_ids]
    return [
        {"params": list(embeddings), "coupled": True, "weight_decay": embedding_decay},
        {"params": [p for p in rest if p.ndim >= 2], "coupled": False, "weight_decay": weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "coupled": False, "weight_decay": 0.0},
    ]


def make_optimizer(kind: str, model: nn.Module, *, lr: float, weight_decay: float = 0.1,
                   fused: bool = False) -> CoupledAdam:
    """"adam" or "coupled": the same grouping (embeddings without decay), differing only in coupling."""
    if kind not in ("adam", "coupled"):
        raise ValueError(f"kind must be 'adam' or 'coupled', got {kind!r}")
    groups = coupled_param_groups(model, weight_decay=weight_decay)
    groups[0]["coupled"] = kind == "coupled"
    return CoupledAdam(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


# ----------------------------------------------------------------------------------------------
# The exact check: one update of an untied LM head
# ----------------------------------------------------------------------------------------------
def head_update_sum(kind: str, *, vocab_size: int = 256, d: int = 32, n_tokens: int = 512, steps: int = 3,
                    seed: int = 0) -> dict[str, float]:
    """Train an LM head ``W (V, d)`` alone on fixed random features (fp64) for ``steps`` updates.

    Returns ‖Σ_i ΔW_i‖ / Σ_i ‖ΔW_i‖ over the run (0 means the updates cancel exactly) and the
    same ratio for the gradients of the first step. The targets are Zipf-distributed, so some
    rows see far more gradient than others, which is what breaks plain Adam.
    """
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, d, generator=gen, dtype=torch.float64)
    targets = torch.multinomial(torch.arange(1, vocab_size + 1, dtype=torch.float64) ** -1.1, n_tokens,
                                replacement=True, generator=gen)
    head = nn.Parameter(0.02 * torch.randn(vocab_size, d, generator=gen, dtype=torch.float64))
    opt = CoupledAdam([{"params": [head], "coupled": kind == "coupled"}], lr=1e-2)
    start = head.detach().clone()
    grad_ratio = None
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(h @ head.T, targets).backward()
        if grad_ratio is None:
            grad_ratio = (head.grad.sum(0).norm() / head.grad.norm(dim=1).sum()).item()
        opt.step()
    delta = head.detach() - start
    return {"update_ratio": (delta.sum(0).norm() / delta.norm(dim=1).sum()).item(), "grad_ratio": grad_ratio}


# ----------------------------------------------------------------------------------------------
# The experiment: train the same tiny LM with Adam and with Coupled Adam, same data, same seed
# ----------------------------------------------------------------------------------------------
@dataclass
class ExperimentConfig:
    vocab_size: int = 1024
    zipf_exponent: float = 1.1
    n_tokens: int = 2_000_000
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 2000
    lr: float = 3e-3
    snapshot_every: int = 100
    seed: int = 0


@dataclass
class RunResult:
    kind: str
    history: History
    val_loss: float
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> E (V, H) float32
    frequencies: torch.Tensor | None = None  # (V,) unigram frequency of each token in the training data

    def metric_curve(self, metric) -> tuple[list[int], list[float]]:
        steps = sorted(self.snapshots)
        return steps, [metric(self.snapshots[s]) for s in steps]

    @property
    def final_embeddings(self) -> torch.Tensor:
        return self.snapshots[max(self.snapshots)]


def run_experiment(cfg: ExperimentConfig, kind: str) -> RunResult:
    """Train one model with ``kind`` in {"adam", "coupled"}; snapshot the embeddings as it learns."""
    # One stream, split: train and validation text come from the same Markov chain.
    stream = zipf_markov(cfg.n_tokens + cfg.n_tokens // 10, vocab_size=cfg.vocab_size,
                         exponent=cfg.zipf_exponent, seed=cfg.seed)
    tokens, val = stream[:cfg.n_tokens], stream[cfg.n_tokens:]
    frequencies = torch.bincount(tokens, minlength=cfg.vocab_size).double() / len(tokens)

    torch.manual_seed(cfg.seed)
    model = TinyLM(ModelConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                               n_heads=cfg.n_heads, tie_embeddings=True))
    result = RunResult(kind=kind, history=History(), val_loss=math.nan, frequencies=frequencies)
    result.snapshots[0] = model.embed.weight.detach().clone()

    def snapshot(step: int, m: nn.Module, _loss: float) -> None:
        if (step + 1) % cfg.snapshot_every == 0 or step + 1 == cfg.steps:
            result.snapshots[step + 1] = m.embed.weight.detach().clone()

    result.history = train(model, lm_batches(tokens, cfg.batch_size, cfg.seq_len, seed=cfg.seed),
                           steps=cfg.steps, optimizer=make_optimizer(kind, model, lr=cfg.lr), on_step=snapshot,
                           desc=f"{kind} (zipf {cfg.zipf_exponent})")
    result.val_loss = evaluate_loss(model, lm_batches(val, 64, cfg.seq_len, seed=cfg.seed + 1), n_batches=8)
    return result


def summarize(adam: RunResult, coupled: RunResult) -> dict[str, float]:
    """The numbers the claims check, from the final embeddings and validation losses."""
    return {
        "mu_rel_adam": relative_mean_norm(adam.final_embeddings),
        "mu_rel_coupled": relative_mean_norm(coupled.final_embeddings),
        "iso_adam": isotropy(adam.final_embeddings),
        "iso_coupled": isotropy(coupled.final_embeddings),
        "val_loss_adam": adam.val_loss,
        "val_loss_coupled": coupled.val_loss,
    }


def mean_direction_projection(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D coordinates of every embedding: along the mean direction μ/‖μ‖, and along the top
    principal direction orthogonal to it. Returns (xy (V, 2), μ projected (2,)).

    This view makes the paper's effect visible: a drifting cloud sits off the origin along x.
    """
    E = E.detach().to(torch.float64)
    mu = E.mean(0)
    u = mu / mu.norm().clamp_min(1e-12)
    centred = E - mu
    centred_perp = centred - (centred @ u)[:, None] * u  # remove the μ component
    _, _, vh = torch.linalg.svd(centred_perp, full_matrices=False)
    w = vh[0]
    basis = torch.stack([u, w], dim=1)  # (H, 2)
    return E @ basis, mu @ basis


# ----------------------------------------------------------------------------------------------
# The fused kernel against the optimizer
# ----------------------------------------------------------------------------------------------
def fused_matches_optimizer(*, vocab_size: int = 300, d: int = 24, steps: int = 4, seed: int = 0) -> float:
    """Max |difference| between CoupledAdam's torch update and the fused Numba kernel (fp64)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(vocab_size, d, generator=gen, dtype=torch.float64)
    grads = [torch.randn(vocab_size, d, generator=gen, dtype=torch.float64) for _ in range(steps)]
    finals = []
    for fused in (False, True):
        p = nn.Parameter(start.clone())
        opt = CoupledAdam([{"params": [p], "coupled": True}], lr=1e-2, weight_decay=0.1, fused=fused)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals.append(p.detach())
    return (finals[0] - finals[1]).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of the results: the notebook's explorer calls them)
# ----------------------------------------------------------------------------------------------
LABELS = {"adam": "Adam", "coupled": "Coupled Adam"}


def _nearest_step(result: RunResult, step: int) -> int:
    steps = sorted(result.snapshots)
    return max([s for s in steps if s <= step] or [steps[0]])


def cloud_figure(results: dict[tuple[float, str], RunResult], *, zipf: float, step: int):
    """Side by side, Adam and Coupled Adam: every token's embedding projected on (μ̂, top PC ⊥ μ̂),
    coloured by log10 frequency, with the mean embedding μ drawn as an arrow from the origin."""
    import plotly.graph_objects as go

    from companion import viz

    keys = [(zipf, "adam"), (zipf, "coupled")]
    missing = [k for k in keys if k not in results]
    if missing:
        raise ValueError(f"no results for {missing}; available zipf exponents: "
                         f"{sorted({z for z, _ in results})}")
    fig = viz.subplots(1, 2, titles=[f"{LABELS[k[1]]}: step {_nearest_step(results[k], step)}" for k in keys],
                       height=460, horizontal_spacing=0.08)
    extent = 0.0
    for col, key in enumerate(keys, start=1):
        res = results[key]
        xy, mu = mean_direction_projection(res.snapshots[_nearest_step(res, step)])
        extent = max(extent, xy.abs().max().item())
        logf = torch.log10(res.frequencies.clamp_min(1e-9))
        fig.add_trace(go.Scattergl(
            x=xy[:, 0].numpy(), y=xy[:, 1].numpy(), mode="markers", name=LABELS[key[1]], showlegend=False,
            marker=dict(size=4, color=logf.numpy(), colorscale="Viridis", cmin=-6, cmax=-1, opacity=0.7,
                        colorbar=dict(title="log10 freq", x=1.02) if col == 2 else None,
                        showscale=col == 2),
            hovertext=[f"token {i}" for i in range(len(xy))]), row=1, col=col)
        fig.add_annotation(x=mu[0].item(), y=mu[1].item(), ax=0, ay=0, xref=f"x{col}", yref=f"y{col}",
                           axref=f"x{col}", ayref=f"y{col}", showarrow=True, arrowhead=3, arrowwidth=3,
                           arrowcolor=viz.PALETTE["ours"], text="μ", font=dict(color=viz.PALETTE["ours"]))
    for col in (1, 2):
        fig.update_xaxes(range=[-1.05 * extent, 1.05 * extent], title_text="along μ̂", row=1, col=col)
        fig.update_yaxes(range=[-1.05 * extent, 1.05 * extent], title_text="top PC ⊥ μ̂", row=1, col=col)
    fig.update_layout(title=f"Embedding cloud, Zipf exponent {zipf}: Adam drifts along μ, Coupled Adam stays centred")
    return fig


def drift_figure(results: dict[tuple[float, str], RunResult], *, zipf: float):
    """‖μ‖ʳ and isotropy over training, Adam vs Coupled Adam."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.subplots(1, 2, titles=["relative mean norm ‖μ‖ʳ (lower = centred)",
                                     "isotropy Iso (higher = isotropic)"], height=380)
    for kind, colour in (("adam", viz.PALETTE["baseline"]), ("coupled", viz.PALETTE["ours"])):
        res = results[(zipf, kind)]
        for col, metric in ((1, relative_mean_norm), (2, isotropy)):
            steps, values = res.metric_curve(metric)
            fig.add_trace(go.Scatter(x=steps, y=values, name=LABELS[kind], legendgroup=kind,
                                     showlegend=col == 1, line=dict(color=colour)), row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(title=f"Embedding geometry during training (Zipf exponent {zipf})")
    return fig


def loss_figure(results: dict[tuple[float, str], RunResult], *, zipf: float, smooth: int = 25):
    """Training loss (moving average) for both optimizers, with the final validation losses."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure(f"Training loss (Zipf exponent {zipf}, moving average over {smooth} steps)",
                     "step", "cross-entropy (nats)", height=360)
    for kind, colour in (("adam", viz.PALETTE["baseline"]), ("coupled", viz.PALETTE["ours"])):
        res = results[(zipf, kind)]
        loss = torch.tensor(res.history.loss)
        k = max(1, min(smooth, len(loss)))
        avg = torch.nn.functional.avg_pool1d(loss[None, None], k, stride=1)[0, 0]
        fig.add_trace(go.Scatter(x=res.history.step[k - 1:], y=avg.numpy(), line=dict(color=colour),
                                 name=f"{LABELS[kind]} (val {res.val_loss:.3f})"))
    return fig
