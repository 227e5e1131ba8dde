"""The CI tools have teeth: the contract checker catches violations, the runner fails on failures."""

import copy
import json
import os
import subprocess
import sys

import nbformat as nbf
import pytest

from ci import catalogue, check_contract, run_notebooks
from companion.paths import NOTEBOOK_DIR, REPO_ROOT

TEMPLATE = NOTEBOOK_DIR / "coupled-adam.ipynb"


@pytest.fixture(scope="module")
def cat():
    return check_contract.load_catalogue()


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _check(tmp_path, nb, cat):
    path = tmp_path / "coupled-adam.ipynb"
    path.write_text(json.dumps(nb))
    return check_contract.check_notebook(path, cat, REPO_ROOT)


def test_every_committed_notebook_meets_the_contract():
    report = check_contract.check_all()
    assert report and all(not problems for problems in report.values()), report


def _edit_code(nb, needle, replace):
    for c in nb["cells"]:
        if c["cell_type"] == "code" and needle in _src(c):
            c["source"] = _src(c).replace(needle, replace)
            return nb
    raise AssertionError(f"{needle!r} not in any code cell")


def _params(nb):
    return next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))


MUTATIONS = {
    "outputs": (lambda nb: _params(nb).update(outputs=[{"output_type": "stream", "name": "stdout", "text": "x"}],
                                                 execution_count=1), "without outputs"),
    "smoke default": (lambda nb: _edit_code(nb, "SMOKE = False", "SMOKE = True"), "SMOKE = False"),
    "no parameters tag": (lambda nb: _params(nb)["metadata"].update(tags=[]), "tagged 'parameters'"),
    "no colab link": (lambda nb: nb["cells"][0].update(source=_src(nb["cells"][0]).replace("colab.research", "x")),
                      "Open in Colab"),
    "no install cell": (lambda nb: nb["cells"].pop(1), "install the companion"),
    "no explorer": (lambda nb: _edit_code(nb, "explorer = explore(", "explorer = dict("), "no explorer"),
    "matplotlib": (lambda nb: _edit_code(nb, "import inspect", "import inspect\nimport matplotlib.pyplot as plt"),
                   "plotly only"),
    "all claims full_only": (lambda nb: [c.update(source=_src(c).replace("check=at_most(1e-12))",
                             "check=at_most(1e-12), full_only=True)").replace("check=above(1e-3))",
                             "check=above(1e-3), full_only=True)").replace("check=below(0.5))",
                             "check=below(0.5), full_only=True)").replace("check=above(0.0))",
                             "check=above(0.0), full_only=True)")) for c in nb["cells"]
                             if c["cell_type"] == "code" and "claim(" in _src(c)], "smoke mode must still assert"),
    "no departs box": (lambda nb: [c.update(source=_src(c).replace("Where this toy departs from the paper", "Note"))
                                   for c in nb["cells"] if c["cell_type"] == "markdown"], "departs"),
    "class in notebook": (lambda nb: _edit_code(nb, "import inspect", "import inspect\nclass Helper:\n    pass"),
                          "defines class"),
    "no arxiv link": (lambda nb: nb["cells"][0].update(source=_src(nb["cells"][0]).replace(
        "https://arxiv.org/abs/2502.08441", "")), "arxiv.org/abs/2502.08441"),
    "heading after claims": (lambda nb: nb["cells"].append(nbf.v4.new_markdown_cell("## Appendix")),
                             "must be the last section"),
    "no setup": (lambda nb: _edit_code(nb, "companion.setup(seed=SEED, smoke=SMOKE, device=DEVICE)",
                                       "companion.setup()"), "companion.setup(seed=SEED"),
    "download": (lambda nb: _edit_code(nb, "import inspect", "import inspect\nimport urllib.request"), "network"),
    "relative path": (lambda nb: _edit_code(nb, "import inspect", "import inspect\nopen('data/x.txt')"),
                      "relative path"),
    "no kernelspec": (lambda nb: nb["metadata"].pop("kernelspec"), "kernelspec"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_contract_checker_catches(tmp_path, cat, name):
    mutate, message = MUTATIONS[name]
    nb = json.loads(TEMPLATE.read_text())
    assert _check(tmp_path, copy.deepcopy(nb), cat) == []
    mutate(nb)
    problems = _check(tmp_path, nb, cat)
    assert any(message in p for p in problems), problems


def test_catalogue_is_valid_and_readme_is_current():
    cat = catalogue.load()
    assert catalogue.validate(cat) == []
    assert len(cat["paper"]) == 89
    assert catalogue.main(["--check"]) == 0


def test_catalogue_validation_catches_bad_rows(tmp_path):
    cat = catalogue.load()
    bad = copy.deepcopy(cat)
    bad["paper"][0]["status"] = "done"
    bad["paper"][1]["slug"] = bad["paper"][2]["slug"]
    bad["paper"][3]["arxiv"] = "arXiv:1234"
    bad["paper"][4]["track"] = "T99"
    problems = "\n".join(catalogue.validate(bad))
    for message in ("status must be", "duplicate slug", "is not like", "unknown track"):
        assert message in problems
    table = catalogue.render_table(cat, scores={})
    assert all(r["slug"] in table for r in catalogue.rows(cat))


def test_paths_do_not_depend_on_the_working_directory(tmp_path):
    code = "import companion.paths as p; print(p.REPO_ROOT, p.NOTEBOOK_DIR, p.data_dir())"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
                           env={k: v for k, v in os.environ.items() if k != "LAB_DATA"}).stdout
            for cwd in (NOTEBOOK_DIR, tmp_path, "/")}
    assert len(outs) == 1


def _notebook(path, source):
    params = nbf.v4.new_code_cell("SMOKE = False\nSEED = 0", metadata={"tags": ["parameters"]})
    spec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb = nbf.v4.new_notebook(cells=[params, nbf.v4.new_code_cell(source)], metadata={"kernelspec": spec})
    nbf.write(nb, path)


@pytest.mark.slow
def test_runner_reports_claims_and_exits_nonzero_on_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LAB_CLAIMS", str(tmp_path / "all-claims.jsonl"))
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "coupled-adam.ipynb",
              "import companion\nfrom companion.claims import claim, at_most\ncompanion.setup(seed=SEED, smoke=SMOKE)\n"
              "claim('coupled-adam', 'probe', ours=0.0, paper='0', check=at_most(1e-9))\n"
              "claim('coupled-adam', 'probe2', ours=None, paper='0', check=at_most(1e-9), full_only=True)")
    assert run_notebooks.main(["--notebook-dir", str(nbs), "--jobs", "1"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "all-claims.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["held", "skipped"] and rows[0]["mode"] == "smoke"

    _notebook(nbs / "broken.ipynb", "raise ValueError('a worker error')")
    assert run_notebooks.main(["--notebook-dir", str(nbs), "--jobs", "2"]) == 1


@pytest.mark.slow
def test_runner_kills_a_notebook_past_twice_its_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DATA", str(tmp_path / "data"))
    _notebook(tmp_path / "sleepy.ipynb", "import time\ntime.sleep(60)")
    (result,) = run_notebooks.run_all([tmp_path / "sleepy.ipynb"], mode="smoke", jobs=1, budget=3, echo=False)
    assert result.status == "timeout" and result.failed and result.seconds < 30


def test_readme_scoreboard_renders_every_notebook_and_every_miss(tmp_path):
    board = {"generated": "2026-01-01", "commit": "abc1234", "mode": "full", "notebooks": [
        {"slug": "coupled-adam", "status": "ok", "seconds": 300.0, "held": 2, "tested": 3, "claims": [
            {"name": "a", "status": "held", "known_miss": None, "commit": "abc1234"},
            {"name": "b", "status": "held", "known_miss": None, "commit": "abc1234"},
            {"name": "needs scale", "status": "known miss", "known_miss": "toy too small", "commit": "abc1234"},
            {"name": "also scale", "status": "known miss", "known_miss": "toy too small", "commit": "abc1234"}]}]}
    path = tmp_path / "scoreboard.json"
    path.write_text(json.dumps(board))
    block = catalogue.render_scoreboard(path)
    assert "| [coupled-adam](notebooks/coupled-adam.ipynb) | 2/3 | 300 s | `abc1234` |" in block
    assert "known miss: needs scale / also scale (toy too small)" in block  # one reason, said once
    readme = catalogue.replace_block(catalogue.README.read_text(), block, catalogue.SB_START, catalogue.SB_END)
    assert block in readme and readme != catalogue.README.read_text()


def test_fix_colab_is_idempotent_and_satisfies_the_contract(tmp_path, cat):
    nb = json.loads(TEMPLATE.read_text())
    nb["cells"][0]["source"] = _src(nb["cells"][0]).replace("colab.research", "example")
    nb["cells"].pop(1)  # drop the install cell
    path = tmp_path / "coupled-adam.ipynb"
    path.write_text(json.dumps(nb))
    assert check_contract.fix_colab(path, REPO_ROOT) is True
    assert check_contract.fix_colab(path, REPO_ROOT) is False
    assert check_contract.check_notebook(path, cat, REPO_ROOT) == []
