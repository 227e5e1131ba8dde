"""Plumbing shared by every kernel module: backend choice, input checks, bench cases.

Each ``kernels/<op>.py`` exposes four entry points (see DESIGN.md, "Kernels"):

* ``reference(...)`` plain torch; the specification every other backend is tested against;
* ``cpu(...)``       Numba ``@njit(parallel=True, cache=True)`` with ``prange``;
* ``cuda(...)``      ``numba.cuda`` kernels with explicit tiling and shared memory;
* ``run(..., backend="auto")`` picks ``cuda`` when a real GPU is present, else ``cpu``.

It may also define ``bench_cases(quick: bool) -> list[BenchCase]``; ``python -m ci.bench``
discovers those, so adding a kernel never means editing the benchmark script.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

BACKENDS = ("auto", "reference", "cpu", "cuda")
FLOAT_DTYPES = (torch.float32, torch.float64)


def simulator_enabled() -> bool:
    """True when NUMBA_ENABLE_CUDASIM=1: CUDA kernels run on the CPU simulator (correctness only)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"


def gpu_available() -> bool:
    """True only for a real CUDA device. The simulator counts as *no* GPU for dispatch."""
    if simulator_enabled():
        return False
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # driver present but broken: behave as CPU-only
        return False


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to ``"cuda"`` or ``"cpu"``; reject unknown names with a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "cuda" if gpu_available() else "cpu"
    return backend


def check_tensor(
    name: str,
    x: Any,
    *,
    ndim: int | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = FLOAT_DTYPES,
    shape: Sequence[int | None] | None = None,
    like: torch.Tensor | None = None,
) -> torch.Tensor:
    """Validate one kernel argument and return it.

    ``shape`` may hold ``None`` for a free axis. ``like`` demands the same dtype and device as
    another tensor. Every failure is a ``ValueError`` naming the argument, what it got and what
    was expected; nothing is broadcast or cast silently.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            raise ValueError(f"{name} has dtype {x.dtype}, expected one of {allowed}")
    if shape is not None:
        if len(shape) != x.ndim or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")
    if like is not None:
        if x.dtype != like.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, expected {like.dtype} (same as the other inputs)")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device}, expected {like.device} (same as the other inputs)")
    return x


def as_numpy(x: torch.Tensor) -> np.ndarray:
    """Zero-copy view of a contiguous CPU tensor (copies only when it must)."""
    return x.detach().cpu().contiguous().numpy()


def copy_back(dst: torch.Tensor, src: np.ndarray) -> None:
    """Write a NumPy result into ``dst`` in place (used for in-place kernels)."""
    dst.copy_(torch.from_numpy(src))


@functools.cache
def _scipy_openblas() -> tuple[Any, Any] | None:
    """``(get_num_threads, set_num_threads)`` of the OpenBLAS that numba's ``np.dot`` calls, or None.

    Numba lowers ``np.dot`` on 2-D float arrays to ``scipy.linalg.cython_blas`` (sgemm/dgemm), so
    the library is the one bundled with the scipy wheel (``scipy.libs/libscipy_openblas*``). A conda
    scipy may use MKL or a system BLAS instead; then we find nothing and change nothing.
    """
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library, as numba will)
    except ImportError:
        return None
    root = os.path.dirname(scipy.__file__)
    patterns = [os.path.join(root, "..", "scipy.libs", "*openblas*"),  # Linux wheels
                os.path.join(root, ".dylibs", "*openblas*")]  # macOS wheels
    for path in sorted(p for pat in patterns for p in glob.glob(pat)):
        try:
            lib = ctypes.CDLL(path)  # the already-loaded library: dlopen returns the same handle
        except OSError:
            continue
        for prefix in ("scipy_openblas_", "openblas_"):
            get = getattr(lib, prefix + "get_num_threads", None)
            set_ = getattr(lib, prefix + "set_num_threads", None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Inside this block, BLAS calls made from Numba kernels run on one thread each.

    Why: our kernels call ``np.dot`` on small tiles from *inside* a ``prange`` loop, so every core
    already runs its own tile. If OpenBLAS also spawned threads for each tile, the two thread pools
    would fight over the same cores (and OpenBLAS prints "Detect OpenMP Loop and this application
    may hang" once per call). The previous thread count is restored on exit.
    """
    handles = _scipy_openblas()
    if handles is None:
        yield
        return
    get, set_ = handles
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


@dataclass
class BenchCase:
    """One benchmark row: a kernel at one shape, timed against its best torch equivalent.

    ``setup()`` builds fresh inputs; ``torch_fn`` and ``numba_fn`` take those inputs. ``flops`` or
    ``bytes`` (per call) turn a time into GFLOP/s or GB/s. ``warmup`` is called once before
    timing ``numba_fn`` and is reported separately as compile time.
    """

    kernel: str
    shape: str
    setup: Callable[[], dict]
    torch_fn: Callable[[dict], Any]
    numba_fn: Callable[[dict], Any]
    flops: float | None = None
    bytes: float | None = None
    torch_label: str = "torch eager"
    cuda_fn: Callable[[dict], Any] | None = None
    torch_cuda_fn: Callable[[dict], Any] | None = None
    notes: dict = field(default_factory=dict)
