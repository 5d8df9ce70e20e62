"""Horovod set-up and the collectives hvdsgd needs, in one place.

Works the same under ``horovodrun -np N`` and as one plain process, which does not import
Horovod at all (size 1; it need not even be installed, as after a plain ``pip install``). Under
``torchrun`` or ``mpirun`` without Horovod's environment every process would train alone, so
:func:`check_launcher` refuses that in one line. ``is_main()`` is the one rank-0 gate for
printing, files and checkpoints.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Callable, TypeVar

import torch

from .data import cpu_count
from .errors import UsageError

T = TypeVar("T")
log = logging.getLogger(__name__)
CPU_CYCLE_TIME_MS = 50  # idle cycle on CPU; work wakes the loop at once


MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def under_horovodrun() -> bool:
    """Started by horovodrun, or by mpirun for a Horovod built with MPI (check_launcher
    refuses mpirun otherwise): rank and size come from the launcher."""
    return "HOROVOD_RANK" in os.environ or any(_int_env(v) > 1 for v in MPI_SIZE_VARS)


def _int_env(var: str) -> int:
    try:
        return int(os.environ.get(var, "1"))
    except ValueError:
        return 1


@functools.lru_cache(maxsize=None)
def _import_horovod():
    """(``horovod.torch``, None), or (None, the ImportError); tried once per process."""
    try:
        import horovod.torch as _hvd
    except ImportError as e:
        return None, e
    return _hvd, None


def hvd(required: bool = True):
    """The ``horovod.torch`` module; None when not ``required`` and this is one plain
    process, which runs without Horovod. Missing when needed: a one-line error."""
    if not required and not under_horovodrun():
        return None
    _hvd, e = _import_horovod()
    if _hvd is None:
        raise UsageError(
            f"horovod.torch is not importable ({e}); build it with "
            "`python -m hvdsgd.build_horovod` (or `make setup` in a checkout)"
        )
    return _hvd


def check_launcher(prog: str = "python -m hvdsgd.train") -> None:
    """Refuse a launch by torchrun or mpirun without Horovod's environment: each process would
    train alone, all writing the same --out. One line saying how to launch instead."""
    if "HOROVOD_RANK" in os.environ:
        return
    for var in ("WORLD_SIZE", *MPI_SIZE_VARS):
        n = _int_env(var)
        if n <= 1:
            continue
        launcher = "torchrun" if var == "WORLD_SIZE" else "mpirun"
        h = _import_horovod()[0]
        if launcher == "mpirun" and h is not None and h.mpi_built():
            return  # Horovod over MPI: hvd.init() takes rank and size from MPI
        raise UsageError(
            f"started by {launcher} as {n} processes, but hvdsgd's ranks come from "
            f"Horovod; launch with: horovodrun -np {n} {prog} ..."
        )


def elastic() -> bool:
    """An elastic launch (horovodrun --min-np/--max-np/--host-discovery-script): Horovod sets
    HOROVOD_ELASTIC=1 for its workers, whose world may shrink and grow while they train."""
    return os.environ.get("HOROVOD_ELASTIC") == "1" and under_horovodrun()


def set_threads(threads: int = 0) -> None:
    """Compute threads: ``threads``, or this host's cores shared by the ranks it runs."""
    h = library()
    torch.set_num_threads(threads or max(1, cpu_count() // (h.local_size() if h else 1)))


def init_library():
    """``hvd.init()`` (idempotent) with a patient Gloo timeout; returns ``horovod.torch``, or
    None for one plain process without Horovod installed."""
    # Gloo gives up on a peer after 30 s by default; a rank that a busy host preempts during
    # start-up (imports, data) can take that long. horovodrun --gloo-timeout-seconds still decides.
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "120")
    h = hvd(required=False)
    if h is not None:
        h.init()  # Horovod: initialise the library (rank, size, the Gloo or NCCL context).
    return h


def library():
    """The initialised ``horovod.torch``, or None (one plain process without Horovod)."""
    h = hvd(required=False)
    return h if h is not None and h.is_initialized() else None


def init(device: str = "auto", threads: int = 0, gpu: int = -1) -> torch.device:
    """``hvd.init()``, pin the GPU to the local rank (or ``gpu``, one process alone), set
    compute threads; returns the device."""
    if device == "cpu" or not torch.cuda.is_available():
        # Horovod's background thread coordinates the ranks once per cycle (1 ms by default),
        # busy or not; on a CPU host whose cores all compute, those wake-ups steal the cores.
        # hvdsgd's Horovod build can instead wake the loop when a tensor is enqueued, so the
        # idle cycle can be long at no cost in latency. horovodrun --cycle-time-ms or the
        # HOROVOD_* variables still decide.
        os.environ.setdefault("HOROVOD_WAKE_ON_ENQUEUE", "1")
        # A waiting rank sleeps between polls instead of spinning, leaving the core to the
        # background thread that does the allreduce it waits for (patched build as well).
        os.environ.setdefault("HOROVOD_WAIT_SLEEP_US", "50")
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(CPU_CYCLE_TIME_MS))
    h = init_library()
    local_rank = h.local_rank() if h is not None else 0
    if (device == "cuda" or gpu >= 0) and not torch.cuda.is_available():
        raise UsageError(
            f"{'--gpu %d' % gpu if gpu >= 0 else '--device cuda'} but no CUDA GPU "
            "is visible; use --device cpu"
        )
    if gpu >= 0:
        if size() > 1:
            raise UsageError(
                "--gpu is for one process; under horovodrun each rank takes the "
                "GPU of its local rank (choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        if gpu >= torch.cuda.device_count():
            raise UsageError(
                f"--gpu {gpu} but only {torch.cuda.device_count()} GPU(s) are "
                f"visible (0-{torch.cuda.device_count() - 1})"
            )
        torch.cuda.set_device(gpu)
        dev = torch.device("cuda", gpu)
    elif device != "cpu" and torch.cuda.is_available():
        # Horovod: pin this process to one GPU, chosen by its rank on this host.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    set_threads(threads)  # Horovod: share this host's cores between the ranks it runs
    return dev


def rank() -> int:
    """This process's rank (0 before ``init``, e.g. in a library call from a plain script)."""
    h = library()
    return h.rank() if h is not None else 0


def size() -> int:
    """The number of ranks (1 before ``init``)."""
    h = library()
    return h.size() if h is not None else 1


def host() -> str:
    """The host this rank runs on, as the launcher named it (``-H``), else the hostname."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def is_main() -> bool:
    """True on rank 0: the only rank that prints, writes files and saves checkpoints."""
    return rank() == 0


def allreduce_sum(t: torch.Tensor, name: str) -> torch.Tensor:
    """Sum of ``t`` over ranks (Horovod allreduce with op=Sum)."""
    if size() == 1:
        return t
    return hvd().allreduce(t, op=hvd().Sum, name=name)


def on_main(fn: Callable[[], T], name: str) -> T:
    """Run ``fn`` on rank 0 only and broadcast its result, or its UsageError, to every rank."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except UsageError as e:
            error = str(e)
    if size() > 1:
        result, error = hvd().broadcast_object((result, error), root_rank=0, name=name)
    if error is not None:
        raise UsageError(error)
    return result  # type: ignore[return-value]


def agree(fn: Callable[[], T], name: str) -> T:
    """Run ``fn`` on every rank; if it raised UsageError anywhere, raise it everywhere.

    Without this a rank that fails alone (say, the data directory is missing on one host)
    would leave the others waiting in the next collective.
    """
    result, error = None, None
    try:
        result = fn()
    except UsageError as e:
        error = str(e)
    if size() > 1:
        errors = hvd().allgather_object(error and (error, host()), name=name)
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            r, (e, where) = bad[0]
            raise UsageError(e if r == 0 else f"rank {r} on {where}: {e}")
    elif error is not None:
        raise UsageError(error)
    return result  # type: ignore[return-value]
