"""Execute notebooks with papermill: ``python -m ci.run_notebooks [--full] [--jobs N] [slug ...]``.

* Smoke mode by default (papermill injects ``SMOKE = True``); ``--full`` runs the full size.
* ``--jobs`` workers run in parallel and share the cores: each gets ``cpus // jobs`` threads via
  ``LAB_THREADS`` / ``OMP_NUM_THREADS`` / ``NUMBA_NUM_THREADS``, so they do not oversubscribe.
* Every notebook runs in a fresh temporary working directory, which proves it does not depend
  on the working directory. Executed copies go to ``data/runs/<mode>/<slug>.ipynb``.
* Each notebook has a time budget (smoke 60 s, full 600 s, from DESIGN.md). Over budget is
  reported as ``slow``; past twice the budget the run is killed (``timeout``) and fails.
* Claims: each run writes its own claims file; its lines are then appended to ``$LAB_CLAIMS``
  (default ``data/claims.jsonl``) and summarised as held/tested in the table.

Exits non-zero if any notebook fails or times out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from companion.paths import NOTEBOOK_DIR, data_dir

BUDGET_S = {"smoke": 60.0, "full": 600.0}


@dataclass
class Result:
    slug: str
    mode: str
    seconds: float
    status: str  # ok | slow | failed | timeout
    claims: list[dict] = field(default_factory=list)
    output: Path | None = None
    log: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "timeout")

    def claims_cell(self) -> str:
        tested = [c for c in self.claims if c["status"] != "skipped"]
        held = sum(c["status"] == "held" for c in tested)
        skipped = len(self.claims) - len(tested)
        return f"{held}/{len(tested)}" + (f" (+{skipped} full-only)" if skipped else "")


def notebook_paths(slugs: list[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    paths = sorted(p for p in notebook_dir.glob("*.ipynb") if not p.name.startswith("."))
    if slugs:
        by_slug = {p.stem: p for p in paths}
        missing = [s for s in slugs if s not in by_slug]
        if missing:
            raise SystemExit(f"no notebook for {missing}; have {sorted(by_slug)}")
        paths = [by_slug[s] for s in slugs]
    return paths


def worker_env(threads: int, claims_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LAB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "NUMBA_NUM_THREADS": str(threads), "LAB_HEADLESS": "1", "LAB_PROGRESS": "0",
        "LAB_CLAIMS": str(claims_file), "PYTHONUNBUFFERED": "1",
    })
    return env


def run_one(path: Path, *, mode: str, seed: int, threads: int, out_dir: Path, budget: float) -> Result:
    slug = path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{slug}.ipynb"
    claims_file = out_dir / f"{slug}.claims.jsonl"
    claims_file.unlink(missing_ok=True)
    params = f"SMOKE: {'true' if mode == 'smoke' else 'false'}\nSEED: {seed}\n"
    with tempfile.TemporaryDirectory(prefix=f"nb-{slug}-") as cwd:
        cmd = [sys.executable, "-m", "papermill", str(path), str(output), "-y", params, "-k", "python3",
               "--cwd", cwd, "--no-progress-bar", "--log-level", "WARNING"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=worker_env(threads, claims_file), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=2 * budget)
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the kernel too: it is in the same session
            log, _ = proc.communicate()
            status = "timeout"
        seconds = time.perf_counter() - t0
    if status == "ok" and seconds > budget:
        status = "slow"
    claims = [json.loads(line) for line in claims_file.read_text().splitlines()] if claims_file.exists() else []
    return Result(slug, mode, seconds, status, claims, output, log or "")


def append_claims(results: list[Result]) -> Path:
    target = Path(os.environ.get("LAB_CLAIMS", data_dir() / "claims.jsonl"))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as fh:
        for r in results:
            for c in r.claims:
                fh.write(json.dumps(c, ensure_ascii=False) + "\n")
    return target


def print_table(results: list[Result]) -> None:
    print(f"\n{'notebook':<28} {'mode':<6} {'seconds':>8}  {'status':<8} claims held/tested")
    for r in results:
        print(f"{r.slug:<28} {r.mode:<6} {r.seconds:>8.1f}  {r.status:<8} {r.claims_cell()}")


def run_all(paths: list[Path], *, mode: str, jobs: int, seed: int = 0, out_dir: Path | None = None,
            budget: float | None = None, echo: bool = True) -> list[Result]:
    cpus = os.cpu_count() or 1
    jobs = max(1, min(jobs, len(paths) or 1))
    threads = max(1, cpus // jobs)
    out_dir = out_dir or data_dir() / "runs" / mode
    budget = budget or BUDGET_S[mode]
    if echo:
        print(f"ci.run_notebooks: {len(paths)} notebook(s), mode={mode}, {jobs} worker(s) x {threads} "
              f"thread(s), budget {budget:.0f} s each (killed at {2 * budget:.0f} s)", flush=True)

    def job(path: Path) -> Result:
        r = run_one(path, mode=mode, seed=seed, threads=threads, out_dir=out_dir, budget=budget)
        if echo:
            print(f"  {r.status:<8} {r.slug} ({r.seconds:.1f} s, claims {r.claims_cell()})", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(job, paths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("slugs", nargs="*", help="notebooks to run (default: all)")
    ap.add_argument("--full", action="store_true", help="full mode instead of smoke")
    ap.add_argument("--jobs", type=int, default=2, help="parallel workers (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--notebook-dir", type=Path, default=NOTEBOOK_DIR, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    mode = "full" if args.full else "smoke"
    results = run_all(notebook_paths(args.slugs or None, args.notebook_dir), mode=mode, jobs=args.jobs,
                      seed=args.seed)
    target = append_claims(results)
    print_table(results)
    for r in results:
        if r.failed:
            print(f"\n===== {r.slug}: {r.status} after {r.seconds:.1f} s; last output: =====\n{r.log[-6000:]}")
        elif r.status == "slow":
            print(f"WARNING: {r.slug} took {r.seconds:.1f} s, over its {mode} budget of {BUDGET_S[mode]:.0f} s")
    print(f"claims appended to {target}; executed notebooks in {data_dir() / 'runs' / mode}")
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
