"""Checked claims: the last section of every notebook.

    from companion.claims import claim, at_most, below

    claim("coupled-adam", "one-step update sum is zero",
          ours=rel_sum, paper="exactly 0 (Sec. 3)", check=at_most(1e-10))

``claim`` evaluates ``check(ours)``, records one JSON line in ``$LAB_CLAIMS`` (default
``data/claims.jsonl``) and **raises** ``ClaimFailed`` when the claim does not hold, so the
notebook, and CI, fail. Two escape hatches keep the scoreboard honest instead of green:

* ``full_only=True``: the toy can only test it at full size. In smoke mode it is recorded as
  ``skipped`` and not asserted; ``ours`` may be None there.
* ``known_miss="why"``: our toy does not reproduce the paper here, for the stated reason. It is
  recorded as ``known miss`` and does not raise. If it holds after all, it is recorded as held.

A check is a :class:`Check` built by the helpers below (never a bare bool), so every scoreboard row
says what was tested.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import json
import math
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from companion.paths import REPO_ROOT, data_dir
from companion.runtime import current


class ClaimFailed(AssertionError):
    """A notebook's claim did not hold."""


class Check:
    """A named predicate on our measured value, e.g. ``at_most(1e-10)`` reads "≤ 1e-10"."""

    def __init__(self, predicate: Callable[[Any], bool], text: str):
        self.predicate = predicate
        self.text = text

    def __call__(self, ours: Any) -> bool:
        try:
            return bool(self.predicate(ours))
        except (TypeError, ValueError):
            return False

    def __repr__(self) -> str:
        return f"Check({self.text})"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def at_most(x: float) -> Check:
    return Check(lambda v: _finite(v) and v <= x, f"≤ {x:g}")


def at_least(x: float) -> Check:
    return Check(lambda v: _finite(v) and v >= x, f"≥ {x:g}")


def below(x: float) -> Check:
    return Check(lambda v: _finite(v) and v < x, f"< {x:g}")


def above(x: float) -> Check:
    return Check(lambda v: _finite(v) and v > x, f"> {x:g}")


def between(lo: float, hi: float) -> Check:
    return Check(lambda v: _finite(v) and lo <= v <= hi, f"in [{lo:g}, {hi:g}]")


def close_to(target: float, tol: float) -> Check:
    return Check(lambda v: _finite(v) and abs(v - target) <= tol, f"{target:g} ± {tol:g}")


def is_true(what: str = "holds") -> Check:
    """For a boolean measurement, e.g. "every candidate is monotone"."""
    return Check(lambda v: v is True, what)


def _plain(x: Any) -> Any:
    """numpy/torch scalars -> Python numbers, so the record is plain JSON."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    raise ValueError(f"claim values must be numbers, bools, strings or lists, got {type(x).__name__}")


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """Short commit hash of the repo, with '-dirty' if tracked files changed; 'unknown' without git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def known_slugs() -> frozenset[str]:
    import tomllib

    path = REPO_ROOT / "notebooks" / "catalogue.toml"
    if not path.exists():
        return frozenset()
    cat = tomllib.loads(path.read_text())
    return frozenset(row["slug"] for table in ("paper", "foundation") for row in cat.get(table, []))


def claims_path() -> Path:
    return Path(os.environ.get("LAB_CLAIMS", data_dir() / "claims.jsonl"))


def _append(record: dict) -> None:
    path = claims_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:  # one locked write per line: safe with parallel workers
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(line)
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)


SESSION: list[dict] = []  # the claims recorded in this process, for summary()


def claim(
    slug: str,
    name: str,
    ours: Any,
    paper: Any,
    check: Check,
    *,
    full_only: bool = False,
    known_miss: str | None = None,
    note: str = "",
) -> dict:
    """Record and assert one claim. Returns the JSON record. See the module docstring."""
    run = current()
    if run is None:
        raise RuntimeError("call companion.setup(seed=..., smoke=...) before claim(...)")
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug or ""):
        raise ValueError(f"slug must be kebab-case like 'coupled-adam', got {slug!r}")
    slugs = known_slugs()
    if slugs and slug not in slugs:
        raise ValueError(f"slug {slug!r} is not in notebooks/catalogue.toml")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not isinstance(check, Check):
        raise ValueError(f"check must be a companion.claims.Check (e.g. at_most(1e-10)), got {check!r}")
    if known_miss is not None and not known_miss.strip():
        raise ValueError("known_miss must explain why the toy does not reproduce the claim")

    skipped = full_only and run.smoke
    if ours is None and not skipped:
        raise ValueError(f"claim {name!r}: ours is None; only a full_only claim in smoke mode may omit it")
    held = None if skipped else check(ours)
    status = ("skipped" if skipped else "held" if held else "known miss" if known_miss else "not held")
    record = {
        "slug": slug, "name": name, "ours": _plain(ours), "paper": _plain(paper), "check": check.text,
        "held": held, "status": status, "mode": run.mode, "seed": run.seed, "commit": git_commit(),
        "full_only": full_only, "known_miss": known_miss, "note": note,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    _append(record)
    SESSION.append(record)
    mark = {"held": "✔", "skipped": "–", "known miss": "✘ (known)", "not held": "✘"}[status]
    print(f"{mark} {status:<10} {name}: ours={record['ours']!r}, check {check.text}, paper: {record['paper']}")
    if status == "not held":
        raise ClaimFailed(f"[{slug}] claim '{name}' did not hold: ours={record['ours']!r}, "
                          f"expected {check.text} (paper: {record['paper']})")
    return record


def summary(slug: str | None = None):
    """An HTML table of this session's claims (for the end of a notebook)."""
    from html import escape

    from IPython.display import HTML

    rows = [r for r in SESSION if slug is None or r["slug"] == slug]
    colour = {"held": "#2ca02c", "not held": "#d62728", "known miss": "#ff7f0e", "skipped": "#7f7f7f"}
    body = "".join(
        f"<tr><td>{escape(r['name'])}</td><td><code>{escape(repr(r['ours']))}</code></td>"
        f"<td>{escape(r['check'])}</td><td>{escape(str(r['paper']))}</td>"
        f"<td style='color:{colour[r['status']]}'><b>{r['status']}</b></td></tr>" for r in rows)
    held = sum(r["status"] == "held" for r in rows)
    tested = sum(r["status"] != "skipped" for r in rows)
    return HTML(f"<p><b>{held}/{tested}</b> tested claims held ({rows[0]['mode'] if rows else '-'} mode)</p>"
                "<table><tr><th>claim</th><th>ours</th><th>check</th><th>paper</th><th>status</th></tr>"
                f"{body}</table>")
