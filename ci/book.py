"""The executed book: ``python -m ci.book [--jobs N] [--only SLUG ...] [--smoke]``.

1. runs the notebooks (full mode unless ``--smoke``) with :mod:`ci.run_notebooks`, in parallel
   workers that share the cores, printing each notebook as it finishes;
2. converts every executed notebook to ``data/book/<slug>.html`` (nbconvert's lab template) and
   puts plotly.js, from the installed plotly package, into each page's ``<head>``, so the pages
   draw their figures offline;
3. writes ``data/book/index.html`` (every notebook with its track, claims held/tested and run
   time) and ``data/scoreboard.json`` (every claim row: paper value, ours, held, mode, commit).

``--only`` (``make run NB=<slug>``) updates just those notebooks' pages and scoreboard entries.
Exits non-zero if a notebook failed; its page is still written, with the error in it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import sys
from pathlib import Path

from ci import check_contract, run_notebooks
from companion.claims import git_commit
from companion.io import atomic_write_text
from companion.paths import NOTEBOOK_DIR, REPO_ROOT, data_dir

SCOREBOARD = REPO_ROOT / "data" / "scoreboard.json"


def to_html(executed: Path) -> str:
    """nbconvert HTML of an executed notebook, with plotly.js inlined once in <head>."""
    import nbformat
    from nbconvert import HTMLExporter

    from companion.viz import plotlyjs_script_tag

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(executed, as_version=4))
    return body.replace("</head>", plotlyjs_script_tag() + "\n</head>", 1)


def notebook_entry(result: run_notebooks.Result, row: dict) -> dict:
    tested = [c for c in result.claims if c["status"] != "skipped"]
    return {
        "slug": result.slug, "title": row.get("title", result.slug), "track": row.get("track", ""),
        "mode": result.mode, "status": result.status, "seconds": round(result.seconds, 1),
        "held": sum(c["status"] == "held" for c in tested), "tested": len(tested),
        "claims": [{k: c[k] for k in ("name", "paper", "ours", "check", "held", "status", "mode", "seed",
                                      "commit", "known_miss")} for c in result.claims],
    }


def write_index(board: dict, book_dir: Path, tracks: dict[str, str]) -> Path:
    rows = []
    for nb in sorted(board["notebooks"], key=lambda n: (list(tracks).index(n["track"]) if n["track"] in tracks
                                                         else 99, n["slug"])):
        colour = "#2ca02c" if nb["held"] == nb["tested"] and nb["status"] in ("ok", "slow") else "#d62728"
        rows.append(
            f"<tr><td><a href='{nb['slug']}.html'>{html.escape(nb['title'])}</a></td>"
            f"<td>{html.escape(nb['track'])} {html.escape(tracks.get(nb['track'], ''))}</td>"
            f"<td style='color:{colour}'><b>{nb['held']}/{nb['tested']}</b></td>"
            f"<td>{nb['seconds']:.0f} s</td><td>{nb['status']}</td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>LLM Paper Lab: the book</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:6px;text-align:left}}</style>
</head><body><h1>LLM Paper Lab: the executed book</h1>
<p>Every notebook run in <b>{html.escape(board['mode'])}</b> mode on {html.escape(board['generated'])}, commit
<code>{html.escape(board['commit'])}</code>. Claims held / tested; a claim that does not hold fails its notebook
unless it is recorded as a known miss.</p>
<table><tr><th>notebook</th><th>track</th><th>claims held</th><th>run time</th><th>status</th></tr>
{''.join(rows)}</table></body></html>"""
    path = book_dir / "index.html"
    atomic_write_text(path, page)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="SLUG", help="run just these notebooks")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="smoke mode (a quick book, for checking the pipeline)")
    ap.add_argument("--scoreboard", type=Path, default=None,
                    help="default: data/scoreboard.json (full) or data/scoreboard-smoke.json (smoke)")
    args = ap.parse_args(argv)

    mode = "smoke" if args.smoke else "full"
    args.scoreboard = args.scoreboard or (SCOREBOARD if mode == "full" else data_dir() / "scoreboard-smoke.json")
    catalogue = check_contract.load_catalogue()
    book_dir = data_dir() / "book"
    book_dir.mkdir(parents=True, exist_ok=True)
    results = run_notebooks.run_all(run_notebooks.notebook_paths(args.only), mode=mode, jobs=args.jobs)
    run_notebooks.append_claims(results)

    old = json.loads(args.scoreboard.read_text()) if args.only and args.scoreboard.exists() else {}
    entries = {n["slug"]: n for n in old.get("notebooks", []) if n.get("mode") == mode}
    for r in results:
        if r.output is not None and r.output.exists():
            atomic_write_text(book_dir / f"{r.slug}.html", to_html(r.output))
        entries[r.slug] = notebook_entry(r, catalogue.get(r.slug, {}))
    entries = {s: e for s, e in entries.items() if (NOTEBOOK_DIR / f"{s}.ipynb").exists()}
    board = {"generated": dt.date.today().isoformat(), "commit": git_commit(), "mode": mode,
             "notebooks": sorted(entries.values(), key=lambda n: n["slug"])}
    atomic_write_text(args.scoreboard, json.dumps(board, indent=1, ensure_ascii=False) + "\n")
    tracks = check_contract.tomllib.loads((NOTEBOOK_DIR / "catalogue.toml").read_text())["tracks"]
    index = write_index(board, book_dir, tracks)
    run_notebooks.print_table(results)
    print(f"book: {index}  scoreboard: {args.scoreboard}")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
