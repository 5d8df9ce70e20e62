"""The bench/ scripts in their smallest form, so that no script rots unnoticed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.dist
def test_throughput_bench_runs_all_three_variants(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", "--models", "mlp", "--repeats", "1", "--iters", "2",
         "--batches-per-iter", "2", "--warmup", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "throughput.json").read_text())
    [row] = result["rows"]
    for kind in ("hvdsgd", "horovod", "ddp"):
        assert row[f"{kind}_total"] > 0
    assert row["hvdsgd_over_ddp"] == pytest.approx(row["hvdsgd_total"] / row["ddp_total"])
    assert "| mlp |" in (tmp_path / "throughput.md").read_text()


def test_hogwild_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "bench/hogwild.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "hogwild-quick.json").read_text())
    [kernel] = result["kernel"]
    assert all(v and min(v) > 0 for v in kernel["gbps"].values())
    assert [r["workers"] for r in result["e2e"]] == [1, 2]
    assert all(r["hvdsgd"]["samples_per_sec"] > 0 and r["reference"]["samples_per_sec"] > 0
               for r in result["e2e"])
    assert {r["policy"] for r in result["policies"]} == {
        "hogwild", "atomic", "locked", "sharded", "sync", "async-apply", "async-deferred"}
    assert "hvdsgd / reference" in (tmp_path / "hogwild-quick.md").read_text()


def test_occupancy_bench_quick_cpu_form(tmp_path):
    proc = subprocess.run([sys.executable, "bench/occupancy.py", "--quick", "--cpu",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith("occupancy: CPU form")
    result = json.loads((tmp_path / "occupancy-quick.json").read_text())
    one, two = result["sweep"]
    assert one["samples_per_sec"] > 0 and two["samples_per_sec"] > 0
    assert two["busy_cores"] > one["busy_cores"] * 0.9  # more workers keep more cores busy
    assert Path(one["profile_dir"], "profile.csv").exists()
    o = result["overhead"]
    assert o["step_ms_off"] > 0 and o["step_ms_on"] > 0 and o["pairs"] == 2
    assert 0 < o["sampler_cpu_pct_of_core"] < 50
    assert (tmp_path / "occupancy-quick.png").read_bytes()[:4] == b"\x89PNG"


def test_kfold_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "bench/kfold.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "kfold-quick.json").read_text())
    [run] = result["runs"]
    assert run["serial_s"] > 0 and run["parallel_s"] > 0 and run["joblib_s"] > 0
    assert result["identical_per_fold"] and result["accuracy_gap_points"] == 0
    assert run["joblib_accuracy"] == pytest.approx(run["serial_accuracy"])  # same folds, seeds
    assert result["ceiling"] == pytest.approx(1.5)
    assert "joblib, 2 jobs" in (tmp_path / "kfold-quick.md").read_text()


@pytest.mark.dist
def test_strategies_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, "bench/strategies.py", "--quick",
                           "--strategies", "allreduce,sync,hogwild", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["strategy"]: r for r in json.loads((tmp_path / "strategies-quick.json").read_text())["rows"]}
    assert set(rows) == {"allreduce", "sync", "hogwild"}
    assert all(r["samples_per_sec"][0] > 0 and 0.5 < r["test_accuracy"][0] <= 1 for r in rows.values())
    assert rows["allreduce"]["staleness_mean"][0] == 0 == rows["sync"]["staleness_mean"][0]
    assert rows["hogwild"]["staleness_mean"][0] > 0  # two writers: updates land in between
    assert "| hogwild |" in (tmp_path / "strategies-quick.md").read_text()
