"""Multi-rank behaviour under `horovodrun -np 2 -H localhost:2 --gloo` (CPU, loopback)."""
import json

import pytest
import torch

from conftest import horovodrun

pytestmark = pytest.mark.dist


def run_train(tmp_path, *flags, np_=2, name="run"):
    out = tmp_path / name
    proc = horovodrun(np_, "-m", "hvdsgd.train", "--out", str(out), "--no-progress", *flags)
    return proc, out


def error_lines(proc):
    return [l for l in (proc.stdout + proc.stderr).splitlines() if "hvdsgd: error:" in l]


@pytest.mark.parametrize("check", ["identical_parameters", "gradient_average", "accumulation",
                                   "bucket_views", "many_small_collectives"])
def test_allreduce_checks(check):
    # A 10 s Gloo timeout: a rank that hangs fails the check quickly instead of after 120 s.
    proc = horovodrun(2, "tests/dist_checks.py", check, timeout=120,
                      env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "10"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{check} ok" in proc.stdout


def test_digits_default_reaches_97_percent(tmp_path):
    proc, out = run_train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97, summary["test_accuracy"]
    assert summary["world_size"] == 2 and summary["epochs"] == 15 and summary["model"] == "cnn"
    for key in ("test_macro_f1", "samples_per_sec", "wall_time_s"):
        assert summary[key] > 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 16))
    assert len(rows[-1]["test_per_class_accuracy"]) == 10
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "confusion.png").stat().st_size > 10_000
    # rank 0 alone prints: one line per epoch, not one per rank
    assert sum("epoch  15/15" in l for l in proc.stdout.splitlines()) == 1


@pytest.mark.parametrize("flags", [
    ("--amp", "bf16", "--fp16-allreduce", "--channels-last", "--model", "cnn"),
    ("--accum-steps", "2", "--loader-workers", "1", "--optimizer", "adamw", "--lr", "0.002",
     "--scheduler", "step", "--model", "mlp"),
])
def test_training_options_train_to_a_useful_model(tmp_path, flags):
    proc, out = run_train(tmp_path, "--epochs", "4", "--no-checkpoint", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.85, summary["test_accuracy"]
    assert summary["config"]["amp" if "--amp" in flags else "accum_steps"] in ("bf16", 2)


def test_resume_ends_with_the_same_weights(tmp_path):
    flags = ("--epochs", "4", "--model", "cnn", "--keep-checkpoints")
    proc, full = run_train(tmp_path, *flags, name="full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((full / "checkpoint-epoch2.pt").read_bytes())
    proc, _ = run_train(tmp_path, *flags, "--resume", name="resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after epoch 2" in proc.stdout
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6, rtol=0), k
    rows = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [3, 4]


def test_plain_process_without_horovodrun(tmp_path):
    import subprocess, sys, os
    from conftest import ROOT
    out = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "hvdsgd.train", "--model", "mlp", "--dry-run",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1


# --------------------------------------------------------------------------- bad input

def bad_mnist(tmp_path, mnist_dir):
    f = mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:1000])
    return ["--dataset", "mnist", "--data-dir", str(mnist_dir), "--model", "mlp"]


def corrupt_checkpoint(tmp_path, mnist_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\x80\x02not really a checkpoint")
    return ["--resume"]


def file_in_the_way(tmp_path, mnist_dir):
    (tmp_path / "file").write_text("x")
    return ["--out", str(tmp_path / "file" / "run")]


BAD = {
    "unknown model": (["--model", "resnet9000"], "unknown model 'resnet9000'"),
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset"),
    "negative lr": (["--lr", "-1"], "--lr must be > 0"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "more ranks than samples": (["--dataset", "synthetic", "--synthetic-samples", "1", "--model", "mlp"],
                                "2 ranks but only 1 training"),
    "missing data dir": (["--dataset", "mnist", "--data-dir", "/nonexistent/hvdsgd"], "does not exist"),
    "truncated data file": (bad_mnist, "truncated or corrupt"),
    "corrupt checkpoint": (corrupt_checkpoint, "corrupt or truncated"),
    "unwritable out": (file_in_the_way, "cannot write to --out"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nonzero_exit_no_hang(tmp_path, mnist_dir, case):
    flags, message = BAD[case]
    if callable(flags):
        flags = flags(tmp_path, mnist_dir)
    proc, _ = run_train(tmp_path, "--epochs", "1", *flags)  # a hang fails on the timeout
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # rank 0 speaks, once
    assert message in lines[0] and "Traceback" not in proc.stderr


def test_mismatched_checkpoint_is_refused(tmp_path):
    proc, out = run_train(tmp_path, "--model", "mlp", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc, _ = run_train(tmp_path, "--model", "cnn", "--epochs", "2", "--resume")
    assert proc.returncode != 0
    [line] = error_lines(proc)
    assert "does not match this run" in line and "model: checkpoint 'mlp', now 'cnn'" in line


def test_nan_loss_stops_every_rank_and_keeps_the_good_checkpoint(tmp_path):
    proc, out = run_train(tmp_path, "--model", "mlp", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    good = (out / "checkpoint.pt").read_bytes()
    proc, _ = run_train(tmp_path, "--model", "mlp", "--epochs", "3", "--resume", "--lr", "1e6")
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stdout[-1500:] + proc.stderr[-1500:]
    [line] = lines
    assert "loss became nan" in line.lower() and "lower --lr" in line
    assert (out / "checkpoint.pt").read_bytes() == good
    assert not list(out.glob(".checkpoint*.tmp"))
