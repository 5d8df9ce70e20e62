"""hvdsgd.tasks under faults: several threads per task, killed workers, killed parents."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

from hvdsgd import tasks

HERE = Path(__file__).resolve().parent


# -------------------------------------------------------- task functions (importable)


def crunch(x: int) -> dict:
    """A task that runs parallel regions (elementwise ops and a reduction over 1M values)."""
    import torch

    a = torch.rand(1000, 1000)
    return {"x": x, "sum": float((a * 2 + 1).sum()), "threads": torch.get_num_threads()}


def sleep_then(x: int, seconds: float, die: bool = False, pid_file: str = "") -> dict:
    """Sleep, then return, or SIGKILL this worker (its pid written to ``pid_file`` first)."""
    import torch

    draw = torch.rand(1).item()
    if die:
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(seconds)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)
    return {"x": x, "draw": draw}


def pair_die(x: int, die_role: int, pid_file: str, pair=None) -> dict | None:
    """A splittable task whose half ``die_role`` SIGKILLs its worker; the other half waits."""
    if pair is not None:
        if pair.role == die_role:
            Path(pid_file).write_text(str(os.getpid()))
            time.sleep(0.3)  # the partner is at the barrier by now
            os.kill(os.getpid(), signal.SIGKILL)
        pair.wait()
        if pair.role == 1:
            return None
    return {"x": x}


def pair_segment_die(x: int, pid_file: str, pair=None) -> dict | None:
    """A splittable task whose owner half creates the pair's segment, then SIGKILLs itself."""
    if pair is not None:
        from hvdsgd.pair import Exchange

        Exchange(pair, 16, 16)
        if pair.role == 0:
            Path(pid_file).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        pair.wait()
        return None
    return {"x": x}


@pytest.mark.e2e
def test_a_killed_owner_leaves_no_segment_and_no_tracker_warning(tmp_path, capfd):
    ts = [
        tasks.Task(
            f"t{i}", pair_segment_die, {"x": i, "pid_file": str(tmp_path / "pid")}, splittable=True
        )
        for i in range(3)
    ]
    results = tasks.run(ts, "processes", workers=2, progress=False)
    assert [r.ok for r in results] == [True, True, False]
    assert not list(Path("/dev/shm").glob(f"hvdsgd-pair-{os.getpid()}-*"))
    time.sleep(1)  # a worker's resource tracker would warn of the killed owner's segment now
    assert "leaked shared_memory" not in capfd.readouterr().err


# ------------------------------------------------------- more than one thread per task

SCRIPT = """
import json, sys
import torch
from hvdsgd import tasks
from test_task_faults import crunch

if __name__ == "__main__":
    torch.set_num_threads(2)
    (torch.rand(1000, 1000) * 2).sum()  # this process's OpenMP pool starts, as kfold's does
    method, threads = sys.argv[1], int(sys.argv[2])
    ts = [tasks.Task(f"t{i}", crunch, {"x": i}, seed=i) for i in range(3)]
    serial = tasks.run(ts, "serial", threads=threads, progress=False)
    pooled = tasks.run(ts, "processes", workers=2, threads=threads, progress=False, method=method)
    print(json.dumps([[r.result for r in serial], [r.result for r in pooled]]))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("method, threads", [("auto", 2), ("spawn", 2), ("fork", 1)])
def test_several_threads_per_task_do_not_hang_and_match_serial(tmp_path, method, threads):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), method, str(threads)],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    serial, pooled = json.loads(proc.stdout.splitlines()[-1])
    assert pooled == serial and [r["threads"] for r in pooled] == [threads] * 3


@pytest.mark.unit
def test_start_method_is_fork_only_with_one_thread_per_task():
    import torch

    assert tasks.start_method("auto", 1) == (
        "forkserver" if torch.cuda.is_initialized() else "fork"
    )
    assert tasks.start_method("auto", 2) == "forkserver"
    with pytest.raises(
        tasks.UsageError,
        match="--start-method fork cannot run --task-threads 2: .*use --start-method forkserver",
    ):
        tasks.run([tasks.Task("t", crunch, {"x": 0})], "processes", threads=2, method="fork")
    preload = tasks.preload_modules([crunch])  # what the forkserver imports once for every worker
    assert preload[0] == "torch" and {"hvdsgd.tasks", "test_task_faults"} <= set(preload)


@pytest.mark.e2e
def test_oversubscription_warns_once(monkeypatch):
    said = []
    monkeypatch.setattr(tasks.log, "warning", said.append)
    monkeypatch.setattr(tasks, "cores", lambda: 2)
    ts = [tasks.Task(f"t{i}", sleep_then, {"x": i, "seconds": 0.0}) for i in range(2)]
    tasks.run(ts, "processes", workers=2, threads=1, progress=False)
    assert said == []
    tasks.run(ts, "processes", workers=2, threads=2, progress=False)
    assert (
        len(said) == 1
        and "2 workers x 2 thread(s) per task = 4 compute threads on 2 cores" in said[0]
        and "--workers 1" in said[0]
    )


# ------------------------------------------------------------------ a worker that dies


@pytest.mark.e2e
def test_a_killed_worker_fails_only_its_own_task(tmp_path):
    pid_file = tmp_path / "pid"
    ts = [
        tasks.Task("slow", sleep_then, {"x": 0, "seconds": 1.5}, seed=1),
        tasks.Task(
            "dies",
            sleep_then,
            {"x": 1, "seconds": 0.5, "die": True, "pid_file": str(pid_file)},
            seed=2,
            inputs={"x": 1},
        ),
        *[
            tasks.Task(f"t{i}", sleep_then, {"x": i, "seconds": 0.1}, seed=10 + i)
            for i in range(2, 6)
        ],
    ]
    pooled = tasks.run(ts, "processes", workers=2, progress=False)
    pid = int(pid_file.read_text())
    dead = pooled[1]
    assert (
        not dead.ok
        and dead.worker == f"pid {pid}"
        and dead.error
        == (f"the worker process (pid {pid}) running it died: killed by SIGKILL (exit -9)")
    )
    assert "task dies failed (pid" in tasks.failures_text(pooled)
    others = [r for r in pooled if r.name != "dies"]
    assert all(r.ok for r in others)
    serial = tasks.run([t for t in ts if t.name != "dies"], "serial", progress=False)
    assert [r.result for r in others] == [r.result for r in serial]


def broken_warm_up(path: str) -> None:
    raise FileNotFoundError(f"no data in {path}")


@pytest.mark.e2e
def test_a_failing_warm_up_fails_the_tasks_with_its_error_and_an_unpicklable_task_alone():
    ts = [tasks.Task(f"t{i}", sleep_then, {"x": i, "seconds": 0.0}) for i in range(3)]
    results = tasks.run(
        ts, "processes", workers=2, progress=False, warm=(broken_warm_up, ("/nowhere",))
    )
    assert len(results) == 3 and not any(r.ok for r in results)
    assert all(
        r.error.startswith("no worker process could run it (pid ")
        and r.error.endswith(": FileNotFoundError: no data in /nowhere)")
        for r in results
    )
    ts[1].kwargs["seconds"] = lambda: 0  # cannot be pickled: that task fails, not the run
    results = tasks.run(ts, "processes", workers=2, progress=False)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.startswith("cannot hand it to a worker process (")


@pytest.mark.e2e
@pytest.mark.parametrize("die_role", [0, 1])
def test_a_killed_half_stops_its_partner_instead_of_hanging(tmp_path, die_role):
    pid_file = tmp_path / "pid"
    ts = [
        tasks.Task(
            f"t{i}",
            pair_die,
            {"x": i, "die_role": die_role, "pid_file": str(pid_file)},
            splittable=True,
        )
        for i in range(3)
    ]
    t0 = time.monotonic()
    results = tasks.run(ts, "processes", workers=2, progress=False)
    assert time.monotonic() - t0 < 60  # the partner does not wait out the barrier's timeout
    pid = int(pid_file.read_text())
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].error == (
        f"the worker process (pid {pid}) running it died: killed by SIGKILL (exit -9)"
    )


# --------------------------------------------------- the parent killed: no orphans left


def alive(procs: list) -> list:
    """The processes of ``procs`` still running (a zombie has exited)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def start(tmp_path, cmd: list, ready) -> tuple:
    """``cmd`` with stdout and stderr in files; returns (Popen, its process tree) once
    ``ready(tree, stdout)`` holds, plus two seconds for the tasks to get going."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=o,
            stderr=e,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Ctrl-C reaches it even when pytest runs in a background job (SIGINT ignored there)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    deadline = time.monotonic() + 120
    while not ready(psutil.Process(proc.pid).children(recursive=True), out.read_text()):
        assert proc.poll() is None, err.read_text()[-2000:]
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.2)
    time.sleep(2)
    return proc, psutil.Process(proc.pid).children(recursive=True)


def stop(proc, tree: list, sig: int, tmp_path, grace: float = 20) -> tuple[int, list[str]]:
    """Send ``sig`` to ``proc``; its exit status and stderr lines, once no process of its
    ``tree`` is left (or ``grace`` seconds have passed: the test fails naming them)."""
    try:
        os.kill(proc.pid, sig)
        rc = proc.wait(60)
        deadline = time.monotonic() + grace
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive(tree)
        assert not left, f"orphans after {sig!r}: " + "; ".join(
            f"pid {p.pid} ppid {p.ppid()}: {' '.join(p.cmdline())[:80]}" for p in left
        )
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in alive(tree):
            p.kill()
    return rc, (tmp_path / "stderr").read_text().strip().splitlines()


def workers_up(n: int):
    return lambda tree, out: len(tree) >= n


def header_out(tree, out: str) -> bool:
    return "thread(s) per" in out


KFOLD = [
    sys.executable,
    "-m",
    "hvdsgd.kfold",
    "--model",
    "mlp",
    "--folds",
    "4",
    "--epochs",
    "500",
    "--no-progress",
]
LOTTERY = [
    sys.executable,
    "-m",
    "hvdsgd.lottery",
    "--model",
    "mlp",
    "--epochs",
    "2",
    "--rounds",
    "300",
    "--reset-steps",
    "0,5",
    "--sparsities",
    "0.5,0.8",
    "--no-progress",
]
LINES = {
    signal.SIGTERM: (143, ["hvdsgd: stopped by SIGTERM"]),
    signal.SIGINT: (130, ["hvdsgd: interrupted"]),
    signal.SIGKILL: (-9, None),
}


@pytest.mark.e2e
@pytest.mark.parametrize(
    "cmd, args, ready, sig",
    [
        (KFOLD, ["--workers", "2"], workers_up(2), signal.SIGKILL),
        (KFOLD, ["--workers", "2"], workers_up(2), signal.SIGTERM),
        # forkserver: the workers' parent is the server, not the killed process
        (KFOLD, ["--workers", "2", "--task-threads", "2"], workers_up(4), signal.SIGKILL),
        # Ctrl-C through the other sweep (one pool, one clean-up: each signal once is enough)
        (LOTTERY, ["--workers", "2"], workers_up(2), signal.SIGINT),
        (KFOLD, ["--serial"], header_out, signal.SIGTERM),
    ],
    ids=[
        "kfold-kill",
        "kfold-term",
        "kfold-forkserver-kill",
        "lottery-int",
        "kfold-serial-term",
    ],
)
def test_killing_the_parent_leaves_no_worker_and_says_one_line(tmp_path, cmd, args, ready, sig):
    proc, tree = start(tmp_path, [*cmd, *args, "--out", str(tmp_path / "run")], ready)
    rc, err = stop(proc, tree, sig, tmp_path)
    code, lines = LINES[sig]
    assert rc == code
    if lines is not None:
        assert err == lines


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_horovodrun_leaves_no_rank(tmp_path, sig):
    exe = Path(sys.executable).parent / "horovodrun"

    def ranks(tree, out):
        return (
            "thread(s) per" in out
            and sum("hvdsgd.kfold" in " ".join(p.cmdline()) for p in alive(tree)) >= 2
        )

    proc, tree = start(
        tmp_path,
        [
            str(exe),
            "-np",
            "2",
            "-H",
            "localhost:2",
            "--gloo",
            *KFOLD,
            "--out",
            str(tmp_path / "run"),
        ],
        ranks,
    )
    rc, _ = stop(proc, tree, sig, tmp_path, grace=30)  # Horovod's middleman: SIGKILL after 5 s
    assert rc == (-9 if sig == signal.SIGKILL else 143)
