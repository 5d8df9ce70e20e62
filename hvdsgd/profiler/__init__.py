"""hvdsgd.profiler: GPU (NVML + GPM) and CPU sampling beside training, or around any command.

In Python (one sampler per rank, each watching its own GPU)::

    from hvdsgd.profiler import Profiler
    with Profiler("runs/prof", interval=0.1, cuda_ordinal=local_rank, rank=rank) as prof:
        train()
    prof.summary["dcgm"]["gpu0"]["sm_active"]["mean"]

From the shell (returns the command's exit code)::

    python -m hvdsgd.profiler --interval 0.1 --out runs/prof -- python train.py --epochs 1
    python -m hvdsgd.profiler --duration 30 --out runs/idle

Writes ``profile[-rankN].csv`` (a row per sample), ``.json`` (summary) and ``.png`` (timeline).
Without a GPU or driver it says so in one log line and records CPU metrics only.
"""

from .nvml import GpuRef, parse_cuda_visible_devices, visible_gpus
from .output import plot_timeline, read_csv, summarize
from .sampler import Profiler

__all__ = [
    "GpuRef",
    "Profiler",
    "parse_cuda_visible_devices",
    "plot_timeline",
    "read_csv",
    "summarize",
    "visible_gpus",
]
