"""hvdsgd.tasks and hvdsgd.kfold: independent tasks over processes and Horovod ranks."""

import dataclasses
import json
import os
import statistics

import numpy as np
import pytest
from conftest import horovodrun, run_module

from hvdsgd import kfold, tasks

# -------------------------------------------------------- task functions (importable)


def square(x: int) -> dict:
    import torch

    return {
        "x": x,
        "value": x * x,
        "draw": torch.rand(1).item(),
        "threads": torch.get_num_threads(),
    }


def fail_on(x: int, bad: int) -> dict:
    if x == bad:
        raise ValueError(f"task {x} is broken on purpose")
    return square(x)


def die_on(x: int, bad: int) -> dict:
    if x == bad:
        os._exit(9)  # the worker process vanishes mid-task
    return square(x)


def sleep_then(x: int, seconds: float) -> dict:
    import time

    time.sleep(seconds)
    return {"x": x, "pid": os.getpid()}


def pair_step(x: int, fail_role: int = -1, pair=None) -> dict | None:
    """A splittable task: both halves meet at a barrier; ``fail_role`` raises in that half."""
    if pair is not None:
        if pair.role == fail_role:
            raise ValueError(f"half {fail_role} is broken on purpose")
        pair.wait()
        if pair.role == 1:
            return None
    return {"x": x, "split": pair is not None, "pid": os.getpid()}


def _tasks(fn=square, n=5, **kw):
    return [
        tasks.Task(f"t{i}", fn, {"x": i, **kw}, seed=100 + i, inputs={"x": i}) for i in range(n)
    ]


# --------------------------------------------------------------------------- tasks


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_results_do_not_depend_on_where_a_task_ran(method):
    serial = tasks.run(_tasks(), "serial", progress=False)
    pooled = tasks.run(_tasks(), "processes", workers=2, progress=False, method=method)
    assert [r.result for r in serial] == [r.result for r in pooled]  # seeded draws match
    assert all(r.ok and r.result["threads"] == 1 for r in pooled)
    assert [r.name for r in pooled] == [f"t{i}" for i in range(5)]  # task order kept


@pytest.mark.e2e
def test_a_free_worker_takes_the_next_task():
    # one long task and four short ones on 2 workers: the short ones all go to the other worker
    ts = [tasks.Task("long", sleep_then, {"x": 0, "seconds": 1.5})] + [
        tasks.Task(f"short{i}", sleep_then, {"x": i, "seconds": 0.1}) for i in range(1, 5)
    ]
    results = tasks.run(ts, "processes", workers=2, progress=False)
    long_pid = results[0].result["pid"]
    assert all(r.result["pid"] != long_pid for r in results[1:])
    assert max(r.start + r.seconds for r in results[1:]) < results[0].start + results[0].seconds


@pytest.mark.e2e
def test_a_failing_task_is_reported_and_the_others_complete():
    results = tasks.run(_tasks(fail_on, bad=2), "processes", workers=2, progress=False)
    assert [r.ok for r in results] == [True, True, False, True, True]
    bad = results[2]
    assert "ValueError: task 2 is broken on purpose" in bad.error and bad.inputs == {"x": 2}
    text = tasks.failures_text(results)
    assert text.startswith("task t2 failed") and '{"x": 2}' in text


@pytest.mark.e2e
def test_a_worker_that_dies_fails_its_task_not_the_run():
    results = tasks.run(_tasks(die_on, n=3, bad=1), "processes", workers=2, progress=False)
    pid = results[1].worker.removeprefix("pid ")
    assert (
        not results[1].ok
        and results[1].error == f"the worker process (pid {pid}) running it died: exit status 9"
    )
    assert results[0].ok and results[2].ok  # its replacement or the other worker ran the rest


@pytest.mark.unit
def test_bad_task_arguments():
    with pytest.raises(tasks.UsageError, match="--workers must be >= 1"):
        tasks.run(_tasks(), "processes", workers=0)
    with pytest.raises(tasks.UsageError, match="unique"):
        tasks.run(_tasks() + _tasks(), "serial")


# ----------------------------------------------------------------------------- kfold


@pytest.mark.unit
def test_folds_are_stratified_disjoint_and_cover_the_data():
    y = np.repeat(np.arange(4), [30, 20, 10, 7])
    folds = kfold.split(y, 5, seed=0, classes=list("abcd"))
    tests = [te for _, te in folds]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(y)))  # cover, disjoint
    for tr, te in folds:
        assert not set(tr) & set(te) and len(tr) + len(te) == len(y)
        for c, n in enumerate([30, 20, 10, 7]):
            assert abs((y[te] == c).sum() - n / 5) <= 1  # each class spread evenly


@pytest.mark.unit
def test_more_folds_than_a_class_has_samples():
    y = np.repeat(np.arange(3), [30, 20, 4])
    with pytest.raises(kfold.UsageError, match="class 'c' has only 4 samples; use --folds 4"):
        kfold.split(y, 5, seed=0, classes=list("abc"))


KFOLD = [
    "-m",
    "hvdsgd.kfold",
    "--model",
    "mlp",
    "--folds",
    "3",
    "--epochs",
    "2",
    "--no-progress",
]  # a small run


def run_kfold(out, *args, timeout=300):
    return run_module(*KFOLD, "--out", out, *args, timeout=timeout)


# ------------------------------------------------------------ split tail (hvdsgd.pair)


@pytest.mark.unit
def test_split_tail_plan():
    def ts(n, ok=True):
        return [tasks.Task(f"t{i}", square, splittable=ok) for i in range(n)]

    assert tasks.split_tail(ts(5), 2) == [4]  # 2 + 2 whole, the fifth on both workers
    assert tasks.split_tail(ts(4), 2) == []  # even: nothing idles
    assert tasks.split_tail(ts(6), 4) == [4, 5]  # two left over, two workers each
    assert tasks.split_tail(ts(7), 4) == []  # three left over need six workers
    assert tasks.split_tail(ts(5, ok=False), 2) == []


@pytest.mark.e2e
def test_split_task_runs_on_two_workers_and_a_failing_half_fails_it_without_hanging():
    ok = tasks.run(
        [tasks.Task(f"t{i}", pair_step, {"x": i}, splittable=True) for i in range(3)],
        "processes",
        workers=2,
        progress=False,
    )
    assert all(r.ok for r in ok) and [r.result["split"] for r in ok] == [False, False, True]
    assert " + " in ok[2].worker and ok[2].worker.count("pid") == 2
    for role in (0, 1):
        ts = [
            tasks.Task(
                f"t{i}", pair_step, {"x": i, "fail_role": role}, splittable=True, inputs={"x": i}
            )
            for i in range(3)
        ]
        results = tasks.run(ts, "processes", workers=2, progress=False)
        assert [r.ok for r in results] == [True, True, False]
        assert f"half {role} is broken on purpose" in results[2].error  # the cause, not the echo


@pytest.mark.unit
def test_splittable_models():
    import torch

    from hvdsgd import models, pair

    x = torch.randn(2, 1, 28, 28)
    assert pair.splittable(models.build("cnn", (1, 28, 28), 10), x)
    assert not pair.splittable(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(784, 10)), x
    )  # RNG
    assert not pair.splittable(
        torch.nn.Sequential(torch.nn.BatchNorm2d(1), torch.nn.Flatten(), torch.nn.Linear(784, 10)),
        x,
    )  # buffers


@pytest.mark.e2e
def test_split_fold_is_bit_for_bit_the_serial_fold(tmp_path):
    """3 folds on 2 workers: fold 3 runs on both, with every figure equal to the serial run."""
    cfg = kfold.KFoldConfig(
        model="cnn",
        folds=3,
        epochs=1,
        batch_size=32,
        accum_steps=3,
        out=str(tmp_path),
        progress=False,
    )
    ts = kfold.make_tasks(cfg)
    serial = tasks.run(ts, "serial", progress=False)
    pooled = tasks.run(ts, "processes", workers=2, progress=False)
    assert " + " in pooled[2].worker and " + " not in pooled[0].worker
    for a, b in zip(serial, pooled, strict=True):
        keys = ("test_accuracy", "test_loss", "test_macro_f1", "train_loss", "updates")
        assert a.ok and b.ok and {k: a.result[k] for k in keys} == {k: b.result[k] for k in keys}


@pytest.mark.unit
def test_kfold_table_time_row_is_the_mean_of_its_rows():
    def fold(name, seconds, train_time):
        return tasks.Result(
            name,
            True,
            {
                "test_accuracy": 0.5,
                "test_macro_f1": 0.5,
                "test_loss": 1.0,
                "train_time_s": train_time,
            },
            None,
            {},
            "pid 1",
            0.0,
            seconds,
        )

    text = kfold.table({"serial": [fold("fold 1", 1.0, 0.5), fold("fold 2", 3.0, 0.7)]})
    assert "serial task time (s)" in text.splitlines()[0]
    assert "| 1.00 |" in text and "| 3.00 |" in text
    assert text.splitlines()[-1].endswith("| 2.00 ± 1.41 |")  # the rows' seconds, not train_time_s


def per_fold(out) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "tasks.jsonl").read_text().splitlines()]
    return [
        (
            r["name"],
            r["result"]["test_accuracy"],
            r["result"]["test_loss"],
            r["result"]["test_macro_f1"],
        )
        for r in rows
    ]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``--compare-serial --workers 2``: a serial run and a 2-worker run of the same 3 folds,
    compared; (the CompletedProcess, its --out). The Horovod test checks its ranks against it."""
    out = tmp_path_factory.mktemp("kfold") / "compared"
    return run_kfold(out, "--compare-serial", "--workers", "2"), out


@pytest.mark.e2e
def test_kfold_compare_serial_reports_speedup_and_identical_folds(compared):
    proc, out = compared
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["identical_per_fold"] is True and s["folds"] == 3 and s["workers"] == 2
    assert s["speedup"] == pytest.approx(s["serial"]["wall_time_s"] / s["wall_time_s"])
    assert s["efficiency"] == pytest.approx(s["speedup"] / 2)
    accuracies = [r["test_accuracy"] for r in s["per_fold"]]
    assert s["test_accuracy"] == pytest.approx(
        {"mean": statistics.mean(accuracies), "std": statistics.stdev(accuracies)}
    )  # over the folds, as the table's mean ± std row
    assert 0.8 < s["test_accuracy"]["mean"] <= 1
    assert len(s["per_fold"]) == 3 and sum(r["test_samples"] for r in s["per_fold"]) == 1797
    assert s["serial"]["cpu_util_mean"] > 0 and s["cpu_util_mean"] > 0
    assert (out / "cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean ± std" in proc.stdout
    assert not (out / "metrics.jsonl").exists()  # tasks.jsonl holds the per-fold rows


@pytest.mark.unit
def test_kfold_overwrite_replaces_an_earlier_run(tmp_path):
    (tmp_path / "summary.json").write_text("{}")  # an earlier run's results
    cfg = kfold.KFoldConfig(
        model="mlp", folds=2, epochs=1, serial=True, progress=False, out=str(tmp_path)
    )
    with pytest.raises(kfold.UsageError, match="--overwrite"):
        kfold.kfold(cfg)
    kfold.kfold(dataclasses.replace(cfg, overwrite=True))
    assert json.loads((tmp_path / "summary.json").read_text())["folds"] == 2


@pytest.mark.dist
def test_kfold_per_fold_results_identical_serial_workers_and_horovod(tmp_path, compared):
    # The serial and the 2-worker run: the --compare-serial run, which found them identical.
    proc, pool = compared
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((pool / "summary.json").read_text())
    assert s["identical_per_fold"] is True  # accuracy and loss, fold by fold, bit for bit
    assert s["serial"]["test_macro_f1"] == s["test_macro_f1"]  # and the folds' macro-F1
    ranks = tmp_path / "hvd"
    proc = horovodrun(2, *KFOLD, "--out", str(ranks))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert per_fold(pool) == per_fold(ranks)
    workers = {
        json.loads(line)["worker"] for line in (ranks / "tasks.jsonl").read_text().splitlines()
    }
    assert workers == {"rank 0", "rank 1"}  # both ranks took folds
    assert json.loads((ranks / "summary.json").read_text())["mode"] == "horovod"


@pytest.mark.unit
def test_kfold_a_failing_fold_is_reported_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    real = kfold.train_fold

    def flaky(cfg, fold, train_idx, test_idx, seed):
        if fold == 2:
            raise RuntimeError("fold 2 ran out of luck")
        return real(cfg, fold, train_idx, test_idx, seed)

    monkeypatch.setattr(kfold, "train_fold", flaky)
    cfg = kfold.KFoldConfig(
        model="mlp", folds=3, epochs=1, serial=True, progress=False, out=str(tmp_path)
    )
    with pytest.raises(SystemExit) as e:
        kfold.kfold(cfg)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "task fold 2 failed" in err and "fold 2 ran out of luck" in err
    assert '"fold": 2' in err and "1 task(s) failed" in err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["failed"] == ["fold 2"] and len([r for r in s["per_fold"] if r["error"] is None]) == 2


@pytest.mark.e2e
def test_kfold_bad_input_is_one_line(tmp_path):
    proc = run_kfold(tmp_path, "--folds", "200", timeout=120)  # found once the data is loaded
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        "hvdsgd: error: --folds 200 but class '8' has only 174 samples; use --folds 174 or fewer"
    )


@pytest.mark.unit
@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be >= 1 (got 0)"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["--folds", "1"], "--folds must be >= 2 (got 1)"),
    ],
)
def test_kfold_bad_flags_are_one_line(args, message):
    with pytest.raises(kfold.UsageError) as e:
        kfold.parse_args(args, cls=kfold.KFoldConfig)
    assert message in str(e.value) and "\n" not in str(e.value)
