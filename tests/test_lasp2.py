"""companion/papers/lasp2.py and companion/distributed.py: the schemes on a real gloo group, the
hand-written backward, byte/call/depth accounting, the launcher's failure handling, torchrun."""

import fcntl
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import distributed
from companion.distributed import WorkerError, dependency_depth, launch
from companion.papers import lasp2
from kernels import linear_attention as la


# ----------------------------------------------------------------------------------------------
# Worker targets for the launcher tests (importable from this module by the worker processes)
# ----------------------------------------------------------------------------------------------
def _exit_silently_on_rank_1(rank, world_size):
    if rank == 1:
        os._exit(3)  # dies without a traceback or a report, like a segfault
    torch.distributed.barrier()
    return rank


def _hang(rank, world_size):
    time.sleep(600)


def _fresh(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Per-device compute, no processes
# ----------------------------------------------------------------------------------------------
def test_linear_attention_reference_is_the_kernel_specification():
    q, k, v = (_fresh(2, 3, 37, 5, seed=s) for s in range(3))
    ours = lasp2.linear_attention(q, k, v)
    theirs, _ = la.reference(q, k, v)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", ["torch_chunked", "reference"])
def test_local_forward_starts_from_the_given_state(kernel):
    q, k, v = _fresh(2, 2, 50, 6, seed=1), _fresh(2, 2, 50, 6, seed=2), _fresh(2, 2, 50, 4, seed=3)
    m_prev = _fresh(2, 2, 6, 4, seed=4)
    out, m_through = lasp2.local_forward(q, k, v, m_prev, kernel=kernel)
    torch.testing.assert_close(out, lasp2.linear_attention(q, k, v) + q @ m_prev, rtol=0, atol=1e-12)
    torch.testing.assert_close(m_through, m_prev + k.transpose(-1, -2) @ v, rtol=0, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 70), dk=st.integers(1, 9), dv=st.integers(1, 9), with_prev=st.booleans(),
       with_next=st.booleans(), seed=st.integers(0, 10_000))
def test_local_backward_is_the_gradient(T, dk, dv, with_prev, with_next, seed):
    """Three kernel calls (one forward in time, two backward) give autograd's gradients, and the
    state passed to the previous rank."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v, do = r(1, 2, T, dk), r(1, 2, T, dk), r(1, 2, T, dv), r(1, 2, T, dv)
    m_prev = r(1, 2, dk, dv) if with_prev else None
    dm_next = r(1, 2, dk, dv) if with_next else None
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = lasp2.linear_attention(*leaves) + (leaves[0] @ m_prev if with_prev else 0)
    loss = (out * do).sum()
    if with_next:  # later chunks see this chunk through its state K^T V
        loss = loss + ((leaves[1].transpose(-1, -2) @ leaves[2]) * dm_next).sum()
    loss.backward()
    dq, dk_, dv_, dm_through = lasp2.local_backward(q, k, v, do, m_prev, dm_next)
    for ours, leaf in zip((dq, dk_, dv_), leaves):
        torch.testing.assert_close(ours, leaf.grad, rtol=0, atol=1e-11)
    expected = q.transpose(-1, -2) @ do + (dm_next if with_next else 0)
    torch.testing.assert_close(dm_through, expected, rtol=0, atol=1e-11)


def test_softmax_blocks_equal_softmax_attention():
    """Online softmax over blocks (any order) and its block gradients equal plain autograd."""
    B, H, C, d, W = 1, 2, 8, 4, 3
    q, k, v, do = (_fresh(B, H, C * W, d, seed=s) for s in range(4))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = lasp2.softmax_attention(*leaves)
    ref.backward(do)
    blk = lambda x, s: x[:, :, s * C:(s + 1) * C]  # noqa: E731
    for t in range(W):  # query block t, key blocks in a scrambled order
        state = lasp2._online_start(blk(q, t), d)
        for s in [t, *reversed(range(t))]:
            state = lasp2._online_update(state, blk(q, t), blk(k, s), blk(v, s), diagonal=s == t)
        m, l, acc = state
        torch.testing.assert_close(acc / l, blk(ref, t).detach(), rtol=0, atol=1e-13)
        lse, out = m + torch.log(l), acc / l
        delta = (blk(do, t) * out).sum(-1, keepdim=True)
        dq = sum(lasp2._block_grads(blk(q, t), blk(k, s), blk(v, s), blk(do, t), lse, delta, s == t)[0]
                 for s in range(t + 1))
        torch.testing.assert_close(dq, blk(leaves[0].grad, t), rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# Dependency depth from logs (no processes)
# ----------------------------------------------------------------------------------------------
def _p2p(phase="forward", send_to=(), recv_from=()):
    return {"op": "p2p", "phase": phase, "collective": False, "send_to": send_to, "recv_from": recv_from}


def _coll(op="all_gather", phase="forward"):
    return {"op": op, "phase": phase, "collective": True, "send_to": (), "recv_from": ()}


@pytest.mark.parametrize("W", [1, 2, 5])
def test_depth_of_a_chain_is_w_minus_1_and_of_a_collective_is_1(W):
    chain = [[*([_p2p(recv_from=(r - 1,))] if r else []), *([_p2p(send_to=(r + 1,))] if r < W - 1 else [])]
             for r in range(W)]
    assert dependency_depth(chain) == list(range(W))
    assert dependency_depth([[_coll()] for _ in range(W)]) == [1] * W
    ring = [[_p2p(send_to=((r + 1) % W,), recv_from=((r - 1) % W,)) for _ in range(W - 1)] for r in range(W)]
    assert max(dependency_depth(ring)) == W - 1


def test_depth_is_per_phase_and_rejects_logs_that_cannot_have_run():
    logs = [[_coll(), _coll(phase="backward")], [_coll(), _coll(phase="backward")]]
    assert dependency_depth(logs, "forward") == [1, 1] and dependency_depth(logs, "backward") == [1, 1]
    assert dependency_depth(logs) == [2, 2]
    with pytest.raises(ValueError, match="do not match"):
        dependency_depth([[_p2p(recv_from=(1,))], []])  # a receive nobody sends
    with pytest.raises(ValueError, match="different operations"):
        dependency_depth([[_coll("all_gather")], [_coll("reduce_scatter")]])


# ----------------------------------------------------------------------------------------------
# The schemes on real process groups
# ----------------------------------------------------------------------------------------------
SMALL = dict(d=8, B=1, H=2)
DEPTH = {"lasp1": lambda W: (W - 1, W - 1), "lasp2": lambda W: (1, 1), "lasp2h": lambda W: (1, 1),
         "ring": lambda W: (W - 1, W), "hybrid": lambda W: (4, 4)}


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """Every scheme on W = 2, 3, 4 ranks (one process group per W), two lengths each.

    Computed once per test run: under pytest-xdist the first worker computes it under a file lock
    and the other loads it (the workers share the parent of their temporary directories).
    """
    shared = tmp_path_factory.getbasetemp().parent / "lasp2_results.pkl"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shared.exists():
            return pickle.loads(shared.read_bytes())
        out = []
        for W in (2, 3, 4):
            cases = [lasp2.Case(s, N=n * W, **SMALL) for n in (16, 48) for s in lasp2.SCHEMES]
            out += lasp2.run_experiment(W, cases, reps=1, warmup=0, timeout_s=120)
        shared.write_bytes(pickle.dumps(out))
        return out


def test_every_scheme_equals_one_device_in_fp64(results):
    for r in results:
        assert r.err_out <= 1e-12 and r.err_grad <= 1e-12, (r.case, r.W, r.err_out, r.err_grad)


def test_recorded_bytes_calls_and_depth_match_the_algorithms(results):
    for r in results:
        c = r.case
        for phase in lasp2.PHASES:
            want = lasp2.expected_bytes_sent(c.scheme, phase, r.W, N=c.N, d=c.d, B=c.B, H=c.H)
            assert r.bytes_sent[phase] == want, (c, r.W, phase)
            assert sum(r.bytes_recv[phase]) == sum(r.bytes_sent[phase])  # every byte sent is received
        fwd, bwd = DEPTH[c.scheme](r.W)
        assert (r.depth["forward"], r.depth["backward"]) == (fwd, bwd), (c.scheme, r.W, r.depth)
        if c.scheme in ("lasp2", "lasp2h"):  # exactly one collective per pass, nothing else
            for phase in lasp2.PHASES:
                assert r.collectives[phase] == [1] * r.W and r.p2p_calls[phase] == [0] * r.W
        if c.scheme == "lasp1":
            assert max(r.collectives["forward"] + r.collectives["backward"]) == 0


def test_lasp2_bytes_do_not_depend_on_n_and_softmax_bytes_are_linear(results):
    for W in (2, 3, 4):
        by_n = {r.case.N: r for r in results if r.W == W and r.case.scheme == "lasp2"}
        assert len({r.max_bytes_sent() for r in by_n.values()}) == 1
        assert by_n[16 * W].bytes_sent["forward"][0] == (W - 1) * 1 * 2 * 8 * 8 * 8  # (W-1)·B·H·d²·8
        for scheme in ("lasp2h", "ring"):
            small, large = (lasp2.find_result(results, scheme, W=W, N=n * W, d=8) for n in (16, 48))
            assert large.max_bytes_sent() == 3 * small.max_bytes_sent()


def test_one_rank_is_plain_attention():
    """W = 1: nothing to communicate; every scheme still runs and equals one device."""
    res = lasp2.run_experiment(1, [lasp2.Case(s, N=32, **SMALL) for s in lasp2.SCHEMES], reps=1, warmup=0)
    for r in res:
        assert r.err_out <= 1e-12 and r.err_grad <= 1e-12 and r.max_bytes_sent() == 0, r.case.scheme
        assert r.p2p_calls == {"forward": [0], "backward": [0]}, r.case.scheme


def test_figures_are_pure_functions_of_the_controls(results):
    a = lasp2.explorer_figure(results, W=2, N=32, d=8)
    b = lasp2.explorer_figure(results, W=4, N=64, d=8)
    c = lasp2.explorer_figure(results, W=4, N=192, d=8)
    assert a.to_json() != b.to_json() and b.to_json() != c.to_json()
    assert a.to_json() == lasp2.explorer_figure(results, W=2, N=32, d=8).to_json()
    timeline = lasp2.timeline_figure(results, W=3, N=48, d=8)
    assert {tr.name for tr in timeline.data} >= {"compute · forward", "comm · forward", "comm · backward"}
    assert len(lasp2.bytes_figure(results, W=4, d=8).data) == 8  # measured + formula for 4 schemes
    with pytest.raises(ValueError, match="no result"):
        lasp2.explorer_figure(results, W=5, N=32, d=8)
    assert "<table>" in lasp2.results_table(results).data


def test_cli_without_torchrun_starts_its_own_workers(capsys):
    code = lasp2.main(["--world-size", "3", "--seq-lens", "48", "--head-dims", "4", "--schemes", "lasp1,lasp2",
                       "--reps", "1"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LASP2_RESULT "))
    report = json.loads(line.removeprefix("LASP2_RESULT "))
    assert code == 0 and report["world_size"] == 3 and report["max_error"] <= 1e-10
    assert [c["depth"]["forward"] for c in report["cases"]] == [2, 1]


@pytest.mark.slow
def test_torchrun_entry_point_with_gloo(tmp_path):
    """The multi-GPU entry point, exercised on CPU: torchrun starts 2 ranks, rank 0 reports JSON."""
    out = tmp_path / "lasp2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "companion.papers.lasp2", "--backend", "gloo", "--seq-lens", "64,128", "--head-dims", "8",
           "--reps", "1", "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo" and report["max_error"] <= 1e-10
    by = {(c["case"]["scheme"], c["case"]["N"]): c for c in report["cases"]}
    assert len(by) == 10
    for N in (64, 128):
        lasp2_case = by[("lasp2", N)]
        assert lasp2_case["collectives"] == {"forward": [1, 1], "backward": [1, 1]}
        assert lasp2_case["bytes_sent"]["forward"] == [1 * 2 * 2 * 8 * 8 * 8] * 2  # (W-1)·B·H·d²·8, B=2, H=2
        assert by[("lasp1", N)]["depth"] == {"forward": 1, "backward": 1}


# ----------------------------------------------------------------------------------------------
# The launcher: failures are loud, fast, and leave nothing behind
# ----------------------------------------------------------------------------------------------
def _assert_all_reaped():
    pids = distributed.last_worker_pids()
    assert pids and not any(distributed.process_alive(pid) for pid in pids), pids


def test_a_worker_that_raises_fails_fast_with_its_traceback():
    assert launch(distributed.raise_on_rank, 2, args=(-1,), preload=lasp2.PRELOAD) == [0, 1]  # warm server
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 1 of 3 raised") as err:
        launch(distributed.raise_on_rank, 3, timeout_s=120)  # rank 0 and 2 wait in a barrier forever
    assert time.monotonic() - t0 < 15
    assert "Traceback" in str(err.value) and "fails on purpose" in str(err.value)
    assert next(iter(err.value.failures)) == 1 and "fails on purpose" in err.value.failures[1]
    _assert_all_reaped()


def test_a_worker_that_dies_silently_is_reported():
    with pytest.raises(WorkerError, match="rank 1 of 2 died with exit code 3") as err:
        launch(_exit_silently_on_rank_1, 2, timeout_s=120)
    assert str(err.value).startswith("rank 1")  # the cause first, then rank 0's "connection closed"
    assert err.value.silent == [1]
    _assert_all_reaped()


def test_a_stalled_group_times_out_and_is_killed():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        launch(_hang, 2, timeout_s=3)
    assert time.monotonic() - t0 < 20
    _assert_all_reaped()


def test_groups_started_at_once_get_different_free_ports():
    outcomes = []

    def one():
        try:
            outcomes.append(launch(distributed.raise_on_rank, 2, args=(-1,), timeout_s=120))
        except Exception as exc:  # pragma: no cover (reported by the assert)
            outcomes.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [[0, 1], [0, 1]]


@pytest.mark.slow
def test_spawn_start_method_works():
    assert launch(distributed.raise_on_rank, 2, args=(-1,), start_method="spawn", timeout_s=180) == [0, 1]
    _assert_all_reaped()


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="world_size"):
        launch(distributed.raise_on_rank, 0)
    with pytest.raises(ValueError, match="start_method"):
        launch(distributed.raise_on_rank, 2, start_method="fork")
    with pytest.raises(ValueError, match="scheme"):
        lasp2.Case("lasp3", N=64, d=8)
    with pytest.raises(ValueError, match="N must be"):
        lasp2.Case("lasp2", N=0, d=8)
    with pytest.raises(ValueError, match="pattern"):
        lasp2.Case("hybrid", N=64, d=8, pattern="LXS")
    with pytest.raises(ValueError, match="kernel"):
        lasp2.SuiteConfig(cases=(lasp2.Case("lasp2", N=64, d=8),), kernel="triton")
    with pytest.raises(ValueError, match="phase"):
        lasp2.expected_bytes_sent("lasp2", "sideways", 2, N=64, d=8)
    with pytest.raises(WorkerError, match="N=30 must be divisible by the world size 4"):
        lasp2.run_experiment(4, [lasp2.Case("lasp2", N=30, d=4)], reps=1, warmup=0)
