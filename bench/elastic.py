"""Elastic training: what the commits cost, and how long a lost rank stops the run.

    python bench/elastic.py           # 12 launches
    python bench/elastic.py --quick   # 3 launches, for the test suite

Every launch is 2 ranks, one per "host" (localhost and 127.0.0.1: two names of this machine,
which Horovod's elastic driver counts as two hosts), ``--gloo``, one compute thread each, the
same flags and seed::

    horovodrun -np 2 -H localhost:1,127.0.0.1:1 --gloo python bench/elastic.py --rank FLAGS
    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script discover.sh --gloo \\
        python bench/elastic.py --rank FLAGS --commit-every N

``--rank FLAGS`` is ``python -m hvdsgd.train FLAGS`` with a stopwatch around the parts of an
elastic commit (the metrics allreduce, which also carries rank 0's view of host changes; the
deep copies of ``TrainState.save``; ``TrainState.check_host_updates`` reading that view) and
around a reset (the rollback, the re-formed
ring, the first step after it): a ``time.perf_counter`` pair each, nothing on a fixed run.
The metrics' flush before a commit's allreduce (loss and counts of the batches so far) is
timed apart and not counted as the commit's: a fixed run does that work at the epoch's end.

Workload: ``mlp`` on synthetic 1x28x28 data, 12,800 samples, batch 32 per rank: 200 steps per
rank per epoch, so the default ``--commit-every`` (100) commits once mid-epoch (its second
commit falls on the epoch's end, which commits anyway)
(digits at 2 ranks x 32 is 23 steps an epoch: not one mid-epoch commit). The mlp's step is
the cheapest of the zoo, so a commit's fixed cost weighs the most: a worst case.

1. **Commit cost.** Samples/s of the elastic run at the default ``--commit-every`` over the
   fixed-size run, from metrics.jsonl (training samples over training time, the first epoch
   left out as warm-up); fixed and elastic launched back to back (ABBA over the repeats), the
   ratio taken per pair, mean ± 1.96 x std over the pairs. Then ``--commit-every`` swept over
   5, 20, 50, 200 (once each, against the fixed runs' mean), with the milliseconds per commit
   and the commits' share of the training time measured inside the ranks: the default is
   justified by the measurement, not only by the noisy end-to-end ratio.
2. **A lost rank.** An elastic run at the default; halfway through epoch 2 the discovery
   script drops 127.0.0.1 and its rank is SIGKILLed (as the OOM killer does). Resumed = the
   reset's record (``Progress.began`` + ``time_s`` in summary.json, made once Horovod has
   re-formed the ring) minus the kill's wall clock; split into detection (the survivor's
   collective fails and it rolls back), the ring re-formed, and the first step done. The run's
   wall time against the fault-free elastic runs (the rest of it runs on 1 rank).
3. **Steps redone** (summary.json) against ``--commit-every``: kills at the default and at
   5 and 200.
4. **The discovery script's cost**: CPU per run as Horovod's driver runs it (once a second),
   hvdsgd's build against stock Horovod's way, back to back in this process.

The machine is shared and noisy: ± is 1.96 x the standard deviation over the repeats (where
single runs fall). Every launch is killed, with its ranks, on the way out, interrupted or not.
Writes ``bench/results/elastic[-quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ("localhost", "127.0.0.1")
RANK_REPORT = "HVDSGD_BENCH_ELASTIC_REPORT"  # where rank 0 of a --rank launch writes its timings


# ------------------------------------------------------------------- inside a rank (--rank)


def rank_main(argv: list[str]) -> None:
    """``python -m hvdsgd.train ARGV`` with commit and reset timings; rank 0 writes them to
    ``$HVDSGD_BENCH_ELASTIC_REPORT``."""
    sys.path.insert(0, str(ROOT))
    from hvdsgd import dist, engine, metrics, train

    t = {"flush": [], "reduce": [], "save": [], "hosts": [], "restore": [], "reset": [], "step": []}
    if os.environ.get("HOROVOD_ELASTIC") == "1":
        from hvdsgd import elastic

        def timed(cls, name: str, key: str, only=lambda *a, **k: True) -> None:
            fn = getattr(cls, name)

            def wrapper(*args, **kwargs):
                if not only(*args, **kwargs):
                    return fn(*args, **kwargs)
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    t[key].append(time.perf_counter() - start)

            setattr(cls, name, wrapper)

        # A mid-epoch commit: train_metrics.EPOCH.STEP allreduce, then save + host check. The
        # metrics' flush (counts of the batches so far) is timed apart, outside the allreduce's
        # time: a fixed run does the same work at the epoch's end.
        timed(metrics.Tally, "reduce", "reduce", lambda self, name, *_: name.count(".") == 2)
        reduce = metrics.Tally.reduce

        def flushed_reduce(self, name, *args):
            if name.count(".") == 2:
                start = time.perf_counter()
                self.flush()
                t["flush"].append(time.perf_counter() - start)
            return reduce(self, name, *args)

        metrics.Tally.reduce = flushed_reduce
        timed(elastic.TrainState, "save", "save")
        timed(elastic.TrainState, "check_host_updates", "hosts")
        restore, reset, step = (
            elastic.TrainState.restore,
            elastic.TrainState.reset,
            engine.train_step,
        )

        def on_restore(self):  # a collective failed: the rank is rolled back
            t["restore"].append(time.time())
            return restore(self)

        def on_reset(self):  # Horovod re-formed the ring
            t["reset"].append({"wall": time.time(), "began": self.progress.began})
            return reset(self)

        def on_step(*args, **kwargs):  # the first step after each reset
            out = step(*args, **kwargs)
            if len(t["step"]) < len(t["reset"]):
                t["step"].append(time.time())
            return out

        elastic.TrainState.restore, elastic.TrainState.reset = on_restore, on_reset
        engine.train_step = on_step
    train.main(argv)
    if dist.rank() == 0 and os.environ.get(RANK_REPORT):
        Path(os.environ[RANK_REPORT]).write_text(json.dumps(t))


if __name__ == "__main__" and sys.argv[1:2] == ["--rank"]:
    rank_main(sys.argv[2:])
    sys.exit(0)

# ------------------------------------------------------------------------- the bench itself

import psutil  # noqa: E402  (not needed inside a rank)

sys.path.insert(0, str(ROOT / "bench"))
from common import command_line, machine, mean_spread, parser, write_results  # noqa: E402  (not needed inside a rank)


class Launch:
    """One horovodrun of this script's ``--rank`` mode, logging to ``where/horovodrun.log``;
    ``stop()`` kills it and every process under it."""

    def __init__(self, where: Path, flags: list[str], elastic: bool):
        self.where, self.elastic = where, elastic
        where.mkdir(parents=True)
        exe = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
        if elastic:
            script = where / "discover.sh"
            script.write_text(f"#!/bin/sh\ncat {where / 'hosts'}\n")
            script.chmod(0o755)
            self.set_hosts(*HOSTS)
            how = ["--min-np", "1", "--max-np", "2", "--host-discovery-script", str(script)]
        else:
            how = ["-H", ",".join(f"{h}:1" for h in HOSTS)]
        self.log = where / "horovodrun.log"
        self.report = where / "rank0.json"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "-np",
                    "2",
                    *how,
                    "--gloo",
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--rank",
                    *flags,
                    "--out",
                    str(where / "run"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "PYTHONUNBUFFERED": "1",
                    RANK_REPORT: str(self.report),
                },
            )
        self.started = time.perf_counter()

    def set_hosts(self, *hosts: str) -> None:
        """What the discovery script prints from now on (written atomically)."""
        tmp = self.where / "hosts.tmp"
        tmp.write_text("".join(f"{h}:1\n" for h in hosts))
        tmp.replace(self.where / "hosts")

    def rank_on(self, host: str) -> psutil.Process | None:
        """This launch's rank on ``host`` (Horovod sets HOROVOD_HOSTNAME for each worker)."""
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
                if (
                    cmd[1:3] == [str(Path(__file__).resolve()), "--rank"]
                    and p.environ().get("HOROVOD_HOSTNAME") == host
                ):
                    return p
            except psutil.Error:
                pass
        return None

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.log.read_text(), re.M)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.fail(f"never printed {pattern!r}")
            time.sleep(0.02)
        return m

    def finish(self, timeout: float = 600) -> dict:
        """Wait for the launch; its summary, metrics rows, rank 0's timings and wall time."""
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running after {timeout:.0f} s")
        launch_s = time.perf_counter() - self.started
        if status != 0:
            self.fail(f"exit status {status}")
        run = self.where / "run"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timings = json.loads(self.report.read_text()) if self.report.exists() else {}
        return {
            "summary": json.loads((run / "summary.json").read_text()),
            "rows": rows,
            "timings": timings,
            "launch_s": launch_s,
        }

    def fail(self, why: str):
        self.stop()
        sys.exit(
            f"bench/elastic.py: the launch in {self.where} failed ({why}):\n"
            + self.log.read_text()[-3000:]
        )

    def stop(self) -> None:
        """SIGKILL horovodrun and everything under it (frozen first, so nothing new starts)."""
        try:
            top = psutil.Process(self.proc.pid)
            family = [top, *top.children(recursive=True)]
        except psutil.Error:
            family = []
        for p in family:
            try:
                p.suspend()
            except psutil.Error:
                pass
        for member in family + [q for f in family for q in _children(f) if q not in family]:
            try:
                member.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(family, timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _children(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


LAUNCHES: list[Launch] = []


def launch(where: Path, flags: list[str], elastic: bool) -> Launch:
    LAUNCHES.append(Launch(where, flags, elastic))
    return LAUNCHES[-1]


def stop_all() -> None:
    while LAUNCHES:
        LAUNCHES.pop().stop()


# ---------------------------------------------------------------------------- measurements


def throughput(r: dict, steps: int) -> dict:
    """Samples/s and ms per step over the epochs after the first, and the commit timings."""
    rows = r["rows"][1:]
    samples = sum(x["samples_per_sec"] * x["epoch_time_s"] for x in rows)
    seconds = sum(x["epoch_time_s"] for x in rows)
    out = {
        "samples_per_sec": samples / seconds,
        "step_ms": 1000 * seconds / (len(rows) * steps),
        "launch_s": r["launch_s"],
        "wall_time_s": r["summary"]["wall_time_s"],
    }
    t = r["timings"]
    if t.get("save"):
        # One mid-epoch commit: its metrics allreduce, then save (deep copies) and host check.
        parts = {"reduce_ms": t["reduce"], "save_ms": t["save"], "hosts_ms": t["hosts"]}
        out.update(
            {
                k: 1000 * sum(v) / len(v) if v else 0.0
                for k, v in {**parts, "flush_ms": t["flush"]}.items()
            }
        )
        out["commit_ms"] = out["reduce_ms"] + out["save_ms"] + out["hosts_ms"]
        # Every commit's parts (epoch ends included) over the training time of every epoch.
        train_s = sum(x["epoch_time_s"] for x in r["rows"])
        out["commit_share"] = sum(sum(v) for v in parts.values()) / train_s
    return out


def lost_rank(where: Path, flags: list[str], commit: int, epoch_s: float) -> dict:
    """An elastic run whose rank on 127.0.0.1 is SIGKILLed halfway through epoch 2, its host
    dropped by the discovery script; seconds from the kill to each stage of the recovery.
    ``epoch_s`` is a steady epoch's time measured by the elastic runs before (epoch 1's own
    time holds the warm-up: half of it can reach past epoch 2, and a loaded CI machine did)."""
    job = launch(where, [*flags, "--commit-every", str(commit)], elastic=True)
    job.wait_for(r"epoch +1/\d+ .* [\d.]+ s$")
    time.sleep(0.5 * epoch_s)  # halfway through epoch 2
    victim = job.rank_on(HOSTS[1])
    if victim is None:
        job.fail(f"no rank on {HOSTS[1]}")
    job.set_hosts(HOSTS[0])  # the discovery script drops the host ...
    killed = time.time()
    victim.kill()  # ... whose rank dies
    r = job.finish()
    resets = r["summary"]["elastic"]["resets"]
    if [(e["cause"], e["from"], e["to"]) for e in resets] != [("rank lost", 2, 1)]:
        job.fail(f"expected one reset 'rank lost' 2 -> 1, the summary has {resets}")
    [event], t = resets, r["timings"]
    began = t["reset"][0]["began"]
    after = [x for x in r["rows"] if x["epoch"] > event["epoch"]]  # whole epochs on 1 rank
    if not after:
        job.fail(
            f"the rank was lost in the last epoch ({event['epoch']}), so no whole epoch ran on "
            "1 rank to time; the machine was too loaded for this --epochs: add more"
        )
    rate = sum(x["samples_per_sec"] * x["epoch_time_s"] for x in after) / sum(
        x["epoch_time_s"] for x in after
    )
    return {
        "commit_every": commit,
        "steps_redone": event["steps_redone"],
        "epoch": event["epoch"],
        "step": event["step"],
        "resumed_s": began + event["time_s"] - killed,
        "detected_s": t["restore"][0] - killed,
        "first_step_s": t["step"][0] - killed,
        "wall_time_s": r["summary"]["wall_time_s"],
        "launch_s": r["launch_s"],
        "samples_per_sec_after": rate,
        "world_size": r["summary"]["world_size"],
    }


def discovery_cost(where: Path, calls: int = 10) -> dict:
    """CPU ms per run of a discovery script as this Horovod's elastic driver runs it (every
    second, for the whole job), and as stock Horovod does (``safe_shell_exec``: a spawned
    Python middleman per call), measured back to back; the children's CPU included."""
    import io
    import resource

    from horovod.runner.common.util import safe_shell_exec
    from horovod.runner.elastic.discovery import HostDiscoveryScript

    script = where / "discover.sh"
    script.write_text("#!/bin/sh\necho localhost:1\n")
    script.chmod(0o755)

    def cpu_ms(fn) -> float:
        fn()  # warm-up
        before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        for _ in range(calls):
            fn()
        after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return (
            1000
            * sum(
                a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime
                for a, b in zip(after, before, strict=True)
            )
            / calls
        )

    hvdsgd = cpu_ms(lambda: HostDiscoveryScript(str(script), 1).find_available_hosts_and_slots())
    stock = cpu_ms(lambda: safe_shell_exec.execute(str(script), stdout=io.StringIO()))
    return {"cpu_ms": hvdsgd, "stock_cpu_ms": stock, "calls": calls}


def render(res: dict) -> str:
    cfg, default = res["config"], res["config"]["commit_default"]

    def pm(v, digits=2, scale=1.0):
        return f"{scale * v[0]:,.{digits}f} ± {scale * v[1]:,.{digits}f}"

    fixed = res["fixed"]
    out = [
        f"mlp on synthetic 1x28x28 data ({cfg['samples']:,} samples), 2 ranks x batch "
        f"{cfg['batch']} ({cfg['steps']} steps per rank per epoch), 1 thread per rank, "
        f"{cfg['epochs']} epochs (the first left out of the timing); fixed-size and elastic "
        f"launches interleaved, {cfg['repeats']} pair(s); ± 1.96 x std.",
        "",
        "| run | commit every (steps) | mid-epoch commits / epoch | samples/s | × fixed "
        "| ms / step | ms / commit (allreduce + copies + host check) | commits' share of "
        "training time |",
        "|---|---|---|---|---|---|---|---|",
        f"| fixed size | - | - | {pm(fixed['samples_per_sec'], 0)} | 1 | "
        f"{pm(fixed['step_ms'])} | - | - |",
    ]
    for row in res["elastic"]:
        c = row["commit_every"]
        name = "elastic (default)" if c == default else "elastic"
        ratio = pm(row["ratio"], 3) if c == default else f"{row['ratio'][0]:.3f}"
        ms = (
            f"{row['commit_ms'][0]:.2f} ({row['reduce_ms'][0]:.2f} + {row['save_ms'][0]:.2f} "
            f"+ {row['hosts_ms'][0]:.2f})"
        )
        out.append(
            f"| {name} | {c} | {(cfg['steps'] - 1) // c} | {pm(row['samples_per_sec'], 0)} | "
            f"{ratio} | {pm(row['step_ms'])} | {ms} | {100 * row['commit_share'][0]:.1f}% |"
        )
    d = next(r for r in res["elastic"] if r["commit_every"] == default)
    out += [
        "",
        f"At the default `--commit-every {default}`: elastic / fixed samples/s "
        f"{pm(d['ratio'], 3)} (target >= 0.98); the commits themselves take "
        f"{100 * d['commit_share'][0]:.1f}% of the training time.",
    ]
    if d["ratio"][1] > 0.02:
        out[-1] += (
            f" The end-to-end ratio's spread (± {d['ratio'][1]:.3f}: launches on a shared, "
            "busy machine) is wider than the 2% it should resolve; the commits' share, "
            "timed inside the same runs, is the figure that decides."
        )

    disc = res["discovery"]
    out += [
        "",
        f"Horovod's elastic driver runs the discovery script once a second for the whole "
        f"job: {disc['cpu_ms']:.1f} ms of CPU a run with hvdsgd's build, against "
        f"{disc['stock_cpu_ms']:.1f} ms the stock way (a Python middleman spawned per run), "
        f"i.e. {disc['cpu_ms'] / 10:.2f}% against {disc['stock_cpu_ms'] / 10:.1f}% of a core "
        f"taken from the ranks.",
    ]

    runs = res["lost_rank"]
    out += [
        "",
        "| commit every | killed in epoch, step | steps redone | lost -> rolled back (s) "
        "| -> ring re-formed (s) | -> first step (s) | samples/s after, 1 rank "
        "| run time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in runs:
        out.append(
            f"| {k['commit_every']} | {k['epoch']}, {k['step'] + k['steps_redone']} | "
            f"{k['steps_redone']} | {k['detected_s']:.2f} | {k['resumed_s']:.2f} | "
            f"{k['first_step_s']:.2f} | {k['samples_per_sec_after']:,.0f} | "
            f"{k['wall_time_s']:.1f} |"
        )
    lost = res["lost_summary"]
    out += [
        "",
        f"A rank's death to training resumed on the other (ring re-formed): "
        f"{pm(lost['resumed_s'])} s, first step done {pm(lost['first_step_s'])} s "
        f"({lost['n']} run(s)); steps redone at most `--commit-every` in every run: "
        f"{'yes' if lost['redone_within_commit'] else 'NO'}. Run time with the lost rank "
        f"{pm(lost['wall_time_s'], 1)} s against {pm(d['wall_time_s'], 1)} s without "
        f"(the rest of it on 1 rank, at {pm(lost['samples_per_sec_after'], 0)} samples/s "
        f"against {pm(fixed['samples_per_sec'], 0)} for 2 ranks on {res['machine']['cores']} "
        "cores).",
    ]
    return "\n".join(out)


def _args(argv) -> argparse.Namespace:
    """The command line, checked; ``--quick`` shrinks it to one pair and one lost rank."""
    p = parser(
        __doc__, "1 pair fixed/elastic at the default --commit-every, one lost rank; 4 epochs"
    )
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    p.add_argument("--samples", type=int, default=12800, help="synthetic training samples")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per rank")
    p.add_argument("--repeats", type=int, default=2, help="fixed/elastic pairs at the default")
    p.add_argument(
        "--commits",
        default="5,20,50,200",
        help="other --commit-every values, one elastic launch each",
    )
    p.add_argument("--kills", type=int, default=2, help="lost-rank runs at the default")
    p.add_argument(
        "--kill-commits",
        default="5,200",
        help="other --commit-every values for one lost-rank run each",
    )
    p.add_argument("--seed", type=int, default=42, help="seed of every run")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.repeats, args.commits, args.kills, args.kill_commits = 4, 1, "", 1, ""
    if args.repeats < 1 or args.kills < 1:
        p.error(
            "--repeats and --kills must be at least 1: the ratio and the resume time need a run"
        )
    if args.epochs < 3:
        p.error("--epochs must be at least 3: the first is warm-up, the rank is lost in the second")
    return args


def _train_flags(args: argparse.Namespace) -> list[str]:
    """The ``hvdsgd.train`` flags every launch shares."""
    return [
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        "--input-shape",
        "1,28,28",
        "--synthetic-samples",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--seed",
        str(args.seed),
        "--scheduler",
        "constant",
        "--warmup-epochs",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--no-plots",
        "--no-checkpoint",
        "--overwrite",
    ]


def _launch_all(
    args: argparse.Namespace,
    flags: list[str],
    steps: int,
    default: int,
    commits: list[int],
    kill_commits: list[int],
) -> tuple[list[dict], dict[int, list[dict]], list[dict], dict]:
    """Every launch, one at a time, each killed with its ranks on the way out: the fixed runs,
    the elastic runs by ``--commit-every``, the lost-rank runs, and the discovery script's
    cost."""
    fixed, elastic, lost = [], {c: [] for c in [default, *commits]}, []
    try:
        with tempfile.TemporaryDirectory(prefix="hvdsgd-elastic-") as tmp:

            def timed(name: str, commit: int | None) -> dict:
                extra = ["--commit-every", str(commit)] if commit else []
                r = throughput(
                    launch(Path(tmp) / name, flags + extra, commit is not None).finish(), steps
                )
                stop_all()
                what = f"elastic, commit every {commit:>3}" if commit else "fixed size"
                more = (
                    f", {r['commit_ms']:.2f} ms/commit ({100 * r['commit_share']:.1f}% of training)"
                    if commit
                    else ""
                )
                print(
                    f"  {what:<26} {r['samples_per_sec']:>8,.0f} samples/s, "
                    f"{r['step_ms']:.2f} ms/step{more}, launch {r['launch_s']:.1f} s",
                    flush=True,
                )
                return r

            for rep in range(args.repeats):
                # The pair at the default back to back, order alternating (ABBA ...); the sweep
                # values after the first pair.
                pair = [None, default] if rep % 2 == 0 else [default, None]
                for c in pair:
                    r = timed(f"{rep}-{c or 'fixed'}", c)
                    (fixed if c is None else elastic[c]).append(r)
                if rep == 0:
                    for c in commits:
                        elastic[c].append(timed(f"{rep}-{c}", c))
            disc = discovery_cost(Path(tmp))
            print(
                f"  discovery script: {disc['cpu_ms']:.1f} ms of CPU a run (stock Horovod: "
                f"{disc['stock_cpu_ms']:.1f} ms), once a second",
                flush=True,
            )
            # A steady epoch of the elastic runs at the default: when to kill in epoch 2.
            epoch_s = steps * _agg(elastic[default])["step_ms"][0] / 1000
            for i, c in enumerate([default] * args.kills + kill_commits):
                k = lost_rank(Path(tmp) / f"lost-{i}-{c}", flags, c, epoch_s)
                stop_all()
                lost.append(k)
                print(
                    f"  lost rank, commit every {c:>3}: killed at epoch {k['epoch']} step "
                    f"{k['step'] + k['steps_redone']}, {k['steps_redone']} steps redone; "
                    f"rolled back {k['detected_s']:.2f} s, resumed {k['resumed_s']:.2f} s, "
                    f"first step {k['first_step_s']:.2f} s after the kill; run "
                    f"{k['wall_time_s']:.1f} s",
                    flush=True,
                )
    finally:
        stop_all()
    return fixed, elastic, lost, disc


def _agg(rs: list[dict]) -> dict:
    return {k: mean_spread([r[k] for r in rs]) for k in rs[0]}


def _elastic_rows(fixed: list[dict], elastic: dict[int, list[dict]], default: int) -> list[dict]:
    """One row per ``--commit-every``: its runs' means and its ratio over the fixed runs."""
    base = _agg(fixed)
    rows = []
    for c in sorted(elastic):
        row = {"commit_every": c, **_agg(elastic[c]), "runs": elastic[c]}
        if c == default:  # pair by pair: each elastic run over the fixed run beside it
            row["ratio"] = mean_spread(
                [
                    e["samples_per_sec"] / f["samples_per_sec"]
                    for e, f in zip(elastic[c], fixed, strict=True)
                ]
            )
        else:
            row["ratio"] = (row["samples_per_sec"][0] / base["samples_per_sec"][0], 0.0)
        rows.append(row)
    return rows


def _lost_summary(lost: list[dict], default: int) -> dict:
    """The lost-rank runs at the default, averaged; steps redone checked in every run."""
    at_default = [k for k in lost if k["commit_every"] == default]
    return {
        "n": len(at_default),
        **{
            k: mean_spread([x[k] for x in at_default])
            for k in (
                "resumed_s",
                "detected_s",
                "first_step_s",
                "wall_time_s",
                "samples_per_sec_after",
            )
        },
        "redone_within_commit": all(k["steps_redone"] <= k["commit_every"] for k in lost),
    }


def main(argv=None) -> None:
    args = _args(argv)
    sys.path.insert(0, str(ROOT))
    from hvdsgd.config import TrainConfig

    default = TrainConfig.commit_every
    commits = [int(c) for c in args.commits.split(",") if c and int(c) != default]
    kill_commits = [int(c) for c in args.kill_commits.split(",") if c]
    steps = math.ceil(math.ceil(args.samples / 2) / args.batch_size)
    flags = _train_flags(args)
    n = 2 * args.repeats + len(commits) + args.kills + len(kill_commits)
    print(
        f"elastic: mlp, synthetic 1x28x28 x {args.samples}, 2 ranks x {args.batch_size} "
        f"({steps} steps/epoch), {args.epochs} epochs, --commit-every {default} (default) "
        f"and {commits}; {args.kills + len(kill_commits)} lost-rank run(s): {n} launches",
        flush=True,
    )

    def stop(signum, frame):  # SIGTERM: the finally in _launch_all still kills every launch
        raise SystemExit(f"bench/elastic.py: stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    fixed, elastic, lost, disc = _launch_all(args, flags, steps, default, commits, kill_commits)
    config = {
        **vars(args),
        "commit_default": default,
        "commits": commits,
        "kill_commits": kill_commits,
        "steps": steps,
        "batch": args.batch_size,
        "flags": flags,
    }
    results = {
        "command": command_line("elastic.py", argv),
        "machine": machine(gpu=False),
        "config": config,
        "fixed": {**_agg(fixed), "runs": fixed},
        "elastic": _elastic_rows(fixed, elastic, default),
        "lost_rank": lost,
        "lost_summary": _lost_summary(lost, default),
        "discovery": disc,
    }
    md = render(results)
    print("\n" + md)
    write_results(args.out, "elastic-quick" if args.quick else "elastic", results, md)


if __name__ == "__main__":
    main()
