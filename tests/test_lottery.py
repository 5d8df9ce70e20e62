"""hvdsgd.lottery: magnitude pruning, masked training, and the command line."""

import json

import pytest
import torch
from conftest import horovodrun, run_module

from hvdsgd import lottery, models
from hvdsgd.errors import UsageError

MLP = ("mlp", (1, 8, 8), 10)  # 3,700 prunable weights: 64 x 50 + 50 x 10


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build(*MLP)


# --------------------------------------------------------------------------- pruning


@pytest.mark.unit
def test_prunable_weights_are_conv_and_linear_weights_only():
    assert list(lottery.prunable(models.build("cnn", (1, 28, 28), 10))) == [
        "0.weight",
        "3.weight",
        "7.weight",
    ]
    assert list(lottery.prunable(mlp())) == ["1.weight", "3.weight"]


@pytest.mark.unit
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.8, 0.97, 0.999])
def test_global_magnitude_masks_hit_the_sparsity_and_keep_the_largest(sparsity):
    weights = lottery.prunable(mlp())
    masks = lottery.prune(weights, sparsity)
    n = sum(w.numel() for w in weights.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert abs(pruned - sparsity * n) <= 1  # within one weight
    assert lottery.sparsity_of(masks) == pytest.approx(sparsity, abs=1 / n)
    kept = torch.cat(
        [w.detach().abs()[m] for w, m in zip(weights.values(), masks.values(), strict=True)]
    )
    gone = torch.cat(
        [w.detach().abs()[~m] for w, m in zip(weights.values(), masks.values(), strict=True)]
    )
    assert gone.max() <= kept.min()  # one threshold over all layers: global, by magnitude


@pytest.mark.unit
def test_apply_masks_zeroes_pruned_weights_and_leaves_the_rest():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = lottery.prune(lottery.prunable(model), 0.6)
    lottery.apply_masks(model, masks)
    after = model.state_dict()
    for name, m in masks.items():
        assert torch.equal(after[name][~m], torch.zeros(int((~m).sum())))
        assert torch.equal(after[name][m], before[name][m])
    for name in ("1.bias", "3.bias"):  # biases are never pruned
        assert name not in masks and torch.equal(after[name], before[name])


@pytest.mark.unit
def test_rounds_prune_the_same_fraction_of_survivors_and_masks_are_nested():
    assert lottery.round_sparsities(0.9, 1) == [0.9]
    steps = lottery.round_sparsities(0.875, 3)  # keep 1/2 per round: 1/2, 1/4, 1/8 remain
    assert steps == pytest.approx([0.5, 0.75, 0.875]) and steps[-1] == 0.875
    model = mlp()
    weights = lottery.prunable(model)
    masks = None
    for s in steps:
        new = lottery.prune(weights, s, masks)
        assert lottery.sparsity_of(new) == pytest.approx(s, abs=1e-3)
        if masks is not None:
            assert all(not (n & ~masks[k]).any() for k, n in new.items())  # nested
        masks = new
        with torch.no_grad():  # the pruned weights grow largest: a fresh mask would keep them
            for k, w in weights.items():
                w.copy_(torch.where(masks[k], torch.randn_like(w), 100.0))


# --------------------------------------------------------------------- masked training


@pytest.mark.unit
def test_pruned_weights_stay_exactly_zero_through_training():
    cfg = lottery.LotteryConfig(
        model="mlp", epochs=2, lr=0.1, momentum=0.9, weight_decay=1e-2, progress=False
    )
    ds = lottery.dataset(cfg)
    model = mlp()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    masks = lottery.prune(lottery.prunable(model), 0.7)
    result = lottery.train_masked(
        cfg, model, masks, (ds.train_x, ds.train_y), (ds.test_x, ds.test_y), 10, seed=1
    )
    assert result["updates"] == 46 and result["test_accuracy"] > 0.5
    params = dict(model.named_parameters())
    for name, m in masks.items():
        assert int(torch.count_nonzero(params[name][~m])) == 0
        assert not torch.equal(params[name][m], start[name][m])  # the survivors trained
    assert not torch.equal(params["1.bias"], start["1.bias"])
    # Without the mask the same momentum and weight decay move every weight.
    free = mlp()
    lottery.apply_masks(free, masks)
    from hvdsgd.strategies.local import fit

    fit(cfg, free, (ds.train_x, ds.train_y), (ds.test_x, ds.test_y), 10, seed=1)
    assert int(torch.count_nonzero(free.get_parameter("1.weight")[~masks["1.weight"]])) > 0


@pytest.mark.unit
def test_each_round_prunes_the_trained_weights_and_resets_survivors_to_theta_k(monkeypatch):
    cfg = lottery.LotteryConfig(model="mlp", epochs=1, rounds=3, progress=False)
    theta_k, final = mlp(1).state_dict(), mlp(2).state_dict()
    calls, real = [], lottery.train_masked

    def spy(cfg, model, masks, *args):
        calls.append(
            {"start": {k: v.clone() for k, v in model.state_dict().items()}, "masks": masks}
        )
        out = real(cfg, model, masks, *args)
        calls[-1]["end"] = {k: v.clone() for k, v in model.state_dict().items()}
        return out

    monkeypatch.setattr(lottery, "train_masked", spy)
    r = lottery.find_ticket(cfg.to_dict(), 0.875, 7, theta_k, final, seed=3)
    assert len(calls) == 3
    for c in calls:  # every round starts from theta_k (masked inside train_masked)
        assert all(torch.equal(c["start"][k], theta_k[k]) for k in theta_k)
    dense = mlp()
    dense.load_state_dict(final)
    expected = lottery.prune(lottery.prunable(dense), 0.5)  # round 1 prunes the dense weights
    for i, c in enumerate(calls):
        assert all(torch.equal(c["masks"][k], expected[k]) for k in expected)
        if i + 1 < len(calls):  # the next round prunes this round's trained survivors
            expected = lottery.prune(
                {k: c["end"][k] for k in expected}, [0.75, 0.875][i], c["masks"]
            )
    assert r["achieved_sparsity"] == pytest.approx(0.875, abs=1 / 3700)
    assert r["reset_step"] == 7 and r["updates"] == 3 * 23 and len(r["per_round"]) == 3


@pytest.mark.unit
def test_amdahl_figures():
    a = lottery.amdahl_figures(1.0, 9.0, workers=2, n_tasks=3)  # f = 0.1
    assert a["serial_fraction"] == pytest.approx(0.1)
    assert a["amdahl_speedup"] == pytest.approx(1 / 0.55) and a["amdahl_limit"] == pytest.approx(10)
    assert a["amdahl_efficiency"] == pytest.approx(1 / 1.1)
    assert a["amdahl_speedup_whole_tasks"] == pytest.approx(1 / (0.1 + 0.9 * 2 / 3))
    assert lottery.amdahl_figures(1.0, 9.0, 1, 3)["amdahl_speedup"] == pytest.approx(1)


# ----------------------------------------------------------------------- command line


LOTTERY = [
    "-m",
    "hvdsgd.lottery",
    "--model",
    "mlp",
    "--epochs",
    "1",
    "--sparsities",
    "0.5,0.8",
    "--reset-steps",
    "0,5",
    "--no-progress",
]  # a small run


def run_lottery(out, *args, timeout=180):
    return run_module(*LOTTERY, "--out", out, *args, timeout=timeout)


def check_tickets(s: dict) -> None:
    """The per-task rows of a 2 x 2 run of ``run_lottery``: masks at the sparsity, zeros kept."""
    assert (s["tasks"], s["rounds"], s["prunable_weights"]) == (4, 2, 3700) and not s["failed"]
    assert s["sparsities"] == [0.5, 0.8] and s["reset_steps"] == [0, 5]
    assert 0.5 < s["dense"]["test_accuracy"] <= 1 and s["dense"]["updates"] == 23
    rows = {(r["sparsity"], r["reset_step"]): r for r in s["per_task"]}
    assert set(rows) == {(0.5, 0), (0.5, 5), (0.8, 0), (0.8, 5)}
    for (sparsity, _), r in rows.items():
        assert abs(r["achieved_sparsity"] - sparsity) <= 1 / 3700
        assert r["remaining_weights"] == 3700 - round(sparsity * 3700)
        assert r["pruned_nonzero"] == 0 and r["updates"] == 2 * 23 and r["error"] is None
        assert [p["sparsity"] for p in r["per_round"]] == pytest.approx(
            lottery.round_sparsities(sparsity, 2), abs=1 / 3700
        )
    assert rows[(0.5, 0)]["test_loss"] != rows[(0.5, 5)]["test_loss"]  # different rewind points


@pytest.mark.e2e
def test_lottery_cli_reports_accuracy_against_sparsity(tmp_path):
    proc = run_lottery(tmp_path, "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    check_tickets(s)
    assert (s["mode"], s["workers"]) == ("processes", 2) and "speedup" not in s
    tickets = sum(r["seconds"] for r in s["per_task"])
    f = s["serial_phase_s"] / (s["serial_phase_s"] + tickets)
    assert s["serial_fraction"] == pytest.approx(f) and s["serial_fraction_from"] == "task times"
    assert s["amdahl_speedup"] == pytest.approx(1 / (f + (1 - f) / 2))
    assert s["wall_time_s"] == pytest.approx(s["serial_phase_s"] + s["parallel_phase_s"])
    assert len((tmp_path / "tasks.jsonl").read_text().splitlines()) == 4
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "cpu.png").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert "| sparsity | reached | k=0 | k=5 |" in proc.stdout and "| 80% | 80.00% |" in proc.stdout


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """``--compare-serial --workers 2``: a serial run and a 2-worker run of the same tickets,
    compared; (the CompletedProcess, its --out). The Horovod test checks its ranks against it."""
    out = tmp_path_factory.mktemp("lottery") / "compared"
    return run_lottery(out, "--workers", "2", "--compare-serial"), out


@pytest.mark.e2e
def test_lottery_compare_serial_reports_speedup_against_amdahl(compared):
    proc, out = compared
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    check_tickets(s)
    f = s["serial_phase_s"] / (s["serial_phase_s"] + s["serial"]["tickets_s"])
    assert s["serial_fraction"] == pytest.approx(f) and s["serial_fraction_from"] == "serial run"
    assert s["amdahl_speedup"] == pytest.approx(1 / (f + (1 - f) / 2))
    assert s["speedup"] == pytest.approx(
        (s["serial_phase_s"] + s["serial"]["tickets_s"])
        / (s["serial_phase_s"] + s["parallel_phase_s"])
    )
    assert s["efficiency"] == pytest.approx(s["speedup"] / 2)
    assert s["identical_per_task"] is True
    for png in ("accuracy.png", "cpu.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "speed-up" in proc.stdout and "Amdahl" in proc.stdout


def per_task(out) -> list[tuple]:
    return [
        (
            r["name"],
            r["result"]["test_accuracy"],
            r["result"]["test_loss"],
            r["result"]["achieved_sparsity"],
        )
        for r in map(json.loads, (out / "tasks.jsonl").read_text().splitlines())
    ]


@pytest.mark.dist
def test_lottery_under_horovod_matches_a_serial_run(tmp_path, compared):
    # The serial run: the --compare-serial run's, which found its 2 workers' tickets identical.
    proc, pool = compared
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((pool / "summary.json").read_text())["identical_per_task"] is True
    ranks = tmp_path / "hvd"
    proc = horovodrun(2, *LOTTERY, "--out", str(ranks))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert per_task(pool) == per_task(ranks)
    rows = (ranks / "tasks.jsonl").read_text().splitlines()
    assert {json.loads(line)["worker"] for line in rows} == {"rank 0", "rank 1"}
    assert json.loads((ranks / "summary.json").read_text())["mode"] == "horovod"


@pytest.mark.unit
def test_lottery_a_failing_ticket_is_reported_and_exits_nonzero(monkeypatch, capsys, tmp_path):
    real = lottery.find_ticket

    def flaky(cfg, sparsity, reset_step, **kw):
        if (sparsity, reset_step) == (0.8, 5):
            raise RuntimeError("this ticket lost")
        return real(cfg, sparsity, reset_step, **kw)

    monkeypatch.setattr(lottery, "find_ticket", flaky)
    cfg = lottery.LotteryConfig(
        model="mlp",
        epochs=1,
        sparsities="0.5,0.8",
        reset_steps="0,5",
        rounds=1,
        serial=True,
        progress=False,
        out=str(tmp_path),
    )
    with pytest.raises(SystemExit) as e:
        lottery.lottery(cfg)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "task s=0.8 k=5 failed" in err and "this ticket lost" in err
    assert '"reset_step": 5' in err and "1 task(s) failed" in err
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["failed"] == ["s=0.8 k=5"] and len(s["per_task"]) == 4
    assert (s["mode"], s["workers"], s["amdahl_speedup"]) == ("serial", 1, 1.0)


@pytest.mark.unit
@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsities", "0.5,1.2"], "--sparsities must lie strictly between 0 and 1 (got 1.2)"),
        (["--sparsities", "half"], "--sparsities must be comma-separated fractions in (0, 1)"),
        (["--sparsities", "0.5,0.5"], "--sparsities lists a value twice"),
        (["--sparsities", "0,0.5"], "--sparsities must lie strictly between 0 and 1 (got 0)"),
        (["--reset-steps", "0,-3"], "--reset-steps must be >= 0 (got -3)"),
        (["--reset-steps", "0,1.5"], "--reset-steps must be comma-separated update counts"),
        (["--rounds", "0"], "--rounds must be >= 1 (got 0)"),
        (["--serial", "--compare-serial"], "--serial and --compare-serial exclude each other"),
        (["--start-method", "teleport"], "unknown start method 'teleport'; choose one of"),
        (
            ["--start-method", "fork", "--task-threads", "2"],
            "--start-method fork cannot run --task-threads 2",
        ),
        (["--resume"], "--resume applies to python -m hvdsgd.train"),
        (["--tensorboard"], "--tensorboard applies to python -m hvdsgd.train"),
        (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    ],
)
def test_bad_flags_are_one_clear_usage_error(args, message):
    with pytest.raises(UsageError) as e:
        lottery.parse_args(args, cls=lottery.LotteryConfig)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.unit
def test_default_reset_steps_follow_the_dense_run(tmp_path):
    auto = lottery.LotteryConfig(model="mlp", epochs=1)
    assert lottery.resolve_reset_steps(auto, 23).reset_list == [0, 5, 18]  # 0, 20%, 80%
    assert lottery.resolve_reset_steps(auto, 2).reset_list == [0, 2]  # each step once
    given = lottery.LotteryConfig(model="mlp", reset_steps="0,7")
    assert lottery.resolve_reset_steps(given, 23) is given
    s = lottery.lottery(
        lottery.LotteryConfig(
            model="mlp",
            epochs=1,
            sparsities="0.5",
            rounds=1,
            serial=True,
            progress=False,
            out=str(tmp_path),
        )
    )
    assert s["reset_steps"] == [0, 5, 18] and s["dense"]["updates"] == 23 and not s["failed"]
    assert s["config"]["reset_steps"] == "0,5,18"


@pytest.mark.unit
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--reset-steps", "0,999"],
            "--reset-steps 999 is past the end of the dense run (23 updates "
            "in 1 epochs); use steps up to 23 or more --epochs",
        ),
        (
            ["--sparsities", "0.99999", "--reset-steps", "0"],
            "--sparsities 0.99999 prunes all 3700 prunable weights of mlp",
        ),
    ],
)
def test_impossible_runs_stop_before_training(tmp_path, args, message):
    cfg = lottery.parse_args(
        ["--model", "mlp", "--epochs", "1", "--out", str(tmp_path), *args],
        cls=lottery.LotteryConfig,
    )
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lottery.lottery(cfg)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.e2e
def test_lottery_bad_input_exits_2_with_one_line(tmp_path):
    proc = run_lottery(tmp_path, "--reset-steps", "0,999", timeout=120)  # found after loading
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "hvdsgd: error: --reset-steps 999 is past the end of the dense run"
    )
    assert not (tmp_path / "summary.json").exists()
