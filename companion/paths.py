"""Where things live. Paths come from this file, never from the working directory, so a notebook
runs the same from ``notebooks/`` (as JupyterLab starts it), from the repo root, or from anywhere.

``LAB_DATA`` overrides the data directory (tests use a temporary one)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def data_dir() -> Path:
    """The generated-artifacts directory (zoo cache, corpora, claims), created on demand."""
    path = Path(os.environ.get("LAB_DATA", REPO_ROOT / "data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


DATA_DIR = data_dir()
