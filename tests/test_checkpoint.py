"""Atomic checkpoints and the checks on load."""

import os
import pickle
import stat

import pytest
import torch

from hvdsgd import checkpoint
from hvdsgd.errors import UsageError

pytestmark = pytest.mark.unit

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
    with pytest.raises(
        UsageError,
        match=f"cannot write checkpoint {path} .disk full.; the last good checkpoint is kept",
    ) as e:
        checkpoint.save(path, {"model": {}, "epoch": 2, "identity": IDENT})
    assert "\n" not in str(e.value)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_a_full_disk_is_one_line_naming_the_path(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError("... unexpected pos 121088 vs 121040")."""
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"model": {}, "epoch": 1, "identity": IDENT})

    def full(obj, fh):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
            "failed writing file data/0: file write failed\nunexpected pos"
        )

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        UsageError,
        match=f"cannot write checkpoint {path} .*file write failed.*last good checkpoint is kept",
    ) as e:
        checkpoint.save(path, {"model": {}, "epoch": 2, "identity": IDENT})
    assert "\n" not in str(e.value)
    assert checkpoint.load(path, IDENT)["epoch"] == 1


def test_a_directory_in_the_checkpoints_place_is_one_line(tmp_path):
    path = tmp_path / "c.pt"
    path.mkdir()
    with pytest.raises(UsageError, match=f"cannot write checkpoint {path} .Is a directory."):
        checkpoint.save(path, {"model": {}, "epoch": 1, "identity": IDENT})
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as fh:
        pickle.dump(
            {"format": checkpoint.FORMAT, "model": Payload(), "identity": IDENT}, fh, protocol=2
        )
    with pytest.raises(UsageError, match="refusing to load checkpoint .* could run code") as e:
        checkpoint.load(path, IDENT)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    with open(path, "wb") as fh:  # protocol 4's framing is not even parsed
        pickle.dump({"format": checkpoint.FORMAT, "model": Payload()}, fh, protocol=4)
    with pytest.raises(UsageError, match="corrupt, truncated or not a checkpoint"):
        checkpoint.load(path, IDENT)
    assert not marker.exists()
    # The same payload inside torch's own zip format is refused as well.
    torch.save({"format": checkpoint.FORMAT, "model": Payload(), "identity": IDENT}, path)
    with pytest.raises(UsageError, match="refusing to load checkpoint"):
        checkpoint.load(path, IDENT)
    assert not marker.exists()


def test_checkpoint_files_follow_the_umask_but_never_world_writable(tmp_path):
    old = os.umask(0o027)
    try:
        checkpoint.save(tmp_path / "c.pt", {"model": {}, "epoch": 1, "identity": IDENT})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o640


def test_resume_names_a_file_or_a_run_directory(tmp_path):
    from hvdsgd.config import RESUME_OUT

    assert checkpoint.resolve(RESUME_OUT, tmp_path) == tmp_path / "checkpoint.pt"
    assert checkpoint.resolve(str(tmp_path), tmp_path / "x") == tmp_path / "checkpoint.pt"
    assert checkpoint.resolve(str(tmp_path / "a.pt"), tmp_path / "x") == tmp_path / "a.pt"


def test_corrupt_foreign_missing_and_mismatched(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(UsageError, match="no checkpoint at"):
        checkpoint.load(path, IDENT)
    path.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="corrupt, truncated or not a checkpoint"):
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
