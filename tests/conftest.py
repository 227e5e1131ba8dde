"""Test-session setup.

CUDA kernels run under Numba's CUDA simulator unless a real GPU is present (nvidia-smi on PATH)
or NUMBA_ENABLE_CUDASIM is already set. This must happen before anything imports numba.cuda.
The simulator checks indexing and results, not speed, races or the memory model.
"""

import os
import shutil

if "NUMBA_ENABLE_CUDASIM" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("LAB_PROGRESS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("LAB_THREADS", "1")))


@pytest.fixture
def fp64():
    """Run a test with float64 as torch's default dtype, then restore it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def bench():
    """The smoke unlearning benchmark (memoriser, tokenizer, splits), built once per test worker;
    shared by tests/test_unlearning.py and tests/test_relearn.py."""
    from companion import unlearning

    return unlearning.load_benchmark("smoke")
