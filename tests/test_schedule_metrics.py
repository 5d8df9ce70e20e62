"""Learning-rate schedules and the metrics computed from a confusion matrix."""

import math

import pytest
import torch
from sklearn.metrics import f1_score

from hvdsgd import schedule
from hvdsgd.metrics import Summary, Tally

pytestmark = pytest.mark.unit


def test_warm_ramps_from_base_to_peak_then_cosine_to_zero():
    f = schedule.multiplier("warm", total_steps=100, warmup_steps=10, start=0.25)
    assert f(0) == 0.25 and f(5) == pytest.approx(0.625) and f(10) == 1.0
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0, abs=1e-12)


def test_cosine_has_no_warmup_and_step_and_constant():
    assert schedule.multiplier("cosine", 100, 10, 0.25)(0) == 1.0
    step = schedule.multiplier("step", 100, 0, 1.0)
    assert (step(10), step(60), step(90)) == (1.0, pytest.approx(0.1), pytest.approx(0.01))
    const = schedule.multiplier("constant", 100, 20, 0.5)
    assert const(10) == pytest.approx(0.75) and const(99) == 1.0


def test_lambda_lr_follows_the_multiplier():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)  # peak = 0.1 x 4 ranks
    sched = schedule.build(opt, "warm", total_steps=10, warmup_steps=2, world_scale=4)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.25, 0.4])


def test_tally_metrics_match_sklearn():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (200,))
    logits = torch.randn(200, 4) + 2 * torch.nn.functional.one_hot(y, 4)
    tally = Tally(4, torch.device("cpu"))
    tally.add(torch.tensor(0.5), logits[:120], y[:120])
    tally.add(torch.tensor(1.5), logits[120:], y[120:])
    s = tally.reduce("t")  # one process: the sum over ranks is this rank's tally
    pred = logits.argmax(1)
    assert s.count == 200 and s.loss == pytest.approx((0.5 * 120 + 1.5 * 80) / 200)
    assert s.accuracy == pytest.approx((pred == y).float().mean().item())
    assert s.macro_f1 == pytest.approx(f1_score(y, pred, average="macro"))
    per_class = [((pred == c) & (y == c)).sum().item() / (y == c).sum().item() for c in range(4)]
    assert s.per_class_accuracy == pytest.approx(per_class)


def test_absent_classes_do_not_count_in_macro_f1():
    conf = torch.tensor([[5, 0, 0], [0, 5, 0], [0, 0, 0]])
    assert Summary(1.0, conf).macro_f1 == 1.0 and math.isclose(Summary(0.0, conf).accuracy, 1.0)
