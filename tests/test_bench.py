"""`make bench-quick`: every bench/ script in its reduced form, so that none rots unnoticed;
and `bench/readme.py`, which builds the README's Results section from bench/results/."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def bench_script(name: str):
    """bench/NAME.py as a module, loaded from its path: bench/ is a folder of scripts, neither a
    package nor on sys.path (bench/readme.py imports nothing from beside it)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme = bench_script("readme")

PNG = b"\x89PNG\r\n\x1a\n"


def check_throughput(out: Path) -> None:
    result = json.loads((out / "throughput-quick.json").read_text())
    [row] = result["rows"]
    for kind in ("hvdsgd", "horovod", "ddp"):
        assert row[f"{kind}_total"] > 0
    assert row["hvdsgd_over_ddp"] == pytest.approx(row["hvdsgd_total"] / row["ddp_total"])
    assert "| mlp |" in (out / "throughput-quick.md").read_text()


def check_scaling(out: Path) -> None:
    result = json.loads((out / "scaling-quick.json").read_text())
    # A row for every swept value, each with a time, a throughput and a learned model.
    assert [(r["model"], r["workers"]) for r in result["workers"]] == [("mlp", 1), ("mlp", 2)]
    assert [(r["model"], r["batch"]) for r in result["batch"]] == [("mlp", 32)]  # shared point
    for r in result["workers"] + result["batch"]:
        assert r["iter_ms"][0] > 0 and r["samples_per_sec"][0] > 0
        assert 0.5 < r["test_accuracy"][0] <= 1, r
    one, two = result["workers"]
    assert one["speedup"] == pytest.approx(1.0)
    assert two["speedup"] == pytest.approx(two["samples_per_sec"][0] / one["samples_per_sec"][0])
    assert (out / "scaling-quick.png").read_bytes()[:8] == PNG
    md = (out / "scaling-quick.md").read_text()
    assert "| mlp: workers (batch 32 per rank) | time / iteration (ms) |" in md
    assert "| mlp: batch per rank (2 workers) |" in md


def check_techniques(out: Path) -> None:
    result = json.loads((out / "techniques-quick.json").read_text())
    rows = {(r["model"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {("vit_tiny", "baseline"), ("vit_tiny", "all")}  # what --quick asks for
    assert result["budgets"]["vit_tiny"]["epochs"] == 1
    for r in rows.values():
        assert math.isfinite(r["samples_per_sec"]) and r["samples_per_sec"] > 0
        assert r["peak_mib"] > 0 and r["process_peak_mib"] >= r["peak_mib"]
        # Scored on the 16 test images --quick asks for: a whole number of them right.
        right = r["test_accuracy"] * 16
        assert right == pytest.approx(round(right)) and 0 <= right <= 16, r["test_accuracy"]
        assert 0 <= r["test_macro_f1"] <= 1
        [run] = r["runs"]
        assert run["timed_samples"] == 8 and run["updates"] == 3  # 24 images, batch 8, 2 warm-up
    base, every = rows["vit_tiny", "baseline"], rows["vit_tiny", "all"]
    assert base["speed_ratio"] == 1 and base["memory_ratio"] == 1
    assert every["speed_ratio"] == pytest.approx(every["samples_per_sec"] / base["samples_per_sec"])
    assert every["memory_ratio"] == pytest.approx(every["peak_mib"] / base["peak_mib"])
    md = (out / "techniques-quick.md").read_text()
    assert "| model | setting | samples/s | × baseline | peak memory (MiB) |" in md
    assert "| vit_tiny | baseline |" in md and "| vit_tiny | all |" in md
    assert "- vit_tiny: 1 epoch(s) at batch 8, adamw" in md
    assert (out / "techniques-quick.png").read_bytes()[:8] == PNG


def check_strategies(out: Path) -> None:
    rows = {
        r["strategy"]: r for r in json.loads((out / "strategies-quick.json").read_text())["rows"]
    }
    assert set(rows) == {"allreduce", "sync", "async-apply", "async-deferred", "hogwild", "sharded"}
    assert all(
        r["samples_per_sec"][0] > 0 and 0.5 < r["test_accuracy"][0] <= 1 for r in rows.values()
    )
    assert rows["allreduce"]["staleness_mean"][0] == 0 == rows["sync"]["staleness_mean"][0]
    for name in ("hogwild", "sharded", "async-apply", "async-deferred"):
        assert rows[name]["staleness_mean"][0] > 0, name  # two writers: updates land in between
    assert "| hogwild |" in (out / "strategies-quick.md").read_text()


def check_hogwild(out: Path) -> None:
    result = json.loads((out / "hogwild-quick.json").read_text())
    [kernel] = result["kernel"]
    assert kernel["gbps"] and all(v and min(v) > 0 for v in kernel["gbps"].values())
    assert [r["workers"] for r in result["e2e"]] == [2]
    assert all(
        r["hvdsgd"]["samples_per_sec"] > 0 and r["reference"]["samples_per_sec"] > 0
        for r in result["e2e"]
    )
    # --quick: the two policies bench/strategies.py --quick leaves out
    assert {r["policy"] for r in result["policies"]} == {"atomic", "locked"}
    assert "hvdsgd / reference" in (out / "hogwild-quick.md").read_text()


def check_occupancy(out: Path, stdout: str) -> None:
    assert "occupancy: CPU form" in stdout  # no GPU here: the script says which form it ran
    result = json.loads((out / "occupancy-quick.json").read_text())
    one, two = result["sweep"]
    assert one["samples_per_sec"] > 0 and two["samples_per_sec"] > 0
    assert two["busy_cores"] > one["busy_cores"] * 0.9  # more workers keep more cores busy
    assert Path(one["profile_dir"], "profile.csv").exists()
    o = result["overhead"]
    assert o["step_ms_off"] > 0 and o["step_ms_on"] > 0 and o["pairs"] == 2
    assert 0 < o["sampler_cpu_pct_of_core"] < 50
    assert (out / "occupancy-quick.png").read_bytes()[:8] == PNG


def check_kfold(out: Path) -> None:
    result = json.loads((out / "kfold-quick.json").read_text())
    compare, grid = result["compare"], result["grid"]
    [run] = compare["runs"]
    assert run["serial_s"] > 0 and run["parallel_s"] > 0 and run["joblib_s"] > 0
    assert compare["identical_per_fold"] and compare["accuracy_gap_points"] == 0
    assert run["joblib_accuracy"] == pytest.approx(run["serial_accuracy"])  # same folds, seeds
    assert compare["ceiling"] == pytest.approx(1.5)
    # The seed study's grid (--quick: lenet only): the folds are identical, so the serial and
    # parallel accuracies are equal and the difference is 0.00, not merely small.
    assert [(r["model"], r["schedule"]) for r in grid] == [("lenet", "warm"), ("lenet", "cosine")]
    for r in grid:
        assert r["identical"] and r["difference_points"] == 0.0, r
        assert r["serial_accuracy"] == r["parallel_accuracy"] > 0.1
        assert r["speedup"] == pytest.approx(r["serial_s"] / r["parallel_s"]) and r["speedup"] > 0
        assert 0 < r["cpu_serial"] <= 100 and 0 < r["cpu_parallel"] <= 100
    md = (out / "kfold-quick.md").read_text()
    assert "joblib, 2 jobs" in md and "| lenet | warm | 1 | - |" in md and "| 0.00 |" in md
    assert (out / "kfold-quick.png").read_bytes()[:8] == PNG


def check_lottery(out: Path) -> None:
    s = json.loads((out / "lottery-quick.json").read_text())["summary"]
    assert len(s["per_task"]) == 4 and s["identical_per_task"]
    assert sorted(round(t["achieved_sparsity"], 2) for t in s["per_task"]) == [0.5, 0.5, 0.9, 0.9]
    assert 1 < s["amdahl_speedup"] <= 2
    serial = s["serial_phase_s"] + s["serial"]["tickets_s"]  # --quick compares with a serial run
    assert s["speedup"] == pytest.approx(serial / (s["serial_phase_s"] + s["parallel_phase_s"]))
    assert "| 90% | 90.00% |" in (out / "lottery-quick.md").read_text()
    assert (out / "lottery-quick.png").read_bytes()[:8] == PNG


def check_elastic(out: Path) -> None:
    from hvdsgd.config import TrainConfig

    result = json.loads((out / "elastic-quick.json").read_text())
    d, steps = TrainConfig.commit_every, result["config"]["steps"]
    assert result["config"]["commit_default"] == d
    [default] = result["elastic"]  # --quick: the default --commit-every alone
    assert default["commit_every"] == d
    assert default["samples_per_sec"][0] > 0 and default["ratio"][0] > 0
    # Each commit's parts were timed inside the ranks.
    assert default["reduce_ms"][0] > 0 and default["save_ms"][0] > 0 and default["hosts_ms"][0] > 0
    assert 0 < default["commit_share"][0] < 1
    [lost] = result["lost_rank"]
    assert lost["world_size"] == 1 and 0 <= lost["steps_redone"] <= d
    assert 0 < lost["detected_s"] <= lost["resumed_s"] <= lost["first_step_s"] < 60
    disc = result["discovery"]  # hvdsgd's build runs the discovery script without a middleman
    assert 0 < disc["cpu_ms"] < disc["stock_cpu_ms"] / 3, disc
    md = (out / "elastic-quick.md").read_text()
    assert f"| elastic (default) | {d} | {(steps - 1) // d} |" in md and f"| {d} | 2, " in md


def bench_scripts() -> list[str]:
    """The Makefile's BENCH list: what `make bench` and `make bench-quick` run, in order."""
    m = re.search(r"^BENCH\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    return m[1].split()


@pytest.mark.bench
@pytest.mark.parametrize("script", bench_scripts())
def test_make_bench_quick_runs_every_script(tmp_path, script):
    """`make bench-quick` for one script of the Makefile's BENCH list (each is its own test, so
    that make test's two workers share them); a script without a check_ function fails here."""
    check = globals().get(f"check_{script}")
    assert check is not None, f"bench/{script}.py is in the Makefile's BENCH but has no check"
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "bench-quick",
            "SETUP=",
            f"PY={sys.executable}",
            f"BENCH_OUT={tmp_path}",
            f"BENCH={script}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if script == "occupancy":  # its check also reads the printed profile lines
        check(tmp_path, proc.stdout)
    else:
        check(tmp_path)
    [md] = tmp_path.glob("*-quick.md")  # what bench/readme.py reads: "`COMMAND` on MACHINE"
    assert re.match(
        rf"`python bench/{script}\.py --quick --out .+` on \d+ cores.*, in \d+ (min \d+ )?s$",
        md.read_text().splitlines()[0],
    ), md


@pytest.mark.e2e
def test_kfold_grid_runs_on_cifar10_from_data_dir_and_refuses_a_dir_without_it(
    tmp_path, cifar10_dir
):
    """The grid on CIFAR-10 (the conftest's small original-format batches) when --data-dir holds
    it; a --data-dir without it is one line and exit 2."""
    kfold = [sys.executable, "bench/kfold.py", "--quick", "--parts", "grid"]
    bad = subprocess.run(
        [*kfold, "--data-dir", str(tmp_path / "nothing")], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "holds no cifar-10-batches-py folder (CIFAR-10's)"
    ), bad.stderr
    out = tmp_path / "out"
    proc = subprocess.run(
        [*kfold, "--schedules", "cosine", "--data-dir", str(cifar10_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [row] = json.loads((out / "kfold-quick.json").read_text())["grid"]
    assert (row["model"], row["schedule"], row["identical"]) == ("lenet", "cosine", True)
    assert row["difference_points"] == 0.0
    assert "3-fold on CIFAR-10" in (out / "kfold-quick.md").read_text()  # --quick: 3 folds


# ------------------------------------------------------------------------ bench/readme.py


@pytest.mark.unit
def test_readme_section_is_built_from_the_results_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "kfold.md").write_text(
        "`python bench/kfold.py` on 2 cores (x86_64), no GPU\n\n| a |\n|---|\n| 1.5 |\n"
    )
    (results / "kfold.png").write_bytes(PNG)
    (results / "kfold-h200.md").write_text(
        "`python bench/kfold.py --gpu` on 16 cores, NVIDIA H200\n\n| b |\n"
    )
    (results / "kfold-quick.md").write_text(
        "`python bench/kfold.py --quick` on 2 cores\n\n| never |\n"
    )
    readme_md = tmp_path / "README.md"
    readme_md.write_text(f"# x\n\nbefore\n\n{readme.BEGIN}\nold figures\n{readme.END}\n\nafter\n")
    args = ["--readme", str(readme_md), "--results", str(results)]
    with pytest.raises(SystemExit, match="out of date"):
        readme.main([*args, "--check"])
    readme.main(args)
    text = readme_md.read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old figures" not in text and "never" not in text
    assert "### K-fold cross-validation in parallel" in text
    assert "```bash\npython bench/kfold.py\n```\n\nOn 2 cores (x86_64), no GPU.\n\n| a |" in text
    assert text.index("| a |") < text.index("python bench/kfold.py --gpu") < text.index("| b |")
    assert "![K-fold cross-validation in parallel](results/kfold.png)" in text  # beside the README
    readme.main([*args, "--check"])  # now current


@pytest.mark.unit
def test_readme_results_section_matches_bench_results():
    """Every figure in the README's Results section comes from a bench/results/ file."""
    readme.main(["--check"])


def bench_code(script: str, code: str) -> subprocess.CompletedProcess:
    """``code`` run with bench/SCRIPT.py importable as ``t`` (bench/ is a folder of scripts, not
    a package: the code runs there in its own process)."""
    return subprocess.run(
        [sys.executable, "-c", f"import json, {script} as t\n" + code],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
    )


def bench_json(script: str, code: str):
    """What ``code`` (see :func:`bench_code`) prints as JSON."""
    proc = bench_code(script, code)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.unit
def test_techniques_marks_a_setting_that_loses_more_than_a_point():
    """bench/techniques.py's table: accuracy as mean ± spread over the seeds, and a setting whose
    mean is more than 1 point below the baseline's is marked; one within a point is not."""
    code = """
def runs(*accs):
    return [dict(samples_per_sec=100.0, peak_mib=10.0, process_peak_mib=20.0, test_accuracy=a,
                 test_macro_f1=a) for a in accs]
base = t.summarise("m", "baseline", runs(0.95, 0.97), None, "")
rows = [t.summarise("m", s, runs(*a), base, "") for s, a in
        (("baseline", (0.95, 0.97)), ("amp", (0.94, 0.95)), ("accum", (0.955, 0.96)))]
print(json.dumps([rows, t.render(rows)]))
"""
    rows, md = bench_json("techniques", code)
    assert [r["loses_accuracy"] for r in rows] == [False, True, False]
    assert rows[1]["accuracy_points"] == pytest.approx(-1.5)
    assert rows[0]["test_accuracy_spread"] == pytest.approx(1.96 * 0.02 / 2**0.5)
    lines = md.splitlines()
    assert "| 96.0 ± 2.8 | — |" in lines[2]  # the baseline: its own reference
    assert "| 94.5 ± 1.4 | **-1.5 ▼** |" in lines[3]
    assert "| 95.8 ± 0.7 | -0.2 |" in lines[4]


@pytest.mark.unit
def test_techniques_gpu_form_trains_the_papers_models_at_full_size():
    """On a GPU the table runs ResNet-50, EfficientNet-B0 and ViT themselves; CPU_BUDGETS holds
    their CPU-sized variants, named as such, with a fraction of the weights."""
    gpu, cpu = bench_json(
        "techniques", "print(json.dumps([list(t.GPU_BUDGETS), list(t.CPU_BUDGETS)]))"
    )
    assert gpu == ["resnet50", "efficientnet_b0", "vit"]
    assert cpu == ["resnet50_narrow", "efficientnet_b0_narrow", "vit_tiny"]
    from hvdsgd import models

    def weights(name):
        return sum(p.numel() for p in models.build(name, (3, 32, 32), 10).parameters())

    full = {m: weights(m) for m in gpu}
    assert full["resnet50"] > 23e6 and full["efficientnet_b0"] > 4e6, full  # torchvision's
    for small, big in zip(cpu, gpu, strict=True):
        assert weights(small) < full[big] / 3, (small, big)


ELASTIC_FAKE_LAUNCH = """
import sys, time
slept = []
time.sleep = slept.append
class Rank:
    def kill(self):
        pass
class Job:  # a launch whose rank was lost in epoch LOST of 4
    def wait_for(self, pattern):
        return None
    def rank_on(self, host):
        return Rank()
    def set_hosts(self, *hosts):
        pass
    def fail(self, why):
        sys.exit("failed: " + why)
    def finish(self):
        event = dict(cause="rank lost", epoch=LOST, step=50, steps_redone=50, time_s=1.0, to=1)
        event["from"] = 2
        rows = [dict(epoch=e, samples_per_sec=1000.0, epoch_time_s=1.0) for e in range(1, 5)]
        return dict(summary=dict(elastic=dict(resets=[event]), wall_time_s=9.0, world_size=1),
                    rows=rows, launch_s=10.0, timings=dict(reset=[dict(began=time.time())],
                    restore=[time.time() + 1], step=[time.time() + 2]))
t.launch = lambda where, flags, elastic: Job()
"""


@pytest.mark.unit
def test_elastic_bench_kills_halfway_through_a_steady_epoch_and_names_a_late_kill():
    """bench/elastic.py's lost-rank run sleeps half of a steady epoch (measured by the elastic
    runs before it) after epoch 1's line, not half of epoch 1, whose warm-up made a loaded CI
    machine kill in the last epoch; a kill that still lands there fails in one line, not with a
    ZeroDivisionError."""
    code = "from pathlib import Path\n" + ELASTIC_FAKE_LAUNCH
    code += "k = t.lost_rank(Path('.'), [], 100, 0.8)\nprint(json.dumps([slept, k]))"
    slept, k = bench_json("elastic", code.replace("LOST", "2"))
    assert slept == [0.4] and k["epoch"] == 2 and k["samples_per_sec_after"] == 1000.0
    proc = bench_code("elastic", code.replace("LOST", "4"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "failed: the rank was lost in the last epoch (4)" in proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    "flags,error",
    [
        (["--epochs", "0"], "--epochs must be positive"),
        (["--lr-warmup", "-1"], "--lr-warmup must be 0 or more"),
        (["--batch-size", "7"], "--batch-size must be even"),
    ],
)
def test_techniques_refuses_a_bad_budget_in_one_line(flags, error):
    proc = subprocess.run(
        [sys.executable, "bench/techniques.py", *flags], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and error in proc.stderr.strip().splitlines()[-1], proc.stderr
