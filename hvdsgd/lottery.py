"""Lottery tickets by iterative magnitude pruning with late resetting: ``python -m hvdsgd.lottery``.

    python -m hvdsgd.lottery --workers 2                          # cnn on digits, 2 processes
    python -m hvdsgd.lottery --compare-serial                     # + serial run, speed-up, Amdahl
    python -m hvdsgd.lottery --sparsities 0.9,0.99 --reset-steps 0,50 --rounds 4
    python -m hvdsgd.lottery --epochs 3                           # reset steps: 0, 20%, 80%
    horovodrun -np 2 -H localhost:2 --gloo python -m hvdsgd.lottery  # tickets spread over ranks

Frankle et al., "Stabilizing the Lottery Ticket Hypothesis" (2019) and "Linear Mode
Connectivity and the Lottery Ticket Hypothesis" (ICML 2020). The serial phase trains the dense
model once from ``--seed`` on the training split of ``--dataset``, keeping its weights
theta_k after each update k of ``--reset-steps`` (0: the initialisation; by default 0 and
20% and 80% of its updates) and its final weights.
Then every (sparsity s, reset step k) pair is a task (:mod:`hvdsgd.tasks`) that runs
``--rounds`` rounds of iterative magnitude pruning: prune the smallest-magnitude surviving
conv and linear weights over the whole network (biases and norms are never pruned) so that
after the last round a fraction s is gone, reset the survivors to theta_k, and retrain
``--epochs`` with the pruned weights held at exactly zero (the weights are rewound; each round
starts a fresh optimizer and learning-rate schedule). A task reports the test accuracy,
macro-F1 and loss of its last round on the test split, and the sparsity its masks reached.

The dense phase is the serial fraction f of Amdahl's law: ``--out`` receives ``tasks.jsonl``,
``summary.json`` (the times of both phases, f, Amdahl's S(N) = 1 / (f + (1 - f) / N) and, with
``--compare-serial``, the measured speed-up and efficiency), ``accuracy.png`` (accuracy
against sparsity, one line per reset step) and, with ``--compare-serial``, ``cpu.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from . import data, tasks
from .config import DataOptions, OptimOptions, option, parse_args
from .errors import UsageError, exit_on_usage_error
from .sweep import Sweep, TaskConfig, cpu_text, data_key, per_task, warm_model

log = logging.getLogger("hvdsgd")


@dataclass
class LotteryConfig(TaskConfig):
    """Lottery tickets; the data, model and training flags of ``hvdsgd.train`` apply to the
    dense run and each round."""

    TITLE = "lottery tickets"

    sparsities: str = option(
        "0.5,0.8,0.9,0.95",
        "final fractions of the conv/linear weights pruned, "
        "each in (0, 1); one task per sparsity and reset step",
    )
    reset_steps: str = option(
        "auto",
        "updates k of the dense run whose weights theta_k the "
        "survivors are reset to (0: the initialisation), like 0,20,100; auto: "
        "0 and 20%% and 80%% of the dense run's updates",
    )
    rounds: int = option(2, "pruning rounds per ticket; each prunes the same fraction of survivors")
    out: str = option(
        "runs/lottery", "run directory: tasks.jsonl, summary.json, accuracy.png, cpu.png"
    )
    epochs: int = option(5, "passes over the training set, of the dense run and of every round")
    lr: float = option(0.05, "learning rate")
    batch_size: int = option(64, "samples per step")
    warmup_epochs: float = option(0.0, "epochs of linear warm-up")

    def check(self) -> None:
        super().check()
        _sparsities(self.sparsities)
        if self.reset_steps != "auto":
            _reset_steps(self.reset_steps)
        if self.rounds < 1:
            raise UsageError(f"--rounds must be >= 1 (got {self.rounds})")

    @property
    def sparsity_list(self) -> list[float]:
        """``sparsities`` parsed: distinct fractions in (0, 1), ascending."""
        return _sparsities(self.sparsities)

    @property
    def reset_list(self) -> list[int]:
        """``reset_steps`` parsed: distinct update counts >= 0, ascending (``auto`` is
        replaced by the steps it means first: :func:`resolve_reset_steps`)."""
        return _reset_steps(self.reset_steps)


def _sparsities(text: str) -> list[float]:
    values = _numbers(text, float, "sparsities", "fractions in (0, 1)", "0.5,0.8,0.9")
    bad = [v for v in values if not 0 < v < 1]
    if bad:
        raise UsageError(
            f"--sparsities must lie strictly between 0 and 1 (got {bad[0]:g}); "
            "e.g. 0.9 prunes 90% of the weights"
        )
    return sorted(values)


def _reset_steps(text: str) -> list[int]:
    values = _numbers(text, int, "reset-steps", "update counts >= 0", "0,20,100 (or auto)")
    if min(values) < 0:
        raise UsageError(
            f"--reset-steps must be >= 0 (got {min(values)}); 0 resets to the initialisation"
        )
    return sorted(values)


def _numbers(text: str, kind: type, flag: str, what: str, example: str) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(
            f"--{flag} must be comma-separated {what}, like {example} (got {text!r})"
        ) from None
    if len(set(values)) < len(values):
        raise UsageError(f"--{flag} lists a value twice (got {text!r})")
    return values


AUTO_RESETS = (0.0, 0.2, 0.8)  # --reset-steps auto: these fractions of the dense run's updates


def resolve_reset_steps(cfg: LotteryConfig, updates: int) -> LotteryConfig:
    """``cfg`` with ``--reset-steps auto`` replaced by 0 and :data:`AUTO_RESETS` of the dense
    run's ``updates`` (rounded, each step once); an explicit list as it is."""
    if cfg.reset_steps != "auto":
        return cfg
    steps = sorted({round(f * updates) for f in AUTO_RESETS})
    return dataclasses.replace(cfg, reset_steps=",".join(map(str, steps)))


def total_updates(cfg: OptimOptions, n_train: int) -> int:
    """Optimizer updates of one ``fit`` over ``n_train`` samples (what ``--reset-steps`` counts)."""
    from .engine import steps_per_epoch

    return cfg.epochs * steps_per_epoch(n_train, 1, cfg.batch_size, cfg.accum_steps, cfg.dry_run)


# --------------------------------------------------------------------------- pruning


def prunable(model) -> dict:
    """The weights magnitude pruning acts on: every conv and linear layer's, by parameter name
    (biases, norm layers and embeddings are never pruned)."""
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {
        f"{name}.weight" if name else "weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, kinds)
    }


def round_sparsities(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each round when every round prunes the same fraction of the survivors:
    1 - (1 - s)^(r / rounds), ending at exactly ``sparsity``."""
    return [1 - (1 - sparsity) ** (r / rounds) for r in range(1, rounds)] + [sparsity]


def prune(weights: dict, sparsity: float, masks: dict | None = None) -> dict:
    """Global magnitude pruning: boolean masks (True = kept) over ``weights`` pruning
    round(sparsity * N) of all N weights together, the smallest |w| first. A weight that
    ``masks`` already prunes stays pruned, so successive masks are nested."""
    import torch

    names = list(weights)
    score = torch.cat([weights[n].detach().abs().flatten().float() for n in names])
    alive = len(score)
    if masks is not None:
        kept = torch.cat([masks[n].flatten() for n in names])
        score = torch.where(kept, score, -1.0)  # below every |w|: pruned first, never revived
        alive = int(kept.sum())
    keep = min(alive, len(score) - round(sparsity * len(score)))
    flat = torch.zeros(len(score), dtype=torch.bool)
    flat[torch.topk(score, keep, sorted=False).indices] = True
    return {
        n: part.view_as(weights[n])
        for n, part in zip(names, flat.split([weights[n].numel() for n in names]), strict=True)
    }


def sparsity_of(masks: dict) -> float:
    """The fraction of the masked weights that are pruned."""
    total = sum(m.numel() for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / total


def apply_masks(model, masks: dict) -> None:
    """Set the pruned weights of ``model`` to zero, in place."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].masked_fill_(~m, 0.0)


def train_masked(
    cfg: OptimOptions, model, masks: dict, train: tuple, test: tuple, num_classes: int, seed: int
) -> dict:
    """``fit`` with the pruned weights held at exactly zero: their gradients are masked before
    clipping, momentum and weight decay see them (so they are not parameters of the ticket),
    and the weights are masked again after every update as a guarantee."""
    from .strategies.local import fit

    params = dict(model.named_parameters())
    hooks = [
        params[n].register_hook(lambda g, m=m: g.masked_fill(~m, 0.0)) for n, m in masks.items()
    ]
    apply_masks(model, masks)
    try:
        return fit(
            cfg,
            model,
            train,
            test,
            num_classes,
            seed,
            after_update=lambda u: apply_masks(u.model, masks),
        )
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------ data

_DATA: dict[tuple, object] = {}  # this process's data set (train and test split), by data_key


def dataset(cfg: DataOptions):
    """This process's data set (loaded once; a task worker takes its parent's)."""
    key = data_key(cfg)
    if key not in _DATA:
        _DATA[key] = data.load_for(cfg)
    return _DATA[key]


def warm_worker(cfg: dict, ds) -> None:
    """A task worker's start: take the parent's data set (no reload), build the model and an
    optimizer once, so that first-call costs are not charged to the first ticket."""
    c = LotteryConfig(**cfg)
    _DATA[data_key(c)] = ds
    warm_model(c, ds.input_shape, ds.num_classes)


# ----------------------------------------------------------------------- the phases


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def train_dense(cfg: LotteryConfig) -> dict:
    """The serial phase: the dense model trained once from ``--seed``; its test figures, the
    weights theta_k at every reset step k, the final weights and the seconds it took."""
    import torch

    from . import models
    from .strategies.local import fit

    t0 = time.perf_counter()
    torch.set_num_threads(cfg.task_threads)
    ds = dataset(cfg)
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.input_shape, ds.num_classes)
    wanted = set(cfg.reset_list)
    rewind = {0: _copy(model.state_dict())} if 0 in wanted else {}

    def snapshot(u) -> None:
        if u.step in wanted:
            rewind[u.step] = _copy(model.state_dict())

    result = fit(
        cfg,
        model,
        (ds.train_x, ds.train_y),
        (ds.test_x, ds.test_y),
        ds.num_classes,
        cfg.seed,
        after_update=snapshot,
    )
    assert rewind.keys() == wanted, f"no snapshot at {sorted(wanted - rewind.keys())}"
    return {
        "result": result,
        "rewind": rewind,
        "final": _copy(model.state_dict()),
        "seconds": time.perf_counter() - t0,
    }


def find_ticket(
    cfg: dict, sparsity: float, reset_step: int, rewind: dict, final: dict, seed: int
) -> dict:
    """One task: ``rounds`` rounds of prune, reset the survivors to theta_k (``rewind``),
    retrain with the mask; the first round prunes the dense run's ``final`` weights."""
    import torch

    from . import models

    c = LotteryConfig(**cfg)
    ds = dataset(c)
    model = models.build(c.model, ds.input_shape, ds.num_classes)
    model.load_state_dict(final)
    masks, history, updates, train_time = None, [], 0, 0.0
    for r, target in enumerate(round_sparsities(sparsity, c.rounds)):
        masks = prune(prunable(model), target, masks)
        model.load_state_dict(rewind)
        res = train_masked(
            c,
            model,
            masks,
            (ds.train_x, ds.train_y),
            (ds.test_x, ds.test_y),
            ds.num_classes,
            seed + r,
        )
        updates, train_time = updates + res["updates"], train_time + res["train_time_s"]
        history.append({"sparsity": sparsity_of(masks), "test_accuracy": res["test_accuracy"]})
    weights = prunable(model)
    revived = sum(int(torch.count_nonzero(weights[n][~m])) for n, m in masks.items())
    return {
        "sparsity": sparsity,
        "reset_step": reset_step,
        "achieved_sparsity": sparsity_of(masks),
        "remaining_weights": sum(int(m.sum()) for m in masks.values()),
        "pruned_nonzero": revived,
        **res,
        "updates": updates,
        "train_time_s": train_time,
        "per_round": history,
    }


def make_tasks(cfg: LotteryConfig, dense: dict) -> list[tasks.Task]:
    cfg_dict = cfg.to_dict()
    pairs = [(s, k) for s in cfg.sparsity_list for k in cfg.reset_list]
    return [
        tasks.Task(
            f"s={s:g} k={k}",
            find_ticket,
            {
                "cfg": cfg_dict,
                "sparsity": s,
                "reset_step": k,
                "rewind": dense["rewind"][k],
                "final": dense["final"],
                "seed": cfg.seed + 1 + i,
            },
            seed=cfg.seed + 1 + i,
            inputs={
                "sparsity": s,
                "reset_step": k,
                "rounds": cfg.rounds,
                "model": cfg.model,
                "dataset": cfg.dataset,
                "seed": cfg.seed + 1 + i,
            },
        )
        for i, (s, k) in enumerate(pairs)
    ]


# ---------------------------------------------------------------------------- report


def amdahl(f: float, n: int) -> float:
    """Amdahl's law: the speed-up on ``n`` workers of a job whose serial fraction is ``f``."""
    return 1 / (f + (1 - f) / n)


def amdahl_figures(serial_s: float, parallel_work_s: float, workers: int, n_tasks: int) -> dict:
    """Amdahl's law for a serial phase of ``serial_s`` then ``parallel_work_s`` of tasks (their
    time one after another): f, S(N), its efficiency, S(N) when the busiest of N workers runs
    ceil(tasks / N) equal tasks, and the limit 1 / f."""
    f = serial_s / (serial_s + parallel_work_s)
    return {
        "serial_fraction": f,
        "amdahl_speedup": amdahl(f, workers),
        "amdahl_efficiency": amdahl(f, workers) / workers,
        "amdahl_speedup_whole_tasks": 1 / (f + (1 - f) * math.ceil(n_tasks / workers) / n_tasks),
        "amdahl_limit": 1 / f,
    }


def table(sparsities: list[float], reset_steps: list[int], per_task: list[dict]) -> str:
    """Test accuracy by sparsity (rows) and reset step k (columns), from ``summary.json``'s
    ``per_task`` records (``bench/lottery.py`` renders a saved run with it too)."""
    by = {(t["sparsity"], t["reset_step"]): t for t in per_task}
    head = "| sparsity | reached | " + " | ".join(f"k={k}" for k in reset_steps) + " |"
    lines = [head, "|---|---|" + "---|" * len(reset_steps)]
    for s in sparsities:
        row = [by[(s, k)] for k in reset_steps]
        reached = next(
            (f"{100 * t['achieved_sparsity']:.2f}%" for t in row if t["error"] is None), "n/a"
        )
        lines.append(
            f"| {100 * s:g}% | {reached} | "
            + " | ".join(_acc(t) if t["error"] is None else "FAILED" for t in row)
            + " |"
        )
    return "\n".join(lines)


def _acc(result: dict) -> str:
    return f"{100 * result['test_accuracy']:.2f}%"


def plot_accuracy(cfg: LotteryConfig, results: list[tasks.Result], dense: dict, path: Path) -> None:
    """Test accuracy against sparsity, one line per reset step; the dense model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k in cfg.reset_list:
        pts = sorted(
            (r.result["achieved_sparsity"], r.result["test_accuracy"])
            for r in results
            if r.ok and r.inputs["reset_step"] == k
        )
        if pts:
            ax.plot(
                [100 * s for s, _ in pts],
                [100 * a for _, a in pts],
                "o-",
                label="reset to initialisation (k=0)" if k == 0 else f"reset to update {k}",
            )
    ax.axhline(100 * dense["result"]["test_accuracy"], color="black", ls="--", lw=1, label="dense")
    ax.set_xlabel("sparsity: conv/linear weights pruned (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        f"{cfg.model} on {cfg.dataset}: IMP, {cfg.rounds} round(s) of "
        f"{cfg.epochs} epoch(s) per ticket",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def check_run(cfg: LotteryConfig, ds) -> tuple[int, int]:
    """What needs the data and the model: every reset step falls within the dense run, and
    the highest sparsity leaves a weight. Returns (dense updates, prunable weights)."""
    from . import models

    updates = total_updates(cfg, len(ds.train_y))
    if cfg.reset_list[-1] > updates:
        raise UsageError(
            f"--reset-steps {cfg.reset_list[-1]} is past the end of the dense run "
            f"({updates} updates in {cfg.epochs} epochs); use steps up to "
            f"{updates} or more --epochs"
        )
    n_weights = sum(
        w.numel()
        for w in prunable(models.build(cfg.model, ds.input_shape, ds.num_classes)).values()
    )
    if round(cfg.sparsity_list[-1] * n_weights) >= n_weights:
        raise UsageError(
            f"--sparsities {cfg.sparsity_list[-1]:g} prunes all {n_weights} "
            f"prunable weights of {cfg.model}; use a lower sparsity"
        )
    return updates, n_weights


def lottery(cfg: LotteryConfig) -> dict:
    from . import dist

    sweep = Sweep(cfg, "hvdsgd.lottery")
    ds = dataset(cfg)
    cfg = resolve_reset_steps(cfg, total_updates(cfg, len(ds.train_y)))
    updates, n_weights = check_run(cfg, ds)
    n_tasks = len(cfg.sparsity_list) * len(cfg.reset_list)
    sweep.start(
        n_tasks,
        f"{cfg.model} on {cfg.dataset} ({len(ds.train_y)} train / {len(ds.test_y)} test), "
        f"{n_weights:,} prunable weights; {n_tasks} tickets = {len(cfg.sparsity_list)} "
        f"sparsities x {len(cfg.reset_list)} reset steps, {cfg.rounds} round(s) of "
        f"{cfg.epochs} epoch(s) each",
        "task",
        warm=(warm_worker, (cfg.to_dict(), ds)),
    )
    horovod = cfg.mode == "horovod"
    if horovod:
        dist.init_library()  # Horovod: rank and world from horovodrun (tasks.run needs it too)
    log.info(f"serial phase: dense training, {updates} updates")
    # Horovod: rank 0 trains the dense model (the other ranks wait: Amdahl's serial part) and
    # broadcasts the results and snapshots, so every rank's tickets start from the same weights.
    dense = (
        dist.on_main(lambda: train_dense(cfg), name="lottery.dense")
        if horovod
        else train_dense(cfg)
    )
    log.info(f"dense: test accuracy {_acc(dense['result'])} in {dense['seconds']:.1f} s")
    runs = sweep.run(make_tasks(cfg, dense))
    results, workers = runs.reported, sweep.workers

    # The tickets' serial time: measured with --compare-serial, else the sum of their own times.
    serial_tickets = runs.walls["serial"] if runs.compared else sum(r.seconds for r in results)
    summary = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "mode": sweep.mode,
        "train_samples": len(ds.train_y),
        "test_samples": len(ds.test_y),
        "prunable_weights": n_weights,
        "sparsities": cfg.sparsity_list,
        "reset_steps": cfg.reset_list,
        "rounds": cfg.rounds,
        "tasks": n_tasks,
        "workers": workers,
        "task_threads": cfg.task_threads,
        "dense": {**dense["result"], "seconds": dense["seconds"]},
        "serial_phase_s": dense["seconds"],
        "parallel_phase_s": runs.wall,
        "wall_time_s": dense["seconds"] + runs.wall,
        **amdahl_figures(dense["seconds"], serial_tickets, workers, n_tasks),
        "serial_fraction_from": "serial run" if runs.compared else "task times",
        "failed": [r.name for r in results if not r.ok],
        "per_task": per_task(results, "task", inputs=True),
        "cpu_util_mean": runs.cpu(),
        "config": cfg.to_dict(),
    }
    if runs.compared:
        summary["serial"] = {
            "tickets_s": runs.walls["serial"],
            "wall_time_s": dense["seconds"] + runs.walls["serial"],
            "cpu_util_mean": runs.cpu("serial"),
        }
        summary.update(runs.speedup(workers, serial_phase_s=dense["seconds"]))
        summary["identical_per_task"] = runs.identical()

    def report() -> None:
        plot_accuracy(cfg, results, dense, sweep.out / "accuracy.png")
        log.info(
            f"\ntest accuracy by sparsity and reset step k (dense: "
            f"{_acc(dense['result'])}):\n"
            + table(cfg.sparsity_list, cfg.reset_list, summary["per_task"])
        )
        log.info(_timing(summary) + f"; results in {sweep.out}/")

    return sweep.finish(runs, summary, report)


def _timing(s: dict) -> str:
    n = s["workers"]
    line = (
        f"serial phase (dense) {s['serial_phase_s']:.1f} s, tickets "
        f"{s['parallel_phase_s']:.1f} s ({s['mode']}, {n} worker{'s' * (n > 1)})"
    )
    if "serial" in s:
        line += (
            f"; serially {s['serial']['wall_time_s']:.1f} s in all: speed-up "
            f"{s['speedup']:.2f}x, efficiency {100 * s['efficiency']:.0f}%; "
            f"per-task results identical: {s['identical_per_task']}; CPU "
            f"{cpu_text(s['serial']['cpu_util_mean'])}% serial, "
            f"{cpu_text(s['cpu_util_mean'])}% parallel"
        )
    return (
        line + f"\nAmdahl, serial fraction f = {s['serial_fraction']:.3f} (from "
        f"{s['serial_fraction_from']}): S({n}) = {s['amdahl_speedup']:.2f}x, efficiency "
        f"{100 * s['amdahl_efficiency']:.0f}% ({s['amdahl_speedup_whole_tasks']:.2f}x with "
        f"{s['tasks']} whole tasks); limit 1/f = {s['amdahl_limit']:.1f}x"
    )


@exit_on_usage_error
def main(argv=None) -> None:
    head, examples, *_ = __doc__.split("\n\n")
    cfg = parse_args(
        argv,
        cls=LotteryConfig,
        prog="python -m hvdsgd.lottery",
        description=head,
        epilog="examples:\n" + examples,
    )
    lottery(cfg)


if __name__ == "__main__":
    main()
