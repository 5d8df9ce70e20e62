"""Configuration by concern: option groups (dataclasses) composed into each entry point's config.

Each group holds the fields of one concern (the data set and model, the optimisation, the
device, the strategy, the shared buffer, the run directory, checkpoints and logs, the
profiler) and checks them in ``check()``. :class:`TrainConfig` composes every group by
multiple inheritance, so its fields stay flat (``cfg.lr``, ``cfg.workers``);
``hvdsgd.sweep.TaskConfig`` composes only the groups that apply to independent tasks.

Every field carries its one-line doc in ``metadata["help"]``; the command line is generated
from the fields (one argument group per concern, defaults shown in ``--help``), and
``--config FILE.toml`` supplies defaults that explicit flags override. A field with a fixed
set of values is typed ``Literal[...]`` and validated from that type.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from .errors import ArgumentParser, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the same parser, from PyPI
    import tomli as tomllib

Dataset = Literal["digits", "mnist", "cifar10", "cifar100", "synthetic"]
Optimizer = Literal["sgd", "adamw"]
Scheduler = Literal["warm", "cosine", "step", "constant"]
AmpMode = Literal["off", "bf16", "fp16", "auto"]
Device = Literal["auto", "cpu", "cuda"]
Strategy = Literal[
    "allreduce",
    "hogwild",
    "lockfree",
    "atomic",
    "locked",
    "sharded",
    "sync",
    "async-apply",
    "async-deferred",
]
FailureMode = Literal["abort", "continue"]

DATASETS = typing.get_args(Dataset)
OPTIMIZERS = typing.get_args(Optimizer)
SCHEDULERS = typing.get_args(Scheduler)
AMP_MODES = typing.get_args(AmpMode)
DEVICES = typing.get_args(Device)
STRATEGIES = typing.get_args(Strategy)
SHARED_STRATEGIES = STRATEGIES[1:]  # one shared-memory buffer, CPU worker processes
FAILURE_MODES = typing.get_args(FailureMode)
MAX_CLASSES = 10_000  # the confusion matrix is classes x classes on every rank
RESUME_OUT = "<--out>"  # `--resume` alone: the checkpoint in --out


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and its one-line ``--help`` (``kw``: more argparse)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Options:
    """The base of every option group: on construction the field types and ``Literal``
    choices are checked, then every group's ``check()`` in turn (each calls ``super()``
    first, so a group may rely on the types being right)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        check_types(self)
        check_choices(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DataOptions(Options):
    """What to train on: the data set, the model, the seed."""

    TITLE = "data set and model"

    model: str = option("cnn", "model")
    dataset: Dataset = option("digits", "data set")
    data_dir: str = option("data", "directory holding the mnist/cifar files")
    download: bool = option(
        False, "download mnist/cifar into --data-dir if missing (needs internet)"
    )
    synthetic: bool = option(False, "random data shaped like --dataset, for throughput (no files)")
    input_shape: str = option("3,32,32", "C,H,W of --dataset synthetic")
    num_classes: int = option(10, "classes of --dataset synthetic")
    synthetic_samples: int = option(4096, "training samples of synthetic data")
    seed: int = option(42, "random seed (same on every rank)")

    def check(self) -> None:
        super().check()
        from .models import NAMES  # late: models imports torch

        choice("model", self.model, NAMES)
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise UsageError(
                f"--num-classes must be between 2 and {MAX_CLASSES:,} (got "
                f"{self.num_classes:,}): every rank keeps a classes x classes confusion matrix"
            )
        at_least(self, 1, "synthetic_samples")
        parse_shape(self.input_shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``input_shape`` parsed as (C, H, W)."""
        return parse_shape(self.input_shape)


@dataclass
class OptimOptions(Options):
    """How each model trains: epochs, batches, the optimiser and its schedule, precision."""

    TITLE = "training and optimisation"

    epochs: int = option(15, "passes over the training set")
    batch_size: int = option(32, "samples per rank per step")
    lr: float = option(
        0.01, "base learning rate per rank; scaled by the world size (not with --adasum)"
    )
    momentum: float = option(0.9, "SGD momentum (AdamW: beta1)")
    weight_decay: float = option(1e-4, "L2 regularisation (decoupled for AdamW)")
    optimizer: Optimizer = option("sgd", "optimiser")
    scheduler: Scheduler = option(
        "warm", "learning-rate schedule; warm: linear warm-up, then cosine"
    )
    warmup_epochs: float = option(2.0, "epochs of linear warm-up from lr to lr * world size")
    accum_steps: int = option(1, "backward passes per update (Horovod backward_passes_per_step)")
    amp: AmpMode = option(
        "off",
        "mixed precision: bf16 (CPU, GPU), fp16 with GradScaler (GPU), or auto "
        "(fp16 on a GPU, bf16 on CPU; what --use-mixed-precision sets)",
    )
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)")
    channels_last: bool = option(False, "NHWC memory format for conv nets")
    dry_run: bool = option(False, "one epoch of two batches, to check the set-up quickly")

    def check(self) -> None:
        super().check()
        at_least(self, 1, "epochs", "batch_size", "accum_steps")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0 (got {self.lr}); try 0.01")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1) (got {self.momentum})")
        at_least(self, 0, "weight_decay", "warmup_epochs", "grad_clip")


@dataclass
class DeviceOptions(Options):
    """Where a rank trains and how its batches are prepared (hvdsgd.train only)."""

    TITLE = "device and input pipeline"

    device: Device = option("auto", "where to train (auto: a GPU if there is one)")
    gpu: int = option(
        -1,
        "GPU index of a single-process run (-1: under horovodrun, each rank's "
        "local rank; alone, GPU 0)",
    )
    threads: int = option(0, "compute threads per rank (0: cores / ranks on this host)")
    pin_memory: bool | None = option(None, "page-locked host batches (default: on with CUDA)")
    loader_workers: int = option(
        0, "background processes preparing batches (0: batches sliced in place)"
    )
    test_batch_size: int = option(0, "samples per evaluation batch (0: max(256, --batch-size))")

    def check(self) -> None:
        super().check()
        at_least(self, 0, "threads", "loader_workers", "test_batch_size")
        if self.gpu < -1:
            raise UsageError(f"--gpu must be a GPU index >= 0 (got {self.gpu})")
        if self.gpu >= 0 and self.device == "cpu":
            raise UsageError(
                f"--gpu {self.gpu} and --device cpu (or --no-cuda) exclude each other; drop one"
            )


@dataclass
class StrategyOptions(Options):
    """How gradients become updates, and the Horovod allreduce options."""

    TITLE = "strategy and Horovod allreduce"

    strategy: Strategy = option("allreduce", "how gradients become updates")
    fp16_allreduce: bool = option(False, "compress gradients to fp16 for the allreduce")
    adasum: bool = option(False, "combine gradients with Adasum instead of averaging")
    gradient_predivide_factor: float = option(
        0.0,
        "divide gradients by this before the allreduce "
        "and by ranks / this after (Horovod's option; 0: by "
        "ranks before, no pass after)",
    )
    bucket_mb: float = option(
        25.0, "CPU: allreduce gradients in groups of about this many MB (as DDP)"
    )
    commit_every: int = option(
        100,
        "elastic runs (horovodrun --min-np/--max-np): steps between "
        "in-memory commits of the training state; a lost rank costs at most "
        "this many steps redone (every epoch end commits too)",
    )

    def check(self) -> None:
        super().check()
        at_least(self, 1, "commit_every")
        at_least(self, 0, "gradient_predivide_factor")
        positive(self, "bucket_mb")
        if self.adasum and self.gradient_predivide_factor not in (0.0, 1.0):
            raise UsageError(
                "--gradient-predivide-factor applies to averaging, not --adasum; drop one"
            )


@dataclass
class SharedBufferOptions(Options):
    """The worker processes of the shared-buffer strategies."""

    TITLE = "shared-buffer strategies (hogwild, sync, ...)"

    workers: int = option(
        2, "worker processes of the shared-buffer strategies (hogwild, sync, ...)"
    )
    shards: int = option(2, "locks of --strategy sharded: the buffer is cut into this many shards")
    eval_interval: float = option(0.5, "shared-buffer strategies: seconds between test evaluations")
    on_worker_failure: FailureMode = option(
        "abort", "a shared-buffer worker died: abort (stop the rest) or continue (the rest finish)"
    )

    def check(self) -> None:
        super().check()
        at_least(self, 1, "workers", "shards")
        positive(self, "eval_interval")


@dataclass
class OutputOptions(Options):
    """Where the results go."""

    TITLE = "run directory"

    out: str = option("runs/train", "run directory: metrics, summary, plots, checkpoint")
    overwrite: bool = option(
        False, "start over in an --out that holds an earlier run's results (deleting them)"
    )
    progress: bool = option(True, "show a progress bar on rank 0")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)


@dataclass
class RunOptions(Options):
    """Checkpoints, resuming and training logs (hvdsgd.train only)."""

    TITLE = "checkpoints and logs"

    resume: str = option(
        "",
        "continue a run: --resume alone takes --out's checkpoint; --resume PATH "
        "a checkpoint file or run directory (--epochs counts every epoch)",
    )
    checkpoint: bool = option(True, "save a checkpoint in --out after every epoch")
    keep_checkpoints: bool = option(
        False, "also keep each epoch's checkpoint as checkpoint-epochN.pt"
    )
    log_interval: int = option(
        0, "batches between progress lines when stderr is not a terminal (0: one line every 10 s)"
    )
    tensorboard: bool = option(
        False,
        "also write TensorBoard event files into --out (the scalars of metrics.jsonl, per epoch)",
    )
    plots: bool = option(
        True,
        "draw curves.png and confusion.png into --out at the end (--no-plots: for scripted "
        "runs that read metrics.jsonl; drawing costs rank 0 over a second of CPU)",
    )

    def check(self) -> None:
        if isinstance(self.resume, bool):  # TOML `resume = true`, or a Python caller
            self.resume = RESUME_OUT if self.resume else ""
        super().check()
        at_least(self, 0, "log_interval")


@dataclass
class ProfileOptions(Options):
    """The utilisation profiler of a training run."""

    TITLE = "profiler"

    profile: bool = option(
        False,
        "record GPU (NVML/GPM) and CPU utilisation into --out: "
        "profile[-rankN].csv/json/png, one sampler per rank",
    )
    profile_interval: float = option(0.1, "seconds between --profile samples")

    def check(self) -> None:
        super().check()
        positive(self, "profile_interval")
        from .profiler.sampler import MAX_INTERVAL_S

        if self.profile_interval > MAX_INTERVAL_S:
            raise UsageError(
                f"--profile-interval must be <= {MAX_INTERVAL_S:.0f} seconds (got "
                f"{self.profile_interval:g})"
            )


# Dataclass fields come last base first: data, optimisation, device, strategy, shared buffer,
# run directory, checkpoints and logs, profiler (the order of --help and of to_dict()).
@dataclass
class TrainConfig(
    ProfileOptions,
    RunOptions,
    OutputOptions,
    SharedBufferOptions,
    StrategyOptions,
    DeviceOptions,
    OptimOptions,
    DataOptions,
):
    """What to train, on what, and how; see ``python -m hvdsgd.train --help``."""

    def check(self) -> None:
        super().check()
        if self.resume and self.overwrite:
            raise UsageError(
                "--resume continues the run in --out and --overwrite deletes it; pick one"
            )
        if self.strategy in SHARED_STRATEGIES:
            check_shared(self)


def check_shared(cfg: TrainConfig) -> None:
    """Flags that the shared-buffer strategies (CPU processes, C++ SGD kernel) cannot honour."""
    s = f"--strategy {cfg.strategy}"
    if cfg.device == "cuda":
        raise UsageError(
            f"{s} trains on CPU worker processes; drop --device cuda or use --strategy allreduce"
        )
    if cfg.optimizer != "sgd":
        raise UsageError(f"{s} updates with the C++ SGD kernel; use --optimizer sgd")
    if cfg.amp == "fp16":
        raise UsageError(
            f"{s} runs on CPU, where fp16 autocast has no loss scaling; use --amp bf16"
        )
    for name in ("fp16_allreduce", "adasum", "resume"):
        if getattr(cfg, name):
            raise UsageError(f"--{flag(name)} applies to --strategy allreduce only; drop it")
    if cfg.strategy == "sharded" and cfg.shards < 2:
        raise UsageError(f"--strategy sharded needs --shards >= 2 (got {cfg.shards})")
    if cfg.strategy == "sync" and cfg.on_worker_failure == "continue":
        raise UsageError(
            "--strategy sync waits for every worker at each step, so it cannot "
            "continue without one; use --on-worker-failure abort"
        )


# ------------------------------------------------------------------------------ checks


def parse_shape(text: str) -> tuple[int, int, int]:
    """``--input-shape`` C,H,W as three ints >= 1, or a UsageError naming the form."""
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be C,H,W like 3,32,32 (got {text!r})") from None
    if min(c, h, w) < 1:
        raise UsageError(f"--input-shape entries must be >= 1 (got {text!r})")
    return c, h, w


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type of every field of ``cls`` (``Literal[...]``, ``bool | None``, ...)."""
    return typing.get_type_hints(cls)


def choices_of(hint: Any) -> tuple | None:
    """The values of a ``Literal[...]`` type; None for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def value_type(hint: Any) -> type:
    """The Python type a field holds: a Literal's values' type, ``bool`` of ``bool | None``."""
    if choices_of(hint):
        return type(choices_of(hint)[0])
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def check_choices(cfg: Options) -> None:
    """Every ``Literal`` field holds one of its values."""
    for name, hint in hints(type(cfg)).items():
        values = choices_of(hint)
        if values is not None:
            choice(name.replace("_", " "), getattr(cfg, name), values)


def check_types(cfg: Options) -> None:
    """Values from TOML or Python callers must match the field types (int is fine for float),
    and every float must be finite: the one check behind every float flag."""
    types = hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, want = getattr(cfg, f.name), value_type(types[f.name])
        if value is None and type(None) in typing.get_args(types[f.name]):
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            ok = True
        if not ok:
            raise UsageError(f"--{flag(f.name)} must be {want.__name__}, got {value!r}")
        if want is float and not math.isfinite(getattr(cfg, f.name)):
            raise UsageError(f"--{flag(f.name)} must be a finite number (got {value!r})")


def at_least(cfg: Options, low: int, *names: str) -> None:
    """Each named numeric field >= ``low``, or one line naming the first that is not."""
    for name in names:
        if getattr(cfg, name) < low:
            raise UsageError(f"--{flag(name)} must be >= {low} (got {getattr(cfg, name)})")


def positive(cfg: Options, *names: str) -> None:
    """Each named numeric field > 0, or one line naming the first that is not."""
    for name in names:
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{flag(name)} must be > 0 (got {getattr(cfg, name)})")


def choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def flag(name: str) -> str:
    """The command-line flag of a field, without its dashes: ``batch_size`` -> batch-size."""
    return name.replace("_", "-")


# ------------------------------------------------------------------------ command line


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every help line; the description and examples keep their line breaks."""


class _Refuse(argparse.Action):
    """A flag of another entry point: one UsageError line naming the fix, at parse time."""

    def __init__(self, option_strings, dest, message: str = "", **kw):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise UsageError(self.message)


def field_groups(cls: type) -> list[tuple[str, list[dataclasses.Field]]]:
    """``cls``'s fields by the option group that defines them, in field order (a field that a
    subclass redefines, for a new default, stays in its group)."""
    fields = dataclasses.fields(cls)
    owner: dict[str, type] = {}
    for base in reversed(cls.__mro__):
        for name in base.__dict__.get("__annotations__", {}):
            owner.setdefault(name, base)
    groups: dict[str, list] = {}
    for f in fields:
        base = owner[f.name]
        groups.setdefault(base.__dict__.get("TITLE", base.__name__), []).append(f)
    return list(groups.items())


def add_field(group, f: dataclasses.Field, hint: Any) -> None:
    """One flag for the field ``f`` of type ``hint``."""
    from .models import NAMES  # late: models imports torch

    name, help_, kw = "--" + flag(f.name), f.metadata["help"], {"dest": f.name}
    values = choices_of(hint)
    if f.name == "model":
        group.add_argument(
            name, **kw, default=f.default, metavar="MODEL", help=f"{help_}: {', '.join(NAMES)}"
        )
    elif f.name == "resume":
        group.add_argument(
            name, **kw, nargs="?", const=RESUME_OUT, default=f.default, metavar="PATH", help=help_
        )
    elif value_type(hint) is bool:  # --x / --no-x; None (pin_memory): decided later
        group.add_argument(
            name, **kw, action=argparse.BooleanOptionalAction, default=f.default, help=help_
        )
    elif f.name == "amp":  # `--amp` alone means bf16
        group.add_argument(
            name, **kw, nargs="?", const="bf16", default=f.default, choices=values, help=help_
        )
    else:
        group.add_argument(
            name,
            **kw,
            type=value_type(hint),
            default=f.default,
            metavar="{" + ",".join(values) + "}" if values else f.name.upper(),
            help=help_,
        )


def build_parser(
    cls: type = TrainConfig,
    prog: str = "python -m hvdsgd.train",
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, grouped by concern, defaults
    shown in help. ``cls.REFUSED`` (flag -> message), if any: flags of other entry points,
    refused in one line naming the fix."""
    from . import __version__

    p = ArgumentParser(
        prog=prog, description=description or cls.__doc__, epilog=epilog, formatter_class=_Formatter
    )
    p.add_argument("--version", action="version", version=version_line(__version__))
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of field = value defaults (top level, or all under one [train] table)",
    )
    types = hints(cls)
    for title, fields in field_groups(cls):
        group = p.add_argument_group(title)
        for f in fields:
            add_field(group, f, types[f.name])
    for name, message in getattr(cls, "REFUSED", {}).items():
        p.add_argument("--" + name, action=_Refuse, message=message, default=argparse.SUPPRESS)
    # Horovod's example scripts' flags, for users who bring their launch lines along.
    names = set(types)
    aliases = p.add_argument_group("Horovod example flags (aliases)")
    if "adasum" in names:
        aliases.add_argument(
            "--use-adasum",
            dest="adasum",
            action="store_true",
            default=argparse.SUPPRESS,
            help="= --adasum",
        )
    if "device" in names:
        aliases.add_argument(
            "--no-cuda",
            dest="device",
            action="store_const",
            const="cpu",
            default=argparse.SUPPRESS,
            help="= --device cpu",
        )
    if "amp" in names:
        aliases.add_argument(
            "--use-mixed-precision",
            dest="amp",
            action="store_const",
            default=argparse.SUPPRESS,
            const="auto",
            help="= --amp auto (fp16 on a GPU, bf16 on CPU)",
        )
    return p


def version_line(version: str) -> str:
    """``hvdsgd X (torch Y, horovod Z)`` from the installed distributions, importing neither."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"hvdsgd {version} (torch {installed('torch')}, horovod {installed('horovod')})"


def load_toml(path: str, cls: type = TrainConfig) -> dict[str, Any]:
    """Field values from a TOML file (``lr = 0.1`` or ``batch-size = 64``, top level or [train])."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})") from None
    if "train" in data and isinstance(data["train"], dict):
        if len(data) > 1:
            others = ", ".join(k for k in data if k != "train")
            raise UsageError(
                f"--config {path}: keys at the top level ({others}) and a [train] "
                "table; put them all in one place"
            )
        data = data["train"]
    names, refused = {f.name for f in dataclasses.fields(cls)}, getattr(cls, "REFUSED", {})
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if flag(name) in refused:
            raise UsageError(f"--config {path}: {refused[flag(name)]}")
        if name not in names:
            raise UsageError(f"--config {path}: unknown key {key!r}")
        out[name] = value
    return out


def parse_args(argv: Sequence[str] | None = None, cls: type = TrainConfig, **parser_kw):
    """Command line (and optional TOML file) -> a validated ``cls`` instance."""
    parser = build_parser(cls, **parser_kw)
    known, _ = parser.parse_known_args(argv)
    from .dist import check_launcher  # late: dist imports torch

    check_launcher(parser.prog)
    if known.config:
        parser.set_defaults(**load_toml(known.config, cls))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return cls(**args)
