"""Data sets as in-memory tensors, and the batches each rank trains on.

Every data set here fits in memory, so it is decoded once into float tensors (on the GPU when
there is one) and batches are slices of those tensors, not items decoded one at a time.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download),
  split 80/20 stratified with a fixed seed. Models that need MNIST's shape get it resized.
- ``mnist``, ``cifar10``, ``cifar100``: the original files read through torchvision from
  ``--data-dir`` (``MNIST/raw/*-ubyte``, ``cifar-10-batches-py/``, ``cifar-100-python/``).
- ``synthetic``: random tensors of any shape, for throughput.

Labels outside the class range are refused at load time, naming the file that holds them, and
a synthetic set or a resize that would not fit in the host's available memory is refused
before anything is allocated.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from .errors import UsageError

log = logging.getLogger(__name__)

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Launchers' count of the ranks on this host, each of which loads its own copy of the data.
LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


@dataclass
class Dataset:
    """Train and test tensors: x float (N, C, H, W), normalised; y int64 (N,)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "Dataset":
        return replace(
            self,
            **{k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")},
        )


# ---------------------------------------------------------------------------- loaders


def load(
    name: str,
    data_dir: str = "data",
    download: bool = False,
    synthetic: bool = False,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
    synthetic_samples: int = 4096,
    seed: int = 0,
    resize_to: int | None = None,
) -> Dataset:
    """Load data set ``name``, resized to ``resize_to`` x ``resize_to`` when given (see
    :func:`resize`); ``synthetic=True`` gives random data of the same shape."""
    if name == "synthetic" or synthetic:
        ds = _synthetic(name, input_shape, num_classes, synthetic_samples, seed, resize_to)
    elif name == "digits":
        ds = load_digits()
    elif name == "mnist":
        ds = load_mnist(data_dir, download)
    elif name in ("cifar10", "cifar100"):
        ds = load_cifar(name, data_dir, download)
    else:
        raise UsageError(
            f"unknown dataset {name!r}; choose one of: digits, mnist, cifar10, cifar100, synthetic"
        )
    return resize(ds, resize_to)


def _synthetic(
    name: str,
    shape: tuple[int, int, int],
    num_classes: int,
    samples: int,
    seed: int,
    resize_to: int | None,
) -> Dataset:
    """:func:`make_synthetic` shaped like ``name``, refused in one line before anything is
    allocated if it, and its resize to ``resize_to``, would not fit in memory."""
    fix = "lower --synthetic-samples or --input-shape"
    if name != "synthetic":
        shape, num_classes = _SHAPES[name]
        fix = "lower --synthetic-samples"
    n_test = _test_samples(num_classes, samples)
    what = (
        f"synthetic data of {samples:,} + {n_test:,} test samples of shape "
        f"{'x'.join(map(str, shape))}"
    )
    need = synthetic_bytes(shape, num_classes, samples)
    if resize_to is not None and shape[1:] != (resize_to, resize_to):
        what += f", resized to {resize_to}x{resize_to} for this --model,"
        need += (samples + n_test) * shape[0] * resize_to * resize_to * 4
    _require_memory(what, need, fix)
    return make_synthetic(shape, num_classes, samples, seed)


_SHAPES = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}


def load_digits() -> Dataset:
    """scikit-learn's digits: 1,437 train / 360 test images of 8x8, 10 classes (a stratified
    split). The split is kept in :func:`cache_dir` (``digits-<scikit-learn version>.npz``), so
    a run reads a small file instead of importing scikit-learn."""
    from importlib.metadata import version

    cache = cache_dir() / f"digits-{version('scikit-learn')}.npz"
    try:
        with np.load(cache) as z:
            split = [z[k] for k in ("xtr", "ytr", "xte", "yte")]
    except Exception:  # none yet, or unreadable: make it (again)
        split = digits_split()
        with contextlib.suppress(OSError):  # a read-only cache costs time, nothing else
            cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                np.savez(f, **dict(zip(("xtr", "ytr", "xte", "yte"), split, strict=True)))
            os.replace(tmp, cache)  # atomic: ranks that load at once each write their own tmp
    return _normalised("digits", *split, [str(c) for c in range(10)])


def digits_split() -> list[np.ndarray]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): x in [0, 1], (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return [xtr, ytr, xte, yte]


def cache_dir() -> Path:
    """hvdsgd's cache: ``$HVDSGD_CACHE``, else ``$XDG_CACHE_HOME/hvdsgd`` or ``~/.cache/hvdsgd``
    (the Horovod build's cache too)."""
    if os.environ.get("HVDSGD_CACHE"):
        return Path(os.environ["HVDSGD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hvdsgd"


def load_mnist(data_dir: str, download: bool = False) -> Dataset:
    """MNIST from ``DATA_DIR/MNIST/raw/*-ubyte`` (the original idx files, gunzipped)."""
    from torchvision.datasets import MNIST

    raw = Path(data_dir) / "MNIST" / "raw"
    _require_files("mnist", data_dir, raw, MNIST_FILES, download)
    try:
        splits = [MNIST(data_dir, train=t, download=download) for t in (True, False)]
    except Exception as e:  # torchvision asserts on sizes, numpy/torch raise on short buffers
        raise UsageError(
            f"mnist files in {raw} are truncated or corrupt ({_why(e)}); "
            "delete them and fetch them again (or pass --download)"
        ) from None
    (xtr, ytr), (xte, yte) = [
        (s.data.numpy()[:, None].astype(np.float32) / 255.0, s.targets.numpy().astype(np.int64))
        for s in splits
    ]
    for y, prefix in ((ytr, "train"), (yte, "t10k")):
        files = [(raw / f"{prefix}-labels-idx1-ubyte", len(y))]
        _check_labels("mnist", y, 10, lambda files=files: files)
    return _normalised("mnist", xtr, ytr, xte, yte, [str(c) for c in range(10)])


def load_cifar(name: str, data_dir: str, download: bool = False) -> Dataset:
    """CIFAR-10/100 from the python-pickle batches under ``DATA_DIR``."""
    from torchvision import datasets

    base = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

    class _Cifar(base):  # type: ignore[misc, valid-type]
        # Existence instead of MD5 checks: a damaged file fails to parse and is reported
        # below with its path, and small test files in the real format load too.
        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    folder = Path(data_dir) / base.base_folder
    expected = [f for f, _ in base.train_list + base.test_list] + [base.meta["filename"]]
    _require_files(name, data_dir, folder, expected, download)
    try:
        splits = [_Cifar(data_dir, train=t, download=download) for t in (True, False)]
    except Exception as e:  # truncated pickles raise EOFError / UnpicklingError / ValueError
        raise UsageError(
            f"{name} files in {folder} are truncated or corrupt ({_why(e)}); "
            "delete them and fetch them again (or pass --download)"
        ) from None
    (xtr, ytr), (xte, yte) = [
        (
            s.data.transpose(0, 3, 1, 2).astype(np.float32) / 255.0,
            np.asarray(s.targets, dtype=np.int64),
        )
        for s in splits
    ]
    classes = len(splits[0].classes)
    for y, files in ((ytr, base.train_list), (yte, base.test_list)):
        _check_labels(name, y, classes, partial(_cifar_counts, folder, [f for f, _ in files]))
    return _normalised(name, xtr, ytr, xte, yte, list(splits[0].classes))


def make_synthetic(
    shape: tuple[int, int, int], num_classes: int, samples: int, seed: int = 0
) -> Dataset:
    """Random N(0, 1) images with random labels; the test set is 1/8 the size."""
    g = torch.Generator().manual_seed(seed)
    n_test = _test_samples(num_classes, samples)
    x = torch.randn(samples + n_test, *shape, generator=g)
    y = torch.randint(0, num_classes, (samples + n_test,), generator=g)
    return Dataset(
        "synthetic",
        x[:samples],
        y[:samples],
        x[samples:],
        y[samples:],
        [str(c) for c in range(num_classes)],
    )


def _test_samples(num_classes: int, samples: int) -> int:
    """Size of the synthetic test set: 1/8 of the training set, at least one per class."""
    return max(num_classes, samples // 8)


def synthetic_bytes(shape: tuple[int, int, int], num_classes: int, samples: int) -> int:
    """Bytes :func:`make_synthetic` allocates: float32 images and int64 labels, test included."""
    return (samples + _test_samples(num_classes, samples)) * (math.prod(shape) * 4 + 8)


def _locate(files: list[tuple[Path, int]], index: int) -> tuple[Path, int]:
    """The file of ``(path, samples)`` that holds sample ``index`` of their concatenation, and
    the sample's index in it (the last file for an index past the end)."""
    for path, n in files:
        if index < n:
            return path, index
        index -= n
    return path, index


def _check_labels(
    name: str, y: np.ndarray, num_classes: int, files: Callable[[], list[tuple[Path, int]]]
) -> None:
    """Refuse a label outside ``0 .. num_classes - 1``, naming the file and sample holding it.

    ``files()`` lists ``(path, samples)`` in the order their labels were concatenated into
    ``y``; it is called only when a label is bad.
    """
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if not len(bad):
        return
    path, index = _locate(files(), int(bad[0]))
    raise UsageError(
        f"{name} file {path} holds label {y[bad[0]]} (sample {index}), outside the "
        f"{num_classes} classes 0-{num_classes - 1}; delete it and fetch it again "
        "(--download)"
    )


def _cifar_counts(folder: Path, files: list[str]) -> list[tuple[Path, int]]:
    """(path, number of labels) of each CIFAR batch file, read again (on the error path)."""
    import pickle

    counts = []
    for f in files:
        with open(folder / f, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        counts.append((folder / f, len(batch.get("labels", batch.get("fine_labels", [])))))
    return counts


def _normalised(name, xtr, ytr, xte, yte, classes) -> Dataset:
    """Standardise per channel with the training set's mean and std."""
    if len(xtr) == 0 or len(xte) == 0:
        raise UsageError(f"{name}: the files hold no samples; fetch them again")
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    t = _tensor
    return Dataset(name, t((xtr - mean) / std), t(ytr), t((xte - mean) / std), t(yte), classes)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _require_files(name: str, data_dir: str, folder: Path, files, download: bool) -> None:
    if download:
        return
    if not Path(data_dir).is_dir():
        raise UsageError(
            f"--data-dir {data_dir} does not exist; create it and put the "
            f"{name} files in {folder}, or pass --download"
        )
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UsageError(
            f"{name} files not found in {folder} (missing: {', '.join(missing)}); "
            "put them there or pass --download"
        )


def _why(e: Exception) -> str:
    return (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__).splitlines()[0][:160]


def _ranks_on_host() -> int:
    """Ranks a launcher started on this host (1 for a plain process)."""
    for var in LOCAL_SIZE_VARS:
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            continue
    return 1


def si_bytes(n: float) -> str:
    """Bytes in SI units with three significant digits: ``113 MB``, ``1.38 TB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 999.5:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def _require_memory(what: str, per_rank: int, fix: str) -> None:
    """Refuse ``what`` when every rank on this host needing ``per_rank`` bytes exceeds the
    memory available now: one line naming the size and ``fix``, before any allocation."""
    ranks, available = _ranks_on_host(), psutil.virtual_memory().available
    if per_rank * ranks > available:
        each = f" ({ranks} ranks on this host x {si_bytes(per_rank)})" if ranks > 1 else ""
        raise UsageError(
            f"{what} needs {si_bytes(per_rank * ranks)} of memory{each}, "
            f"{si_bytes(available)} available; {fix}"
        )


# ------------------------------------------------------------------------ transforms


def resize(ds: Dataset, size: int | None) -> Dataset:
    """Bilinear resize of every image to ``size`` x ``size`` (no-op for None or same size)."""
    if size is None or ds.input_shape[1:] == (size, size):
        return ds
    (c, h, w), n = ds.input_shape, len(ds.train_x) + len(ds.test_x)
    fix = f"choose a --model that takes {h}x{w} inputs"
    _require_memory(
        f"resizing {ds.name} from {h}x{w} to {size}x{size} for this --model",
        n * c * size * size * ds.train_x.element_size(),
        f"lower --synthetic-samples or {fix}" if ds.name == "synthetic" else fix,
    )
    log.info(
        "resizing %s from %dx%d to %dx%d for this model", ds.name, *ds.input_shape[1:], size, size
    )

    def r(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    return replace(ds, train_x=r(ds.train_x), test_x=r(ds.test_x))


# --------------------------------------------------------------------------- batches


class ShardSampler:
    """Worker ``w``'s fixed shard of ``n`` samples, reshuffled by its own generator each epoch.

    Shards are equal-length (the first samples repeat to pad), so every worker takes the same
    number of steps: ``sync`` needs that at its barrier.
    """

    def __init__(self, n: int, w: int, workers: int, seed: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        per = math.ceil(n / workers)
        order = torch.cat([order, order[: per * workers - n]])
        self.indices, self.w, self.seed, self.epoch = order[w::workers], w, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def order(self) -> torch.Tensor:
        """This epoch's order as a tensor (what ``data.Batches`` takes)."""
        g = torch.Generator().manual_seed(self.seed + 7919 * self.w + 1_000_003 * self.epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def __iter__(self):
        return iter(self.order().tolist())


class EpochSampler:
    """Rank ``rank``'s share of an epoch over ``n`` samples, shuffled by ``seed + epoch``.

    The order is ``DistributedSampler``'s (the same permutation, padding and stride), and an
    epoch can go on from its middle: the first ``done`` samples of the permutation (over all
    ranks) are skipped and the rest split over the ranks of the moment (``set_world``). Elastic
    training moves ``done`` on after every step, so after a reset the samples not yet trained
    are split over the new set of ranks: none skipped, none repeated.
    """

    def __init__(self, n: int, rank: int, size: int, seed: int):
        self.n, self.seed, self.epoch, self.done = n, seed, 0, 0
        self.set_world(rank, size)

    def set_world(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.done = epoch, 0

    def __len__(self) -> int:
        return math.ceil((self.n - self.done) / self.size)

    def order(self) -> torch.Tensor:
        """This rank's indices for the rest of the epoch, as a tensor (what Batches takes)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        rest = torch.randperm(self.n, generator=g)[self.done :]
        total = len(self) * self.size  # padded with the first samples, so every rank has as many
        if total > len(rest):
            rest = torch.cat([rest, rest.repeat(math.ceil(total / len(rest)))[: total - len(rest)]])
        return rest[self.rank : total : self.size]

    def __iter__(self):
        return iter(self.order().tolist())


class Batches:
    """One rank's batches of ``(x, y)`` from in-memory tensors.

    ``sampler`` yields sample indices (a ``DistributedSampler`` for training, a strided range
    for evaluation; a sampler with an ``order()`` method hands over the epoch's order as a
    tensor). With ``workers == 0`` a batch is one fancy-index of the tensors, on
    whichever device they live; with workers, a ``DataLoader`` slices in background
    processes and can pin the host batches for an asynchronous copy to ``device``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        sampler,
        device: torch.device,
        workers: int = 0,
        pin_memory: bool = False,
        channels_last: bool = False,
    ):
        self.x, self.y, self.batch_size, self.sampler = x, y, batch_size, sampler
        self.device, self.workers, self.pin_memory = device, workers, pin_memory
        self.memory_format = torch.channels_last if channels_last and x.dim() == 4 else None

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = getattr(self.sampler, "order", None)  # a sampler may hand over a tensor
        index = order() if order else torch.as_tensor(list(self.sampler), dtype=torch.long)
        chunks = index.split(self.batch_size)
        if self.workers == 0:
            source = ((self.x[c.to(self.x.device)], self.y[c.to(self.y.device)]) for c in chunks)
        else:
            source = torch.utils.data.DataLoader(
                _Slices(self.x, self.y, chunks),
                batch_size=None,
                shuffle=False,
                num_workers=self.workers,
                pin_memory=self.pin_memory,
            )
        non_blocking = self.pin_memory  # an asynchronous copy is safe from pinned memory only
        for x, y in source:
            x = x.to(self.device, non_blocking=non_blocking)
            if self.memory_format is not None:
                x = x.contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=non_blocking)


class _Slices(torch.utils.data.Dataset):
    """Batch ``i`` is ``(x[chunks[i]], y[chunks[i]])``: one item per batch."""

    def __init__(self, x, y, chunks):
        self.x, self.y, self.chunks = x, y, chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return self.x[self.chunks[i]], self.y[self.chunks[i]]


def shard(n: int, rank: int, size: int) -> range:
    """Rank ``rank``'s share of ``n`` evaluation samples: every ``size``-th, no padding."""
    return range(rank, n, size)


def cpu_count() -> int:
    """Cores this process may run on (honours taskset / cgroups affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_for(cfg) -> Dataset:
    """The data set a config names (``--dataset``, ``--data-dir``, ``--synthetic`` ...),
    resized to what its ``--model`` needs."""
    from . import models  # late: models imports torchvision

    return load(
        cfg.dataset,
        cfg.data_dir,
        cfg.download,
        cfg.synthetic,
        cfg.shape,
        cfg.num_classes,
        cfg.synthetic_samples,
        cfg.seed,
        resize_to=models.input_size(cfg.model),
    )
