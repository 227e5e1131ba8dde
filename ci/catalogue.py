"""The catalogue and the README's generated blocks: ``python -m ci.catalogue [--check | --write]``.

``notebooks/catalogue.toml`` is the source of truth. This module validates it (schema, unique
slugs, known tracks, existing seed files, notebooks present for rows marked ``notebook`` or
``card``) and renders the README's "Choose a notebook" table between the markers
``<!-- papers:start -->`` and ``<!-- papers:end -->``. It also renders the "Reproduction
scoreboard" block (between ``<!-- scoreboard:start -->`` and
``<!-- scoreboard:end -->``) from ``data/scoreboard.json``. ``--check`` fails if the README differs
from what it would write; ``--write`` rewrites that block. The "claims held" column comes from
``data/scoreboard.json`` (written by ``make book``) when it exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

from companion.paths import NOTEBOOK_DIR, REPO_ROOT

CATALOGUE = NOTEBOOK_DIR / "catalogue.toml"
README = REPO_ROOT / "README.md"
SCOREBOARD = REPO_ROOT / "data" / "scoreboard.json"
SEEDS_DIR = REPO_ROOT.parent / "shared" / "seeds"
START, END = "<!-- papers:start -->", "<!-- papers:end -->"
SB_START, SB_END = "<!-- scoreboard:start -->", "<!-- scoreboard:end -->"

PAPER_FIELDS = {"slug": str, "title": str, "authors": str, "arxiv": str, "year": int, "track": str,
                "seeds": list, "status": str, "feasibility": str, "wave": int, "kernels": list,
                "summary": str, "note": str}
FOUNDATION_FIELDS = {"slug": str, "title": str, "track": str, "status": str, "kernels": list, "summary": str}
STATUSES = ("planned", "notebook", "card")


def load(path: Path = CATALOGUE) -> dict:
    return tomllib.loads(path.read_text())


def rows(cat: dict) -> list[dict]:
    return [{**r, "kind": "paper"} for r in cat.get("paper", [])] + \
           [{**r, "kind": "foundation"} for r in cat.get("foundation", [])]


def validate(cat: dict, notebook_dir: Path = NOTEBOOK_DIR, seeds_dir: Path | None = SEEDS_DIR) -> list[str]:
    """Schema and consistency problems (empty = valid)."""
    problems = []
    tracks = cat.get("tracks", {})
    seen: set[str] = set()
    for r in rows(cat):
        fields = PAPER_FIELDS if r["kind"] == "paper" else FOUNDATION_FIELDS
        where = f"{r['kind']} {r.get('slug', '?')!r}"
        for name, typ in fields.items():
            if not isinstance(r.get(name), typ):
                problems.append(f"{where}: field {name!r} must be {typ.__name__}, got {r.get(name)!r}")
        slug = r.get("slug", "")
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", slug):
            problems.append(f"{where}: slug must be kebab-case")
        if slug in seen:
            problems.append(f"{where}: duplicate slug")
        seen.add(slug)
        if r.get("track") not in tracks:
            problems.append(f"{where}: unknown track {r.get('track')!r}")
        if r.get("status") not in STATUSES:
            problems.append(f"{where}: status must be one of {STATUSES}, got {r.get('status')!r}")
        if r["kind"] == "paper":
            if not re.fullmatch(r"\d{4}\.\d{4,5}", r.get("arxiv", "")):
                problems.append(f"{where}: arxiv id {r.get('arxiv')!r} is not like 2502.08441")
            if r.get("feasibility") not in ("A", "B", "C"):
                problems.append(f"{where}: feasibility must be A, B or C")
            if seeds_dir is not None and seeds_dir.exists():
                for s in r.get("seeds", []):
                    if not (seeds_dir / s).exists():
                        problems.append(f"{where}: seed file {s} does not exist")
        has_nb = (notebook_dir / f"{slug}.ipynb").exists()
        if r.get("status") in ("notebook", "card") and not has_nb:
            problems.append(f"{where}: status {r['status']!r} but notebooks/{slug}.ipynb is missing")
        if r.get("status") == "planned" and has_nb:
            problems.append(f"{where}: notebooks/{slug}.ipynb exists; set status to 'notebook' or 'card'")
    return problems


def scoreboard_summary(path: Path = SCOREBOARD) -> dict[str, str]:
    """slug -> "held/tested" from the committed full-mode scoreboard, if there is one."""
    if not path.exists():
        return {}
    board = json.loads(path.read_text())
    out = {}
    for nb in board.get("notebooks", []):
        out[nb["slug"]] = f"{nb['held']}/{nb['tested']}"
    return out


def render_table(cat: dict, scores: dict[str, str] | None = None) -> str:
    scores = scores if scores is not None else scoreboard_summary()
    tracks = cat["tracks"]
    order = {t: i for i, t in enumerate(tracks)}
    all_rows = sorted(rows(cat), key=lambda r: (order[r["track"]], r["kind"] != "foundation",
                                                r.get("wave", 0), r["slug"]))
    n_papers = len(cat.get("paper", []))
    built = [r for r in all_rows if r["status"] in ("notebook", "card")]
    lines = [f"{len(built)} of {len(all_rows)} notebooks built ({n_papers} seed papers + "
             f"{len(all_rows) - n_papers} foundations notebook). Generated from `notebooks/catalogue.toml` "
             "by `python -m ci.catalogue --write`; claims are from the last full run (`make book`).", "",
             "| track | notebook | paper | status | claims held |", "|---|---|---|---|---|"]
    for r in all_rows:
        title = r["title"].replace("|", "\\|")
        if r["status"] in ("notebook", "card"):
            name = f"[{r['slug']}](notebooks/{r['slug']}.ipynb)"
        else:
            name = r["slug"]
        paper = f"[{title}](https://arxiv.org/abs/{r['arxiv']})" if r["kind"] == "paper" else title
        claims = scores.get(r["slug"], "not run yet" if r["status"] != "planned" else "")
        lines.append(f"| {r['track']} {tracks[r['track']]} | {name} | {paper} | {r['status']} | {claims} |")
    return "\n".join(lines)


def _note(nb: dict) -> str:
    """One line per notebook: the claims that did not hold, grouped by their stated reason."""
    misses = [c for c in nb["claims"] if c["status"] in ("not held", "known miss")]
    skipped = sum(c["status"] == "skipped" for c in nb["claims"])
    if nb["status"] in ("failed", "timeout"):
        return f"the notebook {nb['status']}"
    if not misses:
        note = "all tested claims held"
    else:
        groups: dict[tuple[str, str], list[str]] = {}
        for c in misses:
            groups.setdefault((c["status"], c.get("known_miss") or ""), []).append(c["name"])
        note = "; ".join(f"{status}: {' / '.join(names)}" + (f" ({why})" if why else "")
                         for (status, why), names in groups.items())
    return note + (f"; {skipped} full-only claim(s) not run" if skipped else "")


def _commits(nb: dict) -> str:
    """The commit(s) the notebook's claims were checked at (each claim row records its own)."""
    found = sorted({c["commit"] for c in nb["claims"] if c.get("commit")})
    return ", ".join(f"`{c}`" for c in found) or "?"


def render_scoreboard(path: Path = SCOREBOARD) -> str:
    """The README's "Reproduction scoreboard" block, from data/scoreboard.json."""
    if not path.exists():
        return "No full run recorded yet: run `make book` to produce `data/scoreboard.json`."
    board = json.loads(path.read_text())
    lines = [f"From `data/scoreboard.json`: {board['mode']} runs, file written on {board['generated']} at commit "
             f"`{board['commit']}`; the commit column says where each notebook's claims were checked (`-dirty`: "
             "with uncommitted edits elsewhere in the tree). Every row of that file gives the paper's value, ours, "
             "and whether it held.", "",
             "| notebook | claims held | run time | commit | note |", "|---|---|---|---|---|"]
    for nb in board["notebooks"]:
        note = _note(nb).replace("|", "\\|")
        lines.append(f"| [{nb['slug']}](notebooks/{nb['slug']}.ipynb) | {nb['held']}/{nb['tested']} | "
                     f"{nb['seconds']:.0f} s | {_commits(nb)} | {note} |")
    return "\n".join(lines)


def replace_block(readme: str, table: str, start: str = START, end: str = END) -> str:
    if start not in readme or end not in readme:
        raise ValueError(f"README.md lacks the markers {start} ... {end}")
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{table}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="fail if README's table is stale (default)")
    group.add_argument("--write", action="store_true", help="rewrite README's table")
    args = ap.parse_args(argv)
    cat = load()
    problems = validate(cat)
    for p in problems:
        print(f"catalogue: {p}")
    readme = README.read_text()
    wanted = replace_block(readme, render_table(cat))
    wanted = replace_block(wanted, render_scoreboard(), SB_START, SB_END)
    if args.write:
        README.write_text(wanted)
        print("ci.catalogue: README table written")
    elif wanted != readme:
        print("ci.catalogue: README.md's paper table or scoreboard is out of date (catalogue.toml or "
              "data/scoreboard.json changed); run `python -m ci.catalogue --write`")
        return 1
    if problems:
        return 1
    print(f"ci.catalogue: {len(rows(cat))} rows valid; README table matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
