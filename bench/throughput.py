"""Training throughput of hvdsgd's step against PyTorch DDP and a bare Horovod loop.

    python bench/throughput.py                          # cnn and resnet18, -np 2, batch 64/rank
    python bench/throughput.py --models cnn --np 2 --repeats 3 --iters 10
    python bench/throughput.py --quick                  # a reduced form, for the test suite

Three launches per model, interleaved and repeated so that machine noise hits them alike:
- ``hvdsgd``: hvdsgd's own training step (``engine.train_step`` + the ``Allreduce``
  strategy, batches sliced from in-memory tensors) under ``horovodrun``;
- ``horovod``: the bare loop of Horovod's ``pytorch_synthetic_benchmark.py``
  (``hvd.DistributedOptimizer``, one fixed batch) under ``horovodrun``;
- ``ddp``: the same loop with ``DistributedDataParallel`` (Gloo on CPU, NCCL on GPU) under
  ``torchrun``.
Same model, batch per rank, threads per rank and ranks for all three. Each run warms up,
then times ``--iters`` iterations of ``--batches-per-iter`` steps; a run's figure is the
mean samples/s per rank, and the table shows mean ± 1.96·std over iterations and repeats.
Writes ``bench/results/throughput.{json,md}`` (``--quick``: ``throughput-quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from common import command_line, horovodrun, machine, mean_spread, parser, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {"cnn": (1, 28, 28), "mlp": (1, 28, 28)}  # everything else: CIFAR size


def shape_of(model: str):
    return SHAPES.get(model, (3, 32, 32))


# ------------------------------------------------------------------------- workers


def _init_ranks(kind: str) -> tuple[int, int, int, int]:
    """Start the run's communication; (rank, size, local rank, local size)."""
    if kind == "ddp":
        import torch
        import torch.distributed as tdist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend)
        rank, size = tdist.get_rank(), tdist.get_world_size()
        local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        return rank, size, local_rank, local_size
    import horovod.torch as hvd

    if kind == "hvdsgd":
        from hvdsgd import dist

        dist.init("auto", threads=0)  # hvdsgd's own set-up (threads = cores / local size)
    else:
        hvd.init()
    return hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size()


def _hvdsgd_step(args, model, device, rank: int, size: int):
    """hvdsgd's training step over batches sliced from in-memory tensors, endlessly."""
    import torch
    from torch.utils.data.distributed import DistributedSampler

    from hvdsgd import data
    from hvdsgd.config import TrainConfig
    from hvdsgd.engine import train_step
    from hvdsgd.metrics import Tally
    from hvdsgd.strategies.allreduce import Allreduce

    shape, b = shape_of(args.model), args.batch_size
    n = b * size * 16
    x, y = torch.randn(n, *shape, device=device), torch.randint(0, 10, (n,), device=device)
    cfg = TrainConfig(
        model=args.model,
        batch_size=b,
        lr=0.01,
        momentum=0.9,
        weight_decay=0.0,
        scheduler="constant",
        warmup_epochs=0,
    )
    strategy = Allreduce(cfg, model, device, steps_per_epoch=16)
    sampler = DistributedSampler(range(n), num_replicas=size, rank=rank, seed=0)
    batches = data.Batches(x, y, b, sampler, device)
    tally = Tally(10, device)

    def stream():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from batches
            epoch += 1

    it = stream()

    def step():
        model.train()
        train_step(model, [next(it)], strategy, device, "off", tally)

    return step


def _bare_step(kind: str, args, model, device, local_rank: int, size: int):
    """The loop of Horovod's synthetic benchmark on one fixed batch, under DDP or Horovod."""
    import torch
    import torch.nn.functional as F

    shape, b = shape_of(args.model), args.batch_size
    xb, yb = torch.randn(b, *shape, device=device), torch.randint(0, 10, (b,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 * size, momentum=0.9)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    else:
        import horovod.torch as hvd

        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())

    def step():
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()

    return step


def _rates(step, args, cuda: bool) -> list[float]:
    """Samples/s of this rank over each of ``args.iters`` timed iterations, after warm-up."""
    import torch

    def timed():
        for _ in range(args.batches_per_iter):
            step()
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.iters):
        t = timeit.timeit(timed, number=1)
        rates.append(args.batch_size * args.batches_per_iter / t)
    return rates


def worker(args) -> None:
    """One rank of one benchmark run; rank 0 writes the per-iteration figures."""
    import torch

    from hvdsgd import models

    kind = args.worker
    rank, size, local_rank, local_size = _init_ranks(kind)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, cores // local_size))  # the same for all three

    torch.manual_seed(0)
    model = models.build(args.model, shape_of(args.model), 10).to(device)
    if kind == "hvdsgd":
        step = _hvdsgd_step(args, model, device, rank, size)
    else:
        step = _bare_step(kind, args, model, device, local_rank, size)
    rates = _rates(step, args, cuda)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"rates_per_rank": rates, "size": size}))
    if kind == "ddp":
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()  # else Gloo's threads outlive exit: SIGABRT
        # The DDP reducer still holds the Gloo group, and a busy machine can finalise its pair
        # threads before the group at interpreter exit: std::terminate, SIGABRT (seen once in a
        # `make test` with both xdist workers busy). Every rank is past the barrier and rank 0
        # has written its figures, so leave without the finalisers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# -------------------------------------------------------------------------- driver


def launch(kind: str, model: str, args, result: Path) -> list[float]:
    small = model in SHAPES  # cnn, mlp: milliseconds a step; the others: a second or more
    per_iter = args.batches_per_iter or (20 if small else 2)
    warmup = args.warmup if args.warmup is not None else (5 if small else 2)
    iters = args.iters or (6 if small else 4)
    common = [
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--model",
        model,
        "--batch-size",
        str(args.batch_size),
        "--iters",
        str(iters),
        "--warmup",
        str(warmup),
        "--batches-per-iter",
        str(per_iter),
        "--result",
        str(result),
    ]
    if kind == "ddp":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", f"--nproc-per-node={args.np}", *common]
    else:
        cmd = horovodrun(args.np, *common)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(
            f"bench/throughput.py: the {kind} run of {model} failed:\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    return json.loads(result.read_text())["rates_per_rank"]


def main(argv=None) -> None:
    p = parser(__doc__, "mlp, 1 repeat, 2 iterations")
    p.add_argument("--models", default="cnn,resnet18", help="comma-separated model names")
    p.add_argument("--np", type=int, default=2, help="ranks")
    p.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
    p.add_argument(
        "--iters", type=int, default=None, help="timed iterations a run (None: 6 cnn/mlp, else 4)"
    )
    p.add_argument(
        "--batches-per-iter",
        type=int,
        default=None,
        help="steps per timed iteration (None: 20 for cnn/mlp, 2 otherwise)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (None: 5 for cnn/mlp, else 2)"
    )
    p.add_argument("--repeats", type=int, default=2, help="interleaved launches of each variant")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--worker", choices=("hvdsgd", "horovod", "ddp"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.models, args.repeats, args.iters, args.batches_per_iter, args.warmup = (
            "mlp",
            1,
            2,
            2,
            1,
        )

    kinds = ("hvdsgd", "horovod", "ddp")
    info = machine()
    print(
        f"throughput: -np {args.np}, batch {args.batch_size}/rank, {info['cores']} cores, "
        f"GPU: {info['gpu'] or 'none'}; "
        f"{args.repeats} interleaved launches x {args.iters or '6 (cnn/mlp) or 4'} iterations"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            rates = {k: [] for k in kinds}
            for rep in range(args.repeats):
                for kind in kinds if rep % 2 == 0 else reversed(kinds):
                    t0 = time.time()
                    r = launch(kind, model, args, Path(tmp) / f"{kind}.json")
                    rates[kind] += r
                    print(
                        f"  {model:>9} {kind:>7} run {rep + 1}: "
                        f"{statistics.mean(r) * args.np:8.1f} "
                        f"samples/s total ({time.time() - t0:.0f} s)",
                        flush=True,
                    )
            stats = {k: mean_spread(v) for k, v in rates.items()}
            rows.append(
                {
                    "model": model,
                    **{f"{k}_per_rank": stats[k][0] for k in kinds},
                    **{f"{k}_ci95": stats[k][1] for k in kinds},
                    **{f"{k}_total": stats[k][0] * args.np for k in kinds},
                    "hvdsgd_over_ddp": stats["hvdsgd"][0] / stats["ddp"][0],
                    "hvdsgd_over_horovod": stats["hvdsgd"][0] / stats["horovod"][0],
                }
            )

    header = (
        "| model | hvdsgd samples/s | bare Horovod | DDP | hvdsgd / DDP | hvdsgd / Horovod |\n"
        "|---|---|---|---|---|---|"
    )
    lines = [header] + [
        f"| {r['model']} | {r['hvdsgd_total']:.0f} ± {r['hvdsgd_ci95'] * args.np:.0f} "
        f"| {r['horovod_total']:.0f} ± {r['horovod_ci95'] * args.np:.0f} "
        f"| {r['ddp_total']:.0f} ± {r['ddp_ci95'] * args.np:.0f} "
        f"| {r['hvdsgd_over_ddp']:.2f} | {r['hvdsgd_over_horovod']:.2f} |"
        for r in rows
    ]
    table = "\n".join(lines)
    print("\n" + table)
    write_results(
        args.out,
        "throughput-quick" if args.quick else "throughput",
        {
            "command": command_line("throughput.py", argv),
            "machine": info,
            "np": args.np,
            "batch_size": args.batch_size,
            "rows": rows,
        },
        f"-np {args.np}, batch {args.batch_size}/rank; samples/s total, mean ± 1.96·std\n\n"
        + table,
    )


if __name__ == "__main__":
    main()
