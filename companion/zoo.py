"""Named tiny pretrained models, built on first use and cached under ``data/zoo/``.

    model = zoo.load("stories-gqa")       # trains once (seconds), then loads from the cache

A recipe is registered with a name, a ``version``, a cheap ``skeleton()`` (the untrained
architecture) and a ``fit(model) -> meta`` function that trains it in place, deterministically.
The cache holds two files per model:

* ``<name>.pt``: the state dict (written atomically, loaded with ``weights_only=True``);
* ``<name>.json``: the manifest: recipe version, SHA-256 of the ``.pt`` bytes, and ``meta``.

On load the hash is checked. A corrupt or partial file, or a missing manifest, is rebuilt with a
warning; it is never loaded. A version bump rebuilds too. Parallel workers that need the same
model serialise on ``<name>.lock``, so it is built once.

Papers register their own recipes in ``companion/papers/<slug>.py`` with :func:`register`.
Keep recipes cheap: a cold cache (a fresh clone in CI) pays the build inside a smoke run.
"""

from __future__ import annotations

import io
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from companion.io import atomic_write_bytes, atomic_write_text, file_lock, sha256_bytes
from companion.paths import data_dir


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    skeleton: Callable[[], nn.Module]
    fit: Callable[[nn.Module], dict]
    description: str = ""


_REGISTRY: dict[str, Recipe] = {}


def register(name: str, *, version: str, skeleton: Callable[[], nn.Module], description: str = ""):
    """Decorator for a ``fit(model) -> meta`` function: registers the recipe under ``name``."""

    def decorator(fit: Callable[[nn.Module], dict]) -> Callable[[nn.Module], dict]:
        if name in _REGISTRY and _REGISTRY[name].fit.__qualname__ != fit.__qualname__:
            raise ValueError(f"zoo name {name!r} is already registered by {_REGISTRY[name].fit.__module__}")
        _REGISTRY[name] = Recipe(name, version, skeleton, fit, description)
        return fit

    return decorator


def names() -> list[str]:
    return sorted(_REGISTRY)


def zoo_dir() -> Path:
    return data_dir() / "zoo"


def _paths(name: str) -> tuple[Path, Path, Path]:
    d = zoo_dir()
    return d / f"{name}.pt", d / f"{name}.json", d / f"{name}.lock"


def _try_load(recipe: Recipe) -> tuple[nn.Module, dict] | None:
    """The cached model if the cache is complete, current and intact; None otherwise."""
    weights, manifest_path, _ = _paths(recipe.name)
    if not weights.exists() and not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("version") != recipe.version:
            print(f"zoo: {recipe.name!r} recipe changed ({manifest.get('version')} -> {recipe.version}); rebuilding")
            return None
        payload = weights.read_bytes()
        if sha256_bytes(payload) != manifest["sha256"]:
            raise ValueError("SHA-256 mismatch")
        model = recipe.skeleton()
        model.load_state_dict(torch.load(io.BytesIO(payload), weights_only=True))
        return model, manifest["meta"]
    except Exception as exc:  # anything wrong with the cache -> rebuild, never use it
        warnings.warn(f"zoo cache for {recipe.name!r} is corrupt or incomplete ({exc}); rebuilding",
                      RuntimeWarning, stacklevel=3)
        return None


def load(name: str, *, rebuild: bool = False) -> nn.Module:
    """The trained model ``name`` in eval mode, with its metadata as ``model.zoo_meta``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; registered: {names()} "
                         "(a paper's models register when companion.papers.<slug> is imported)")
    recipe = _REGISTRY[name]
    weights, manifest_path, lock = _paths(name)
    with file_lock(lock), torch.random.fork_rng():  # loading must not change the caller's random stream
        cached = None if rebuild else _try_load(recipe)
        if cached is None:
            print(f"zoo: building {name!r} ({recipe.description or 'no description'}); cached afterwards")
            t0 = time.perf_counter()
            torch.manual_seed(0)
            model = recipe.skeleton()
            meta = dict(recipe.fit(model) or {})
            meta["build_seconds"] = round(time.perf_counter() - t0, 2)
            try:
                json.dumps(meta)
            except TypeError as exc:
                raise ValueError(f"zoo recipe {name!r}: fit() must return JSON-serialisable metadata ({exc})") from exc
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            payload = buffer.getvalue()
            atomic_write_bytes(weights, payload)  # weights first: a manifest never points at nothing
            atomic_write_text(manifest_path, json.dumps(
                {"name": name, "version": recipe.version, "sha256": sha256_bytes(payload),
                 "bytes": len(payload), "torch": torch.__version__, "meta": meta}, indent=1))
        else:
            model, meta = cached
    model.eval()
    model.zoo_meta = meta
    return model


# ----------------------------------------------------------------------------------------------
# Shared recipes
# ----------------------------------------------------------------------------------------------
def _stories_gqa_skeleton() -> nn.Module:
    from companion.model import ModelConfig, TinyLM
    from companion.tokenizer import stories_tokenizer

    vocab = stories_tokenizer(512).vocab_size
    return TinyLM(ModelConfig(vocab_size=vocab, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2))


@register("stories-gqa", version="1", skeleton=_stories_gqa_skeleton,
          description="2-layer GQA LM (d=128, 8 query heads, 2 kv heads, RoPE) on generated stories")
def _fit_stories_gqa(model: nn.Module) -> dict:
    from companion.data import lm_batches, stories
    from companion.tokenizer import stories_tokenizer
    from companion.train import evaluate_loss, train

    tok = stories_tokenizer(512)
    train_ids = tok.encode_corpus(stories(4000, seed=1))
    val_ids = tok.encode_corpus(stories(400, seed=2))
    hist = train(model, lm_batches(train_ids, 32, 128, seed=0), steps=400, lr=3e-3, desc="stories-gqa")
    return {"train_loss": hist.loss[-1], "val_loss": evaluate_loss(model, lm_batches(val_ids, 32, 128, seed=1)),
            "steps": 400, "tokenizer": "stories_tokenizer(512)"}
