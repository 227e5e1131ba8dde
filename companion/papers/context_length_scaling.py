"""Context-length scaling: "Explaining Context Length Scaling and Bounds for Language Models"
(Shi, Ma, Liu, Zhao, Hwang, Li; arXiv 2502.01481; v4: "Intrinsic Entropy of Context Length Scaling in LLMs").

The paper's decomposition of a model's cross-entropy at context length ``l`` and data size ``D``:

    L(l, D) = R_Bayes(l) + L_Approx(l, D)

R_Bayes(l), the loss of the best possible predictor that sees ``l`` tokens, can only fall as ``l``
grows. L_Approx, the gap between the trained model and that predictor, grows with ``l`` (the
model must find the signal in a bigger input) and shrinks with ``D``. Their sum is U-shaped in
``l``, and its minimum moves right as ``D`` grows.

This module holds the paper's synthetic task, where R_Bayes is known in closed form, and what the
notebook runs on it:

* the XOR-bits task (:data:`TASKS`, :func:`make_xor_bits`) and its exact Bayes risk
  (:func:`bayes_risk`, checked against brute-force enumeration by :func:`bayes_risk_bruteforce`);
* the two learners of the official code, an MLP and a "Bi-MLP" whose middle layer sees only the
  context bits (:data:`ARCHS`, :func:`forward`), with a leading model axis on every weight, so a
  whole grid of (context length × seed) models trains in one batched step;
* :func:`train_models` (batched AdamW, per-model gradient clipping and early stopping) and
  :func:`run_grid` (context length × data size × seed);
* :func:`intrinsic_dimension`, the PCA-eigenvalue count of the official code;
* the LLaMA cross-entropy numbers embedded in the official code (:data:`LLAMA_CTX`, :data:`LLAMA_CE`);
* pure figure functions for the notebook and its explorer.

Official code read for details (github.com/JingzheShi/NLPCtlScalingAndBounds):
``SyntheticDataset/task_definition.json`` (the 50 tasks), ``SyntheticDataset/generate_data.py``
(labels, 1-based bit positions, random labels for l > 100, round-robin task ids),
``SyntheticDataset/train_model.py`` and ``train_model.sh`` (MLP and Bi-MLP shapes, LeakyReLU slopes,
BCE with the 1e-6 probability clamp at evaluation, AdamW lr 1e-3 / wd 8e-4, clipping at 1.0,
early stopping on validation loss), ``SyntheticDataset/save_feature_tensor.py`` (which layer gives
the features), ``NaturalLanguage/Measuring/draw_CEvsPCA/draw_IntrinsicDim.py`` (the 0.0035·λ_max
rule and the LLaMA numbers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# The synthetic task
# ----------------------------------------------------------------------------------------------
# (l, a) for the 50 tasks, transcribed from SyntheticDataset/task_definition.json of the official
# repo. Task t's label is x_a XOR x_l with 1-based bit positions; it needs bit l, the further one.
TASKS: tuple[tuple[int, int], ...] = (
    (21, 20), (21, 1), (21, 2), (22, 3), (22, 4), (22, 5), (23, 6), (23, 7), (24, 8), (24, 9),
    (25, 10), (25, 11), (26, 12), (26, 13), (27, 14), (27, 15), (28, 16), (29, 17), (30, 18), (30, 19),
    (31, 20), (32, 1), (33, 3), (34, 6), (35, 8), (36, 10), (37, 12), (39, 14), (40, 16), (42, 38),
    (43, 41), (45, 44), (47, 46), (50, 48), (52, 51), (55, 54), (58, 57), (62, 61), (66, 65), (71, 70),
    (77, 76), (84, 83), (93, 92), (103, 102), (118, 87), (137, 25), (165, 20), (209, 34), (293, 128),
    (522, 353),
)
N_BITS = 100  # CURRENT_L_MAX in generate_data.py: a task with l > 100 gets a random label
N_TASKS = len(TASKS)
LN2 = math.log(2.0)
LOGIT_CLAMP = math.log((1 - 1e-6) / 1e-6)  # train_model.py clamps eval probabilities to [1e-6, 1 - 1e-6]


def _check_tasks(tasks, n_bits: int) -> tuple[tuple[int, int], ...]:
    del n_bits  # a task with l > n_bits is legal: its label is a coin (generate_data.py)
    tasks = tuple((int(l), int(a)) for l, a in tasks)
    if not tasks:
        raise ValueError("tasks must hold at least one (l, a) pair, got an empty list")
    for l, a in tasks:
        if not (1 <= a < l):
            raise ValueError(f"tasks: each (l, a) needs 1 <= a < l (bit l is the further bit), got {(l, a)}")
    return tasks


def bayes_risk(ctl: int, tasks=TASKS, n_bits: int = N_BITS) -> float:
    """Exact Bayes risk (nats) of a predictor that sees the first ``ctl`` bits and the task one-hot.

    Tasks are equally frequent. A task whose far bit ``l`` is visible (``l <= ctl``, and ``l <= n_bits``
    so the label is not random) has a deterministic label: risk 0. Otherwise the label is
    x_a XOR (an unseen fair coin), or a fresh coin, so it is a fair coin given everything visible:
    risk ln 2. Hence ``BR(ctl) = ln2 · #{t : l_t > min(ctl, n_bits)} / T``.
    """
    if isinstance(ctl, bool) or not isinstance(ctl, (int, np.integer)) or ctl < 0:
        raise ValueError(f"ctl must be a non-negative int, got {ctl!r}")
    tasks = _check_tasks(tasks, n_bits)
    hidden = sum(1 for l, _ in tasks if l > min(int(ctl), n_bits))
    return LN2 * hidden / len(tasks)


def bayes_risk_bruteforce(ctl: int, tasks, n_bits: int) -> float:
    """H(y | first ``ctl`` bits, task) by enumerating all 2**n_bits inputs (n_bits <= 16), in fp64.

    Independent of the argument in :func:`bayes_risk`: for each task and each visible prefix it
    averages the label over every completion of the hidden bits (a random label counts as 1/2)
    and takes the binary entropy of that conditional probability.
    """
    if not 1 <= n_bits <= 16:
        raise ValueError(f"n_bits must be in [1, 16] for enumeration, got {n_bits}")
    if isinstance(ctl, bool) or not isinstance(ctl, (int, np.integer)) or not 0 <= ctl <= n_bits:
        raise ValueError(f"ctl must be an int in [0, n_bits={n_bits}], got {ctl!r}")
    tasks = _check_tasks(tasks, n_bits)
    codes = np.arange(2**n_bits)
    bits = (codes[:, None] >> np.arange(n_bits)) & 1  # (2^n, n): bit j of row i is x_{j+1}
    prefix = codes & ((1 << ctl) - 1)  # inputs with the same visible bits share a prefix code
    risks = []
    for l, a in tasks:
        y = (bits[:, a - 1] ^ bits[:, l - 1]).astype(np.float64) if l <= n_bits else np.full(len(codes), 0.5)
        p1 = np.bincount(prefix, weights=y, minlength=1 << ctl) / np.bincount(prefix, minlength=1 << ctl)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(np.where(p1 > 0, p1 * np.log(p1), 0.0) + np.where(p1 < 1, (1 - p1) * np.log(1 - p1), 0.0))
        risks.append(h.mean())  # every prefix is equally likely
    return float(np.mean(risks))


@dataclass
class XorBits:
    """``n`` samples of the task. bits: (n, n_bits) uint8; task: (n,) int64; label: (n,) float32."""

    bits: torch.Tensor
    task: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return len(self.label)

    def to(self, device) -> XorBits:
        return XorBits(self.bits.to(device), self.task.to(device), self.label.to(device))

    def head(self, n: int) -> XorBits:
        """The first ``n`` samples (the official code takes prefixes of one big training set)."""
        if not 0 < n <= len(self):
            raise ValueError(f"n must be in [1, {len(self)}], got {n}")
        return XorBits(self.bits[:n], self.task[:n], self.label[:n])


def make_xor_bits(n: int, *, seed: int, split: str = "train", tasks=TASKS, n_bits: int = N_BITS) -> XorBits:
    """Uniform random bits; sample i belongs to task ``i % T`` (round robin, as generate_data.py).

    Each ``(seed, split)`` pair has its own generator, so train, validation and test sets never
    share a stream. (The official generator also rejects duplicate rows; with 2^100 possible rows
    a duplicate among a few million is practically impossible, so we skip that.)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    splits = ("train", "val", "test")
    if split not in splits:
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    tasks = _check_tasks(tasks, n_bits)
    gen = torch.Generator().manual_seed(int(seed) * 7919 + splits.index(split) + 1)
    bits = torch.randint(0, 2, (n, n_bits), generator=gen, dtype=torch.uint8)
    task = torch.arange(n) % len(tasks)
    l_pos = torch.tensor([l for l, _ in tasks])[task]
    a_pos = torch.tensor([a for _, a in tasks])[task]
    coin = torch.randint(0, 2, (n,), generator=gen, dtype=torch.uint8)
    seen = l_pos <= n_bits
    near, far = torch.where(seen, a_pos, 1) - 1, torch.where(seen, l_pos, 1) - 1  # (placeholders where a coin)
    xor = bits.gather(1, near[:, None])[:, 0] ^ bits.gather(1, far[:, None])[:, 0]
    label = torch.where(seen, xor, coin).float()
    return XorBits(bits, task, label)


# ----------------------------------------------------------------------------------------------
# Many small models at once: every weight has a leading model axis
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """Layer sizes of one learner. ``kind`` is "mlp" or "bimlp" (official ``MLP``/``Bi_Input_MLP``)."""

    kind: str = "mlp"
    hidden: int = 128  # MLP: fc1 width (fc2 halves it); Bi-MLP: task_hidden_size
    bottleneck: int = 80  # Bi-MLP only: next_size, the feature layer used for PCA
    head_hidden: int = 64  # Bi-MLP only: next_hidden_size
    n_in: int = 94  # largest context length in the batch; narrower models mask their extra rows
    n_tasks: int = N_TASKS

    def __post_init__(self):
        if self.kind not in ARCHS:
            raise ValueError(f"kind must be one of {sorted(ARCHS)}, got {self.kind!r}")
        for name in ("hidden", "bottleneck", "head_hidden", "n_in", "n_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "mlp" and self.hidden < 2:
            raise ValueError(f"hidden must be >= 2 for the MLP (fc2 has hidden // 2 units), got {self.hidden}")

    @property
    def slope(self) -> float:
        return ARCHS[self.kind]

    def layout(self) -> list[tuple[str, tuple[int, ...], int | str]]:
        """(name, shape, fan-in) of every tensor of one model; the fan-in of the first layer depends
        on the model's context length, so it is given as "in" (ctl + T) or "bits" (ctl).

        ``W_bits`` and ``W_task`` together are the official first (MLP) or third (Bi-MLP) Linear
        over ``cat(bits, one_hot(task))``: a one-hot times a matrix is a row lookup, so we store
        the task rows apart and gather them (same function, same gradients, 50 fewer input columns).
        """
        h, k, g, n, T = self.hidden, self.bottleneck, self.head_hidden, self.n_in, self.n_tasks
        if self.kind == "mlp":
            return [("W_bits", (n, h), "in"), ("W_task", (T, h), "in"), ("b1", (h,), "in"),
                    ("W2", (h, h // 2), h), ("b2", (h // 2,), h),
                    ("W3", (h // 2, h), h // 2), ("b3", (h,), h // 2),
                    ("W4", (h, 1), h), ("b4", (1,), h)]
        return [("W_bits", (n, h), "bits"), ("b1", (h,), "bits"),
                ("W2", (h, k), h), ("b2", (k,), h),
                ("W_feat", (k, g), k + T), ("W_task", (T, g), k + T), ("b3", (g,), k + T),
                ("W4", (g, 1), g), ("b4", (1,), g)]

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.layout())


ARCHS = {"mlp": 0.0015, "bimlp": 0.001}  # LeakyReLU negative slope of each learner in train_model.py
Params = dict[str, torch.Tensor]  # name -> (M, *shape): one row per model


def _check_ctls(ctls, n_in: int) -> list[int]:
    ctls = [int(c) for c in ctls]
    if not ctls or any(not 1 <= c <= n_in for c in ctls):
        raise ValueError(f"ctls must be a non-empty list of ints in [1, n_in={n_in}], got {ctls}")
    return ctls


def init_params(arch: Arch, ctls: list[int], *, seed: int, dtype=torch.float32) -> Params:
    """Parameters of M = len(ctls) models, each initialised like a ``torch.nn.Linear`` of its own
    width (uniform ±1/√fan_in, fan_in = ctl + T for the first MLP layer); bit rows ≥ ctl are 0."""
    ctls = _check_ctls(ctls, arch.n_in)
    gen = torch.Generator().manual_seed(int(seed))
    params = {}
    for name, shape, fan in arch.layout():
        fan_in = torch.tensor([fan if isinstance(fan, int) else c + arch.n_tasks if fan == "in" else c
                               for c in ctls], dtype=torch.float64)
        bound = (1.0 / fan_in.sqrt()).to(dtype).view(-1, *[1] * len(shape))
        params[name] = (torch.rand(len(ctls), *shape, generator=gen, dtype=dtype) * 2 - 1) * bound
    params["W_bits"] *= bit_mask(ctls, arch.n_in, dtype=dtype)[:, :, None]
    return params


def bit_mask(ctls: list[int], n_in: int, dtype=torch.float32) -> torch.Tensor:
    """(M, n_in): 1 where model m sees bit j (j < ctl_m), else 0."""
    return (torch.arange(n_in)[None, :] < torch.tensor(ctls)[:, None]).to(dtype)


def forward(arch: Arch, p: Params, mask: torch.Tensor, bits: torch.Tensor, task: torch.Tensor,
            *, features: bool = False) -> torch.Tensor:
    """Logits (M, B) of M models, model m on its own batch ``bits[m]`` (M, B, n_in), ``task[m]`` (M, B).

    ``mask`` (M, n_in) hides the bits a model may not see: multiplying the weights (not the input)
    means a masked row gets exactly zero gradient, so model m is exactly a ``ctl_m``-wide network.
    With ``features=True`` returns the middle features that ``save_feature_tensor.py`` saves instead:
    the MLP's fc2 output (M, B, hidden // 2) or the Bi-MLP's linear_2 output (M, B, bottleneck).
    """
    act = lambda z: F.leaky_relu(z, arch.slope)  # noqa: E731
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
    x = torch.bmm(bits, p["W_bits"] * mask[:, :, None])
    if arch.kind == "mlp":
        h = act(x + p["W_task"][rows, task] + p["b1"][:, None])
        h = torch.baddbmm(p["b2"][:, None], h, p["W2"])  # no activation between fc2 and fc3 (official)
        if features:
            return h
        h = act(torch.baddbmm(p["b3"][:, None], h, p["W3"]))
    else:
        feat = torch.baddbmm(p["b2"][:, None], act(x + p["b1"][:, None]), p["W2"])  # sees bits only
        if features:
            return feat
        h = act(torch.bmm(feat, p["W_feat"]) + p["W_task"][rows, task] + p["b3"][:, None])
    return torch.baddbmm(p["b4"][:, None], h, p["W4"])[..., 0]


def reference_forward(arch: Arch, p: dict[str, torch.Tensor], ctl: int, bits: torch.Tensor,
                      task: torch.Tensor) -> torch.Tensor:
    """One model, written the way the official code writes it: ``Linear(cat(bits[:, :ctl], one_hot))``.

    p: one model's tensors (no model axis); bits (B, ≥ctl); task (B,). Returns logits (B,).
    Only for checking :func:`forward` (tests and the notebook's exactness claim).
    """
    act = lambda z: F.leaky_relu(z, arch.slope)  # noqa: E731
    one_hot = F.one_hot(task, arch.n_tasks).to(p["b1"].dtype)
    x = bits[:, :ctl].to(p["b1"].dtype)
    if arch.kind == "mlp":
        fc1 = torch.cat([p["W_bits"][:ctl], p["W_task"]], 0)
        h = act(F.linear(torch.cat([x, one_hot], -1), fc1.T, p["b1"]))
        h = act(F.linear(F.linear(h, p["W2"].T, p["b2"]), p["W3"].T, p["b3"]))
    else:
        feat = F.linear(act(F.linear(x, p["W_bits"][:ctl].T, p["b1"])), p["W2"].T, p["b2"])
        lin3 = torch.cat([p["W_feat"], p["W_task"]], 0)
        h = act(F.linear(torch.cat([feat, one_hot], -1), lin3.T, p["b3"]))
    return F.linear(h, p["W4"].T, p["b4"])[:, 0]


def batched_matches_single(arch: Arch | None = None, *, ctls=(3, 7, 12), batch: int = 40, seed: int = 0) -> float:
    """Max |difference| of logits and of gradients between :func:`forward` on a batch of models and
    :func:`reference_forward` on each model alone, in float64 (0 up to rounding)."""
    arch = arch or Arch(kind="mlp", hidden=16, n_in=12, n_tasks=5)
    ctls = list(ctls)
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.requires_grad_() for k, v in init_params(arch, ctls, seed=seed, dtype=torch.float64).items()}
    bits = torch.randint(0, 2, (len(ctls), batch, arch.n_in), generator=gen).double()
    task = torch.randint(0, arch.n_tasks, (len(ctls), batch), generator=gen)
    y = torch.randint(0, 2, (len(ctls), batch), generator=gen).double()
    logits = forward(arch, params, bit_mask(ctls, arch.n_in, torch.float64), bits, task)
    F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum().backward()
    worst = 0.0
    for m, ctl in enumerate(ctls):
        one = {k: v.detach()[m].clone().requires_grad_() for k, v in params.items()}
        ref = reference_forward(arch, one, ctl, bits[m], task[m])
        F.binary_cross_entropy_with_logits(ref, y[m]).backward()
        worst = max(worst, (ref - logits[m]).abs().max().item())
        for k in one:
            rows = slice(0, ctl) if k == "W_bits" else slice(None)  # masked rows exist only in the batch
            worst = max(worst, (one[k].grad[rows] - params[k].grad[m][rows]).abs().max().item())
    return worst


# ----------------------------------------------------------------------------------------------
# Batched training with early stopping
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def adamw_step(params: Params, grads: Params, m: Params, v: Params, *, step: int, lr: float, weight_decay: float,
               betas=(0.9, 0.999), eps: float = 1e-8, clip: float | None = 1.0) -> None:
    """torch.optim.AdamW's update, for every model at once, after clipping each model's gradient to
    global norm ``clip`` (``clip_grad_norm_`` in the official loop). All dicts hold (M, ...) tensors."""
    if clip is not None:
        norm = sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt()
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)
        grads = {k: g * scale.view(-1, *[1] * (g.ndim - 1)) for k, g in grads.items()}
    b1, b2 = betas
    for k, p in params.items():
        p.mul_(1 - lr * weight_decay)
        m[k].mul_(b1).add_(grads[k], alpha=1 - b1)
        v[k].mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
        p.addcdiv_(m[k], (v[k] / (1 - b2**step)).sqrt_().add_(eps), value=-lr / (1 - b1**step))


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (official: AdamW lr 1e-3, wd 8e-4, clip 1.0, batch 10k, ≤200 epochs, patience 25)."""

    batch_size: int = 500
    lr: float = 1e-3
    weight_decay: float = 8e-4
    max_epochs: int = 30
    patience: int = 5
    clip: float = 1.0
    eval_chunk: int = 5000
    # CPU threads while training. The matrices are small: on the shared 2-core machine, two threads
    # made the smoke grid 16x slower than one (61.6 s vs 3.8 s wall, 28 s vs 1.6 s CPU: the idle
    # thread spins at every barrier while the other is descheduled). Never more than torch's setting.
    threads: int = 1

    def __post_init__(self):
        for name in ("batch_size", "max_epochs", "patience", "eval_chunk", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.clip <= 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, clip > 0; got {self.lr}, {self.weight_decay}, "
                             f"{self.clip}")


@dataclass
class Trained:
    """What :func:`train_models` returns for M models (arrays are numpy, row m = model m)."""

    arch: Arch
    ctls: list[int]
    seed_index: list[int]
    params: Params  # (M, ...) tensors at each model's best validation epoch (on the CPU)
    val_loss: np.ndarray  # (M,) best validation loss (nats)
    test_loss: np.ndarray  # (M,) test loss at that epoch
    test_task_loss: np.ndarray  # (M, T) test loss of each task
    best_epoch: np.ndarray  # (M,)
    epochs_run: np.ndarray  # (M,)
    val_curve: list[list[float]]  # per model, validation loss after every epoch
    seconds: float = 0.0
    sample_passes: int = 0  # training samples pushed through a model (forward + backward), summed over models


@torch.no_grad()
def evaluate(arch: Arch, params: Params, mask, data: list[XorBits], seed_index: list[int], *, chunk: int = 5000,
             per_task: bool = False):
    """Mean BCE (nats) of each model on its seed's dataset, probabilities clamped to [1e-6, 1−1e-6]
    as in the official evaluation. Returns (M,) or, with ``per_task``, ((M,), (M, T))."""
    n = len(data[0])
    n_models, dtype, device = mask.shape[0], params["b1"].dtype, params["b1"].device
    total = torch.zeros(n_models, dtype=torch.float64, device=device)
    task_sum = torch.zeros(n_models, arch.n_tasks, dtype=torch.float64, device=device)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        bits = torch.stack([d.bits[sl, :arch.n_in] for d in data])[seed_index].to(dtype)
        task = torch.stack([d.task[sl] for d in data])[seed_index]
        y = torch.stack([d.label[sl] for d in data])[seed_index].to(dtype)
        logits = forward(arch, params, mask, bits, task).clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").double()
        total += loss.sum(1)
        if per_task:
            task_sum.scatter_add_(1, task, loss)
    mean = (total / n).cpu().numpy()
    if not per_task:
        return mean
    counts = torch.bincount(data[0].task, minlength=arch.n_tasks).double().clamp(min=1)
    return mean, (task_sum / counts).cpu().numpy()


def train_models(arch: Arch, ctls: list[int], seed_index: list[int], train: list[XorBits], val: list[XorBits],
                 test: list[XorBits], cfg: TrainConfig, *, init_seed: int = 0, progress: bool = False) -> Trained:
    """See :func:`_train_models`; this wrapper only caps torch's CPU threads at ``cfg.threads``."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(cfg.threads, before)))
    try:
        return _train_models(arch, ctls, seed_index, train, val, test, cfg, init_seed=init_seed, progress=progress)
    finally:
        torch.set_num_threads(before)


def _train_models(arch: Arch, ctls: list[int], seed_index: list[int], train: list[XorBits], val: list[XorBits],
                  test: list[XorBits], cfg: TrainConfig, *, init_seed: int = 0, progress: bool = False) -> Trained:
    """Train M = len(ctls) models at once; model m sees the first ``ctls[m]`` bits of dataset
    ``train[seed_index[m]]``. Models that share a dataset also share its minibatch order.

    Each epoch every model takes the same steps; then each is scored on its validation set. A model
    keeps the parameters of its best epoch and leaves the batch after ``cfg.patience`` epochs without
    improvement, so the work shrinks as models stop. Runs on the device the data lives on.
    """
    ctls = _check_ctls(ctls, arch.n_in)
    if len(seed_index) != len(ctls) or any(not 0 <= s < len(train) for s in seed_index):
        raise ValueError(f"seed_index must give one dataset index in [0, {len(train)}) per model, got {seed_index}")
    if not (len(train) == len(val) == len(test)) or len({len(d) for d in train}) != 1:
        raise ValueError("train, val and test need one dataset per seed, and train sets of one size")
    t0 = time.perf_counter()
    n_models, n_train = len(ctls), len(train[0])
    device = train[0].bits.device
    params = {k: v.to(device) for k, v in init_params(arch, ctls, seed=init_seed).items()}
    best = {k: v.clone() for k, v in params.items()}
    best_val = np.full(n_models, np.inf)
    best_epoch = np.zeros(n_models, dtype=int)
    epochs_run = np.zeros(n_models, dtype=int)
    curves: list[list[float]] = [[] for _ in ctls]
    active = list(range(n_models))
    mom, vel = ({k: torch.zeros_like(v) for k, v in params.items()} for _ in range(2))
    mask_all = bit_mask(ctls, arch.n_in).to(device)
    gen = torch.Generator().manual_seed(init_seed + 1)  # minibatch order is drawn on the CPU on every device
    bits_all = [d.bits[:, :arch.n_in].float() for d in train]
    step, passes = 0, 0
    for epoch in range(cfg.max_epochs):
        seeds_used = sorted({seed_index[m] for m in active})
        order = {s: torch.randperm(n_train, generator=gen).to(device) for s in seeds_used}
        pos = torch.tensor([seeds_used.index(seed_index[m]) for m in active], device=device)  # model -> its data
        mask = mask_all[active]
        for start in range(0, n_train, cfg.batch_size):
            idx = [order[s][start:start + cfg.batch_size] for s in seeds_used]
            bits = torch.stack([bits_all[s][i] for s, i in zip(seeds_used, idx, strict=True)])[pos]
            task = torch.stack([train[s].task[i] for s, i in zip(seeds_used, idx, strict=True)])[pos]
            y = torch.stack([train[s].label[i] for s, i in zip(seeds_used, idx, strict=True)])[pos]
            for p in params.values():
                p.requires_grad_(True)
            logits = forward(arch, params, mask, bits, task)
            # Sum over models of each model's mean loss: model m's gradient is that of its own loss.
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1).sum()
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
            params = {k: p.detach() for k, p in params.items()}
            step += 1
            adamw_step(params, grads, mom, vel, step=step, lr=cfg.lr, weight_decay=cfg.weight_decay, clip=cfg.clip)
            passes += y.numel()
        val_loss = evaluate(arch, params, mask, val, [seed_index[m] for m in active], chunk=cfg.eval_chunk)
        keep = []
        for row, m in enumerate(active):
            curves[m].append(float(val_loss[row]))
            epochs_run[m] = epoch + 1
            if val_loss[row] < best_val[m]:
                best_val[m], best_epoch[m] = val_loss[row], epoch + 1
                for k in best:
                    best[k][m] = params[k][row]
            if epoch + 1 - best_epoch[m] < cfg.patience:
                keep.append(row)
        if progress:
            print(f"  epoch {epoch + 1}: {len(keep)}/{n_models} models still training")
        if not keep:
            break
        if len(keep) < len(active):
            params, mom, vel = ({k: t[keep] for k, t in d.items()} for d in (params, mom, vel))
            active = [active[r] for r in keep]
    test_loss, task_loss = evaluate(arch, best, mask_all, test, seed_index, chunk=cfg.eval_chunk, per_task=True)
    best = {k: v.cpu() for k, v in best.items()}
    return Trained(arch, ctls, list(seed_index), best, best_val, test_loss, task_loss, best_epoch, epochs_run,
                   curves, time.perf_counter() - t0, passes)


# ----------------------------------------------------------------------------------------------
# The grid: context length × data size × seed
# ----------------------------------------------------------------------------------------------
@dataclass
class GridResult:
    """Test losses of the grid. ``loss[s, c, d]``: seed s, context length ctls[c], data size sizes[d]."""

    ctls: list[int]
    sizes: list[int]
    seeds: list[int]
    loss: np.ndarray  # (S, C, D) test loss at the best validation epoch
    task_loss: np.ndarray  # (S, C, D, T)
    epochs: np.ndarray  # (S, C, D) epochs run
    val_loss: np.ndarray | None = None  # (S, C, D) best validation loss
    seconds: dict[int, float] = field(default_factory=dict)  # per data size
    sample_passes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_loss(self) -> np.ndarray:
        """(C, D): the loss curve averaged over seeds (the curve the claims use)."""
        return self.loss.mean(0)

    def argmin_ctl(self) -> np.ndarray:
        """(D,): the context length that minimises the seed-averaged loss, for each data size."""
        return np.array(self.ctls)[self.mean_loss.argmin(0)]

    def argmin_ctl_per_seed(self) -> np.ndarray:
        """(S, D)."""
        return np.array(self.ctls)[self.loss.argmin(1)]


def make_datasets(seeds: list[int], n_train: int, n_val: int, n_test: int, tasks=TASKS):
    """Per seed: (train, val, test) sets; smaller training sets are prefixes of ``train``."""
    return ([make_xor_bits(n_train, seed=s, split="train", tasks=tasks) for s in seeds],
            [make_xor_bits(n_val, seed=s, split="val", tasks=tasks) for s in seeds],
            [make_xor_bits(n_test, seed=s, split="test", tasks=tasks) for s in seeds])


def run_grid(ctls: list[int], sizes: list[int], seeds: list[int], *, arch: Arch, cfg: TrainConfig,
             n_val: int = 10_000, n_test: int = 10_000, device: str = "cpu", progress: bool = True) -> GridResult:
    """Train one model per (seed, ctl, size). All (seed, ctl) models of one size train as one batch."""
    if not sizes or any(s < N_TASKS for s in sizes):
        raise ValueError(f"sizes must be data sizes >= {N_TASKS} (one sample per task), got {sizes}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if max(ctls) > arch.n_in:
        raise ValueError(f"arch.n_in={arch.n_in} is smaller than the largest ctl {max(ctls)}")
    train, val, test = ([d.to(device) for d in ds] for ds in make_datasets(seeds, max(sizes), n_val, n_test))
    S, C, D = len(seeds), len(ctls), len(sizes)
    loss, val_loss, epochs = np.zeros((S, C, D)), np.zeros((S, C, D)), np.zeros((S, C, D), dtype=int)
    task_loss = np.zeros((S, C, D, N_TASKS))
    grid = GridResult(list(ctls), list(sizes), list(seeds), loss, task_loss, epochs, val_loss)
    pairs = [(s, c) for s in range(S) for c in range(C)]
    for d, size in enumerate(sizes):
        res = train_models(arch, [ctls[c] for _, c in pairs], [s for s, _ in pairs], [t.head(size) for t in train],
                           val, test, cfg, init_seed=1000 * seeds[0] + d)
        for m, (s, c) in enumerate(pairs):
            loss[s, c, d], val_loss[s, c, d], epochs[s, c, d] = res.test_loss[m], res.val_loss[m], res.epochs_run[m]
            task_loss[s, c, d] = res.test_task_loss[m]
        grid.seconds[size], grid.sample_passes[size] = res.seconds, res.sample_passes
        if progress:
            print(f"D={size:>7,}: {len(pairs)} models in {res.seconds:5.1f} s "
                  f"(epochs {res.epochs_run.min()}-{res.epochs_run.max()})")
    return grid


# ----------------------------------------------------------------------------------------------
# Intrinsic dimension of the Bi-MLP's features
# ----------------------------------------------------------------------------------------------
ID_THRESHOLD = 0.0035  # THRESHOLD in draw_CEvsPCA/draw_IntrinsicDim.py


def pca_eigenvalues(features: torch.Tensor) -> np.ndarray:
    """Eigenvalues (k,) of the covariance of ``features`` (N, k), largest first, in float64."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be an (N, k) tensor with N >= 2, got {getattr(features, 'shape', features)}")
    x = features.detach().double()
    x = x - x.mean(0)
    eig = torch.linalg.eigvalsh(x.T @ x / (x.shape[0] - 1))
    return eig.flip(0).clamp(min=0).numpy()


def intrinsic_dimension(eigvals, threshold: float = ID_THRESHOLD) -> int:
    """Number of eigenvalues above ``threshold · λ_max``.

    The official script records the 0-based index of the last such eigenvalue, which is this count
    minus one; the shift changes neither a trend nor a linear fit's R².
    """
    eig = np.asarray(eigvals, dtype=np.float64)
    if eig.ndim != 1 or eig.size == 0 or eig.max() <= 0:
        raise ValueError(f"eigvals must be a non-empty 1-D array with a positive maximum, got {eig!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    return int((eig > threshold * eig.max()).sum())


@torch.no_grad()
def model_features(arch: Arch, params: Params, ctls: list[int], seed_index: list[int], data: list[XorBits],
                   n: int) -> torch.Tensor:
    """(M, n, k): each model's middle features (the layer ``save_feature_tensor.py`` returns: MLP
    fc2, k = hidden // 2; Bi-MLP linear_2, k = bottleneck) on the first ``n`` samples of its seed's data."""
    if not 2 <= n <= len(data[0]):
        raise ValueError(f"n must be in [2, {len(data[0])}], got {n}")
    bits = torch.stack([d.bits[:n, :arch.n_in] for d in data])[seed_index].float()
    task = torch.stack([d.task[:n] for d in data])[seed_index]
    return forward(arch, params, bit_mask(ctls, arch.n_in), bits, task, features=True)


@dataclass
class IDResult:
    """Models at one data size: ``ce[s, c]`` test loss and ``ids[s, c]`` intrinsic dimension of
    seed s at context length ctls[c]; ``eigvals[s, c]`` the normalised spectrum (λ/λ_max);
    ``ids_init[s, c]`` the same measurement on the untrained network (a control)."""

    ctls: list[int]
    seeds: list[int]
    size: int
    kind: str
    ce: np.ndarray  # (S, C)
    ids: np.ndarray  # (S, C)
    ids_init: np.ndarray  # (S, C)
    eigvals: np.ndarray  # (S, C, k)
    val_loss: np.ndarray  # (S, C) best validation loss
    seconds: float = 0.0
    sample_passes: int = 0

    def fit(self) -> tuple[float, float, float]:
        """Least-squares line CE ≈ slope·ID + intercept over every (seed, ctl) point: (slope, intercept, R²)."""
        return linear_fit(self.ids.ravel(), self.ce.ravel())


def linear_fit(x, y) -> tuple[float, float, float]:
    """(slope, intercept, R²) of the least-squares line y ≈ slope·x + intercept."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 3:
        raise ValueError(f"x and y must be 1-D of the same length >= 3, got {x.shape} and {y.shape}")
    if np.ptp(x) == 0:
        return 0.0, float(y.mean()), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    return float(slope), float(intercept), float(1 - (resid**2).sum() / total) if total > 0 else 1.0


def run_intrinsic_dimension(ctls: list[int], size: int, seeds: list[int], *, arch: Arch, cfg: TrainConfig,
                            n_val: int = 10_000, n_test: int = 10_000, n_features: int = 5000,
                            device: str = "cpu", progress: bool = True) -> IDResult:
    """Train one model per (seed, ctl) on ``size`` samples; measure its test CE and the intrinsic
    dimension of its middle features on ``n_features`` test samples (and, as a control, of the
    same network before training)."""
    if not 2 <= n_features <= n_test:
        raise ValueError(f"n_features must be in [2, n_test={n_test}], got {n_features}")
    train, val, test = make_datasets(list(seeds), size, n_val, n_test)
    pairs = [(s, c) for s in range(len(seeds)) for c in range(len(ctls))]
    model_ctls, seed_index = [ctls[c] for _, c in pairs], [s for s, _ in pairs]
    init_seed = 1000 * seeds[0] + 999
    res = train_models(arch, model_ctls, seed_index, *([d.to(device) for d in ds] for ds in (train, val, test)),
                       cfg, init_seed=init_seed)
    spectra = {}
    for name, params in (("trained", res.params), ("init", init_params(arch, model_ctls, seed=init_seed))):
        feats = model_features(arch, params, model_ctls, seed_index, test, n_features)
        spectra[name] = np.stack([pca_eigenvalues(f) for f in feats])
    S, C = len(seeds), len(ctls)
    ids = {k: np.array([intrinsic_dimension(e) for e in eig]).reshape(S, C) for k, eig in spectra.items()}
    if progress:
        print(f"{arch.kind}, D={size:,}: {len(pairs)} models in {res.seconds:5.1f} s "
              f"(epochs {res.epochs_run.min()}-{res.epochs_run.max()})")
    eig = spectra["trained"]
    return IDResult(list(ctls), list(seeds), size, arch.kind, res.test_loss.reshape(S, C), ids["trained"],
                    ids["init"], (eig / eig[:, :1]).reshape(S, C, -1), res.val_loss.reshape(S, C), res.seconds,
                    res.sample_passes)


# ----------------------------------------------------------------------------------------------
# LLaMA cross-entropy at growing context, as embedded in the official code
# ----------------------------------------------------------------------------------------------
# Transcribed from NaturalLanguage/Measuring/draw_CEvsPCA/draw_IntrinsicDim.py (arrays Ctl_Loss and
# CE_Loss). The file does not say which Llama-3.1 model or text produced them (the measuring scripts
# default to Llama-3.1-8B / 70B); they are repo data, not a table of the paper.
LLAMA_CTX = (8, 12, 16, 24, 32, 48, 64, 128, 256, 384, 512, 768)
LLAMA_CE = (3.9531, 3.5390, 3.28283, 2.99618, 2.83873, 2.65246, 2.53125, 2.36169, 2.21765, 2.14698, 2.12716,
            2.08389)


def fit_bayes_risk_curve(ctx, ce) -> dict[str, float]:
    """Fit CE(l) ≈ C0 + C / l^γ (the paper's Eq. 3 for the Bayes risk) by least squares.
    Returns C0, C, gamma and R²."""
    from scipy.optimize import curve_fit

    ctx, ce = np.asarray(ctx, dtype=np.float64), np.asarray(ce, dtype=np.float64)
    if ctx.shape != ce.shape or ctx.ndim != 1 or ctx.size < 4 or (ctx <= 0).any():
        raise ValueError(f"ctx and ce must be 1-D of the same length >= 4 with ctx > 0, got {ctx.shape}, {ce.shape}")
    model = lambda l, c0, c, g: c0 + c / l**g  # noqa: E731
    (c0, c, g), _ = curve_fit(model, ctx, ce, p0=(ce.min() - 0.1, (ce.max() - ce.min()) * ctx.min(), 1.0),
                              maxfev=20_000)
    resid = ce - model(ctx, c0, c, g)
    r2 = 1 - (resid**2).sum() / ((ce - ce.mean()) ** 2).sum()
    return {"C0": float(c0), "C": float(c), "gamma": float(g), "r2": float(r2)}


# ----------------------------------------------------------------------------------------------
# Figures (pure functions of precomputed results; the notebook's explorer calls loss_explorer_figure)
# ----------------------------------------------------------------------------------------------
def _colours(n: int) -> list[str]:
    from plotly.colors import sample_colorscale

    return sample_colorscale("Viridis", [0.9 * i / max(1, n - 1) for i in range(n)])


def bayes_floor_figure(ctls: list[int] | None = None, ctl_max: int = N_BITS):
    """The exact Bayes risk BR(ctl) for ctl = 0..ctl_max: a staircase that drops ln2/50 at each task's l."""
    import plotly.graph_objects as go

    from companion import viz

    xs = list(range(ctl_max + 1))
    fig = viz.figure("Exact Bayes floor of the XOR-bits task", "context length ctl (visible bits)",
                     "Bayes risk BR(ctl) (nats)", height=380)
    fig.add_trace(go.Scatter(x=xs, y=[bayes_risk(c) for c in xs], mode="lines", line_shape="hv",
                             line=dict(color=viz.PALETTE["paper"]), name="BR(ctl)"))
    if ctls:
        fig.add_trace(go.Scatter(x=list(ctls), y=[bayes_risk(c) for c in ctls], mode="markers+text",
                                 text=[f"{bayes_risk(c):.3f}" for c in ctls], textposition="top right",
                                 marker=dict(size=9, color=viz.PALETTE["ours"]), name="our grid"))
    ls = [l for l, _ in TASKS if l <= ctl_max]
    fig.add_trace(go.Scatter(x=ls, y=[0.0] * len(ls), mode="markers", marker=dict(symbol="line-ns-open", size=10,
                             color=viz.PALETTE["baseline"]), name="far bit l of each task"))
    return fig


def _subset_loss(grid: GridResult, n_tasks: int) -> np.ndarray:
    """(S, C, D) loss averaged over the first ``n_tasks`` tasks (the nearest far bits)."""
    if not 1 <= n_tasks <= N_TASKS:
        raise ValueError(f"n_tasks must be in [1, {N_TASKS}], got {n_tasks}")
    return grid.task_loss[..., :n_tasks].mean(-1)


def loss_curves_figure(grid: GridResult, *, n_tasks: int = N_TASKS, highlight: int | None = None):
    """Test loss against ctl, one curve per data size (seed mean; per-seed points faint), with the
    exact Bayes floor; a star marks each curve's minimum. ``n_tasks < 50`` rescores the same models
    on the first ``n_tasks`` tasks only; ``highlight`` (a data size) fades the other curves."""
    import plotly.graph_objects as go

    from companion import viz

    loss = _subset_loss(grid, n_tasks)
    mean = loss.mean(0)
    sub = TASKS[:n_tasks]
    xs = list(range(min(grid.ctls), max(grid.ctls) + 1))
    fig = viz.figure(f"Loss against context length ({n_tasks} tasks, mean of {len(grid.seeds)} seeds)",
                     "context length ctl", "test cross-entropy (nats)", height=440)
    fig.add_trace(go.Scatter(x=xs, y=[bayes_risk(c, sub) for c in xs], mode="lines", line_shape="hv",
                             line=dict(color="black", dash="dash"), name="Bayes floor BR(ctl)"))
    for d, (size, colour) in enumerate(zip(grid.sizes, _colours(len(grid.sizes)), strict=True)):
        faded = highlight is not None and size != highlight
        opacity = 0.25 if faded else 1.0
        for s in range(len(grid.seeds)):
            fig.add_trace(go.Scatter(x=grid.ctls, y=loss[s, :, d], mode="markers", opacity=0.35 * opacity,
                                     marker=dict(color=colour, size=6), showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=grid.ctls, y=mean[:, d], mode="lines+markers", opacity=opacity,
                                 line=dict(color=colour, width=3), name=f"D = {size:,}"))
        best = int(mean[:, d].argmin())
        fig.add_trace(go.Scatter(x=[grid.ctls[best]], y=[mean[best, d]], mode="markers", opacity=opacity,
                                 marker=dict(symbol="star", size=16, color=colour, line=dict(color="black", width=1)),
                                 showlegend=False, hovertext=f"argmin for D={size:,}"))
    fig.add_hline(y=LN2, line=dict(color=viz.PALETTE["baseline"], dash="dot"), annotation_text="ln 2 (guessing)")
    return fig


def argmin_figure(grid: GridResult):
    """The optimal context length against data size: of the seed-mean curve, and of each seed."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure("The optimal context length grows with the data", "training samples D",
                     "argmin over ctl of the loss", height=380)
    per_seed = grid.argmin_ctl_per_seed()
    for s, seed in enumerate(grid.seeds):
        jitter = 1 + 0.03 * (s - (len(grid.seeds) - 1) / 2)
        fig.add_trace(go.Scatter(x=[d * jitter for d in grid.sizes], y=per_seed[s], mode="markers",
                                 marker=dict(size=8, color=viz.PALETTE["baseline"], opacity=0.6),
                                 name="each seed" if s == 0 else None, showlegend=s == 0,
                                 hovertext=f"seed {seed}"))
    fig.add_trace(go.Scatter(x=grid.sizes, y=grid.argmin_ctl(), mode="lines+markers", name="mean curve",
                             line=dict(color=viz.PALETTE["ours"], width=3), marker=dict(size=11)))
    fig.update_xaxes(type="log", tickvals=grid.sizes)
    fig.update_yaxes(tickvals=grid.ctls, range=[min(grid.ctls) - 5, max(grid.ctls) + 5])
    return fig


def loss_explorer_figure(grid: GridResult, *, size: int, n_tasks: int = N_TASKS):
    """Explorer view. Left: the loss curve of data size ``size`` (seeds and mean) above the Bayes floor
    of the first ``n_tasks`` tasks; the gap is the approximation loss. Right: the test loss of every
    task (rows, by far bit l) at every ctl, mean over seeds: dark = learnt, yellow = guessing."""
    import plotly.graph_objects as go

    from companion import viz

    if size not in grid.sizes:
        raise ValueError(f"size must be one of the trained data sizes {grid.sizes}, got {size}")
    d = grid.sizes.index(size)
    loss = _subset_loss(grid, n_tasks)[:, :, d]
    floor = [bayes_risk(c, TASKS[:n_tasks]) for c in grid.ctls]
    fig = viz.subplots(1, 2, titles=[f"D = {size:,}, first {n_tasks} tasks", "test loss of each task (seed mean)"],
                       height=460, column_widths=[0.55, 0.45], horizontal_spacing=0.12)
    fig.add_trace(go.Scatter(x=grid.ctls, y=floor, mode="lines+markers", line=dict(color="black", dash="dash"),
                             name="Bayes risk"), row=1, col=1)
    fig.add_trace(go.Scatter(x=grid.ctls, y=loss.mean(0), mode="lines+markers", fill="tonexty",
                             fillcolor="rgba(214,39,40,0.15)", line=dict(color=viz.PALETTE["ours"], width=3),
                             name="loss = Bayes + approximation"), row=1, col=1)
    for s in range(len(grid.seeds)):
        fig.add_trace(go.Scatter(x=grid.ctls, y=loss[s], mode="markers", marker=dict(color=viz.PALETTE["ours"],
                                 size=6, opacity=0.4), showlegend=False, hoverinfo="skip"), row=1, col=1)
    best = int(loss.mean(0).argmin())
    fig.add_trace(go.Scatter(x=[grid.ctls[best]], y=[loss.mean(0)[best]], mode="markers", name="optimum",
                             marker=dict(symbol="star", size=16, color=viz.PALETTE["ours"],
                                         line=dict(color="black", width=1))), row=1, col=1)
    tasks_loss = grid.task_loss[:, :, d, :n_tasks].mean(0).T  # (n_tasks, C)
    fig.add_trace(go.Heatmap(z=tasks_loss, x=[str(c) for c in grid.ctls],
                             y=[f"t{t} (l={l})" for t, (l, _) in enumerate(TASKS[:n_tasks])], zmin=0, zmax=LN2,
                             colorscale="Viridis", colorbar=dict(title="nats", x=1.0), showscale=True),
                  row=1, col=2)
    fig.update_xaxes(title_text="context length ctl", row=1, col=1)
    fig.update_xaxes(title_text="ctl", type="category", row=1, col=2)
    fig.update_yaxes(title_text="cross-entropy (nats)", range=[0, 0.8], row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=n_tasks <= 25, row=1, col=2)
    return fig


def spectrum_figure(res: IDResult, *, seed_index: int = 0):
    """Normalised PCA spectra λ_i/λ_max of the middle features, one line per ctl, with the ID threshold."""
    import plotly.graph_objects as go

    from companion import viz

    fig = viz.figure(f"Spectrum of the {res.kind.upper()}'s middle features (seed {res.seeds[seed_index]})",
                     "eigenvalue index i", "λ_i / λ_max", height=400)
    k = res.eigvals.shape[-1]
    for c, (ctl, colour) in enumerate(zip(res.ctls, _colours(len(res.ctls)), strict=True)):
        fig.add_trace(go.Scatter(x=list(range(1, k + 1)), y=np.maximum(res.eigvals[seed_index, c], 1e-9),
                                 mode="lines", line=dict(color=colour),
                                 name=f"ctl {ctl}: ID {res.ids[seed_index, c]}"))
    fig.add_hline(y=ID_THRESHOLD, line=dict(color=viz.PALETTE["ours"], dash="dash"),
                  annotation_text=f"threshold {ID_THRESHOLD}·λ_max")
    fig.update_yaxes(type="log", range=[-6, 0.1])
    return fig


def id_figure(res: IDResult):
    """Left: ID against ctl (each seed, the mean, and the untrained network) next to the number of
    tasks a ctl makes learnable. Right: test CE against ID with the least-squares line and its R²."""
    import plotly.graph_objects as go

    from companion import viz

    slope, intercept, r2 = res.fit()
    fig = viz.subplots(1, 2, titles=["intrinsic dimension grows with context",
                                     f"CE against ID: CE ≈ {slope:.4f}·ID + {intercept:.3f}, R² = {r2:.3f}"],
                       height=420, horizontal_spacing=0.1)
    for s, seed in enumerate(res.seeds):
        fig.add_trace(go.Scatter(x=res.ctls, y=res.ids[s], mode="markers", marker=dict(color=viz.PALETTE["baseline"],
                                 size=7, opacity=0.6), name="ID, each seed" if s == 0 else None,
                                 showlegend=s == 0, hovertext=f"seed {seed}"), row=1, col=1)
    fig.add_trace(go.Scatter(x=res.ctls, y=res.ids.mean(0), mode="lines+markers", name="ID, seed mean",
                             line=dict(color=viz.PALETTE["ours"], width=3)), row=1, col=1)
    fig.add_trace(go.Scatter(x=res.ctls, y=res.ids_init.mean(0), mode="lines+markers", name="ID before training",
                             line=dict(color=viz.PALETTE["baseline"], dash="dot")), row=1, col=1)
    fig.add_trace(go.Scatter(x=res.ctls, y=[sum(l <= c for l, _ in TASKS) for c in res.ctls], mode="lines+markers",
                             line=dict(color=viz.PALETTE["paper"], dash="dash"), name="tasks with l ≤ ctl"),
                  row=1, col=1)
    for c, (ctl, colour) in enumerate(zip(res.ctls, _colours(len(res.ctls)), strict=True)):
        fig.add_trace(go.Scatter(x=res.ids[:, c], y=res.ce[:, c], mode="markers", marker=dict(color=colour, size=10),
                                 name=f"ctl {ctl}"), row=1, col=2)
    xs = np.array([res.ids.min(), res.ids.max()], dtype=float)
    fig.add_trace(go.Scatter(x=xs, y=slope * xs + intercept, mode="lines", line=dict(color="black", dash="dash"),
                             name="least-squares line"), row=1, col=2)
    fig.update_xaxes(title_text="context length ctl", row=1, col=1)
    fig.update_yaxes(title_text="count", row=1, col=1)
    fig.update_xaxes(title_text="intrinsic dimension (eigenvalues > 0.0035·λ_max)", row=1, col=2)
    fig.update_yaxes(title_text="test cross-entropy (nats)", row=1, col=2)
    return fig


def llama_figure(fit: dict[str, float] | None = None):
    """The LLaMA cross-entropy numbers from the official code against context, with the Eq. 3 fit."""
    import plotly.graph_objects as go

    from companion import viz

    fit = fit or fit_bayes_risk_curve(LLAMA_CTX, LLAMA_CE)
    fig = viz.figure("Llama-3.1 cross-entropy against context (numbers from the official code)",
                     "context length l (tokens)", "cross-entropy (nats)", height=400)
    fig.add_trace(go.Scatter(x=list(LLAMA_CTX), y=list(LLAMA_CE), mode="markers", name="repo data",
                             marker=dict(size=10, color=viz.PALETTE["paper"])))
    xs = np.geomspace(min(LLAMA_CTX), max(LLAMA_CTX), 100)
    fig.add_trace(go.Scatter(x=xs, y=fit["C0"] + fit["C"] / xs ** fit["gamma"], mode="lines",
                             line=dict(color=viz.PALETTE["ours"], dash="dash"),
                             name=f"{fit['C0']:.3f} + {fit['C']:.2f}/l^{fit['gamma']:.3f} (R² {fit['r2']:.4f})"))
    fig.update_xaxes(type="log", tickvals=list(LLAMA_CTX))
    return fig
