"""HOGWILD and the parameter-server strategies: the shared model's units in this process,
then end to end (hvdsgd.train and its worker processes): accuracy, run directory, faults."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    ROOT,
    SHM,
    run_train,
    shm_segments,
    summary_of,
    train_cmd,
    wait_started,
    workers_of,
)

from hvdsgd import models, shm
from hvdsgd.config import SHARED_STRATEGIES, TrainConfig
from hvdsgd.data import ShardSampler
from hvdsgd.strategies.updaters import (
    KERNEL_POLICY,
    POLICY_UPDATES,
    Applier,
    Control,
    SharedUpdater,
    give_start,
    receive,
    slots,
    wait_start,
)

# ------------------------------------------------------------------------------ units


@pytest.mark.unit
def test_shard_sampler_equal_disjoint_and_reshuffled():
    n, workers = 103, 4
    shards = [ShardSampler(n, w, workers, seed=1) for w in range(workers)]
    assert len({len(s) for s in shards}) == 1  # equal steps for every worker (sync barrier)
    every = [i for s in shards for i in s.indices.tolist()]
    assert len(every) == len(shards[0]) * workers < n + workers
    assert set(every) == set(range(n))  # covered; repeats only fill the padding
    assert set(iter(shards[0])) == set(shards[0].indices.tolist())
    s = shards[0]
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    assert sorted(a) == sorted(b) and a != b  # same shard, a new order each epoch
    s.set_epoch(0)
    assert list(s) == a  # and reproducible
    assert list(iter(shards[1])) != list(iter(ShardSampler(n, 1, workers, seed=2)))


@pytest.mark.unit
def test_grad_buffer_receives_backward_in_place():
    model = models.build("mlp", (1, 8, 8), 10)
    flat = shm.grad_buffer(model)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert flat.abs().sum() > 0 and torch.equal(flat, ref)
    ptr = flat.data_ptr()
    flat.zero_()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert flat.data_ptr() == ptr and torch.equal(
        torch.cat([p.grad.reshape(-1) for p in model.parameters()]), flat
    )


@pytest.mark.unit
def test_shared_model_views_are_live_and_unlinked():
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10)
    before = [p.detach().clone() for p in model.parameters()]
    shared = shm.SharedModel.create(model, workers=1)
    try:
        other = models.build("mlp", (1, 8, 8), 10)
        shm.SharedModel.attach(shared.names, other)
        for a, b in zip(before, other.parameters(), strict=True):
            assert torch.equal(a, b)  # the attached model reads the creator's weights
        shared.flat.add_(1.0)  # a write to the buffer is seen by both models at once
        for a, p, q in zip(before, model.parameters(), other.parameters(), strict=True):
            assert torch.equal(p, a + 1) and torch.equal(q, a + 1)
    finally:
        shared.unlink()
    assert not (SHM / shared.names["params"].lstrip("/")).exists()


@pytest.mark.unit
def test_the_policy_tables_cover_every_shared_strategy():
    assert set(POLICY_UPDATES) == set(KERNEL_POLICY) == set(SHARED_STRATEGIES)
    assert all(callable(f) and hasattr(SharedUpdater, f.__name__) for f in POLICY_UPDATES.values())
    assert set(KERNEL_POLICY.values()) <= {"hogwild", "atomic", "locked", "sharded"}


@pytest.mark.unit
@pytest.mark.parametrize("strategy", SHARED_STRATEGIES)
def test_every_policy_moves_the_shared_weights_by_lr_times_the_gradient(strategy):
    """One worker, in this process: its update lands in the shared buffer (async-deferred: by
    the applier thread), and async-apply's private copy reads it back."""
    cfg = TrainConfig(
        model="mlp", strategy=strategy, workers=1, momentum=0.0, weight_decay=0.0, lr=0.1
    )
    torch.manual_seed(0)
    model = models.build("mlp", (1, 8, 8), 10)
    shared = shm.SharedModel.create(
        model, 1, shards=2 if strategy == "sharded" else 1, slots=slots(cfg)
    )
    try:
        ctl = Control.create(mp.get_context("spawn"), cfg)
        updater = SharedUpdater(cfg, 0, shared, model, 10, ctl.ends[0])
        applier = Applier(shared.params, ctl, cfg)
        if strategy == "async-deferred":
            applier.start()
        before, g = shared.flat.clone(), torch.randn(shared.params.size)
        updater.grad.copy_(g)
        updater.update()
        applier.stop()  # (async-deferred) the deposits in its queue are applied first
        assert shared.params.updates == 1 and not applier.errors
        assert torch.allclose(shared.flat, before - updater.lr * g, atol=1e-6)
        assert updater.grad.abs().sum() == 0 and updater.step == 1
        if strategy == "async-apply":
            assert torch.equal(updater.private, shared.flat) and updater.version == 1
    finally:
        shared.unlink()


# ----------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_hogwild_reaches_97_percent_on_digits(tmp_path):
    # 4 workers: more than 2 cores, the most contention and staleness the suite trains with.
    # 60 epochs: each worker's epoch is its own 1/workers shard; the whole run lasts ~1 s.
    workers = 4
    proc = run_train(
        tmp_path,
        "--strategy",
        "hogwild",
        "--workers",
        str(workers),
        "--lr",
        "0.05",
        "--epochs",
        "60",
        "--eval-interval",
        "0.02",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary_of(tmp_path)
    # Reached 97% on the clock (the parent evaluates the live weights every 20 ms); the last
    # evaluation may sit a test sample or two either side of it (1 of 360 is 0.28 points).
    assert s["time_to_accuracy_s"]["0.97"] is not None, s["test_accuracy"]
    assert s["test_accuracy"] >= 0.96, s["test_accuracy"]
    assert s["strategy"] == "hogwild" and s["workers"] == workers == s["world_size"]
    for key in (
        "staleness_mean",
        "staleness_p95",
        "staleness_max",
        "samples_per_sec",
        "test_macro_f1",
        "time_to_accuracy_s",
        "updates",
    ):
        assert s[key] is not None, key
    assert s["updates"] > 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all("time_s" in r and "test_accuracy" in r for r in rows)
    assert all(a["time_s"] < b["time_s"] for a, b in zip(rows, rows[1:], strict=False))
    # Each worker's own time is within the wall time, so the sum of rates is at least the wall rate.
    assert s["aggregate_samples_per_sec"] >= 0.95 * s["samples_per_sec"] > 0
    assert rows[-1]["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=0.02)
    for f in ("curves.png", "confusion.png", "checkpoint.pt"):
        assert (tmp_path / f).stat().st_size > 0
    assert "staleness" in proc.stdout


@pytest.mark.e2e
@pytest.mark.parametrize(
    "strategy", ["sync", "async-apply", "async-deferred", "lockfree", "sharded", "atomic", "locked"]
)
def test_every_policy_reaches_95_percent(tmp_path, strategy):
    # In this process (its workers are spawned as from the command line): no interpreter start
    # per policy; the command line itself is run by the other end-to-end tests.
    from hvdsgd.train import train

    cfg = TrainConfig(
        model="mlp", strategy=strategy, workers=2, lr=0.05, out=str(tmp_path), progress=False
    )
    train(cfg)
    s = summary_of(tmp_path)
    assert s["test_accuracy"] >= 0.95, (strategy, s["test_accuracy"])
    assert s["strategy"] == strategy and s["epochs"] == 15
    if strategy == "sync":
        assert s["staleness_max"] == 0  # one update per step, behind a barrier
    expected_shards = 2 if strategy == "sharded" else 1
    assert s["shards"] == expected_shards


# ---------------------------------------------------------------------------- faults


def run_killing_a_worker(tmp_path, kill, *args, timeout=180) -> tuple:
    """``hvdsgd.train ARGS`` on 2 workers, ``kill(pid, workers)`` once they are started (it kills
    one and returns it), then the run to its end: (proc, out, err, victim index). A failed wait
    or a hung run is killed with everything under it."""
    proc = subprocess.Popen(
        train_cmd(tmp_path, "--workers", "2", *args),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = psutil.Process(proc.pid)
    try:
        ws = workers_of(proc.pid, 2)
        wait_started(proc.pid)
        victim = kill(run, ws)
        out, err = proc.communicate(timeout=timeout)
    finally:
        for p in [*run.children(recursive=True), run] if proc.poll() is None else []:
            p.kill()
    return proc, out, err, ws.index(victim)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["abort", "continue"])
def test_killed_worker_is_reported(tmp_path, mode):
    # Seconds of training; the kill lands as the workers get the start signal (not at the first
    # metrics row: the evaluator writes rows every 2 s, after a fast machine had finished 500
    # epochs, and the victim was gone). The survivor of "continue" trains its shard to the end,
    # so that run is shorter.
    epochs = "3000" if mode == "abort" else "500"

    def kill(run, ws):
        ws[1].send_signal(signal.SIGKILL)  # spawned after the segments were made
        return ws[1]

    proc, out, err, _ = run_killing_a_worker(
        tmp_path,
        kill,
        "--strategy",
        "hogwild",
        "--epochs",
        epochs,
        "--on-worker-failure",
        mode,
        "--eval-interval",
        "0.1",
    )
    if mode == "abort":
        assert proc.returncode != 0
        line = [ln for ln in err.splitlines() if ln.startswith("hvdsgd: error:")]
        assert len(line) == 1 and "worker" in line[0] and "SIGKILL" in line[0], err
        assert "Traceback" not in err
    else:
        assert proc.returncode == 0, out + err
        assert "SIGKILL" in out + err
        s = summary_of(tmp_path)
        assert len(s["failed_workers"]) == 1
    assert shm_segments(proc.pid) == []


def _wait_for_start(ends) -> None:  # a spawned worker's wait, as hvdsgd's workers do it
    ends.report.send("waiting")
    wait_start(ends)


@pytest.mark.e2e
def test_a_worker_killed_while_it_waits_for_the_start_does_not_hang_the_parent():
    """SIGKILL (the OOM killer) to a worker waiting for the start signal: the parent still gives
    it and goes on to notice the death. With a multiprocessing Event the parent's set() waited
    for the dead sleeper to wake, for ever (test_killed_worker_is_reported[abort] hung so in CI
    when its kill landed on the start)."""
    ctx = torch.multiprocessing.get_context("spawn")
    ctl = Control.create(ctx, TrainConfig(strategy="hogwild", workers=2))
    waiters = [ctx.Process(target=_wait_for_start, args=(e,), daemon=True) for e in ctl.ends]
    for p in waiters:
        p.start()
    assert [r.recv() for r in ctl.reports] == ["waiting", "waiting"]
    time.sleep(0.5)  # both asleep in the wait
    waiters[0].kill()
    waiters[0].join()
    go = threading.Thread(target=give_start, args=(ctl, 2), daemon=True)
    go.start()
    go.join(timeout=10)
    assert not go.is_alive(), "the start signal hung on the killed worker"
    waiters[1].join(timeout=10)
    assert waiters[1].exitcode == 0  # the living worker got its start


def _wchan(p: psutil.Process) -> str:
    """Where the kernel has ``p`` asleep ("anon_pipe_read", "futex_do_wait", ...)."""
    try:
        return (Path("/proc") / str(p.pid) / "wchan").read_text()
    except OSError:
        return ""


@pytest.mark.e2e
def test_async_deferred_worker_killed_while_it_waits_for_a_slot_leaves_the_others_going(tmp_path):
    """async-deferred, --on-worker-failure continue: the parent (the applier) is frozen, so the
    workers run out of free slots and wait; the one asleep in a pipe read is SIGKILLed. With one
    free-slot queue for all workers that one held the queue's read lock, and the survivor
    waited for it for ever; with a pipe per worker the survivor trains to the end."""

    def kill(run, ws):
        run.suspend()
        deadline = time.time() + 30
        while not any("pipe" in _wchan(w) for w in ws if w.status() == "sleeping"):
            assert time.time() < deadline, [_wchan(w) for w in ws]
            time.sleep(0.05)
        [victim, *_] = [w for w in ws if "pipe" in _wchan(w)]
        victim.kill()
        while status(victim) != psutil.STATUS_ZOMBIE:  # dead; its parent, frozen, reaps it later
            assert time.time() < deadline
            time.sleep(0.05)
        run.resume()
        return victim

    proc, out, err, victim = run_killing_a_worker(
        tmp_path,
        kill,
        "--strategy",
        "async-deferred",
        "--epochs",
        "300",
        "--on-worker-failure",
        "continue",
        timeout=120,
    )
    assert proc.returncode == 0, out + err
    assert "SIGKILL" in out + err
    s = summary_of(tmp_path)
    assert s["failed_workers"] == [victim]
    assert shm_segments(proc.pid) == []


def _half_a_message_then_die(ends) -> None:  # a worker killed in the middle of a report
    os.write(ends.report.fileno(), (1000).to_bytes(4, "big") + b"x" * 10)
    os.kill(os.getpid(), signal.SIGKILL)


def _report(ends) -> None:
    ends.report.send("ok")


@pytest.mark.e2e
def test_a_worker_killed_mid_report_is_read_as_gone_and_the_others_are_heard():
    """The parent reads each worker's reports from that worker's own pipe, whose other end
    only the worker holds: half a message and then death is end-of-file there (the pipe is
    dropped), never a read that waits for the rest, and the other worker's report arrives."""
    ctx = torch.multiprocessing.get_context("spawn")
    ctl = Control.create(ctx, TrainConfig(strategy="hogwild", workers=2))
    procs = []
    for w, target in enumerate((_half_a_message_then_die, _report)):
        procs.append(ctx.Process(target=target, args=(ctl.ends[w],), daemon=True))
        procs[-1].start()
        ctl.spawned(w)
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL, 0]
    heard, conns = [], list(ctl.reports)

    def read() -> None:
        while conns:
            heard.extend(receive(conns, timeout=1.0))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the parent waits for the rest of a dead worker's message"
    assert heard == ["ok"] and conns == []


def status(p) -> str:
    """``p.status()``; a process gone meanwhile counts as a zombie (it has exited)."""
    try:
        return p.status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_ZOMBIE


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_parent_stops_workers_and_unlinks(tmp_path, sig):
    import psutil

    proc = subprocess.Popen(
        train_cmd(tmp_path, "--strategy", "locked", "--workers", "2", "--epochs", "400"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    kids = workers_of(proc.pid, 2)
    assert shm_segments(proc.pid), "the segment exists while the workers start"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert shm_segments(proc.pid) == []

    def running():
        return [k for k in kids if k.is_running() and status(k) != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 10  # the parent has exited: its workers follow at once
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()


@pytest.mark.e2e
def test_exception_in_parent_stops_workers_and_unlinks(tmp_path, monkeypatch):
    from hvdsgd.strategies.supervisor import Supervisor
    from hvdsgd.train import train

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(Supervisor, "supervise", broken)
    cfg = TrainConfig(model="mlp", strategy="hogwild", workers=2, out=str(tmp_path))
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg)
    assert shm_segments(os.getpid()) == []


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--strategy", "sharded", "--shards", "1"], "--shards >= 2"),
        (["--strategy", "hogwild", "--optimizer", "adamw"], "--optimizer sgd"),
        (["--strategy", "hogwild", "--workers", "0"], "--workers must be >= 1"),
        (["--strategy", "sync", "--on-worker-failure", "continue"], "abort"),
        (["--strategy", "hogwild", "--resume"], "allreduce only"),
        (["--strategy", "nope"], "unknown strategy"),
    ],
)
def test_bad_input(tmp_path, args, needle):
    proc = run_train(tmp_path, *args, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
