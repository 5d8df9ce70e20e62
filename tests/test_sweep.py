"""hvdsgd.sweep: the task config (which flags apply to tasks), the runs and the records."""

import dataclasses
import json

import pytest

from hvdsgd import kfold, lottery, sweep, tasks
from hvdsgd.config import SharedBufferOptions, TrainConfig, parse_args
from hvdsgd.errors import UsageError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "cls, argv, message",
    [
        (
            kfold.KFoldConfig,
            ["--strategy", "sharded", "--shards", "4"],
            "--strategy applies to python -m hvdsgd.train; each task trains alone in one "
            "process (local SGD, no allreduce): drop it",
        ),
        (kfold.KFoldConfig, ["--shards", "4"], "--shards applies to python -m hvdsgd.train"),
        (kfold.KFoldConfig, ["--adasum"], "--adasum applies to python -m hvdsgd.train"),
        (kfold.KFoldConfig, ["--use-adasum"], "--use-adasum applies to python -m hvdsgd.train"),
        (kfold.KFoldConfig, ["--fp16-allreduce"], "--fp16-allreduce applies"),
        (kfold.KFoldConfig, ["--commit-every", "5"], "--commit-every applies"),
        (kfold.KFoldConfig, ["--eval-interval", "1"], "--eval-interval applies"),
        (kfold.KFoldConfig, ["--on-worker-failure", "continue"], "--on-worker-failure applies"),
        (lottery.LotteryConfig, ["--resume"], "--resume applies to python -m hvdsgd.train"),
        (lottery.LotteryConfig, ["--no-checkpoint"], "--no-checkpoint applies"),
        (lottery.LotteryConfig, ["--profile"], "a sweep profiles the CPU of its runs itself"),
        (lottery.LotteryConfig, ["--log-interval", "5"], "one line per finished task: drop it"),
        (lottery.LotteryConfig, ["--device", "cuda"], "the tasks train on CPU"),
        (lottery.LotteryConfig, ["--no-cuda"], "--no-cuda applies to python -m hvdsgd.train"),
        (lottery.LotteryConfig, ["--threads", "2"], ": use --task-threads"),
        (lottery.LotteryConfig, ["--amp", "fp16"], "sweep's tasks train on CPU; use --amp bf16"),
    ],
)
def test_training_flags_that_do_not_apply_to_tasks_are_refused_in_one_line(cls, argv, message):
    with pytest.raises(UsageError) as e:
        parse_args(["--model", "mlp", *argv], cls=cls)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_refused_key_in_a_toml_file_says_why(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text('strategy = "hogwild"\n')
    with pytest.raises(UsageError, match="--config .*: --strategy applies to python -m hvdsgd"):
        parse_args(["--config", str(f)], cls=kfold.KFoldConfig)


def test_task_config_holds_only_what_tasks_use():
    cfg = parse_args(["--workers", "3", "--use-mixed-precision"], cls=kfold.KFoldConfig)
    names = {f.name for f in dataclasses.fields(cfg)}
    assert not names & {"strategy", "shards", "resume", "profile", "device", "threads"}
    assert "strategy" not in cfg.to_dict()  # so summary.json's config names no strategy
    assert cfg.workers == 3 and cfg.amp == "bf16"  # auto on CPU, as train() picks
    assert kfold.KFoldConfig(**cfg.to_dict()) == cfg  # what a task worker rebuilds
    # --workers: task processes here, shared-buffer workers in hvdsgd.train (not a subclass)
    assert not isinstance(cfg, SharedBufferOptions)
    assert isinstance(TrainConfig(), SharedBufferOptions)


def test_sweep_help_is_grouped_and_names_no_training_only_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"], cls=lottery.LotteryConfig, prog="python -m hvdsgd.lottery")
    out = capsys.readouterr().out
    groups = out[out.index("options:") :]  # after the usage lines
    titles = ("data set and model:", "training and optimisation:", "sweep: how the tasks")
    assert [groups.index(t) for t in titles] == sorted(groups.index(t) for t in titles)
    assert groups.index("sweep: how the tasks") < groups.index("--task-threads")
    assert "--strategy" not in out and "--resume" not in out and "--reset-steps" in out


def result(name, accuracy, ok=True):
    figures = {"test_accuracy": accuracy, "test_loss": 1.0}
    return tasks.Result(
        name, ok, figures if ok else None, None if ok else "boom", {"x": 1}, "pid 1", 0.0, 2.0
    )


def test_runs_speedup_and_identity():
    runs = sweep.Runs(
        {"serial": [result("a", 0.5)], "parallel": [result("a", 0.5)]},
        {"serial": 6.0, "parallel": 4.0},
        {"serial": None, "parallel": None},
        "parallel",
    )
    assert runs.compared and runs.wall == 4.0 and runs.identical()
    assert runs.speedup(2) == {"speedup": 1.5, "efficiency": 0.75}
    assert runs.speedup(2, serial_phase_s=2.0)["speedup"] == pytest.approx(8 / 6)
    runs.results["parallel"] = [result("a", 0.25)]
    assert not runs.identical()


def test_task_records(tmp_path):
    results = [result("t0", 0.5), result("t1", 0.0, ok=False)]
    sweep.write_records(tmp_path, results, {"failed": ["t1"]})
    rows = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert [r["ok"] for r in rows] == [True, False] and rows[1]["inputs"] == {"x": 1}
    assert json.loads((tmp_path / "summary.json").read_text()) == {"failed": ["t1"]}
    row = {"fold": "t1", "seconds": 2.0, "worker": "pid 1", "error": "boom"}
    assert sweep.per_task(results, "fold")[1] == row
