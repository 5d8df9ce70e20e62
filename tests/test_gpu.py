"""GPU training: the data set on the device, fp16 autocast with GradScaler, bf16 autocast."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_training_with_amp(tmp_path, amp):
    out = tmp_path / amp
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvdsgd.train",
            "--device",
            "cuda",
            "--amp",
            amp,
            "--epochs",
            "6",
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cuda" and summary["config"]["amp"] == amp
    assert summary["test_accuracy"] >= 0.95
