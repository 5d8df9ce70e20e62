"""Data sets: digits split, the real MNIST/CIFAR formats, and the bad-file errors."""
import pytest
import torch

from hvdsgd import data
from hvdsgd.errors import UsageError


def test_digits_split_is_stratified_and_fixed():
    a, b = data.load("digits"), data.load("digits")
    assert a.train_x.shape == (1437, 1, 8, 8) and a.test_x.shape == (360, 1, 8, 8)
    assert torch.equal(a.test_y, b.test_y) and torch.equal(a.train_x, b.train_x)
    counts = torch.bincount(a.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # each class 1/5 of its ~180 samples
    assert abs(a.train_x.mean().item()) < 1e-4 and abs(a.train_x.std().item() - 1) < 1e-2


def test_resize_to_mnist_shape():
    ds = data.resize(data.load("digits"), 28)
    assert ds.input_shape == (1, 28, 28) and len(ds.train_x) == 1437


def test_mnist_reads_idx_files(mnist_dir):
    ds = data.load("mnist", str(mnist_dir))
    assert ds.train_x.shape == (60, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert ds.train_y.tolist() == [i % 10 for i in range(60)] and ds.num_classes == 10


def test_cifar10_reads_pickle_batches(cifar10_dir):
    ds = data.load("cifar10", str(cifar10_dir))
    assert ds.train_x.shape == (50, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert ds.classes[0] == "airplane" and ds.train_y.dtype == torch.int64


def test_missing_data_dir_names_the_fix(tmp_path):
    with pytest.raises(UsageError, match=r"--data-dir .* does not exist.*--download"):
        data.load("mnist", str(tmp_path / "nope"))


def test_missing_files_are_listed(tmp_path):
    with pytest.raises(UsageError, match=r"missing: train-images-idx3-ubyte.*--download"):
        data.load("mnist", str(tmp_path))


@pytest.mark.parametrize("victim", ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"])
def test_truncated_mnist_is_reported(mnist_dir, victim):
    f = mnist_dir / victim
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        data.load("mnist", str(mnist_dir))


def test_truncated_cifar_is_reported(cifar10_dir):
    f = cifar10_dir / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UsageError, match="cifar10 files in .* truncated or corrupt"):
        data.load("cifar10", str(cifar10_dir))


def test_synthetic_has_the_asked_shape():
    ds = data.load("synthetic", input_shape=(3, 16, 16), num_classes=5, synthetic_samples=64)
    assert ds.input_shape == (3, 16, 16) and ds.num_classes == 5 and len(ds.train_y) == 64
    like = data.load("cifar100", synthetic=True, synthetic_samples=32)
    assert like.input_shape == (3, 32, 32) and like.num_classes == 100


def test_batches_cover_the_shard_once():
    x, y = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    b = data.Batches(x, y, 4, data.shard(10, 1, 3), torch.device("cpu"))
    seen = torch.cat([yb for _, yb in b]).tolist()
    assert seen == [1, 4, 7] and len(b) == 1


def test_batches_with_loader_workers_match_in_place_slicing():
    x, y = torch.randn(20, 1, 2, 2), torch.arange(20)
    plain = data.Batches(x, y, 6, range(20), torch.device("cpu"))
    workers = data.Batches(x, y, 6, range(20), torch.device("cpu"), workers=1)
    for (xa, ya), (xb, yb) in zip(plain, workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
