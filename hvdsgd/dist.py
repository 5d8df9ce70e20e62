"""Horovod set-up and the collectives hvdsgd needs, in one place.

Works the same under ``horovodrun -np N`` and as one plain process (Horovod then runs with
size 1). ``is_main()`` is the one rank-0 gate for printing, files and checkpoints.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

import torch

from .data import cpu_count
from .errors import UsageError

T = TypeVar("T")
log = logging.getLogger(__name__)
CPU_CYCLE_TIME_MS = 50  # idle cycle on CPU; work wakes the loop at once


def hvd():
    """The ``horovod.torch`` module, with a one-line error if it is missing."""
    try:
        import horovod.torch as _hvd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError(f"horovod.torch is not importable ({e}); run `make setup` "
                         "or scripts/build_horovod.sh")
    return _hvd


def init_library():
    """``hvd.init()`` (idempotent) with a patient Gloo timeout; returns ``horovod.torch``."""
    # Gloo gives up on a peer after 30 s by default; a rank that a busy host preempts during
    # start-up (imports, data) can take that long. horovodrun --gloo-timeout-seconds still decides.
    os.environ.setdefault("HOROVOD_GLOO_TIMEOUT_SECONDS", "120")
    h = hvd()
    h.init()  # Horovod: initialise the library (rank, size, the Gloo or NCCL context).
    return h


def init(device: str = "auto", threads: int = 0) -> torch.device:
    """``hvd.init()``, pin the GPU to the local rank, set compute threads; returns the device."""
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
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and torch.cuda.is_available():
        # Horovod: pin this process to one GPU, chosen by its rank on this host.
        torch.cuda.set_device(h.local_rank() % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    # Horovod: share this host's cores between the ranks it runs.
    torch.set_num_threads(threads or max(1, cpu_count() // h.local_size()))
    return dev


def rank() -> int:
    """This process's rank (0 before ``init``, e.g. in a library call from a plain script)."""
    h = hvd()
    return h.rank() if h.is_initialized() else 0


def size() -> int:
    """The number of ranks (1 before ``init``)."""
    h = hvd()
    return h.size() if h.is_initialized() else 1


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
        errors = hvd().allgather_object(error, name=name)
        bad = [(r, e) for r, e in enumerate(errors) if e is not None]
        if bad:
            r, e = bad[0]
            raise UsageError(e if r == 0 else f"rank {r}: {e}")
    elif error is not None:
        raise UsageError(error)
    return result  # type: ignore[return-value]

