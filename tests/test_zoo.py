"""companion/zoo.py: build once, load from cache, detect corruption, rebuild on version bumps."""

import hashlib
import json
import multiprocessing as mp
import time
import warnings
from pathlib import Path

import pytest
import torch

from companion import zoo
from companion.model import ModelConfig, TinyLM


@pytest.fixture
def zoo_env(tmp_path, monkeypatch):
    """A private LAB_DATA and a private copy of the registry."""
    monkeypatch.setenv("LAB_DATA", str(tmp_path))
    monkeypatch.setattr(zoo, "_REGISTRY", dict(zoo._REGISTRY))
    return tmp_path / "zoo"


def _skeleton(d_model=8):
    return lambda: TinyLM(ModelConfig(vocab_size=16, d_model=d_model, n_layers=1, n_heads=2, d_ff=16))


def _register(name, *, version="1", d_model=8, log=None):
    """A cheap deterministic recipe; every fit call is recorded in ``log`` (a list or a file path)."""
    calls = [] if log is None else log

    @zoo.register(name, version=version, skeleton=_skeleton(d_model), description="test recipe")
    def fit(model):
        if isinstance(calls, Path):
            with open(calls, "a") as fh:
                fh.write("fit\n")
            time.sleep(0.3)  # widen the window in which a second builder could race
        else:
            calls.append(name)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        return {"score": 1.25, "version": version}

    return calls


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _expected_state(d_model=8):
    torch.manual_seed(0)
    model = _skeleton(d_model)()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return _state(model)


def _check_files(zdir, name):
    pt, js = zdir / f"{name}.pt", zdir / f"{name}.json"
    manifest = json.loads(js.read_text())
    payload = pt.read_bytes()
    assert manifest["sha256"] == hashlib.sha256(payload).hexdigest()
    assert manifest["bytes"] == len(payload)
    assert manifest["name"] == name
    assert sorted(p.name for p in zdir.iterdir()) == sorted([pt.name, js.name, f"{name}.lock"])  # no temp files
    return manifest


# ----------------------------------------------------------------------------------------------
def test_first_load_builds_and_writes_cache(zoo_env):
    calls = _register("t-build")
    model = zoo.load("t-build")
    assert calls == ["t-build"]
    manifest = _check_files(zoo_env, "t-build")
    assert manifest["version"] == "1"
    assert manifest["meta"]["score"] == 1.25 and "build_seconds" in manifest["meta"]
    assert model.zoo_meta == manifest["meta"]
    assert not model.training
    _assert_same(_state(model), _expected_state())  # built from torch.manual_seed(0), deterministically
    saved = torch.load(zoo_env / "t-build.pt", weights_only=True)
    _assert_same(saved, _state(model))


def test_second_load_uses_cache(zoo_env):
    calls = _register("t-cache")
    first = zoo.load("t-cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = zoo.load("t-cache")
    assert calls == ["t-cache"]  # not rebuilt
    assert second is not first
    _assert_same(_state(second), _state(first))
    assert second.zoo_meta == first.zoo_meta
    assert not second.training


def test_rebuild_flag_forces_a_build(zoo_env):
    calls = _register("t-force")
    zoo.load("t-force")
    model = zoo.load("t-force", rebuild=True)
    assert calls == ["t-force"] * 2
    _assert_same(_state(model), _expected_state())
    _check_files(zoo_env, "t-force")


def _flip(path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0xFF for b in data[mid:mid + 8])
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage",
    [
        lambda z, n: _flip(z / f"{n}.pt"),
        lambda z, n: _truncate(z / f"{n}.pt"),
        lambda z, n: (z / f"{n}.pt").write_bytes(b""),
        lambda z, n: (z / f"{n}.pt").unlink(),
        lambda z, n: (z / f"{n}.json").unlink(),
        lambda z, n: (z / f"{n}.json").write_text("{not json"),
        lambda z, n: (z / f"{n}.json").write_text("[]"),
        lambda z, n: (z / f"{n}.json").write_text(json.dumps({"version": "1"})),
    ],
    ids=["flip-bytes", "truncate", "empty-pt", "missing-pt", "missing-manifest", "garbage-manifest",
         "array-manifest", "manifest-without-hash"],
)
def test_damaged_cache_warns_and_rebuilds(zoo_env, damage):
    calls = _register("t-damage")
    reference = _state(zoo.load("t-damage"))
    damage(zoo_env, "t-damage")
    with pytest.warns(RuntimeWarning, match="corrupt or incomplete"):
        model = zoo.load("t-damage")
    assert calls == ["t-damage"] * 2
    _assert_same(_state(model), reference)
    _check_files(zoo_env, "t-damage")  # the rebuilt files are valid ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.load("t-damage")  # ... and load without another rebuild
    assert len(calls) == 2


def test_valid_pickle_with_wrong_hash_is_not_loaded(zoo_env):
    """A well-formed state dict that is not the one the manifest hashed must not be used."""
    _register("t-swap")
    good = _state(zoo.load("t-swap"))
    other = {k: torch.zeros_like(v) for k, v in good.items()}
    torch.save(other, zoo_env / "t-swap.pt")
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        model = zoo.load("t-swap")
    _assert_same(_state(model), good)


def test_version_bump_rebuilds_without_warning(zoo_env):
    calls = _register("t-version", version="1")
    zoo.load("t-version")
    _register("t-version", version="2", log=calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = zoo.load("t-version")
    assert calls == ["t-version"] * 2
    assert json.loads((zoo_env / "t-version.json").read_text())["version"] == "2"
    assert model.zoo_meta["version"] == "2"
    zoo.load("t-version")
    assert len(calls) == 2


def test_changed_skeleton_without_version_bump_rebuilds(zoo_env):
    calls = _register("t-shape", d_model=8)
    zoo.load("t-shape")
    _register("t-shape", d_model=12, log=calls)  # same version, incompatible state dict
    with pytest.warns(RuntimeWarning):
        model = zoo.load("t-shape")
    assert model.cfg.d_model == 12
    assert len(calls) == 2


def test_unknown_name_raises(zoo_env):
    with pytest.raises(ValueError, match="unknown zoo model 'no-such-model'"):
        zoo.load("no-such-model")
    assert not zoo_env.exists() or not any(zoo_env.iterdir())


def test_register_rejects_a_different_recipe_under_a_taken_name(zoo_env):
    _register("t-taken")
    with pytest.raises(ValueError, match="already registered"):
        zoo.register("t-taken", version="1", skeleton=_skeleton())(lambda m: {})
    assert "t-taken" in zoo.names() and zoo.names() == sorted(zoo.names())


def test_cache_lives_under_lab_data(zoo_env, tmp_path):
    assert zoo.zoo_dir() == tmp_path / "zoo"
    _register("t-where")
    zoo.load("t-where")
    assert (tmp_path / "zoo" / "t-where.pt").exists()


def test_load_does_not_disturb_the_global_rng(zoo_env):
    _register("t-rng")
    torch.manual_seed(123)
    zoo.load("t-rng")  # cold: builds
    after_cold = torch.rand(4)
    torch.manual_seed(123)
    zoo.load("t-rng")  # warm: loads
    after_warm = torch.rand(4)
    torch.manual_seed(123)
    untouched = torch.rand(4)
    assert torch.equal(after_cold, after_warm)
    assert torch.equal(after_warm, untouched)


def _worker(name, log, data_dir, d_model, barrier):
    import os

    os.environ["LAB_DATA"] = data_dir
    _register(name, d_model=d_model, log=Path(log))
    barrier.wait()
    model = zoo.load(name)
    torch.save(model.state_dict(), Path(data_dir) / f"out-{os.getpid()}.pt")


def test_parallel_loads_build_once(zoo_env, tmp_path):
    log = tmp_path / "fits.log"
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_worker, args=("t-par", str(log), str(tmp_path), 8, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "fit\n"  # built exactly once
    outs = sorted(tmp_path.glob("out-*.pt"))
    assert len(outs) == 2
    a, b = (torch.load(o, weights_only=True) for o in outs)
    _assert_same(a, b)
    _check_files(zoo_env, "t-par")


def test_failed_build_leaves_no_cache_and_is_retried(zoo_env):
    attempts = []

    @zoo.register("t-fail", version="1", skeleton=_skeleton())
    def fit(model):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("training diverged")
        return {"ok": True}

    with pytest.raises(RuntimeError, match="diverged"):
        zoo.load("t-fail")
    assert not (zoo_env / "t-fail.pt").exists() and not (zoo_env / "t-fail.json").exists()
    model = zoo.load("t-fail")  # the lock was released and the build runs again
    assert model.zoo_meta["ok"] is True and len(attempts) == 2
    _check_files(zoo_env, "t-fail")
