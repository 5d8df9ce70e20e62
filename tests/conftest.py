import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_dir(tmp_path):
    """A small MNIST in the original idx format: 60 train / 20 test images of 28x28."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return tmp_path


@pytest.fixture
def cifar10_dir(tmp_path):
    """A small CIFAR-10 in the original python-pickle batches: 5 x 10 train, 10 test."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8),
                 "labels": list(range(10)), "batch_label": name}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, fh)
    return tmp_path


def horovodrun(np_, *args, timeout=240, cwd=None, env=None):
    """Run `horovodrun -np N -H localhost:N --gloo python ARGS` and return the CompletedProcess."""
    exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    cmd = [exe, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                          env=full_env)
    if proc.returncode != 0:
        # Shown under "Captured stdout" when the test fails: the first lines that say what went
        # wrong (an assertion message shows only a tail, where the root cause rarely is).
        key = [l for l in (proc.stdout + proc.stderr).splitlines()
               if re.search(r"error|exception|timed? ?out|terminated|signal|abort", l, re.I)]
        print(f"horovodrun -np {np_} exited {proc.returncode}; first lines naming an error:",
              *key[:40], sep="\n")
    return proc


@pytest.fixture(autouse=True)
def _gpu_gate(request):
    """`gpu` tests skip without a CUDA GPU, and fail instead when HVDSGD_TEST_GPU=1."""
    if request.node.get_closest_marker("gpu") is None:
        return
    import torch
    if not torch.cuda.is_available():
        if os.environ.get("HVDSGD_TEST_GPU") == "1":
            pytest.fail("HVDSGD_TEST_GPU=1 but no CUDA GPU is visible")
        pytest.skip("needs an NVIDIA GPU (HVDSGD_TEST_GPU=1 makes this a failure)")
