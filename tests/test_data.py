"""Data sets: digits split, the real MNIST/CIFAR formats, and the bad-file errors."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import ROOT, write_idx

from hvdsgd import data
from hvdsgd.errors import UsageError


@pytest.mark.unit
def test_digits_split_is_stratified_and_fixed():
    a, b = data.load("digits"), data.load("digits")
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # each class 1/5 of its ~180 samples
    assert abs(a.train_x.mean().item()) < 1e-4 and abs(a.train_x.std().item() - 1) < 1e-2


@pytest.mark.unit
def test_resize_to_mnist_shape():
    ds = data.resize(data.load("digits"), 28)
    assert ds.input_shape == (1, 28, 28) and len(ds.train_x) == 1437


@pytest.mark.unit
def test_mnist_reads_idx_files(mnist_dir):
    ds = data.load("mnist", str(mnist_dir))
    assert ds.train_x.shape == (60, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert ds.train_y.tolist() == [i % 10 for i in range(60)] and ds.num_classes == 10


@pytest.mark.unit
def test_cifar10_reads_pickle_batches(cifar10_dir):
    ds = data.load("cifar10", str(cifar10_dir))
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.train_y.dtype == torch.int64


@pytest.mark.unit
def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(UsageError, match=r"--data-dir .* does not exist.*--download"):
        data.load("mnist", str(tmp_path / "nope"))


@pytest.mark.unit
def test_missing_files_are_listed(tmp_path):
    with pytest.raises(UsageError, match=r"missing: train-images-idx3-ubyte.*--download"):
        data.load("mnist", str(tmp_path))


@pytest.mark.unit
@pytest.mark.parametrize(
    "victim", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]
)
def test_truncated_mnist_is_reported(mnist_dir, victim):
    f = mnist_dir / victim
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        data.load("mnist", str(mnist_dir))


@pytest.mark.unit
def test_truncated_cifar_is_reported(cifar10_dir):
    f = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UsageError, match="cifar10 files in .* truncated or corrupt"):
        data.load("cifar10", str(cifar10_dir))


@pytest.mark.unit
def test_synthetic_has_the_asked_shape():
    ds = data.load("synthetic", input_shape=(3, 16, 16), num_classes=5, synthetic_samples=64)
    assert ds.input_shape == (3, 16, 16) and ds.num_classes == 5 and len(ds.train_y) == 64
    like = data.load("cifar100", synthetic=True, synthetic_samples=32)
    assert like.input_shape == (3, 32, 32) and like.num_classes == 100


@pytest.mark.unit
def test_batches_cover_the_shard_once():
    x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    b = data.Batches(x, y, 4, data.shard(10, 1, 3), torch.device("cpu"))
    seen = torch.cat([yb for _, yb in b]).tolist()
    assert seen == [1, 4, 7] and len(b) == 1


@pytest.mark.unit
def test_batches_with_loader_workers_match_in_place_slicing():
    x, y = torch.randn(20, 1, 2, 2), torch.arange(20)
    plain = data.Batches(x, y, 6, range(20), torch.device("cpu"))
    workers = data.Batches(x, y, 6, range(20), torch.device("cpu"), workers=1)
    for (xa, ya), (xb, yb) in zip(plain, workers, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ------------------------------------------------------------ bad labels, too much memory


def run_train(*args, timeout=120):
    """``python -m hvdsgd.train ARGS`` in one plain process; the CompletedProcess."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hvdsgd.train",
            "--model",
            "mlp",
            "--dry-run",
            "--no-progress",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def one_error_line(proc) -> str:
    """The single line a bad input prints; fails on a traceback or more lines."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdsgd: error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.mark.unit
@pytest.mark.parametrize(
    "split, file", [("train", "train-labels-idx1-ubyte"), ("t10k", "t10k-labels-idx1-ubyte")]
)
def test_mnist_label_out_of_range_names_file_label_and_range(mnist_dir, split, file):
    labels = np.arange(60 if split == "train" else 20) % 10
    labels[7] = 15
    write_idx(mnist_dir / "MNIST" / "raw" / file, labels)
    path = mnist_dir / "MNIST" / "raw" / file
    with pytest.raises(UsageError) as e:
        data.load("mnist", str(mnist_dir))
    assert str(e.value) == (
        f"mnist file {path} holds label 15 (sample 7), outside the "
        "10 classes 0-9; delete it and fetch it again (--download)"
    )


def rewrite_cifar_labels(folder: Path, name: str, key: str, index: int, label: int) -> Path:
    """Set label ``index`` of CIFAR batch ``name`` to ``label``; returns the file."""
    path = folder / name
    with open(path, "rb") as fh:
        batch = pickle.load(fh)
    batch[key][index] = label
    with open(path, "wb") as fh:
        pickle.dump(batch, fh)
    return path


@pytest.mark.unit
@pytest.mark.parametrize("name, label", [("data_batch_4", 15), ("test_batch", -1)])
def test_cifar_label_out_of_range_names_its_batch_file(cifar10_dir, name, label):
    path = rewrite_cifar_labels(cifar10_dir / "cifar-10-batches-py", name, "labels", 3, label)
    with pytest.raises(UsageError) as e:
        data.load("cifar10", str(cifar10_dir))
    assert str(e.value) == (
        f"cifar10 file {path} holds label {label} (sample 3), outside the "
        "10 classes 0-9; delete it and fetch it again (--download)"
    )


@pytest.mark.e2e
def test_bad_label_is_one_line_from_train_not_an_index_error(cifar10_dir, tmp_path):
    path = rewrite_cifar_labels(
        cifar10_dir / "cifar-10-batches-py", "data_batch_2", "labels", 0, 15
    )
    proc = run_train(
        "--dataset", "cifar10", "--data-dir", str(cifar10_dir), "--out", str(tmp_path / "run")
    )
    assert one_error_line(proc) == (
        f"hvdsgd: error: cifar10 file {path} holds label 15 (sample 0), outside the 10 classes "
        "0-9; delete it and fetch it again (--download)"
    )


@pytest.fixture
def little_memory(monkeypatch):
    """psutil reports 64 MiB available, to a process alone on its host; returns the bytes."""
    for var in data.LOCAL_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    avail = 64 * 2**20
    real = psutil.virtual_memory
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real()._replace(available=avail))
    return avail


@pytest.mark.unit
def test_synthetic_too_big_for_memory_is_refused_before_allocating(little_memory, monkeypatch):
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("allocated anyway"))
    # 4,608 samples of 3x32x32 float32 + int64 labels: 56.6 MB of data fits in 64 MiB ...
    assert data.synthetic_bytes((3, 32, 32), 10, 4096) == 4608 * (3 * 32 * 32 * 4 + 8)
    with pytest.raises(UsageError) as e:  # ... twice that does not
        data.load("synthetic", input_shape=(3, 32, 32), synthetic_samples=8192)
    assert str(e.value) == (
        "synthetic data of 8,192 + 1,024 test samples of shape 3x32x32 needs "
        "113 MB of memory, 67.1 MB available; lower --synthetic-samples "
        "or --input-shape"
    )
    with pytest.raises(UsageError, match=r"needs 113 MB .*; lower --synthetic-samples$"):
        data.load("cifar10", synthetic=True, synthetic_samples=8192)  # shaped like cifar10


@pytest.mark.unit
def test_synthetic_that_fits_still_loads(little_memory):
    ds = data.load("synthetic", input_shape=(3, 32, 32), synthetic_samples=4096)
    assert len(ds.train_y) == 4096 and len(ds.test_y) == 512


@pytest.mark.unit
def test_resize_too_big_for_memory_is_refused(little_memory, monkeypatch):
    ds = data.load("synthetic", input_shape=(3, 8, 8), synthetic_samples=512)
    monkeypatch.setattr(data.F, "interpolate", lambda *a, **k: pytest.fail("allocated anyway"))
    with pytest.raises(UsageError) as e:  # 576 x 3 x 224 x 224 floats: 347 MB
        data.resize(ds, 224)
    assert str(e.value) == (
        "resizing synthetic from 8x8 to 224x224 for this --model needs "
        "347 MB of memory, 67.1 MB available; lower --synthetic-samples "
        "or choose a --model that takes 8x8 inputs"
    )


@pytest.mark.unit
def test_memory_of_every_rank_on_the_host_counts(little_memory, monkeypatch):
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "4")  # 4 ranks x 18.9 MB > 64 MiB
    with pytest.raises(
        UsageError,
        match=r"needs 75.6 MB of memory \(4 ranks on this host x "
        r"18.9 MB\), 67.1 MB available",
    ):
        data.load("synthetic", input_shape=(1, 32, 32), synthetic_samples=4096)


@pytest.mark.e2e
def test_huge_synthetic_set_is_one_line_from_train(tmp_path):
    proc = run_train(
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "100000000",
        "--out",
        str(tmp_path / "run"),
        timeout=60,
    )
    line = one_error_line(proc)
    assert re.fullmatch(
        r"hvdsgd: error: synthetic data of 100,000,000 \+ 12,500,000 test samples "
        r"of shape 3x32x32 needs 1\.38 TB of memory, [0-9.]+ [MGT]B available; "
        r"lower --synthetic-samples or --input-shape",
        line,
    ), line


@pytest.mark.unit
def test_synthetic_and_its_resize_are_checked_together_before_allocating(
    little_memory, monkeypatch
):
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("allocated anyway"))
    with pytest.raises(UsageError) as e:  # 3.6 MB of 8x8 images, 2.77 GB once resized
        data.load("synthetic", input_shape=(3, 8, 8), synthetic_samples=4096, resize_to=224)
    assert str(e.value) == (
        "synthetic data of 4,096 + 512 test samples of shape 3x8x8, resized "
        "to 224x224 for this --model, needs 2.78 GB of memory, 67.1 MB "
        "available; lower --synthetic-samples or --input-shape"
    )


@pytest.mark.unit
def test_load_resizes_for_the_model():
    ds = data.load("digits", resize_to=28)
    assert ds.input_shape == (1, 28, 28) and len(ds.train_x) == 1437


@pytest.mark.unit
def test_sizes_read_in_si_units_up_to_petabytes_and_beyond():
    assert [data.si_bytes(n) for n in (999, 1.2345e6, 1.38e12, 2e15, 2e18)] == [
        "999 B",
        "1.23 MB",
        "1.38 TB",
        "2 PB",
        "2e+03 PB",
    ]


@pytest.mark.unit
def test_digits_come_from_the_cache_bit_for_bit_and_a_bad_cache_is_remade(tmp_path, monkeypatch):
    monkeypatch.setenv("HVDSGD_CACHE", str(tmp_path / "cache"))
    fresh = data.load_digits()  # made from scikit-learn, then kept
    [kept] = (tmp_path / "cache").glob("digits-*.npz")
    assert (tmp_path / "cache").stat().st_mode & 0o077 == 0 and kept.stat().st_mode & 0o077 == 0
    cached = data.load_digits()
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(fresh, name), getattr(cached, name)), name
    assert cached.classes == fresh.classes and len(cached.train_y) == 1437
    kept.write_bytes(b"not an npz")  # a torn or foreign file: made again, not trusted
    again = data.load_digits()
    assert torch.equal(again.train_x, fresh.train_x)
    assert kept.read_bytes()[:2] == b"PK"  # rewritten as an npz (a zip)
