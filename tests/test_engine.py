"""The one epoch loop of every strategy (engine.begin_epoch, run_epoch, steps_per_epoch)."""

import pytest
import torch

from hvdsgd import data, engine
from hvdsgd.metrics import Tally

pytestmark = pytest.mark.unit


class Count:
    """An Updater that counts its steps (and leaves the weights alone)."""

    def __init__(self):
        self.steps = 0

    def backward(self, loss):
        loss.backward()

    def update(self):
        self.steps += 1


@pytest.mark.parametrize("n,parts,batch,accum", [(103, 4, 8, 1), (103, 4, 8, 3), (64, 1, 64, 2)])
@pytest.mark.parametrize("dry_run", [False, True])
def test_steps_per_epoch_is_what_run_epoch_takes(n, parts, batch, accum, dry_run):
    cpu, cfg = torch.device("cpu"), type("Cfg", (), {"amp": "off", "accum_steps": accum})()
    cfg.dry_run = dry_run
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    model = torch.nn.Linear(5, 3)
    for w in range(parts):
        batches = data.Batches(x, y, batch, data.ShardSampler(n, w, parts, seed=0), cpu)
        updater = Count()
        steps = engine.run_epoch(
            model, batches, updater, cpu, cfg, 0, Tally(3, cpu), base_seed=0, who=w
        )
        assert steps == updater.steps == engine.steps_per_epoch(n, parts, batch, accum, dry_run)


def test_begin_epoch_reseeds_from_seed_epoch_and_who_and_sets_the_shuffle():
    cpu = torch.device("cpu")
    sampler = data.EpochSampler(50, 0, 2, seed=1)
    batches = data.Batches(torch.zeros(50, 1), torch.zeros(50, dtype=torch.long), 5, sampler, cpu)

    def draw(epoch, who, skip=0):
        engine.begin_epoch(batches, cpu, 7, epoch, who, skip)
        return torch.rand(3), sampler.order().tolist(), len(sampler)

    a, b = draw(2, 1), draw(2, 1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]  # the same (seed, epoch, who): the same
    assert not torch.equal(draw(3, 1)[0], a[0]) and draw(3, 1)[1] != a[1]  # another epoch
    assert not torch.equal(draw(2, 0)[0], a[0])  # another rank
    assert draw(2, 1, skip=20)[2] == (50 - 20) // 2  # an elastic run going on mid-epoch
