"""bench/throughput.py in its smallest form, so the script cannot rot unnoticed."""
import json
import subprocess
import sys

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
