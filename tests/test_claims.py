"""companion.claims: claims assert, record one JSON line each, and cannot be made vacuous."""

import json
import math

import pytest

import companion
from companion import claims as C


@pytest.fixture
def claims_file(tmp_path, monkeypatch):
    path = tmp_path / "claims.jsonl"
    monkeypatch.setenv("LAB_CLAIMS", str(path))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_held_claim_is_recorded_with_every_field(claims_file):
    companion.setup(seed=3, smoke=True)
    rec = C.claim("coupled-adam", "zero sum", ours=1e-17, paper="exactly 0", check=C.at_most(1e-12))
    assert rec["held"] is True and rec["status"] == "held"
    (row,) = _records(claims_file)
    for field in ("slug", "name", "ours", "paper", "held", "mode", "seed", "commit"):
        assert field in row
    assert row["mode"] == "smoke" and row["seed"] == 3 and row["check"] == "≤ 1e-12"


def test_failed_claim_raises_after_recording(claims_file):
    companion.setup(seed=0, smoke=False)
    with pytest.raises(C.ClaimFailed, match="did not hold"):
        C.claim("coupled-adam", "ratio", ours=0.9, paper="< 0.5", check=C.below(0.5))
    (row,) = _records(claims_file)
    assert row["held"] is False and row["status"] == "not held" and row["mode"] == "full"


def test_nan_and_non_numbers_never_hold(claims_file):
    companion.setup()
    for check in (C.at_most(1.0), C.at_least(0.0), C.below(1.0), C.above(0.0), C.between(0, 1), C.close_to(0, 1)):
        assert not check(math.nan)
        assert not check("0.5")
        assert not check(None)
    assert C.is_true()(True) and not C.is_true()(1)


def test_full_only_is_skipped_in_smoke_and_asserted_in_full(claims_file):
    companion.setup(smoke=True)
    rec = C.claim("coupled-adam", "big run", ours=None, paper="x", check=C.below(0.05), full_only=True)
    assert rec["status"] == "skipped" and rec["held"] is None
    companion.setup(smoke=False)
    with pytest.raises(C.ClaimFailed):
        C.claim("coupled-adam", "big run", ours=0.2, paper="x", check=C.below(0.05), full_only=True)


def test_known_miss_records_honestly_without_raising(claims_file):
    companion.setup(smoke=False)
    rec = C.claim("coupled-adam", "needs scale", ours=0.2, paper="x", check=C.below(0.05),
                  known_miss="our 2-layer toy is too small")
    assert rec["status"] == "known miss" and rec["held"] is False
    rec = C.claim("coupled-adam", "needs scale", ours=0.01, paper="x", check=C.below(0.05), known_miss="why")
    assert rec["status"] == "held"


@pytest.mark.parametrize("kwargs, message", [
    (dict(check=True), "check must be"),
    (dict(slug="Coupled Adam"), "kebab-case"),
    (dict(slug="no-such-paper"), "not in notebooks/catalogue.toml"),
    (dict(name=" "), "name must be"),
    (dict(ours=None), "ours is None"),
    (dict(known_miss=" "), "known_miss must explain"),
    (dict(ours=object()), "claim values must be"),
])
def test_bad_claims_raise_value_error(claims_file, kwargs, message):
    companion.setup(smoke=False)
    args = dict(slug="coupled-adam", name="n", ours=1.0, paper="p", check=C.at_most(2.0)) | kwargs
    with pytest.raises(ValueError, match=message):
        C.claim(**args)


def test_numpy_and_torch_scalars_become_plain_json(claims_file):
    import numpy as np
    import torch

    companion.setup()
    C.claim("coupled-adam", "np", ours=np.float64(0.25), paper=torch.tensor(0.5), check=C.below(1))
    row = _records(claims_file)[-1]
    assert row["ours"] == 0.25 and row["paper"] == 0.5


def test_claim_requires_setup(claims_file, monkeypatch):
    monkeypatch.setattr("companion.claims.current", lambda: None)
    with pytest.raises(RuntimeError, match="companion.setup"):
        C.claim("coupled-adam", "n", ours=1.0, paper="p", check=C.at_most(2.0))
