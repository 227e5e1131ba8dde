"""``companion.setup``: the one call at the top of every notebook.

It makes a run reproducible and well-behaved on shared CPUs:

* seeds ``random``, NumPy and torch from ``seed``;
* sets torch's thread count from ``LAB_THREADS`` (the notebook runner gives each parallel worker
  its share of the cores, so workers do not oversubscribe them);
* selects the plotly theme and a renderer that works in JupyterLab, VS Code and offline HTML;
* remembers the run mode (smoke or full) and seed for :func:`companion.claims.claim`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

_CURRENT: Run | None = None


@dataclass(frozen=True)
class Run:
    """The context of one notebook run."""

    seed: int
    smoke: bool
    device: str
    threads: int
    headless: bool

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else "full"

    def pick(self, smoke, full):
        """``run.pick(smoke=200, full=2000)``: choose a size knob by mode."""
        return smoke if self.smoke else full


def is_headless() -> bool:
    """True when run by papermill/nbconvert through ``ci`` (which sets LAB_HEADLESS=1)."""
    return os.environ.get("LAB_HEADLESS", "0") == "1"


def setup(seed: int = 0, smoke: bool = False, device: str = "cpu") -> Run:
    """Seed everything, set threads and plotting, and record the run mode. Returns a :class:`Run`."""
    global _CURRENT
    import numpy as np
    import torch

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(smoke, bool):
        raise ValueError(f"smoke must be True or False, got {smoke!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch sees no GPU; use DEVICE = 'cpu'")

    threads = int(os.environ.get("LAB_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(max(1, threads))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    from companion import viz

    viz.use_lab_theme()
    _CURRENT = Run(seed=seed, smoke=smoke, device=device, threads=threads, headless=is_headless())
    print(f"companion.setup: mode={_CURRENT.mode} seed={seed} device={device} torch_threads={threads}")
    return _CURRENT


def current() -> Run | None:
    """The :class:`Run` set by the last :func:`setup` call in this process, or None."""
    return _CURRENT
