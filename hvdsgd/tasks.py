"""Independent training tasks over local processes or Horovod ranks.

    python -m hvdsgd.kfold --workers 2                     # uses this module
    horovodrun -np 4 python -m hvdsgd.kfold                # one task at a time per rank

A :class:`Task` is a top-level function, its keyword arguments and its own seed. ``run``
executes a list of them three ways, with the same results:

- ``serial``: one after another in this process;
- ``processes``: a pool of ``workers`` processes (forked where that is safe, else forked
  from a forkserver; :func:`start_method`); a free worker takes the next task, so a slow
  task does not leave the others idle. When the tasks do not divide evenly over the workers
  (5 folds on 2), each of the last ones is split over two workers if it is ``splittable``
  (:mod:`hvdsgd.pair`: exact, same bits). Workers die with the process that started them,
  whatever ends it; a worker that dies fails only the task it was running (reported with its
  pid and exit status) and is replaced;
- ``horovod`` (under ``horovodrun``): rank 0 hands out task indices over a socket as ranks
  ask for them (every rank, rank 0 included, runs tasks); the results are gathered on rank 0
  and broadcast back, so every rank ends with the same status.

Every task runs on ``threads`` compute threads (1 by default) with the global generator
seeded from its seed, so its figures do not depend on where or in what order it ran. A
task that raises is reported with its error and its inputs; the others complete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import typing
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Listener, wait
from typing import Any, Callable, Iterator, Literal

from .errors import UsageError

log = logging.getLogger("hvdsgd")

MODES = ("serial", "processes", "horovod")
StartMethod = Literal["auto", "fork", "spawn", "forkserver"]
START_METHODS = typing.get_args(StartMethod)


@dataclass
class Task:
    """One independent job: ``fn(**kwargs)`` with the global RNG seeded from ``seed``."""

    name: str  # unique; the row of the results table
    fn: Callable[..., dict]  # a module-level function (spawned workers import it)
    kwargs: dict = field(default_factory=dict)
    seed: int = 0
    inputs: dict = field(default_factory=dict)  # what to print if it fails (small, JSON-able)
    splittable: bool = False  # fn takes ``pair=``: two workers can share it (hvdsgd.pair)


@dataclass
class Result:
    """What became of one task."""

    name: str
    ok: bool
    result: dict | None
    error: str | None
    inputs: dict
    worker: str  # "pid 1234" or "rank 1"
    start: float  # seconds since the run started
    seconds: float


# ------------------------------------------------------------------------ execution


def execute(
    task: Task, threads: int = 1, t0: float | None = None, worker: str = "", pair=None
) -> Result:
    """Run one task here: ``threads`` compute threads, RNG seeded; exceptions are caught.
    ``pair``: this is one half of a split task (a :class:`hvdsgd.pair.PairLink`)."""
    import torch

    torch.set_num_threads(threads)
    torch.default_generator.manual_seed(task.seed)
    start = time.perf_counter()
    base = t0 if t0 is not None else start
    try:
        out, err = task.fn(**task.kwargs, **({"pair": pair} if pair else {})), None
    except Exception as e:  # a failing task is a result, not the end of the run
        out = None
        err = (
            f"{type(e).__name__}: {e}"
            if isinstance(e, UsageError)
            else f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"
        )
        if pair is not None:
            pair.barrier.abort()  # the other half stops at its next wait instead of hanging
    return Result(
        task.name,
        err is None,
        out,
        err,
        task.inputs,
        worker or f"pid {os.getpid()}",
        start - base,
        time.perf_counter() - start,
    )


_BARRIERS: list = []  # a pool worker's barriers for split tasks (given at its start)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(main_pid: int) -> None:
    """End this worker when the process that runs the pool ends, however it ends: the kernel
    sends SIGKILL when the parent *thread* exits (``PR_SET_PDEATHSIG``), and a watchdog thread
    waits on the pool's process itself, which is not the parent under a forkserver."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=_watch, args=(main_pid,), daemon=True, name="hvdsgd-watchdog").start()


def _watch(main_pid: int) -> None:
    try:
        fd = os.pidfd_open(main_pid)  # readable once that process has exited
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux, or Linux < 5.3): poll
        while True:
            time.sleep(0.5)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(1)
    select.select([fd], [], [])
    os._exit(1)


def _worker(
    conn,
    main_pid: int,
    warm: Callable[..., Any] | None,
    warm_args: tuple,
    threads: int,
    barriers: list,
) -> None:
    """A pool process: start (torch, threads, ``warm``), say "ready", then run each job
    ``(fn, args)`` it is sent and send back its Result, until it is sent None."""
    _die_with(main_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which cleans up
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a forked worker has the parent's handlers
        signal.signal(sig, signal.SIG_DFL)
    _BARRIERS[:] = barriers
    try:
        import torch  # every task needs it: import it before the first one is handed out

        torch.set_num_threads(threads)
        if warm is not None:
            warm(*warm_args)  # e.g. load and cache the data set once per worker
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while (job := conn.recv()) is not None:
        fn, args = job
        conn.send(("result", fn(*args)))


def _how(exitcode: int | None) -> str:
    """How a process ended, from its exit code: 'killed by SIGKILL (exit -9)', 'exit status 9'."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name} (exit {exitcode})"
    return f"exit status {exitcode}"


@dataclass
class _Job:
    """What a pool worker runs: ``call = (fn, args)``, returning the Result of ``task``."""

    key: tuple  # (task index, half: None, 0 or 1)
    task: Task
    call: tuple
    group: int | None = None  # the split task it is half of: the halves fail together


class _Worker:
    """One pool process, the parent's end of its pipe, and the job it is running."""

    def __init__(self, ctx, init: tuple):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, *init), name="hvdsgd-task")
        self.process.start()
        child.close()
        self.ready, self.job, self.since, self.stopped = False, None, 0.0, False

    def give(self, job: _Job) -> None:
        self.job, self.since = job, time.perf_counter()
        self.conn.send(job.call)

    def receive(self) -> tuple:
        """Its next message; ("died", how) once it has exited."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.process.join()
        self.conn.close()
        return "died", _how(self.process.exitcode)


class _Pool:
    """Worker processes that each run one job at a time, the next free one taking the next
    job. A worker that dies fails its own job only (and the other half of a split task,
    which would wait for it) and is replaced while jobs remain."""

    def __init__(self, ctx, init: tuple, t0: float):
        self.ctx, self.init, self.t0 = ctx, init, t0
        self.workers: list[_Worker] = []

    def start(self, n: int) -> None:
        for _ in range(n):
            self.workers.append(_Worker(self.ctx, self.init))

    def run(self, jobs: list[_Job]) -> Iterator[tuple[_Job, Result]]:
        """(job, its Result) for every job, as they finish."""
        todo, spare, lost = deque(jobs), len(jobs), "none could start"
        while self.workers and (todo or any(w.job for w in self.workers)):
            yield from self._hand_out(todo)
            ends = {
                **{w.conn: w for w in self.workers},
                **{w.process.sentinel: w for w in self.workers},
            }
            for w in dict.fromkeys(ends[e] for e in wait(list(ends))):
                kind, payload = w.receive()
                if kind == "ready":
                    w.ready = True
                elif kind == "result":
                    job, w.job = w.job, None
                    yield job, payload
                else:  # "error": its start raised; "died": it exited
                    self.workers.remove(w)
                    w.process.join()
                    lost = f"pid {w.process.pid}: {payload}"
                    if w.job is not None:
                        yield w.job, self._died(w, payload)
                        if w.job.group is not None:
                            yield from self._stop_group(w.job.group, todo)
                    if kind == "died" and todo and spare > 0:
                        spare -= 1
                        self.start(1)
        for job in todo:
            yield job, self._result(job, f"no worker process could run it ({lost})")

    def _hand_out(self, todo: deque) -> Iterator[tuple[_Job, Result]]:
        """The next job to every ready, idle worker; (job, its failed Result) for a job that
        cannot be handed over."""
        for w in self.workers:
            if w.ready and w.job is None and todo:
                job = todo.popleft()
                try:
                    w.give(job)
                except OSError:
                    pass  # it has just died: its sentinel says so next
                except Exception as e:  # a task that cannot be pickled, say
                    w.job = None
                    yield (
                        job,
                        self._result(
                            job, f"cannot hand it to a worker process ({type(e).__name__}: {e})"
                        ),
                    )

    def _result(
        self, job: _Job, error: str, worker: str = "?", since: float | None = None
    ) -> Result:
        """The failed Result of ``job``; ``since``: when it was handed out."""
        now = time.perf_counter()
        since = now if since is None else since
        return Result(
            job.task.name, False, None, error, job.task.inputs, worker, since - self.t0, now - since
        )

    def _died(self, w: _Worker, how: str) -> Result:
        from .pair import PARTNER_STOPPED

        error = (
            f"{PARTNER_STOPPED} (its worker process died)"
            if w.stopped
            else f"the worker process (pid {w.process.pid}) running it died: {how}"
        )
        return self._result(w.job, error, f"pid {w.process.pid}", w.since)

    def _stop_group(self, group: int, todo: deque) -> Iterator[tuple[_Job, Result]]:
        """The other half of a split task whose worker died: killed if it runs (it may wait
        on a barrier that the dead process can no longer release), dropped if it waits."""
        from .pair import PARTNER_STOPPED

        for w in self.workers:
            if w.job is not None and w.job.group == group:
                w.stopped = True
                w.process.kill()
        for job in [j for j in todo if j.group == group]:
            todo.remove(job)
            yield job, self._result(job, f"{PARTNER_STOPPED} (its worker process died)")

    def close(self, abort: bool) -> None:
        """Stop every worker: after its last job, or at once (an error, Ctrl-C, SIGTERM)."""
        for w in self.workers:
            try:
                w.process.kill() if abort else w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            w.process.join(None if abort else 10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()


class _Bar:
    """Tasks done: tqdm on a terminal, else one log line per task."""

    def __init__(self, total: int, show: bool):
        self.bar, self.total, self.n, self.show = None, total, 0, show
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc="tasks", unit="task", file=sys.stderr, dynamic_ncols=True
            )

    def done(self, r: Result) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{r.name} {'ok' if r.ok else 'FAILED'}")
        elif self.show:
            log.info(
                f"  task {self.n}/{self.total} {r.name}: "
                f"{'ok' if r.ok else 'FAILED'} in {r.seconds:.1f} s ({r.worker})"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_serial(tasks: list[Task], threads: int, bar: _Bar) -> list[Result]:
    t0, out = time.perf_counter(), []
    for task in tasks:
        out.append(execute(task, threads, t0))
        bar.done(out[-1])
    return out


def check_method(method: str, threads: int) -> None:
    """A start method that exists and, for ``fork``, one compute thread per task."""
    if method not in START_METHODS:
        raise UsageError(
            f"--start-method must be one of {', '.join(START_METHODS)} (got {method!r})"
        )
    if method == "fork" and threads > 1:
        raise UsageError(
            f"--start-method fork cannot run --task-threads {threads}: a worker "
            "forked after this process's OpenMP threads started hangs in its first "
            "parallel region; use --start-method forkserver (what auto picks)"
        )


def start_method(requested: str = "auto", threads: int = 1) -> str:
    """``auto``: fork where it is safe (Linux, no CUDA context here, one thread per task),
    else forkserver.

    A forked worker starts in milliseconds with torch imported and the data in memory. But
    GNU OpenMP's thread pool does not survive a fork: once this process ran a parallel region
    on several threads (loading the data, the dense run), a forked worker that runs one on
    several threads waits forever for threads it does not have. One thread per task never
    starts that pool. Otherwise workers fork from a forkserver, a fresh process that has only
    imported torch and the tasks' modules (spawn would re-import torch in every worker).
    """
    check_method(requested, threads)
    if requested != "auto":
        return requested
    import torch

    methods = multiprocessing.get_all_start_methods()
    if (
        threads == 1
        and "fork" in methods
        and sys.platform == "linux"
        and not torch.cuda.is_initialized()
    ):
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def preload_modules(fns: list[Callable]) -> list[str]:
    """What a forkserver imports once for all its workers: torch, the hvdsgd modules this
    process has imported and the modules defining ``fns``; not the main module (a worker runs
    it as ``__mp_main__``, and runpy warns when it finds it imported already)."""
    main = getattr(sys.modules["__main__"], "__spec__", None)
    names = {n for n in sys.modules if n.partition(".")[0] == __name__.partition(".")[0]}
    names |= {fn.__module__ for fn in fns}
    return ["torch", *sorted(names - {"__main__", main.name if main else None})]


def split_tail(tasks: list[Task], workers: int) -> list[int]:
    """Indices of the tasks to split over two workers each: the last ``len % workers`` ones,
    when there are at least two workers for each of them and all of them are splittable."""
    r = len(tasks) % workers
    tail = list(range(len(tasks) - r, len(tasks)))
    return tail if r and 2 * r <= workers and all(tasks[i].splittable for i in tail) else []


def _execute_half(task: Task, threads: int, t0: float, index: int, role: int, name: str) -> Result:
    from .pair import PairLink

    return execute(task, threads, t0, pair=PairLink(role, _BARRIERS[index], name))


def _merge_halves(owner: Result, helper: Result) -> Result:
    """The split task's result: the owner's figures, or the error of the half that failed
    first (the other half then only reports that its partner stopped)."""
    if owner.ok and helper.ok:
        return owner
    from .pair import PARTNER_STOPPED

    own_fault = not owner.ok and PARTNER_STOPPED not in owner.error
    error = owner.error if own_fault or helper.ok else helper.error
    return Result(
        owner.name,
        False,
        None,
        error,
        owner.inputs,
        owner.worker if own_fault or helper.ok else helper.worker,
        owner.start,
        owner.seconds,
    )


def run_processes(
    tasks: list[Task],
    workers: int,
    threads: int,
    bar: _Bar,
    warm: tuple | None = None,
    method: str = "auto",
) -> list[Result]:
    """A pool of worker processes; each free worker takes the next task. ``warm``: (fn, args)
    run once in each worker as it starts. The uneven tail is split (:func:`split_tail`)."""
    t0, results = time.perf_counter(), {}
    fn, args = warm or (None, ())
    method = start_method(method, threads)
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(preload_modules([t.fn for t in tasks] + ([fn] if fn else [])))
    tail = split_tail(tasks, workers)
    barriers = [ctx.Barrier(2) for _ in tail]
    halves: dict[int, dict[int, Result]] = {i: {} for i in tail}
    # perf_counter is CLOCK_MONOTONIC on Linux: one clock for the parent and its workers.
    jobs = [
        _Job((i, None), t, (execute, (t, threads, t0)))
        for i, t in enumerate(tasks)
        if i not in halves
    ]
    jobs += [
        _Job(
            (i, role),
            tasks[i],
            (_execute_half, (tasks[i], threads, t0, b, role, f"hvdsgd-pair-{os.getpid()}-{b}")),
            b,
        )
        for b, i in enumerate(tail)
        for role in (0, 1)
    ]  # last: as the whole tasks end
    pool, finished = _Pool(ctx, (os.getpid(), fn, args, threads, barriers), t0), False
    try:
        pool.start(workers)
        for job, r in pool.run(jobs):
            i, role = job.key
            if role is not None:
                halves[i][role] = r
                if len(halves[i]) < 2:
                    continue
                r = _merge_halves(halves[i][0], halves[i][1])
                if r.ok:
                    r.worker = f"{halves[i][0].worker} + {halves[i][1].worker}"
            results[i] = r
            bar.done(r)
        finished = True
    finally:
        pool.close(abort=not finished)  # Ctrl-C, SIGTERM: do not wait for the running tasks
        barriers.clear()  # their last references: semaphores released now, not at an exit
        #                   that SIGTERM's one-line report skips (the tracker would warn)
        unlink_segments([f"hvdsgd-pair-{os.getpid()}-{b}" for b in range(len(tail))])
    return [results[i] for i in range(len(tasks))]


def unlink_segments(names: list[str]) -> None:
    """Unlink the shared-memory segments of split tasks whose owner was killed before it
    could (``hvdsgd.pair.Exchange``); a segment already gone is fine."""
    from multiprocessing.shared_memory import _posixshmem

    for name in names:
        try:
            _posixshmem.shm_unlink("/" + name)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- horovod


def run_horovod(tasks: list[Task], threads: int, bar: _Bar) -> list[Result]:
    """Dynamic scheduling over Horovod ranks; every rank returns all the results.

    Rank 0 serves ``next task`` requests from every rank (itself included) over an
    authenticated socket whose address it broadcasts; a rank asks again when it finishes.
    """
    from .dist import init_library

    hvd = init_library()  # Horovod: idempotent; the rank and world come from horovodrun
    rank, size = hvd.rank(), hvd.size()
    server = None
    if rank == 0:
        host = "127.0.0.1" if hvd.local_size() == size else socket.getfqdn()
        server = _Server(tasks, size, bar, host)
        address = (server.address, server.authkey)
    else:
        address = None
    # Horovod: every rank learns where rank 0 serves the task indices.
    address, authkey = hvd.broadcast_object(address, root_rank=0, name="tasks.address")
    t0 = time.perf_counter()
    with Client(address, authkey=authkey) as conn:
        conn.send(None)
        while (i := conn.recv()) is not None:
            conn.send(execute(tasks[i], threads, t0, f"rank {rank}"))
    results = server.wait() if server is not None else None
    # Horovod: every rank returns the same results, so every rank exits with the same status.
    return hvd.broadcast_object(results, root_rank=0, name="tasks.results")


class _Server:
    """Rank 0's task dispenser: one thread per rank's connection, one shared index."""

    def __init__(self, tasks: list[Task], ranks: int, bar: _Bar, host: str):
        self.tasks, self.ranks, self.bar = tasks, ranks, bar
        self.authkey = os.urandom(32)
        self.listener = Listener((host, 0), authkey=self.authkey)
        self.address = self.listener.address
        self.next, self.results, self.lock = 0, {}, threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        handlers = []
        for _ in range(self.ranks):
            conn = self.listener.accept()
            h = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            h.start()
            handlers.append(h)
        for h in handlers:
            h.join()
        self.listener.close()

    def _serve(self, conn) -> None:
        i = None  # the task this connection's rank is running
        with conn:
            while True:
                r = conn.recv()  # None first, then the Result of task i
                with self.lock:
                    if r is not None:
                        self.results[i] = r
                        self.bar.done(r)
                    i = self.next if self.next < len(self.tasks) else None
                    self.next += i is not None
                conn.send(i)
                if i is None:
                    return

    def wait(self) -> list[Result]:
        self.thread.join()
        return [self.results[i] for i in range(len(self.tasks))]


# ------------------------------------------------------------------------------ run


def reporting(mode: str) -> bool:
    """Whether this process reports: always, except Horovod ranks other than 0."""
    return mode != "horovod" or int(os.environ.get("HOROVOD_RANK", "0")) == 0


def mode_for(workers: int, serial: bool) -> str:
    """serial, processes, or horovod when started by horovodrun with more than one rank."""
    if int(os.environ.get("HOROVOD_SIZE", "1")) > 1:
        return "horovod"
    return "serial" if serial else "processes"


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def warn_oversubscribed(workers: int, threads: int) -> None:
    """A warning when the workers' compute threads outnumber the cores."""
    if workers * threads > cores():
        log.warning(
            f"hvdsgd: warning: {workers} workers x {threads} thread(s) per task = "
            f"{workers * threads} compute threads on {cores()} cores: the tasks will "
            f"take turns and run slower; use --workers {max(1, cores() // threads)} or "
            "fewer --task-threads"
        )


def run(
    tasks: list[Task],
    mode: str = "processes",
    workers: int = 2,
    threads: int = 1,
    progress: bool = True,
    warm: tuple | None = None,
    method: str = "auto",
) -> list[Result]:
    """Execute ``tasks``; returns their results in task order (on every Horovod rank).

    ``warm``: ``(fn, args)`` that a worker process runs once as it starts (module-level
    ``fn``), such as loading the data set its tasks share. ``method``: the processes' start
    method (``auto``, ``fork``, ``spawn``, ``forkserver``; see :func:`start_method`).
    """
    check_method(method, threads)
    if mode not in MODES:
        raise UsageError(f"unknown task mode {mode!r}; use one of {', '.join(MODES)}")
    if workers < 1:
        raise UsageError(f"--workers must be >= 1 (got {workers})")
    if threads < 1:
        raise UsageError(f"--task-threads must be >= 1 (got {threads})")
    if len({t.name for t in tasks}) != len(tasks):
        raise UsageError("task names must be unique")
    bar = _Bar(len(tasks), progress and reporting(mode))
    try:
        if mode == "serial":
            return run_serial(tasks, threads, bar)
        if mode == "processes":
            workers = min(workers, len(tasks)) or 1
            warn_oversubscribed(workers, threads)
            return run_processes(tasks, workers, threads, bar, warm, method)
        return run_horovod(tasks, threads, bar)
    finally:
        bar.close()


def failures_text(results: list[Result]) -> str:
    """One paragraph per failed task: its name, inputs and error."""
    return "\n".join(
        f"task {r.name} failed ({r.worker}), inputs {json.dumps(r.inputs)}:\n  "
        + r.error.replace("\n", "\n  ")
        for r in results
        if not r.ok
    )
