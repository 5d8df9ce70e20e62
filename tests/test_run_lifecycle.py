"""A run's directory and life: no reuse without --resume/--overwrite, one run per --out, what
--resume means, permissions, writes that fail, and one plain process without Horovod."""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from hvdsgd import checkpoint
from hvdsgd.config import TrainConfig
from hvdsgd.errors import UsageError
from hvdsgd.train import train

FAST = dict(model="mlp", progress=False, lr=0.05)


def run(out, **kw):
    return train(TrainConfig(out=str(out), **{**FAST, **kw}))


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def entry(*args, env=None, timeout=120, cwd=None, **kwargs):
    """``python ARGS`` with the repository on the path; returns the CompletedProcess.
    ``kwargs`` go to subprocess.run (preexec_fn= ...)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    full.update({"PYTHONPATH": str(ROOT), **(env or {})})
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=timeout,
        cwd=cwd or ROOT,
        **kwargs,
    )


@pytest.mark.e2e
def test_an_out_with_results_is_refused_until_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, epochs=1)
    with pytest.raises(UsageError, match="already holds a run's results .*--resume.*--overwrite"):
        run(out, epochs=1)
    assert len(rows(out)) == 1  # nothing was appended by the refused run
    (out / "notes.txt").write_text("mine")
    run(out, epochs=2, overwrite=True)
    assert [r["epoch"] for r in rows(out)] == [1, 2]  # the old run's row is gone, not mixed in
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes only run outputs


@pytest.mark.e2e
def test_a_live_run_holds_the_directory_and_is_named_by_pid(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hvdsgd.report import RunDir; "
            "RunDir(sys.argv[1]).prepare(); print('locked', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"in use by a running hvdsgd \\(pid {holder.pid} "):
            run(out, epochs=1)
    finally:
        holder.kill()
        holder.wait()
    run(out, epochs=1)  # the lock died with its process
    assert len(rows(out)) == 1


@pytest.mark.e2e
def test_resume_counts_every_epoch_and_keeps_the_summary_whole(tmp_path):
    out = tmp_path / "r"
    first = run(out, epochs=2)
    for epochs in (2, 1):  # finished, or fewer than done: nothing to train, and how to go on
        with pytest.raises(
            UsageError, match=f"has trained 2 epochs and --epochs is {epochs}.*pass --epochs"
        ):
            run(out, epochs=epochs, resume=True)
    # --resume PATH (a checkpoint file) without --out goes on in that file's run directory.
    from hvdsgd.train import main

    main(
        [
            "--model",
            "mlp",
            "--lr",
            "0.05",
            "--no-progress",
            "--epochs",
            "3",
            "--resume",
            str(out / "checkpoint.pt"),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]
    assert summary["epochs"] == 3 and summary["train_samples"] == 3 * 1437
    assert summary["samples_per_sec"] > 0
    assert summary["train_samples"] == sum(r["train_samples"] for r in rows(out))
    assert first["train_samples"] == 2 * 1437
    # Into another --out: that directory starts with the history it continues.
    other = tmp_path / "branch"
    run(other, epochs=4, resume=str(out))
    assert [r["epoch"] for r in rows(other)] == [1, 2, 3, 4]
    assert [r["epoch"] for r in rows(out)] == [1, 2, 3]


@pytest.mark.e2e
def test_the_run_directory_is_private_and_nothing_is_world_writable(plain_train):
    _, out = plain_train  # run with umask 0: the modes are hvdsgd's own
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    files = [f for f in out.iterdir() if f.is_file()]
    assert {"summary.json", "metrics.jsonl", "checkpoint.pt", "curves.png"} <= {
        f.name for f in files
    }
    for f in files:
        assert not f.stat().st_mode & stat.S_IWOTH, f"{f.name} is world-writable"


@pytest.mark.e2e
def test_a_failed_checkpoint_write_stops_with_one_line_and_keeps_the_last_good_one(
    tmp_path, monkeypatch
):
    out = tmp_path / "full"
    real, calls = torch.save, []

    def disk_fills_in_epoch_2(obj, fh, *a, **k):
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        return real(obj, fh, *a, **k)

    monkeypatch.setattr(torch, "save", disk_fills_in_epoch_2)
    with pytest.raises(
        UsageError,
        match=f"cannot write checkpoint {out}/checkpoint.pt .*file "
        "write failed.*last good checkpoint is kept",
    ):
        run(out, epochs=3)
    monkeypatch.setattr(torch, "save", real)
    assert checkpoint.load(out / "checkpoint.pt", json.loads("{}"))["epoch"] == 1


@pytest.mark.e2e
def test_batch_larger_than_the_training_set_warns_once(tmp_path, capsys):
    run(tmp_path / "big", epochs=2, batch_size=4096)
    out = capsys.readouterr().out
    assert out.count("--batch-size 4096 is larger than the 1437 training samples") == 1


@pytest.mark.unit
def test_gpu_without_a_gpu_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UsageError, match="--gpu 0 but no CUDA GPU is visible"):
        run(tmp_path / "g", gpu=0)


@pytest.mark.e2e
def test_tensorboard_scalars_are_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run(out, epochs=2, tensorboard=True)
    events = EventAccumulator(str(out))
    events.Reload()
    for key in ("test_accuracy", "train_loss", "lr", "samples_per_sec"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["epoch"], r[key]) for r in rows(out)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)


@pytest.mark.e2e
def test_no_plots_draws_nothing_and_keeps_the_rest(tmp_path):
    """--no-plots (the bench scripts' launches): no PNG, the same records otherwise."""
    run(tmp_path / "plain", epochs=1)
    run(tmp_path / "bare", epochs=1, plots=False)
    made = {p: {f.name for f in (tmp_path / p).iterdir()} for p in ("plain", "bare")}
    assert made["plain"] - made["bare"] == {"curves.png", "confusion.png"}
    assert {"summary.json", "metrics.jsonl", "checkpoint.pt"} <= made["bare"]
    assert not any(name.endswith(".png") for name in made["bare"])


@pytest.mark.e2e
def test_torchrun_launch_is_one_line_from_rank_0_only(tmp_path):
    argv = ("-m", "hvdsgd.train", "--out", str(tmp_path / "t"))
    lines = []
    for rank in (0, 1):
        proc = entry(*argv, env={"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)})
        assert proc.returncode == 2
        lines += (proc.stdout + proc.stderr).splitlines()
    assert lines == [
        "hvdsgd: error: started by torchrun as 2 processes, but hvdsgd's ranks come "
        "from Horovod; launch with: horovodrun -np 2 python -m hvdsgd.train ..."
    ]
    assert not (tmp_path / "t").exists()


@pytest.mark.e2e
def test_plain_process_without_horovodrun(tmp_path):
    out = tmp_path / "single"
    proc = entry(
        "-m", "hvdsgd.train", "--model", "mlp", "--dry-run", "--out", str(out), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1


@pytest.fixture(scope="module")
def no_horovod(tmp_path_factory):
    """A PYTHONPATH on which ``import horovod`` fails, in this process's children too."""
    shim = tmp_path_factory.mktemp("shim") / "horovod"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('horovod is not installed (test shim)')\n")
    return {"PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}


def without_horovod(tmp_path_factory, no_horovod, *argv, **kwargs):
    """``python ARGS --out OUT --no-progress`` where horovod cannot be imported, run to its
    end; (the CompletedProcess, OUT). One run per entry point serves every test reading it."""
    out = tmp_path_factory.mktemp("plain") / "out"
    proc = entry(*argv, "--out", str(out), "--no-progress", env=no_horovod, timeout=240, **kwargs)
    return proc, out


@pytest.fixture(scope="module")
def plain_train(tmp_path_factory, no_horovod):
    """``python -m hvdsgd.train``, 1 epoch, started with umask 0 (so the run directory's modes
    are hvdsgd's own, not inherited)."""
    argv = ("-m", "hvdsgd.train", "--model", "mlp", "--epochs", "1")
    return without_horovod(tmp_path_factory, no_horovod, *argv, preexec_fn=lambda: os.umask(0))


@pytest.fixture(scope="module")
def plain_hogwild(tmp_path_factory, no_horovod):
    """``python -m hvdsgd.train --strategy hogwild --workers 2``, 2 epochs, with TensorBoard
    event files (when tensorboard is installed)."""
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    argv = ("-m", "hvdsgd.train", "--strategy", "hogwild", "--workers", "2", "--model", "mlp")
    argv += ("--epochs", "2", *(["--tensorboard"] if tensorboard else []))
    return without_horovod(tmp_path_factory, no_horovod, *argv)


@pytest.fixture(scope="module")
def plain_kfold(tmp_path_factory, no_horovod):
    argv = ("-m", "hvdsgd.kfold", "--folds", "2", "--epochs", "1", "--model", "mlp")
    return without_horovod(tmp_path_factory, no_horovod, *argv)


@pytest.fixture(scope="module")
def plain_lottery(tmp_path_factory, no_horovod):
    argv = ("-m", "hvdsgd.lottery", "--epochs", "1", "--model", "mlp", "--sparsities", "0.5")
    argv += ("--reset-steps", "0", "--rounds", "1")
    return without_horovod(tmp_path_factory, no_horovod, *argv)


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["train", "hogwild", "kfold", "lottery"])
def test_every_single_process_entry_point_runs_without_horovod(request, no_horovod, name):
    proc, out = request.getfixturevalue(f"plain_{name}")
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert json.loads((out / "summary.json").read_text())
    check = entry("-c", "import horovod", env=no_horovod)
    assert "horovod is not installed (test shim)" in check.stderr  # the shim did block it


@pytest.mark.e2e
def test_the_profiler_runs_without_horovod(tmp_path, no_horovod):
    proc = entry(
        "-m",
        "hvdsgd.profiler",
        "--interval",
        "0.05",
        "--out",
        str(tmp_path / "p"),
        "--no-plot",
        "--",
        sys.executable,
        "-c",
        "import time; time.sleep(0.5)",
        env=no_horovod,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert list((tmp_path / "p").glob("profile*.csv"))


@pytest.mark.e2e
def test_under_horovodrun_horovod_is_required(tmp_path, no_horovod):
    proc = entry(
        "-m",
        "hvdsgd.train",
        "--out",
        str(tmp_path / "h"),
        env={**no_horovod, "HOROVOD_RANK": "0", "HOROVOD_SIZE": "2"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hvdsgd: error: horovod.torch is not importable (horovod is not installed (test shim)); "
        "build it with `python -m hvdsgd.build_horovod` (or `make setup` in a checkout)"
    ]


@pytest.mark.e2e
def test_tensorboard_of_a_hogwild_run(plain_hogwild):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc, out = plain_hogwild
    assert proc.returncode == 0, proc.stderr[-1500:]
    events = EventAccumulator(str(out))
    events.Reload()
    values = [e.value for e in events.Scalars("test_accuracy")]
    assert values == pytest.approx([r["test_accuracy"] for r in rows(out)], rel=1e-6)


@pytest.mark.e2e
def test_sync_and_shared_runs_keep_one_record_format(tmp_path, capsys):
    """Both kinds of run go through one lifecycle (hvdsgd.run): the same files, the same
    summary keys (the shared-buffer strategies add theirs), checkpoint entries and lines."""
    sync = run(tmp_path / "sync", epochs=1)
    shared = run(tmp_path / "shared", epochs=1, strategy="hogwild", workers=2)
    assert set(shared) - set(sync) == {
        "workers",
        "shards",
        "updates",
        "aggregate_samples_per_sec",
        "staleness_mean",
        "staleness_p95",
        "staleness_max",
        "time_to_accuracy_s",
        "failed_workers",
    }
    assert set(sync) <= set(shared) and sync["train_samples"] == shared["train_samples"] == 1437
    for kind, summary, extra in (("sync", sync, set()), ("shared", shared, {"updates"})):
        out = tmp_path / kind
        assert json.loads((out / "summary.json").read_text()).keys() == summary.keys()
        assert rows(out) and all(r["epochs"] == 1 for r in rows(out))
        saved = torch.load(out / checkpoint.NAME, weights_only=True)
        assert (
            saved.keys() == {"format", "model", "epoch", "identity", "strategy", "config"} | extra
        )
        assert saved["epoch"] == 1 and (out / "curves.png").exists()
    lines = capsys.readouterr().out.splitlines()
    start = "hvdsgd: mlp (3,760 parameters) on digits (1437 train / 360 test"
    assert sum(ln.startswith(start) for ln in lines) == 2, lines
    assert sum(ln.startswith("done: test accuracy") for ln in lines) == 2, lines


@pytest.mark.unit
@pytest.mark.parametrize("dry_run", [False, True])
def test_the_lifecycle_takes_any_strategys_rows_figures_and_checkpoint(tmp_path, capsys, dry_run):
    """What a strategy hands run.Run (rows, an Outcome) becomes metrics.jsonl, summary.json
    (its keys added to every strategy's), a checkpoint (none under --dry-run) and lines."""
    from hvdsgd import data, logs, models
    from hvdsgd.metrics import Summary
    from hvdsgd.run import Outcome, Run

    logs.setup(True)  # the log's lines on this test's stdout
    cfg = TrainConfig(model="mlp", out=str(tmp_path), dry_run=dry_run, keep_checkpoints=True)
    x, y = torch.zeros(4, 1, 8, 8), torch.arange(4) % 2
    ds = data.Dataset("toy", x, y, x, y, ["a", "b"])
    model = models.build("mlp", (1, 8, 8), 2)
    r = Run(cfg, ds, model, t_start=0.0)
    r.prepare()
    r.announce(", 1x8x8", "my way")
    row = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.5, "test_accuracy": 0.75}
    r.record(row, "row line", model, torch.optim.SGD(model.parameters()))
    test = Summary(2.0, torch.tensor([[2, 0], [1, 1]]))
    summary = r.finish(
        Outcome(
            strategy="mine",
            world_size=3,
            test=test,
            last={"train_loss": 0.5},
            samples=8,
            train_time=2.0,
            device="cpu",
            threads=1,
            extra={"my_key": 7},
            done_figures=lambda s: f"{s['my_key']} mine, ",
        )
    )
    r.close()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert summary["my_key"] == 7 and summary["train_samples"] == 8
    assert summary["samples_per_sec"] == 4.0 and summary["test_accuracy"] == 0.75
    assert rows(tmp_path) == [row]
    saved = {"checkpoint.pt", "checkpoint-epoch1.pt"} & {f.name for f in tmp_path.iterdir()}
    assert saved == (set() if dry_run else {"checkpoint.pt", "checkpoint-epoch1.pt"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "hvdsgd: mlp (3,352 parameters) on toy (4 train / 4 test, 1x8x8), my way"
    assert lines[1] == "row line"
    assert lines[2].startswith("done: test accuracy 75.00%, macro-F1 ") and "7 mine, " in lines[2]
