"""LLM Paper Lab companion library: what the notebooks import.

Importing ``companion`` is cheap (no torch): each module is imported where it is used.

    import companion
    run = companion.setup(seed=SEED, smoke=SMOKE, device=DEVICE)   # first cell of every notebook

Modules: ``model`` (tiny decoder LM), ``data`` and ``tokenizer`` (generated corpora, byte-level
BPE), ``train`` (one training loop), ``zoo`` (cached tiny pretrained models), ``metrics``,
``viz`` (plotly theme and renderer), ``widgets`` (explorers), ``claims`` (checked claims), and
``papers.<slug>`` (one module per paper).
"""

from companion.paths import DATA_DIR, NOTEBOOK_DIR, REPO_ROOT
from companion.runtime import Run, setup

__all__ = ["DATA_DIR", "NOTEBOOK_DIR", "REPO_ROOT", "Run", "setup"]
__version__ = "0.1.0"
