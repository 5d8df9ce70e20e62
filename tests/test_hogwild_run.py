"""HOGWILD runs as a user sees them: epoch lines, sample counts, threads, start-up progress,
interruption (a checkpoint, one line, 128 + signal) and errors after training started."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, run_train, shm_segments, summary_of, wait_training, workers_of

from hvdsgd import checkpoint, models, report
from hvdsgd.config import TrainConfig
from hvdsgd.errors import UsageError
from hvdsgd.strategies.supervisor import START_REPORT_S
from hvdsgd.train import train

pytestmark = pytest.mark.e2e

N_TRAIN = 1437  # digits: the fixed 80% training split


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The issue's command (2 workers, the default 15 epochs), evaluated every 20 ms."""
    out = tmp_path_factory.mktemp("hogwild") / "run"
    proc = run_train(
        out, "--strategy", "hogwild", "--workers", "2", "--eval-interval", "0.02", timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, out


def test_epoch_never_exceeds_epochs_and_the_last_is_exact(default_run):
    _, out = default_run
    rows = _rows(out)
    assert all(r["epoch"] <= 15 for r in rows), max(r["epoch"] for r in rows)
    assert rows[-1]["epoch"] == pytest.approx(15)  # 2 workers x 15 x 23 steps: every update in
    assert summary_of(out)["epochs"] == 15


def test_each_epoch_line_appears_once(default_run):
    proc, out = default_run
    lines = [ln for ln in proc.stdout.splitlines() if re.search(r"epoch +[\d.]+/15", ln)]
    epochs = [re.search(r"epoch +([\d.]+)/15", ln).group(1) for ln in lines]
    assert epochs.count("15.00") == 1, "\n".join(lines[-5:])
    updates = [r["updates"] for r in _rows(out)]
    assert len(updates) == len(set(updates)) and updates == sorted(updates), updates


def test_train_samples_count_real_samples_not_padding(default_run):
    # 1437 samples in 2 shards of 719: one sample is repeated to pad, and is not counted.
    _, out = default_run
    assert summary_of(out)["train_samples"] == 15 * N_TRAIN


def test_threads_default_to_one_per_worker(default_run):
    _, out = default_run
    assert summary_of(out)["threads_per_rank"] == 1


def test_threads_oversubscription_warning_and_start_progress(tmp_path, capsys, monkeypatch):
    # In this process, with a start-up line every second (START_REPORT_S is 5 s): 2 workers of
    # `cores` threads each start in seconds and are oversubscribed on any machine.
    from hvdsgd.strategies import supervisor

    every_s = 1.0
    assert START_REPORT_S > every_s
    monkeypatch.setattr(supervisor, "START_REPORT_S", every_s)
    cores = len(os.sched_getaffinity(0))
    workers, threads = 2, max(2, cores)
    cfg = TrainConfig(
        model="mlp",
        strategy="hogwild",
        workers=workers,
        threads=threads,
        epochs=1,
        out=str(tmp_path),
        progress=True,
    )
    train(cfg)
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if "oversubscribed" in ln]
    assert len(warnings) == 1, out
    assert f"{workers} workers x {threads} threads on {cores} core" in warnings[0], warnings[0]
    # A line every START_REPORT_S while they start, one when all have.
    started = re.findall(rf"started (\d+)/{workers} workers \(([\d.]+) s\)", out)
    assert started and int(started[-1][0]) == workers, out
    due = float(started[-1][1]) // every_s  # lines due while they started
    assert due - 1 <= len(started) - 1 <= due, out  # none missing, none extra
    assert f"x {threads} threads" in out  # the header says what runs
    # Each worker ran with `threads` compute threads (it reports torch.get_num_threads()).
    assert summary_of(tmp_path)["threads_per_rank"] == threads


# ------------------------------------------------------------------------- interruption


@pytest.mark.parametrize(
    "sig,code,line",
    [
        (signal.SIGTERM, 143, "hvdsgd: stopped by SIGTERM"),
        (signal.SIGINT, 130, "hvdsgd: interrupted"),
    ],
)
def test_interrupted_run_writes_a_weights_only_checkpoint(tmp_path, sig, code, line):
    cmd = [
        sys.executable,
        "-m",
        "hvdsgd.train",
        "--model",
        "mlp",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--eval-interval",
        "0.2",
        "--strategy",
        "hogwild",
        "--workers",
        "2",
        "--epochs",
        "3000",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        kids = workers_of(proc.pid, 2)
        wait_training(tmp_path)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, out + err
    assert err.strip().splitlines() == [line], err  # one line, no resource-tracker warning
    assert shm_segments(proc.pid) == [] and not any(
        k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids
    )
    state = torch.load(tmp_path / checkpoint.NAME, weights_only=True)
    model = models.build("mlp", (1, 8, 8), 10)
    assert state["model"].keys() == model.state_dict().keys()
    assert state["updates"] > 0 and state["epoch"] == state["updates"] // (2 * 23)
    assert state["epoch"] < 3000 and state["identity"]["model"] == "mlp"
    trained = torch.nn.utils.parameters_to_vector(model.parameters())
    model.load_state_dict(state["model"])
    assert not torch.equal(trained, torch.nn.utils.parameters_to_vector(model.parameters()))
    assert "checkpoint" in out


# ----------------------------------------------------------- errors after training starts


def _our_workers() -> list:
    """This process's HOGWILD workers still running (not the resource tracker)."""

    def alive_worker(c) -> bool:
        try:
            return c.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(c.cmdline())
        except psutil.Error:
            return False

    return [c for c in psutil.Process().children() if alive_worker(c)]


def _fail(*_args, **_kwargs):
    raise UsageError("cannot write /x/checkpoint.pt (Is a directory)")


@pytest.mark.parametrize("where", ["checkpoint", "metrics"])
def test_write_error_after_start_stops_workers_and_unlinks(tmp_path, monkeypatch, where):
    if where == "checkpoint":
        monkeypatch.setattr(checkpoint, "save", _fail)
    else:
        monkeypatch.setattr(report.RunDir, "log_epoch", _fail)
    cfg = TrainConfig(
        model="mlp", strategy="hogwild", workers=2, epochs=2, out=str(tmp_path), progress=False
    )
    with pytest.raises(UsageError, match="Is a directory"):
        train(cfg)
    assert shm_segments(os.getpid()) == []
    assert _our_workers() == []


def test_directory_at_checkpoint_path_is_a_usage_error(tmp_path, monkeypatch):
    write_summary = report.RunDir.write_summary

    def and_block_the_checkpoint(self, summary):  # the path becomes a directory mid-run
        write_summary(self, summary)
        (self.path / checkpoint.NAME).mkdir()

    monkeypatch.setattr(report.RunDir, "write_summary", and_block_the_checkpoint)
    cfg = TrainConfig(
        model="mlp", strategy="hogwild", workers=2, epochs=1, out=str(tmp_path), progress=False
    )
    with pytest.raises(UsageError, match=re.escape(str(tmp_path / checkpoint.NAME))):
        train(cfg)
    assert shm_segments(os.getpid()) == [] and _our_workers() == []
