"""Atomic checkpoints and the checks on load."""
import pytest
import torch

from hvdsgd import checkpoint
from hvdsgd.errors import UsageError

IDENT = {"model": "cnn", "dataset": "digits", "parameters": 10}


def test_round_trip(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {"w": torch.ones(3)}, "epoch": 2, "identity": IDENT})
    state = checkpoint.load(path, IDENT)
    assert state["epoch"] == 2 and torch.equal(state["model"]["w"], torch.ones(3))


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {}, "epoch": 1, "identity": IDENT})
    good = path.read_bytes()

    def dies_halfway(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"model": {}, "epoch": 2, "identity": IDENT})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_corrupt_foreign_missing_and_mismatched(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(UsageError, match="no checkpoint at"):
        checkpoint.load(path, IDENT)
    path.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="corrupt or truncated"):
        checkpoint.load(path, IDENT)
    torch.save({"weights": 1}, path)
    with pytest.raises(UsageError, match="not an hvdsgd checkpoint"):
        checkpoint.load(path, IDENT)
    checkpoint.save(path, {"model": {}, "epoch": 1, "identity": IDENT})
    with pytest.raises(UsageError, match="model: checkpoint 'cnn', now 'mlp'"):
        checkpoint.load(path, {**IDENT, "model": "mlp"})
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UsageError, match="corrupt or truncated"):
        checkpoint.load(path, IDENT)
