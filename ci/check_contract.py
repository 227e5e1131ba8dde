"""Check every notebook against the notebook contract (DESIGN.md): ``python -m ci.check_contract``.

What a program can check, clause by clause (the numbers follow DESIGN.md):

1. title cell: markdown ``# Title``, the authors, arXiv id and link matching the catalogue, and a
   "What you will see" list of 3 to 5 items;
2. one ``parameters``-tagged code cell assigning ``SMOKE = False``, ``SEED = 0``, ``DEVICE = "cpu"``;
3. the story: LaTeX math in markdown, the paper's code imported from ``companion.papers.<module>``
   (and that module and ``tests/test_<module>.py`` exist), at most small glue (no classes, no
   function longer than 25 lines), and one "Where this toy departs from the paper" box;
4. at least one ``explore(...)`` call;
5. plotly only: no matplotlib, seaborn or bokeh;
6. a final "Claims" section holding the ``claim(...)`` calls, at least one of which is not
   ``full_only`` (smoke mode must assert something);
7. ``companion.setup(seed=SEED, smoke=SMOKE, device=DEVICE)`` is called; no downloads; no paths
   relative to the working directory;
8. committed without outputs or execution counts, with a ``python3`` kernelspec.

9. Binder/Colab: the title cell links "Open in Colab" for this notebook, and the first code cell
   installs the companion library only when it is missing (``--fix-colab`` writes both).

Also: every notebook has a catalogue row whose status is ``notebook`` or ``card``, and every such
row has a notebook. Reading cards (status ``card``) are exempt from 3's module and 4 is required.
Run-time clauses (the 60 s / 10 min budgets, determinism) are checked by ``ci.run_notebooks``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import tomllib
from pathlib import Path

from companion.paths import NOTEBOOK_DIR, REPO_ROOT

DEPARTS_MARKER = "where this toy departs from the paper"
NETWORK_PATTERNS = [r"\brequests\b", r"\burllib\b", r"\bwget\b", r"\bcurl\b", r"from_pretrained",
                    r"load_dataset", r"hf_hub", r"torch\.hub", r"https?://(?!arxiv\.org|github\.com)"]
PLOT_LIBS = re.compile(r"^\s*(import|from)\s+(matplotlib|seaborn|bokeh|altair)\b", re.M)
MAX_GLUE_FUNCTION_LINES = 25


def repository_url(repo: Path = REPO_ROOT) -> str:
    return tomllib.loads((repo / "pyproject.toml").read_text())["project"]["urls"]["Repository"].rstrip("/")


def colab_url(slug: str, repo: Path = REPO_ROOT) -> str:
    owner_repo = repository_url(repo).removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{slug}.ipynb"


def colab_badge(slug: str, repo: Path = REPO_ROOT) -> str:
    return (f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(slug, repo)})")


def install_cell_source(repo: Path = REPO_ROOT) -> str:
    return (
        "# On Colab or a fresh kernel, install the companion library (a no-op under `make lab`).\n"
        "import importlib.util\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if importlib.util.find_spec("companion") is None:\n'
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+{repository_url(repo)}.git"],\n'
        "                   check=True)"
    )


def load_catalogue(path: Path = NOTEBOOK_DIR / "catalogue.toml") -> dict[str, dict]:
    cat = tomllib.loads(path.read_text())
    rows = {}
    for kind in ("paper", "foundation"):
        for row in cat.get(kind, []):
            rows[row["slug"]] = {**row, "kind": kind}
    return rows


def module_name(slug: str) -> str:
    return slug.replace("-", "_")


def _src(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def _strip_magics(code: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in code.splitlines())


def check_notebook(path: Path, catalogue: dict[str, dict], repo: Path = REPO_ROOT) -> list[str]:
    """Problems found in one notebook (empty list = the contract holds)."""
    problems: list[str] = []
    bad = problems.append
    slug = path.stem
    try:
        nb = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return [f"not valid notebook JSON: {exc}"]
    cells = nb.get("cells", [])
    code_cells = [c for c in cells if c.get("cell_type") == "code"]
    md_cells = [c for c in cells if c.get("cell_type") == "markdown"]
    row = catalogue.get(slug)
    if row is None:
        return [f"no row with slug {slug!r} in notebooks/catalogue.toml"]
    if row.get("status") not in ("notebook", "card"):
        bad(f"catalogue status is {row.get('status')!r}; set it to 'notebook' or 'card'")
    is_card = row.get("status") == "card"

    # 8. stored clean
    spec = nb.get("metadata", {}).get("kernelspec", {})
    if spec.get("name") != "python3" or spec.get("language") != "python":
        bad("metadata.kernelspec must have name 'python3' and language 'python' (papermill needs both)")
    for i, c in enumerate(code_cells):
        if c.get("outputs") or c.get("execution_count") is not None:
            bad(f"code cell {i} has outputs or an execution count; commit notebooks without outputs")
            break

    # 1. title cell
    if not cells or cells[0].get("cell_type") != "markdown":
        bad("the first cell must be the markdown title cell")
    else:
        title = _src(cells[0])
        if not re.match(r"\s*# \S", title):
            bad("the title cell must start with '# <paper title>'")
        if row["kind"] == "paper":
            arxiv = row["arxiv"]
            if f"arxiv.org/abs/{arxiv}" not in title:
                bad(f"the title cell must link https://arxiv.org/abs/{arxiv}")
            first_author = re.split(r"[ ,&]+", row.get("authors", "").replace(" et al.", ""))
            surname = next((w for w in reversed(first_author[:3]) if w and w[0].isupper()), None)
            if surname and surname not in title:
                bad(f"the title cell must name the authors (expected to see {surname!r})")
        if colab_url(slug, repo) not in title:
            bad(f"the title cell must link Open in Colab: {colab_url(slug, repo)} (run --fix-colab)")
        m = re.search(r"what you will see[^\n]*\n((?:\s*[-*\d].*\n?)+)", title, re.I)
        items = [ln for ln in (m.group(1).splitlines() if m else []) if re.match(r"\s*([-*]|\d+\.)\s", ln)]
        if not 3 <= len(items) <= 5:
            bad(f"the title cell needs a 'What you will see' list of 3-5 items (found {len(items)})")

    # 2. parameters cell
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1 or tagged[0].get("cell_type") != "code":
        bad(f"exactly one code cell must be tagged 'parameters' (found {len(tagged)})")
    else:
        try:
            assigns = {t.id: n.value for n in ast.parse(_src(tagged[0])).body if isinstance(n, ast.Assign)
                       for t in n.targets if isinstance(t, ast.Name)}
        except SyntaxError as exc:
            assigns = {}
            bad(f"parameters cell does not parse: {exc}")
        for name, want in (("SMOKE", False), ("SEED", 0), ("DEVICE", "cpu")):
            node = assigns.get(name)
            if not (isinstance(node, ast.Constant) and node.value == want and type(node.value) is type(want)):
                bad(f"parameters cell must assign {name} = {want!r}")

    if not code_cells or 'find_spec("companion")' not in _src(code_cells[0]) \
            or repository_url(repo) not in _src(code_cells[0]):
        bad("the first code cell must install the companion only when missing (run --fix-colab)")

    code = "\n".join(_strip_magics(_src(c)) for c in code_cells)
    markdown = "\n".join(_src(c) for c in md_cells)

    # 3. the story
    if not re.search(r"\$[^$\n]+\$|\$\$", markdown):
        bad("explain the method in equations: no LaTeX ($...$) found in markdown cells")
    if DEPARTS_MARKER not in markdown.lower():
        bad("add the box '> **Where this toy departs from the paper** ...' (scale, data, proxies)")
    if not is_card:
        mod = module_name(slug)
        if not re.search(rf"companion\.papers(\.{mod}\b| import [^\n]*\b{mod}\b)", code):
            bad(f"import the method from companion.papers.{mod}")
        if not (repo / "companion" / "papers" / f"{mod}.py").exists():
            bad(f"missing companion/papers/{mod}.py")
        if not (repo / "tests" / f"test_{mod}.py").exists():
            bad(f"missing tests/test_{mod}.py")
    for i, c in enumerate(code_cells):
        try:
            tree = ast.parse(_strip_magics(_src(c)))
        except SyntaxError as exc:
            bad(f"code cell {i} does not parse: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bad(f"code cell {i} defines class {node.name}; method code belongs in companion/papers/")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n_lines = node.end_lineno - node.lineno + 1
                if n_lines > MAX_GLUE_FUNCTION_LINES:
                    bad(f"code cell {i}: function {node.name} is {n_lines} lines (max glue "
                        f"{MAX_GLUE_FUNCTION_LINES}); move it to companion/papers/")

    # 4. explorer, 5. plotly only
    if not re.search(r"\bexplore\(", code):
        bad("no explorer: call companion.widgets.explore(make_fig, ...)")
    if PLOT_LIBS.search(code):
        bad("figures must be plotly only (found a matplotlib/seaborn/bokeh/altair import)")

    # 6. claims last
    headings = [(i, _src(c)) for i, c in enumerate(cells) if c.get("cell_type") == "markdown"
                and re.search(r"^#{1,3} .*claims", _src(c), re.I | re.M)]
    claim_cells = [i for i, c in enumerate(cells) if c.get("cell_type") == "code" and "claim(" in _src(c)]
    if not headings:
        bad("the last section must be a '## Claims' heading")
    if not claim_cells:
        bad("no claim(...) calls")
    elif headings and min(claim_cells) < headings[-1][0]:
        bad("claim(...) calls must come after the final 'Claims' heading")
    if headings:
        later_headings = [i for i, c in enumerate(cells) if i > headings[-1][0] and
                          c.get("cell_type") == "markdown" and re.match(r"\s*#{1,2} ", _src(c))]
        if later_headings:
            bad("'Claims' must be the last section (found a later '#'/'##' heading)")
    smoke_claims = [m for m in re.finditer(r"\bclaim\((?:[^()]|\([^()]*\))*\)", code)
                    if not re.search(r"full_only\s*=\s*True", m.group(0))]
    if claim_cells and not smoke_claims:
        bad("every claim is full_only: smoke mode must still assert something real")

    # 7. setup, network, paths
    if not re.search(r"companion\.setup\(\s*seed\s*=\s*SEED\s*,\s*smoke\s*=\s*SMOKE\s*,\s*device\s*=\s*DEVICE", code):
        bad("call companion.setup(seed=SEED, smoke=SMOKE, device=DEVICE) before the experiment")
    for pat in NETWORK_PATTERNS:
        if re.search(pat, code.replace(install_cell_source(repo), "")):
            bad(f"possible network access in code ({pat}); generate data instead")
    if re.search(r"""["'](\.\./|\./|data/|notebooks/)""", code):
        bad("relative path literal in code; take paths from companion.paths")
    return problems


def check_all(notebook_dir: Path = NOTEBOOK_DIR, repo: Path = REPO_ROOT) -> dict[str, list[str]]:
    catalogue = load_catalogue(notebook_dir / "catalogue.toml")
    report = {p.stem: check_notebook(p, catalogue, repo) for p in sorted(notebook_dir.glob("*.ipynb"))}
    for slug, row in catalogue.items():
        if row.get("status") in ("notebook", "card") and slug not in report:
            report[slug] = [f"catalogue says status={row['status']!r} but notebooks/{slug}.ipynb is missing"]
    return report


def fix_colab(path: Path, repo: Path = REPO_ROOT) -> bool:
    """Insert or refresh the Colab badge and the install cell. Returns True if the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    title = nb.cells[0]
    lines = [ln for ln in title.source.splitlines() if "colab.research.google.com" not in ln]
    head, rest = (lines[:1], lines[1:]) if lines and lines[0].startswith("# ") else ([], lines)
    while rest and not rest[0].strip():  # drop the blank lines around the old badge
        rest.pop(0)
    title.source = "\n".join(head + ["", colab_badge(path.stem, repo), ""] + rest)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    if 'find_spec("companion")' in nb.cells[first_code].source:
        nb.cells[first_code].source = install_cell_source(repo)
    else:
        nb.cells.insert(first_code, nbformat.v4.new_code_cell(install_cell_source(repo)))
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after)
    return after != before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fix-colab", action="store_true", help="write the Colab badge and install cell first")
    args = ap.parse_args(argv)
    if args.fix_colab:
        for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
            if fix_colab(path):
                print(f"fixed Colab badge / install cell in {path.name}")
    report = check_all()
    n_bad = 0
    for slug, problems in report.items():
        print(f"{'ok ' if not problems else 'BAD'} {slug}")
        for p in problems:
            print(f"    - {p}")
        n_bad += bool(problems)
    print(f"ci.check_contract: {len(report) - n_bad}/{len(report)} notebooks meet the contract")
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
