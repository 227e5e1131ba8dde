"""One training loop for every notebook.

    history = train(model, batches, steps=2000, lr=3e-3)                      # AdamW
    history = train(model, batches, steps=2000, optimizer=lambda m: CoupledAdam(...))

* ``batches(step) -> (x, y)``: a deterministic sampler such as :func:`companion.data.lm_batches`.
* ``optimizer``: None (AdamW, no decay on norms), a ``torch.optim.Optimizer``, or a factory
  ``model -> Optimizer``. The schedule is linear warmup then cosine decay to ``min_lr_ratio·lr``,
  applied as a multiplier on every param group's own starting lr.
* Gradients are clipped to ``clip`` (global norm); ``clip=None`` turns it off.
* ``eval_fn(model) -> dict`` runs every ``eval_every`` steps and at the end (in eval mode, no grad).
* ``on_step(step, model, loss)`` is called after every update (for per-step measurements).
* ``checkpoint=path`` saves model, optimizer and history atomically every ``checkpoint_every``
  steps; calling ``train`` again with the same path resumes from it.

Progress is a ``tqdm.auto`` bar (set ``LAB_PROGRESS=0`` to silence it). Returns a
:class:`History`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from companion.io import atomic_write_bytes


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def last_eval(self, key: str) -> float:
        return self.eval[key][-1][1]

    def to_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss, "lr": self.lr,
                "eval": {k: [list(p) for p in v] for k, v in self.eval.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(d["step"], d["loss"], d["lr"], {k: [tuple(p) for p in v] for k, v in d["eval"].items()})


def lr_factor(step: int, *, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Multiplier on the base lr at ``step`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def default_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or 1-D params)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def progress_enabled() -> bool:
    return os.environ.get("LAB_PROGRESS", "1") != "0"


def train(
    model: nn.Module,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer | Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup: int | None = None,
    min_lr_ratio: float = 0.1,
    clip: float | None = 1.0,
    eval_every: int = 0,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    on_step: Callable[[int, nn.Module, float], None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 500,
    desc: str = "train",
    device: str | torch.device = "cpu",
) -> History:
    """Train ``model`` for ``steps`` updates and return the :class:`History`. See module docs."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    warmup = max(1, steps // 20) if warmup is None else warmup
    if not 0 <= warmup <= steps:
        raise ValueError(f"warmup must be in [0, steps={steps}], got {warmup}")

    if optimizer is None:
        opt = default_adamw(model, lr, weight_decay)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(model)
    else:
        raise ValueError(f"optimizer must be None, an Optimizer or a factory, got {type(optimizer).__name__}")
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])

    history, start = History(), 0
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history, start = History.from_dict(state["history"]), state["step"]

    def run_eval(step: int) -> None:
        if eval_fn is None:
            return
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for key, value in eval_fn(model).items():
                history.eval.setdefault(key, []).append((step, float(value)))
        model.train(was_training)

    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(range(start, steps), desc=desc, disable=not progress_enabled(), leave=False,
               mininterval=1.0)
    for step in bar:
        factor = lr_factor(step, steps=steps, warmup=warmup, min_lr_ratio=min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        x, y = batches(step)
        loss = model(x.to(device), y.to(device)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower lr or check data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        history.step.append(step)
        history.loss.append(loss.item())
        history.lr.append(opt.param_groups[0]["lr"])
        if on_step is not None:
            on_step(step, model, history.loss[-1])
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            run_eval(step + 1)
        if checkpoint is not None and (step + 1) % checkpoint_every == 0:
            _save_checkpoint(checkpoint, model, opt, history, step + 1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
    run_eval(steps)
    model.eval()
    return history


def _save_checkpoint(path, model, opt, history, step) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "history": history.to_dict(), "step": step}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                  n_batches: int = 8, *, offset: int = 0) -> float:
    """Mean loss over ``batches(offset) .. batches(offset + n_batches - 1)``.

    Pass a sampler over held-out tokens (e.g. ``lm_batches(val_tokens, ...)``) for a validation loss.
    """
    if not (isinstance(n_batches, int) and n_batches >= 1):
        raise ValueError(f"n_batches must be an int >= 1, got {n_batches!r}")
    was_training = model.training
    model.eval()
    losses = [model(*batches(offset + i)).loss.item() for i in range(n_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)
