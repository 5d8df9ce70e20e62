"""Checks on every rank: `horovodrun -np N --gloo python tests/dist_checks.py CHECK [CHECK...]`.

The checks run one after the other in one job (one horovodrun start-up for them all). Each raises
AssertionError on failure: that rank prints `CHECK FAILED on rank R: why`, goes on with the next
check and exits 1 at the end; rank 0 prints `CHECK ok` for each check that passed.
"""

import copy
import itertools
import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

from hvdsgd import data, dist, models
from hvdsgd.config import TrainConfig
from hvdsgd.engine import train_step
from hvdsgd.errors import UsageError, exit_on_usage_error
from hvdsgd.metrics import Tally
from hvdsgd.strategies.allreduce import Allreduce


def setup(**overrides):
    device = dist.init("cpu", threads=1)
    cfg = TrainConfig(model="cnn", lr=0.05, epochs=1, **overrides)
    ds = data.resize(data.load("digits"), 28)
    torch.manual_seed(dist.rank())  # different on purpose: the broadcast must fix it
    model = models.build("cnn", ds.input_shape, ds.num_classes)
    return cfg, device, ds, model, Allreduce(cfg, model, device, steps_per_epoch=10)


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def check_identical_parameters():
    """After the broadcast and after every step, all ranks hold the same parameters."""
    cfg, device, ds, model, strategy = setup()
    h, r, b = dist.hvd(), dist.rank(), 16
    for step in range(5):
        gathered = h.allgather(flat_params(model)[None], name=f"params.{step}")
        assert all(torch.equal(gathered[0], g) for g in gathered[1:]), (
            f"ranks differ at step {step}"
        )
        lo = (step * h.size() + r) * b  # each rank its own, different samples
        batch = [(ds.train_x[lo : lo + b], ds.train_y[lo : lo + b])]
        train_step(model, batch, strategy, device, "off", Tally(10, device))
    assert not torch.equal(flat_params(model), gathered[0]), "parameters did not change"


def check_gradient_average():
    """The allreduced gradient equals one process's gradient on the concatenated batch."""
    cfg, device, ds, model, strategy = setup()
    h, r, b = dist.hvd(), dist.rank(), 24
    reference = copy.deepcopy(model)  # same (broadcast) weights, no hooks
    x, y = ds.train_x[: b * h.size()], ds.train_y[: b * h.size()]
    F.cross_entropy(reference(x), y).backward()

    strategy.backward(F.cross_entropy(model(x[r * b : (r + 1) * b]), y[r * b : (r + 1) * b]))
    strategy.synchronize()  # Horovod: wait for the allreduce, grads now averaged
    worst = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert worst < 1e-5, f"averaged gradient differs from the full-batch one by {worst:.3g}"
    strategy.update()


def check_accumulation():
    """Two micro-batches with --accum-steps 2 give the gradient of their concatenation."""
    cfg, device, ds, model, strategy = setup(accum_steps=2)
    h, r, b = dist.hvd(), dist.rank(), 12
    reference = copy.deepcopy(model)
    x, y = ds.train_x[: 2 * b * h.size()], ds.train_y[: 2 * b * h.size()]
    F.cross_entropy(reference(x), y).backward()
    mine = slice(2 * r * b, 2 * (r + 1) * b)
    for xm, ym in zip(x[mine].split(b), y[mine].split(b), strict=True):
        strategy.backward(F.cross_entropy(model(xm), ym) * 0.5)  # as engine.train_step scales
    strategy.synchronize()
    worst = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    assert worst < 1e-5, f"accumulated gradient differs from the full-batch one by {worst:.3g}"
    strategy.update()


def check_bucket_views():
    """CPU buckets: many small buckets and fp16 compression still give the full-batch gradient,
    two steps running, and every .grad stays a view into its bucket."""
    device = dist.init("cpu", threads=1)
    h, r, b = dist.hvd(), dist.rank(), 24
    for fp16 in (False, True):
        cfg = TrainConfig(model="cnn", lr=0.05, epochs=1, bucket_mb=0.01, fp16_allreduce=fp16)
        ds = data.resize(data.load("digits"), 28)
        torch.manual_seed(dist.rank())
        model = models.build("cnn", ds.input_shape, ds.num_classes)
        strategy = Allreduce(cfg, model, device, steps_per_epoch=10)
        assert len(strategy.buckets.flats) >= 3, len(strategy.buckets.flats)
        storages = {id(p): p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        for step in range(2):
            reference = copy.deepcopy(model)
            x = ds.train_x[step * b * h.size() : (step + 1) * b * h.size()]
            y = ds.train_y[step * b * h.size() : (step + 1) * b * h.size()]
            for q in reference.parameters():
                q.grad = None
            F.cross_entropy(reference(x), y).backward()
            strategy.backward(
                F.cross_entropy(model(x[r * b : (r + 1) * b]), y[r * b : (r + 1) * b])
            )
            strategy.synchronize()
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                worst = (p.grad - q.grad).abs().max().item()
                tol = 2e-3 * q.grad.abs().max().item() if fp16 else 1e-5
                assert worst <= tol, f"fp16={fp16} step {step}: gradient off by {worst:.3g}"
            strategy.update()
            assert all(
                p.grad.untyped_storage().data_ptr() == storages[id(p)] for p in model.parameters()
            ), "a .grad is no longer a view into its bucket"
            assert all(not p.grad.any() for p in model.parameters()), "update() left gradients"


def check_many_small_collectives():
    """Thousands of tiny allreduces enqueued while the background loop decides whether to sleep:
    hvdsgd's wake-on-enqueue build once took its two locks in opposite orders there and hung a
    rank (here, 2 of 3 runs within 3,000 rounds) until the peers' Gloo timeout shut Horovod down."""
    dist.init("cpu", threads=1)
    h = dist.hvd()
    x = torch.full((1,), float(dist.rank() + 1))
    for _ in range(3000):
        handles = [h.allreduce_async(x, name=f"small.{j}") for j in range(8)]
        for handle in handles:
            assert h.synchronize(handle).item() == (h.size() + 1) / 2  # the average of 1..size


def check_tally_carries_extra_values():
    """Values summed in the metrics' allreduce (an elastic commit's view of host changes) come
    back summed, and the metrics are the same as without them."""
    dist.init("cpu", threads=1)
    r, size = dist.rank(), dist.size()
    tallies = [Tally(3, torch.device("cpu")) for _ in range(2)]
    for t in tallies:
        t.add(torch.tensor(0.5 + r), torch.eye(3)[[r % 3, 1, 2]], torch.tensor([0, 1, r % 3]))
    plain = tallies[0].reduce("tally.plain")
    extra = (
        torch.tensor([7.0, 0.0, r + 1.0], dtype=torch.float64)
        if r == 0
        else torch.tensor([0.0, 0.0, r + 1.0], dtype=torch.float64)
    )
    both = tallies[1].reduce("tally.extra", extra)
    assert plain.extra is None and both.extra.tolist() == [7.0, 0.0, size * (size + 1) / 2]
    assert both.loss_sum == plain.loss_sum and torch.equal(both.confusion, plain.confusion)
    assert plain.count == 3 * size


def check_usage_error_on_one_rank():
    """Bad input on rank 1 alone (its --data-dir, say) while rank 0 waits for it in a collective:
    rank 1 says so in one line (rank 0 has nothing to say), rank 0 leaves without a traceback, and
    horovodrun adds nothing. The test checks the output; here every rank exits 2 or is stopped."""

    @exit_on_usage_error
    def main():
        dist.init("cpu", threads=1)
        if dist.rank() == 1:
            raise UsageError("--data-dir /nonexistent does not exist on rank 1")
        dist.hvd().allreduce(torch.ones(1), name="wait.for.rank.1")

    main()


def check_lost_contact_while_the_job_is_stopped():
    """Rank 0 ignores horovodrun's SIGTERM (as a rank starved on a loaded host effectively does)
    and steps until the job is stopped: it meets the lost peer and, after its grace time, says
    "lost contact". The test stops horovodrun and checks that the line is dropped."""

    @exit_on_usage_error
    def main():
        dist.init("cpu", threads=1)
        for step in itertools.count():
            dist.hvd().allreduce(torch.ones(1), name=f"step.{step}")
            if step == 10 and dist.is_main():
                print("stepping", flush=True)
            time.sleep(0.01)

    if os.environ.get("HOROVOD_RANK") == "0":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # kept by exit_on_usage_error
    main()


def main(names: list[str]) -> int:
    """Run the checks ``names`` in order; 1 when one of them failed on this rank."""
    failed = False
    for name in names:
        try:
            globals()[f"check_{name}"]()
        except AssertionError as e:
            failed = True
            print(f"{name} FAILED on rank {dist.rank()}: {e}", flush=True)
            continue
        if dist.is_main():
            print(f"{name} ok", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
