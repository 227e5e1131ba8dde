"""A real ``torch.distributed`` group on one machine, and a recorder for what its ranks send.

Two pieces, both used by ``companion.papers.lasp2`` and meant for any later paper about parallelism:

**launch.** ``launch(fn, world_size=4, args=(cfg,))`` starts ``world_size`` worker processes, joins
them into one process group (gloo on CPU) and returns ``[fn(rank, world_size, *args) for each rank]``.
It is built to fail fast and clean, in a notebook or headless under papermill:

* the rendezvous store is opened by the parent on port 0, so the OS picks a free port and holds it
  (no port can clash, and there is no window between "find a free port" and "bind it");
* every worker reports through a queue: its result, or its formatted traceback. The first error is
  re-raised in the parent as :class:`WorkerError` within half a second (time to hear from the other
  ranks too), with the workers' tracebacks;
* a worker that dies without a word (a segfault, ``os._exit``) is noticed by its exit code, and a
  whole group that stalls hits ``timeout_s``;
* whatever happens, a ``finally`` terminates, kills if needed, and joins every worker: none is left.

Workers come from a ``forkserver`` that has already imported torch, so a group starts in well under
a second after the first one (a ``spawn`` start imports torch again in every worker: measured about
30 s for 4 workers on our loaded 2-core CI machine). ``start_method="spawn"`` is supported too. Target
functions must be importable (defined in a module, not in a notebook cell).

**CommRecorder.** Wraps the collectives and point-to-point calls a rank makes, and logs for each one
the payload bytes sent and received, the peers, the phase (forward/backward) and its issue and
completion times. :func:`dependency_depth` replays the logs of all ranks together and returns the
length of the longest chain of communications that had to wait for each other: 1 for a single
AllGather, W-1 for a ring that passes a state from rank to rank.

Byte convention: we count the payload of the tensors a rank hands to the library, as if every
message went straight to its destination. In an AllGather of a tensor of ``n`` bytes, each rank
sends its tensor to W-1 peers and receives W-1 tensors: ``(W-1) n`` each way. A ring AllGather (what
gloo and NCCL run inside) moves exactly the same number of bytes per rank; only the route differs.
A ReduceScatter of W chunks of ``n`` bytes sends the W-1 chunks owned by other ranks and receives
W-1 partial sums of its own chunk: ``(W-1) n`` each way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue as queue_module
import time
import traceback
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["WorkerError", "launch", "last_worker_pids", "process_alive", "raise_on_rank", "CommEvent", "Span",
           "CommRecorder", "dependency_depth"]

START_METHODS = ("forkserver", "spawn")
FAILURE_GRACE_S = 0.5  # after a first failure, how long to collect the other ranks' reports
_LAST_PIDS: list[int] = []


class WorkerError(RuntimeError):
    """A worker raised or died. The message holds the workers' own tracebacks.

    ``failures`` maps rank -> traceback text in the order they arrived (the first is usually the
    cause; its peers then fail with "connection closed"); ``silent`` lists ranks that died without
    a word (exit code != 0), which are the likelier cause when present.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None, silent: Sequence[int] = ()):
        super().__init__(message)
        self.failures = dict(failures or {})
        self.silent = list(silent)


def last_worker_pids() -> list[int]:
    """Process ids of the workers of the most recent :func:`launch` (for tests: all are reaped)."""
    return list(_LAST_PIDS)


def process_alive(pid: int) -> bool:
    """True if a process with this id exists (a zombie, i.e. exited but not reaped, counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def raise_on_rank(rank: int, world_size: int, bad_rank: int = 1) -> int:
    """A worker that fails on purpose: rank ``bad_rank`` raises while every other rank waits in a
    barrier that can never complete. :func:`launch` must report the error, not hang."""
    if rank == bad_rank:
        raise RuntimeError(f"rank {rank} fails on purpose (a bug in one worker)")
    dist.barrier()
    return rank


def _worker_main(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
                 results, timeout_s: float, threads: int) -> None:
    """Body of one worker process: join the group, run ``fn``, report a result or a traceback."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)  # W workers on few cores: one thread each, or they fight
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=dt.timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=dt.timedelta(seconds=timeout_s))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # noqa: B036 (the parent must hear about KeyboardInterrupt/SystemExit too)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reap(procs: Sequence) -> None:
    """Terminate, then kill, then join every process still running. Never leaves one behind."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)


def _silent(procs: Sequence, done: dict, errors: dict) -> list[int]:
    """Ranks whose process exited with an error code without sending anything."""
    return [r for r, p in enumerate(procs) if r not in done and r not in errors and p.exitcode not in (None, 0)]


def launch(fn: Callable[..., Any], world_size: int, *, args: tuple = (), backend: str = "gloo",
           timeout_s: float = 120.0, start_method: str = "forkserver", threads: int = 1,
           preload: Sequence[str] = ()) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes in one process group.

    Returns the per-rank results, rank order. ``fn`` and ``args`` must be picklable, and ``fn``
    importable from a module. Raises :class:`WorkerError` (with the worker's traceback) as soon as
    any rank fails, and ``TimeoutError`` when the group has not finished after ``timeout_s``
    seconds. ``preload`` names modules the forkserver imports once, besides torch and ``fn``'s own
    module. The server starts at the first forkserver launch of a process and keeps that list, so
    give the first launch everything later launches will need.
    """
    import torch.multiprocessing as mp

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")

    ctx = mp.get_context(start_method)
    if start_method == "forkserver":  # only the first call in a process starts the server
        ctx.set_forkserver_preload(["torch", "torch.distributed", __name__, fn.__module__, *preload])
    # The parent owns the rendezvous store, bound to port 0: the OS picks a free port.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=dt.timedelta(seconds=timeout_s))
    results = ctx.Queue()
    procs: list = []
    done: dict[int, Any] = {}
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_worker_main, name=f"dist-rank{rank}", daemon=True,
                            args=(rank, world_size, store.port, backend, fn, tuple(args), results,
                                  timeout_s, threads))
            p.start()
            procs.append(p)
        _LAST_PIDS[:] = [p.pid for p in procs]
        deadline = time.monotonic() + timeout_s
        errors: dict[int, str] = {}  # rank -> traceback, in arrival order
        failed_at = None
        while len(done) + len(errors) < world_size:
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                break  # the others are probably stuck waiting for the failed rank
            try:
                rank, status, payload = results.get(timeout=0.1)
            except queue_module.Empty:
                if failed_at is None and _silent(procs, done, errors):
                    failed_at = time.monotonic()
                if failed_at is None and time.monotonic() > deadline:
                    raise TimeoutError(f"process group of {world_size} did not finish in {timeout_s:g} s; "
                                       f"ranks that reported: {sorted(done)}") from None
                continue
            if status == "error":
                errors[rank] = payload
                failed_at = failed_at or time.monotonic()
            else:
                done[rank] = payload
        silent = _silent(procs, done, errors)
        if errors or silent:
            # A rank that died silently is usually the cause; its peers then fail with "connection closed".
            parts = [f"rank {r} of {world_size} died with exit code {procs[r].exitcode} without reporting "
                     "(a crash or os._exit: no traceback)" for r in silent]
            parts += [f"rank {r} of {world_size} raised:\n{tb}" for r, tb in errors.items()]
            raise WorkerError("\n".join(parts), failures=errors, silent=silent)
        for p in procs:  # every rank reported: give them a moment to exit on their own
            p.join(timeout=5.0)
        return [done[r] for r in range(world_size)]
    finally:
        _reap(procs)
        results.close()
        results.cancel_join_thread()
        del store


# ----------------------------------------------------------------------------------------------
# The communication recorder
# ----------------------------------------------------------------------------------------------
@dataclass
class CommEvent:
    """One communication call of one rank. Times are ``time.perf_counter()`` seconds."""

    op: str  # "all_gather" | "reduce_scatter" | "send" | "recv" | "sendrecv"
    phase: str  # "forward" | "backward" | whatever :meth:`CommRecorder.phase` was given
    label: str  # what travels, for the timeline, e.g. "M_t"
    collective: bool
    bytes_sent: int
    bytes_recv: int
    send_to: tuple[int, ...] = ()  # point-to-point peers (global ranks)
    recv_from: tuple[int, ...] = ()
    t_issue: float = 0.0
    t_done: float = 0.0


@dataclass
class Span:
    """A stretch of local computation, for the timeline figure."""

    label: str
    phase: str
    t_start: float
    t_end: float


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Pending:
    """Handle of an asynchronous call: ``wait()`` completes it and stamps its completion time."""

    def __init__(self, work, event: CommEvent, value: Any, sync: Callable[[], None] | None):
        self._work, self._event, self._value, self._sync = work, event, value, sync

    def wait(self) -> Any:
        works = self._work if isinstance(self._work, list) else [self._work]
        for w in works:
            if w is not None:
                w.wait()
        if self._sync is not None:
            self._sync()
        self._event.t_done = time.perf_counter()
        return self._value


@dataclass
class CommRecorder:
    """Every communication call of one rank goes through here and is logged as a :class:`CommEvent`.

    ``group`` is the process group (None = the default group). ``sync`` is called around timed
    regions (pass ``torch.cuda.synchronize`` on GPUs so that times mean something).
    """

    group: Any = None
    sync: Callable[[], None] | None = None
    events: list[CommEvent] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    current_phase: str = "forward"

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def reset(self) -> None:
        self.events.clear()
        self.spans.clear()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        previous, self.current_phase = self.current_phase, name
        try:
            yield
        finally:
            self.current_phase = previous

    @contextlib.contextmanager
    def compute(self, label: str) -> Iterator[None]:
        """Time a block of local computation (shown on the timeline, never counted as communication)."""
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.spans.append(Span(label, self.current_phase, t0, time.perf_counter()))

    def _log(self, **kw) -> CommEvent:
        event = CommEvent(phase=self.current_phase, t_issue=time.perf_counter(), **kw)
        self.events.append(event)
        return event

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    # -- collectives ------------------------------------------------------------------------
    def all_gather(self, tensor: torch.Tensor, *, label: str, async_op: bool = False):
        """Every rank contributes ``tensor``; returns the list of all W tensors (rank order)."""
        tensor = tensor.contiguous()
        W = self.world_size
        out = [torch.empty_like(tensor) for _ in range(W)]
        n = _nbytes(tensor)
        event = self._log(op="all_gather", label=label, collective=True, bytes_sent=(W - 1) * n,
                          bytes_recv=(W - 1) * n)
        work = dist.all_gather(out, tensor, group=self.group, async_op=async_op)
        pending = _Pending(work, event, out, self.sync)
        return pending if async_op else pending.wait()

    def reduce_scatter(self, chunks: Sequence[torch.Tensor], *, label: str) -> torch.Tensor:
        """``chunks[s]`` is this rank's contribution to rank s; returns the sum over ranks of
        every rank's contribution to this rank."""
        W, rank = self.world_size, self.rank
        if len(chunks) != W:
            raise ValueError(f"reduce_scatter needs one chunk per rank ({W}), got {len(chunks)}")
        chunks = [c.contiguous() for c in chunks]
        out = torch.empty_like(chunks[rank])
        event = self._log(op="reduce_scatter", label=label, collective=True,
                          bytes_sent=sum(_nbytes(c) for s, c in enumerate(chunks) if s != rank),
                          bytes_recv=(W - 1) * _nbytes(out))
        dist.reduce_scatter(out, list(chunks), group=self.group)
        return _Pending(None, event, out, self.sync).wait()

    # -- point to point ----------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, *, label: str) -> None:
        """Blocking send to group rank ``dst``."""
        tensor = tensor.contiguous()
        event = self._log(op="send", label=label, collective=False, bytes_sent=_nbytes(tensor), bytes_recv=0,
                          send_to=(self._global(dst),))
        dist.send(tensor, self._global(dst), group=self.group)
        _Pending(None, event, None, self.sync).wait()

    def recv(self, tensor: torch.Tensor, src: int, *, label: str) -> torch.Tensor:
        """Blocking receive from group rank ``src`` into ``tensor`` (returned)."""
        event = self._log(op="recv", label=label, collective=False, bytes_sent=0, bytes_recv=_nbytes(tensor),
                          recv_from=(self._global(src),))
        dist.recv(tensor, self._global(src), group=self.group)
        return _Pending(None, event, tensor, self.sync).wait()

    def sendrecv(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, *, label: str,
                 async_op: bool = False):
        """One ring step: send ``send`` to ``dst`` while receiving ``recv`` from ``src``."""
        send = send.contiguous()
        event = self._log(op="sendrecv", label=label, collective=False, bytes_sent=_nbytes(send),
                          bytes_recv=_nbytes(recv), send_to=(self._global(dst),),
                          recv_from=(self._global(src),))
        ops = [dist.P2POp(dist.isend, send, self._global(dst), self.group),
               dist.P2POp(dist.irecv, recv, self._global(src), self.group)]
        pending = _Pending(dist.batch_isend_irecv(ops), event, recv, self.sync)
        return pending if async_op else pending.wait()

    # -- summaries ---------------------------------------------------------------------------
    def summary(self, phase: str | None = None) -> dict[str, int]:
        """Totals for one phase (or all): bytes sent/received, collective and point-to-point calls."""
        ev = [e for e in self.events if phase is None or e.phase == phase]
        return {"bytes_sent": sum(e.bytes_sent for e in ev), "bytes_recv": sum(e.bytes_recv for e in ev),
                "collectives": sum(e.collective for e in ev), "p2p_calls": sum(not e.collective for e in ev)}

    def export(self) -> dict[str, list[dict]]:
        """Plain dicts (picklable, JSON-able) of the events and spans."""
        return {"events": [asdict(e) for e in self.events], "spans": [asdict(s) for s in self.spans]}


def dependency_depth(logs: Sequence[Sequence[dict | CommEvent]], phase: str | None = None) -> list[int]:
    """Replay every rank's log together; return, per rank, the communication depth it reached.

    A message sent by a rank that has reached depth L arrives at depth L + 1, and a receive lifts
    the receiver to at least that depth. A collective waits for every rank, so it ends at depth
    (the deepest participant) + 1 on all of them. The result is the length of the longest chain of
    communications, each of which could only start after the one before it had finished: the
    number of sequential network latencies on that rank's critical path.

    ``logs[r]`` is rank r's events in program order (``CommRecorder.events`` or its export).
    Point-to-point messages between two ranks match in FIFO order; collectives match by their
    position among each rank's collectives. Raises ``ValueError`` if the logs cannot be matched
    (a send without a receive, or ranks calling different collectives): they could not have run.
    """
    W = len(logs)
    steps: list[list[tuple]] = []
    for log in logs:
        seq = []
        for e in log:
            e = asdict(e) if isinstance(e, CommEvent) else e
            if phase is not None and e["phase"] != phase:
                continue
            if e["collective"]:
                seq.append(("coll", e["op"]))
            else:  # a ring step issues its send before it waits on its receive
                seq.extend(("send", dst) for dst in e["send_to"])
                seq.extend(("recv", src) for src in e["recv_from"])
        steps.append(seq)
    level, pos = [0] * W, [0] * W
    in_flight: dict[tuple[int, int], deque] = defaultdict(deque)
    arrived: dict[int, dict[int, int]] = defaultdict(dict)  # collective index -> {rank: level}
    n_coll = [0] * W
    progress = True
    while progress:
        progress = False
        for r in range(W):
            while pos[r] < len(steps[r]):
                kind, arg = steps[r][pos[r]]
                if kind == "send":
                    in_flight[(r, arg)].append(level[r] + 1)
                elif kind == "recv":
                    if not in_flight[(arg, r)]:
                        break
                    level[r] = max(level[r], in_flight[(arg, r)].popleft())
                else:
                    c = n_coll[r]
                    if r not in arrived[c]:
                        arrived[c][r] = level[r]
                    if len(arrived[c]) < W:
                        break  # wait for the others
                    ops = {steps[q][pos[q]][1] for q in range(W) if pos[q] < len(steps[q])}
                    if len(ops) != 1:
                        raise ValueError(f"collective #{c}: ranks called different operations {sorted(ops)}")
                    new = max(arrived[c].values()) + 1
                    for q in range(W):
                        level[q], n_coll[q] = new, c + 1
                        if q != r:
                            pos[q] += 1
                    progress = True
                pos[r] += 1
                progress = True
    stuck = [r for r in range(W) if pos[r] < len(steps[r])]
    if stuck or any(in_flight.values()):
        raise ValueError(f"communication logs do not match: ranks {stuck} wait forever, "
                         f"unreceived messages on {[k for k, v in in_flight.items() if v]}")
    return level
