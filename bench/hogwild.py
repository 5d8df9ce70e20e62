"""HOGWILD on CPU: the C++ update kernel, end-to-end training, and the update policies.

    python bench/hogwild.py                    # all three parts, figures to bench/results/
    python bench/hogwild.py --parts kernel --sizes 1000000 --repeats 5
    python bench/hogwild.py --quick            # a reduced form, for the test suite

1. ``kernel``: bytes/s of one update of a flat float32 buffer (STREAM counting: 12 B per
   parameter for plain SGD, 20 B with momentum), hvdsgd's kernel against NumPy's
   ``p -= lr * g``, NumPy's single in-place pass ``p -= g`` (the memory-bound floor of one
   pass), and ``torch.optim.SGD`` with momentum (``foreach=True``, ``fused=True``); one
   thread each, same buffer, interleaved repeats.
2. ``e2e``: ``mlp`` on digits, HOGWILD with 1, 2 and 4 workers against the PyTorch reference
   pattern (pytorch/examples ``mnist_hogwild``: ``model.share_memory()`` and a
   ``torch.optim.SGD`` in every process) on the same model, data, batches and evaluation
   loop: samples/s and time to 97% test accuracy. Samples/s is measured two ways, for both
   sides alike: *wall* (all samples over the time from the start signal to the last
   worker's last step) and *aggregate* (the sum of each worker's own rate over its own first
   to last step: the steady state with every worker running, without the tail in which the
   last worker finishes alone after a moment of interference on a shared machine).
3. ``policies``: the kernel's synchronised forms (``atomic``, ``locked``) against ``hogwild``
   at 2 workers (``--policies``; the others, ``sharded``, ``sync``, ``async-apply`` and
   ``async-deferred``, are in bench/strategies.py's table beside Horovod's allreduce):
   samples/s, final accuracy, time to 97%, mean staleness.

Writes ``bench/results/hogwild.json`` and ``hogwild.md``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import command_line, machine, mean_spread, parser, write_results

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POLICIES = ("hogwild", "atomic", "locked", "sharded", "sync", "async-apply", "async-deferred")


def fmt(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m, ci = mean_spread([x * scale for x in xs])
    return f"{m:.{digits}f} ± {ci:.{digits}f}"


# ---------------------------------------------------------------------------- kernel


def _kernel_variants(_C, p: np.ndarray, g: np.ndarray, buf: np.ndarray, opts: dict) -> dict:
    """name: (function, bytes per parameter), each updating ``p`` in place."""
    return {
        "hvdsgd sgd": (lambda: _C.sgd_step(p, g, 1e-6), 12),
        "numpy p -= lr*g": (lambda: np.subtract(p, 1e-6 * g, out=p), 12),
        "numpy p -= g (one pass)": (lambda: np.subtract(p, g, out=p), 12),
        "hvdsgd sgd+momentum": (lambda: _C.sgd_step(p, g, 1e-6, buf, momentum=0.9), 20),
        **{name: (opt.step, 20) for name, opt in opts.items()},
    }


def bench_kernel(sizes: list[int], repeats: int, inner: int) -> list[dict]:
    """``inner`` / n calls per timing (at least 3): about the same bytes for every size."""
    from hvdsgd import _C

    torch.set_num_threads(1)
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        p = rng.standard_normal(n, dtype=np.float32)
        g = rng.standard_normal(n, dtype=np.float32) * 1e-3
        buf = np.zeros(n, np.float32)
        pt, gt = torch.from_numpy(p), torch.from_numpy(g)
        pt_param = torch.nn.Parameter(pt)  # shares p's memory
        pt_param.grad = gt
        opts = {
            "torch foreach": torch.optim.SGD([pt_param], lr=1e-6, momentum=0.9, foreach=True),
            "torch fused": torch.optim.SGD([pt_param], lr=1e-6, momentum=0.9, fused=True),
        }
        variants = _kernel_variants(_C, p, g, buf, opts)
        for fn, _ in variants.values():  # warm up: page in, build the optimizers' state
            fn()
        results = {k: [] for k in variants}
        for rep in range(repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            calls = max(3, inner // n)
            for name in order:
                fn, nbytes = variants[name]
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                dt = (time.perf_counter() - t0) / calls
                results[name].append(nbytes * n / dt / 1e9)
        row = {"n": n, "gbps": results}
        m = {k: statistics.mean(v) for k, v in results.items()}
        row["sgd_over_numpy_lr"] = m["hvdsgd sgd"] / m["numpy p -= lr*g"]
        row["sgd_over_numpy_one_pass"] = m["hvdsgd sgd"] / m["numpy p -= g (one pass)"]
        row["momentum_over_torch_foreach"] = m["hvdsgd sgd+momentum"] / m["torch foreach"]
        row["momentum_over_torch_fused"] = m["hvdsgd sgd+momentum"] / m["torch fused"]
        rows.append(row)
        print(
            f"  kernel n={n:,}: " + ", ".join(f"{k} {fmt(v)} GB/s" for k, v in results.items()),
            flush=True,
        )
    return rows


# ----------------------------------------------------- reference HOGWILD (mnist_hogwild)


def _reference_worker(w, workers, model, x, y, cfg, ready, start, counts, begins, ends):
    """pytorch/examples mnist_hogwild's ``train``: a torch.optim.SGD over shared parameters."""
    import torch.nn.functional as F

    from hvdsgd import data

    torch.set_num_threads(1)
    sampler = data.ShardSampler(len(y), w, workers, cfg["seed"])
    batches = data.Batches(x, y, cfg["batch_size"], sampler, torch.device("cpu"))
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
    )
    with ready.get_lock():
        ready.value += 1
    start.wait()
    begins[w] = time.monotonic()
    for epoch in range(cfg["epochs"]):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in batches:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            counts[w] += len(yb)
    ends[w] = time.monotonic()


def run_reference(workers: int, cfg: dict, eval_interval: float) -> dict:
    """The reference pattern with the parent's evaluation loop of hvdsgd's strategies."""
    import torch.multiprocessing as tmp

    from hvdsgd import data, models
    from hvdsgd.engine import evaluate
    from hvdsgd.metrics import Tally

    torch.set_num_threads(1)
    ds = data.load_digits()
    torch.manual_seed(cfg["seed"])
    model = models.build("mlp", ds.input_shape, ds.num_classes)
    model.share_memory()
    ctx = tmp.get_context("spawn")
    ready, start = ctx.Value("i", 0), ctx.Event()
    counts = ctx.Array("q", workers, lock=False)
    begins, ends = ctx.Array("d", workers, lock=False), ctx.Array("d", workers, lock=False)
    procs = [
        ctx.Process(
            target=_reference_worker,
            args=(
                w,
                workers,
                model,
                ds.train_x,
                ds.train_y,
                cfg,
                ready,
                start,
                counts,
                begins,
                ends,
            ),
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    test = data.Batches(ds.test_x, ds.test_y, 512, range(len(ds.test_y)), torch.device("cpu"))
    while ready.value < workers:  # the same start line as hvdsgd: every worker set up
        if not all(p.is_alive() for p in procs):
            sys.exit("bench/hogwild.py: a reference worker failed to start")
        time.sleep(0.05)
    start.set()
    # hvdsgd's evaluator: snapshots of the shared weights on the clock, evaluated afterwards.
    t0, snaps = time.monotonic(), []
    while any(p.is_alive() for p in procs):
        time.sleep(eval_interval)
        snaps.append((time.monotonic() - t0, [p.detach().clone() for p in model.parameters()]))
    for p in procs:
        p.join()
    elapsed = max(ends[:]) - t0
    live = [p.detach().clone() for p in model.parameters()]
    reached = None
    for t, params in snaps + [(elapsed, live)]:
        with torch.no_grad():
            for p, v in zip(model.parameters(), params, strict=True):
                p.copy_(v)
        acc = (
            evaluate(model, test, torch.device("cpu"), "off", Tally(10, torch.device("cpu")))
            .local()
            .accuracy
        )
        if reached is None and acc >= 0.97:
            reached = min(t, elapsed)
    aggregate = sum(c / (e - b) for c, b, e in zip(counts[:], begins[:], ends[:], strict=True))
    return {
        "samples_per_sec": sum(counts[:]) / elapsed,
        "aggregate_samples_per_sec": aggregate,
        "test_accuracy": acc,
        "time_to_97_s": reached,
    }


def run_hvdsgd(strategy: str, workers: int, cfg: dict, eval_interval: float, tmp: Path) -> dict:
    out = tmp / f"{strategy}-{workers}"
    cmd = [
        sys.executable,
        "-m",
        "hvdsgd.train",
        "--model",
        "mlp",
        "--strategy",
        strategy,
        "--workers",
        str(workers),
        "--epochs",
        str(cfg["epochs"]),
        "--batch-size",
        str(cfg["batch_size"]),
        "--lr",
        str(cfg["lr"]),
        "--momentum",
        str(cfg["momentum"]),
        "--weight-decay",
        str(cfg["weight_decay"]),
        "--scheduler",
        "constant",
        "--warmup-epochs",
        "0",
        "--seed",
        str(cfg["seed"]),
        "--eval-interval",
        str(eval_interval),
        "--no-progress",
        "--no-plots",
        "--no-checkpoint",
        "--overwrite",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"bench/hogwild.py: {' '.join(cmd[2:])} failed:\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {
        "samples_per_sec": s["samples_per_sec"],
        "aggregate_samples_per_sec": s["aggregate_samples_per_sec"],
        "test_accuracy": s["test_accuracy"],
        "time_to_97_s": s["time_to_accuracy_s"]["0.97"],
        "staleness_mean": s["staleness_mean"],
        "staleness_p95": s["staleness_p95"],
    }


def _agg(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if r[key] is not None]
        out[key] = statistics.mean(vals) if vals else None
        out[key + "_ci95"] = mean_spread(vals)[1] if vals else None
        out[key + "_runs"] = [r[key] for r in runs]
    return out


def _cell(row: dict, key: str, scale: float = 1.0, digits: int = 0) -> str:
    if row[key] is None:
        return "not reached"
    return f"{row[key] * scale:.{digits}f} ± {row[key + '_ci95'] * scale:.{digits}f}"


def bench_e2e(workers_list, repeats, cfg, eval_interval, tmp) -> list[dict]:
    rows = []
    for workers in workers_list:
        runs = {"hvdsgd": [], "reference": []}
        for rep in range(repeats):
            for kind in ("hvdsgd", "reference") if rep % 2 == 0 else ("reference", "hvdsgd"):
                r = (
                    run_hvdsgd("hogwild", workers, cfg, eval_interval, tmp)
                    if kind == "hvdsgd"
                    else run_reference(workers, cfg, eval_interval)
                )
                runs[kind].append(r)
                print(
                    f"  e2e {workers} worker(s) {kind:>9}: {r['samples_per_sec']:8.0f} samples/s "
                    f"(aggregate {r['aggregate_samples_per_sec']:8.0f}), "
                    f"acc {100 * r['test_accuracy']:.2f}%, 97% at {r['time_to_97_s']}",
                    flush=True,
                )
        rows.append(
            {
                "workers": workers,
                "hvdsgd": _agg(runs["hvdsgd"]),
                "reference": _agg(runs["reference"]),
            }
        )
    one = next((r for r in rows if r["workers"] == 1), None)
    for r in rows:
        for key, tag in (("samples_per_sec", ""), ("aggregate_samples_per_sec", "_aggregate")):
            r["hvdsgd_over_reference" + tag] = r["hvdsgd"][key] / r["reference"][key]
            if one:
                r["speedup_over_1_worker" + tag] = r["hvdsgd"][key] / one["hvdsgd"][key]
    return rows


def bench_policies(policies, workers, repeats, cfg, eval_interval, tmp) -> list[dict]:
    rows = []
    runs = {p: [] for p in policies}
    for rep in range(repeats):
        for policy in policies if rep % 2 == 0 else reversed(policies):
            r = run_hvdsgd(policy, workers, cfg, eval_interval, tmp)
            runs[policy].append(r)
            print(
                f"  policy {policy:>14}: {r['samples_per_sec']:8.0f} samples/s, acc "
                f"{100 * r['test_accuracy']:.2f}%, 97% at {r['time_to_97_s']}, staleness "
                f"{r['staleness_mean']:.2f}",
                flush=True,
            )
    for policy in policies:
        rows.append({"policy": policy, **_agg(runs[policy])})
    return rows


# ------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    p = parser(__doc__, "small sizes, 1 repeat, 2 workers, the atomic and locked policies")
    p.add_argument("--parts", default="kernel,e2e,policies", help="comma-separated parts to run")
    p.add_argument("--sizes", default="1000000,25000000", help="kernel buffer sizes (parameters)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each variant")
    p.add_argument("--workers", default="1,2,4", help="end-to-end worker counts")
    p.add_argument("--epochs", type=int, default=200, help="end-to-end epochs")
    p.add_argument("--eval-interval", type=float, default=0.01, help="seconds between evaluations")
    p.add_argument(
        "--policies",
        default="hogwild,atomic,locked",
        help=f"policies part: comma-separated, of {','.join(POLICIES)}",
    )
    args = p.parse_args(argv)
    policies = tuple(args.policies.split(","))
    if set(policies) - set(POLICIES):
        p.error(f"--policies {args.policies}: choose from {','.join(POLICIES)}")
    if args.quick:
        args.sizes, args.repeats, args.workers, args.epochs = "100000", 1, "2", 3
        # The other policies run in bench/strategies.py --quick: here only the kernel's two
        # synchronised forms, against each other.
        policies = ("atomic", "locked")
    parts = args.parts.split(",")
    cfg = {
        "epochs": args.epochs,
        "batch_size": 64,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "seed": 42,
    }
    info = machine(gpu=False)
    print(
        f"hogwild: {info['cores']} cores, CPU only; {args.repeats} interleaved repeats", flush=True
    )
    results: dict = {"machine": info, "config": cfg}
    with tempfile.TemporaryDirectory() as tmp:
        if "kernel" in parts:
            results["kernel"] = bench_kernel(
                [int(s) for s in args.sizes.split(",")], args.repeats, inner=200_000_000
            )
        if "e2e" in parts:
            results["e2e"] = bench_e2e(
                [int(w) for w in args.workers.split(",")],
                args.repeats,
                cfg,
                args.eval_interval,
                Path(tmp),
            )
        if "policies" in parts:
            results["policies"] = bench_policies(
                policies, 2, args.repeats, cfg, args.eval_interval, Path(tmp)
            )
    md = render(results, args)
    print("\n" + md)
    results["command"] = command_line("hogwild.py", argv)
    write_results(args.out, "hogwild-quick" if args.quick else "hogwild", results, md)


def render(results: dict, args) -> str:
    parts = []
    if "kernel" in results:
        lines = ["| parameters | variant | GB/s (STREAM counting) |", "|---|---|---|"]
        for r in results["kernel"]:
            for name, v in r["gbps"].items():
                lines.append(f"| {r['n']:,} | {name} | {fmt(v, digits=2)} |")
        lines.append("")
        lines.append(
            "| parameters | hvdsgd / numpy p -= lr*g | hvdsgd / numpy one pass "
            "| hvdsgd+momentum / torch foreach | hvdsgd+momentum / torch fused |"
        )
        lines.append("|---|---|---|---|---|")
        for r in results["kernel"]:
            lines.append(
                f"| {r['n']:,} | {r['sgd_over_numpy_lr']:.2f} | {r['sgd_over_numpy_one_pass']:.2f} "
                f"| {r['momentum_over_torch_foreach']:.2f} | {r['momentum_over_torch_fused']:.2f} |"
            )
        parts.append("\n".join(lines))
    if "e2e" in results:
        nan = float("nan")
        lines = [
            "| workers | measure | hvdsgd samples/s | reference samples/s | hvdsgd / reference "
            "| hvdsgd speed-up over 1 worker |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["e2e"]:
            h, ref = r["hvdsgd"], r["reference"]
            for key, tag, name in (
                ("samples_per_sec", "", "wall"),
                ("aggregate_samples_per_sec", "_aggregate", "aggregate"),
            ):
                lines.append(
                    f"| {r['workers']} | {name} | {_cell(h, key)} | {_cell(ref, key)} "
                    f"| {r['hvdsgd_over_reference' + tag]:.2f} "
                    f"| {r.get('speedup_over_1_worker' + tag, nan):.2f} |"
                )
        lines += [
            "",
            "| workers | hvdsgd time to 97% (s) | reference time to 97% (s) "
            "| hvdsgd accuracy | reference accuracy |",
            "|---|---|---|---|---|",
        ]
        for r in results["e2e"]:
            h, ref = r["hvdsgd"], r["reference"]
            lines.append(
                f"| {r['workers']} | {_cell(h, 'time_to_97_s', digits=2)} "
                f"| {_cell(ref, 'time_to_97_s', digits=2)} "
                f"| {_cell(h, 'test_accuracy', 100, 2)} | {_cell(ref, 'test_accuracy', 100, 2)} |"
            )
        parts.append("\n".join(lines))
    if "policies" in results:
        lines = [
            "| --strategy (2 workers) | samples/s | final accuracy (%) | time to 97% (s) "
            "| mean staleness |",
            "|---|---|---|---|---|",
        ]
        for r in results["policies"]:
            lines.append(
                f"| {r['policy']} | {_cell(r, 'samples_per_sec')} "
                f"| {_cell(r, 'test_accuracy', 100, 2)} "
                f"| {_cell(r, 'time_to_97_s', digits=2)} | {_cell(r, 'staleness_mean', digits=2)} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
