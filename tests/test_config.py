"""TrainConfig validation, the generated command line and TOML files."""

import dataclasses

import pytest

from hvdsgd.config import TrainConfig, parse_args
from hvdsgd.errors import UsageError

pytestmark = pytest.mark.unit


def test_defaults_are_the_embedded_demo():
    cfg = parse_args([])
    assert (cfg.model, cfg.dataset, cfg.strategy) == ("cnn", "digits", "allreduce")


def test_flags_fill_the_dataclass():
    cfg = parse_args(
        [
            "--model",
            "mlp",
            "--lr",
            "0.5",
            "--batch-size",
            "8",
            "--amp",
            "--no-checkpoint",
            "--accum-steps",
            "2",
            "--pin-memory",
        ]
    )
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.amp) == ("mlp", 0.5, 8, "bf16")
    assert cfg.checkpoint is False and cfg.accum_steps == 2 and cfg.pin_memory is True
    assert parse_args(["--amp", "fp16"]).amp == "fp16"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "resnet9000"], "unknown model 'resnet9000'; choose one of: mlp, cnn"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--lr", "-0.1"], "--lr must be > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--momentum", "1.5"], "--momentum must be in"),
        (["--input-shape", "3x32"], "--input-shape must be C,H,W"),
        (["--lr", "fast"], "invalid float value"),
        (["--optimiser", "sgd"], "unrecognized arguments"),
    ],
)
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


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
        (["--eval-interval", "inf"], "--eval-interval must be a finite number"),
        (["--profile-interval", "inf"], "--profile-interval must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
        (["--fp16", "--no-progress"], "unrecognized arguments: --fp16"),
        (
            ["--num-classes", "1000000", "--dataset", "synthetic"],
            "--num-classes must be between 2 and 10,000",
        ),
        (["--resume", "--overwrite"], "pick one"),
        (["--gpu", "0", "--no-cuda"], "exclude each other"),
        (["--gradient-predivide-factor", "-1"], "--gradient-predivide-factor must be >= 0"),
        (["--test-batch-size", "-1"], "--test-batch-size must be >= 0"),
    ],
)
def test_every_bad_value_names_its_own_flag(argv, message):
    with pytest.raises(UsageError, match=message) as e:
        parse_args(argv)
    assert "\n" not in str(e.value)


def test_toml_mixing_top_level_keys_and_a_train_table_is_refused(tmp_path):
    f = tmp_path / "mixed.toml"
    f.write_text("lr = 0.1\n[train]\nepochs = 2\n")
    with pytest.raises(UsageError, match=r"keys at the top level \(lr\) and a \[train\] table"):
        parse_args(["--config", str(f)])


def test_toml_optional_bool_of_the_wrong_type_is_one_line(tmp_path):
    f = tmp_path / "pin.toml"
    f.write_text('pin_memory = "no"\n')
    with pytest.raises(UsageError, match="--pin-memory must be bool, got 'no'"):
        parse_args(["--config", str(f)])
    f.write_text("pin_memory = false\nresume = true\n")
    cfg = parse_args(["--config", str(f)])
    assert cfg.pin_memory is False and cfg.resume  # `resume = true`: --out's checkpoint


def test_horovod_example_flags_are_aliases():
    cfg = parse_args(["--use-adasum", "--no-cuda", "--use-mixed-precision"])
    assert (cfg.adasum, cfg.device, cfg.amp) == (True, "cpu", "auto")
    cfg = parse_args(
        ["--log-interval", "10", "--test-batch-size", "100", "--gradient-predivide-factor", "2"]
    )
    assert (cfg.log_interval, cfg.test_batch_size, cfg.gradient_predivide_factor) == (10, 100, 2.0)
    plain = parse_args([])
    assert (plain.adasum, plain.device, plain.amp) == (False, "auto", "off")


def test_resume_alone_or_with_a_path():
    from hvdsgd.config import RESUME_OUT

    assert parse_args(["--resume"]).resume == RESUME_OUT
    assert parse_args(["--resume", "runs/x/checkpoint.pt"]).resume == "runs/x/checkpoint.pt"
    assert parse_args([]).resume == ""


def test_help_lists_the_models_and_version_names_the_stack(capsys):
    from hvdsgd.models import NAMES

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ", ".join(NAMES) in out
    with pytest.raises(SystemExit):
        parse_args(["--version"])
    assert capsys.readouterr().out.startswith("hvdsgd 0.")


def test_torchrun_without_horovod_is_one_line_on_rank_0(monkeypatch):
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        UsageError,
        match="started by torchrun as 2 processes.*launch with: "
        "horovodrun -np 2 python -m hvdsgd.train",
    ):
        parse_args([])
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(UsageError, match="started by mpirun as 4 processes"):
        parse_args([])


@pytest.mark.parametrize(
    "name", ["dataset", "optimizer", "scheduler", "device", "strategy", "on_worker_failure"]
)
def test_every_choice_is_validated_from_its_literal_type(name):
    import typing

    from hvdsgd import config

    values = config.choices_of(config.hints(TrainConfig)[name])
    assert values and getattr(TrainConfig(), name) in values
    with pytest.raises(UsageError) as e:
        TrainConfig(**{name: "nope"})
    assert str(e.value) == (
        f"unknown {name.replace('_', ' ')} 'nope'; choose one of: {', '.join(values)}"
    )
    assert config.STRATEGIES == typing.get_args(config.Strategy)
    assert config.SHARED_STRATEGIES == config.STRATEGIES[1:]


def test_fields_are_grouped_by_concern_and_stay_flat(capsys):
    from hvdsgd import config

    cfg = TrainConfig(workers=3, lr=0.5)
    assert (cfg.workers, cfg.lr) == (3, 0.5) and TrainConfig(**cfg.to_dict()) == cfg
    groups = dict(config.field_groups(TrainConfig))
    assert [f.name for f in groups["shared-buffer strategies (hogwild, sync, ...)"]] == [
        "workers",
        "shards",
        "eval_interval",
        "on_worker_failure",
    ]
    assert sum(len(fs) for fs in groups.values()) == len(dataclasses.fields(TrainConfig))
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    body = out[out.index("options:") :]
    starts = [body.index(f"\n{title}:\n") for title in groups] + [len(body)]
    for i, fields in enumerate(groups.values()):
        for f in fields:  # each flag under its group's title, before the next title
            assert starts[i] < body.index(f"\n  --{f.name.replace('_', '-')}") < starts[i + 1]
    assert "(default: 0.5)" in body and "(default: allreduce)" in body
