"""TrainConfig validation, the generated command line and TOML files."""
import pytest

from hvdsgd.config import TrainConfig, parse_args
from hvdsgd.errors import UsageError


def test_defaults_are_the_embedded_demo():
    cfg = parse_args([])
    assert (cfg.model, cfg.dataset, cfg.strategy) == ("cnn", "digits", "allreduce")


def test_flags_fill_the_dataclass():
    cfg = parse_args(["--model", "mlp", "--lr", "0.5", "--batch-size", "8", "--amp",
                      "--no-checkpoint", "--accum-steps", "2", "--pin-memory"])
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.amp) == ("mlp", 0.5, 8, "bf16")
    assert cfg.checkpoint is False and cfg.accum_steps == 2 and cfg.pin_memory is True
    assert parse_args(["--amp", "fp16"]).amp == "fp16"


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet9000"], "unknown model 'resnet9000'; choose one of: mlp, cnn"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--momentum", "1.5"], "--momentum must be in"),
    (["--input-shape", "3x32"], "--input-shape must be C,H,W"),
    (["--lr", "fast"], "invalid float value"),
    (["--optimiser", "sgd"], "unrecognized arguments"),
])
def test_bad_input_is_one_clear_usage_error(argv, message):
    with pytest.raises(UsageError, match=message) as e:
        parse_args(argv)
    assert "\n" not in str(e.value)


def test_toml_supplies_defaults_and_flags_win(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[train]\nmodel = "mlp"\nbatch-size = 16\nlr = 1\n')
    cfg = parse_args(["--config", str(f), "--batch-size", "4"])
    assert (cfg.model, cfg.batch_size, cfg.lr) == ("mlp", 4, 1.0)
    assert isinstance(cfg.lr, float)


def test_toml_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = \n")
    with pytest.raises(UsageError, match="not valid TOML"):
        parse_args(["--config", str(bad)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rate = 0.1\n")
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        parse_args(["--config", str(unknown)])
    typed = tmp_path / "typed.toml"
    typed.write_text('epochs = "ten"\n')
    with pytest.raises(UsageError, match="--epochs: invalid int value: 'ten'"):
        parse_args(["--config", str(typed)])
    with pytest.raises(UsageError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.toml")])


def test_dataclass_validates_direct_construction():
    with pytest.raises(UsageError, match="--accum-steps must be >= 1"):
        TrainConfig(accum_steps=0)
