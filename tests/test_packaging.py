"""Packaging and commands: pyproject, environment.yml, Makefile, .ci/run and README agree."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from companion.paths import REPO_ROOT


def _pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _environment_pip_requirements() -> list[str]:
    lines = (REPO_ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = []
    for line in lines[start + 1:]:
        m = re.match(r"\s+- (.+)$", line)
        if not m:
            break
        item = m.group(1).strip()
        if not item.startswith("-"):  # skip pip options (--extra-index-url) and "-e ."
            reqs.append(item)
    return reqs


def test_environment_yml_matches_pyproject():
    proj = _pyproject()["project"]
    wanted = proj["dependencies"] + proj["optional-dependencies"]["dev"]
    assert sorted(_environment_pip_requirements()) == sorted(wanted)
    assert "- -e ." in (REPO_ROOT / "environment.yml").read_text(), "Binder must install companion itself"


def test_torch_is_bounded_above():
    deps = _pyproject()["project"]["dependencies"]
    torch_req = next(d for d in deps if d.startswith("torch"))
    assert re.search(r"<\s*2\.\d+", torch_req), f"unbounded torch pulls CUDA wheels: {torch_req}"


def test_packages_and_distribution_name():
    proj = _pyproject()
    assert proj["project"]["name"] == "llm-paper-lab"
    include = proj["tool"]["setuptools"]["packages"]["find"]["include"]
    for pkg in ("companion", "kernels", "ci"):
        assert any(pattern.startswith(pkg) for pattern in include)
        assert (REPO_ROOT / pkg / "__init__.py").exists()


def test_makefile_targets_refresh_the_venv():
    text = (REPO_ROOT / "Makefile").read_text()
    for target in ("lab", "test", "book", "run", "bench"):
        m = re.search(rf"^{target}:(.*)$", text, re.M)
        assert m, f"missing make target {target}"
        deps = m.group(1).split()
        assert "$(STAMP)" in deps or set(deps) <= {"lint", "unit", "notebooks", "contract"}, target
    assert "--ServerApp.ip=127.0.0.1" in text, "make lab must bind to localhost"
    assert "token" not in text.lower().replace("token auth", ""), "make lab must keep token auth"


def test_ci_run_calls_make_test_and_only_installs_chromium_besides():
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert script.splitlines()[-1] == "make test", "make test must be the last command (its status is the exit code)"
    assert "set -euo pipefail" in script
    assert len(re.findall(r"\bmake\b", script.replace("`make test`", ""))) == 1
    other = [ln for ln in script.splitlines() if "apt-get" in ln or "install" in ln]
    assert all("chromium" in ln or "apt-get update" in ln or ln.lstrip().startswith(("#", "echo", "||"))
               for ln in other), other


def test_readme_shows_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "make lab" in readme and "make test" in readme


@pytest.mark.slow
def test_import_companion_is_fast():
    """`import companion` must take <= 2 s (it imports no torch)."""
    code = "import time; t = time.perf_counter(); import companion; print(time.perf_counter() - t)"
    times = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  cwd=Path("/")).stdout) for _ in range(2)]
    assert min(times) <= 2.0, times
    heavy = subprocess.run([sys.executable, "-c", "import companion, sys; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "False", "import companion should stay light (no torch)"
