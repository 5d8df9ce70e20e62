"""Training configuration: one typed dataclass, validated on construction.

Every field carries its one-line doc in ``metadata["help"]``; the command line is generated
from the fields (defaults shown in ``--help``), and ``--config FILE.toml`` supplies defaults
that explicit flags override.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ArgumentParser, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10: the same parser, from PyPI
    import tomli as tomllib

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "synthetic")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("warm", "cosine", "step", "constant")
AMP_MODES = ("off", "bf16", "fp16", "auto")
STRATEGIES = (
    "allreduce",
    "hogwild",
    "lockfree",
    "atomic",
    "locked",
    "sharded",
    "sync",
    "async-apply",
    "async-deferred",
)
SHARED_STRATEGIES = STRATEGIES[1:]  # one shared-memory buffer, CPU worker processes
FAILURE_MODES = ("abort", "continue")
DEVICES = ("auto", "cpu", "cuda")
MAX_CLASSES = 10_000  # the confusion matrix is classes x classes on every rank


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default and its one-line ``--help`` (``kw``: more argparse)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """What to train, on what, and how; see ``python -m hvdsgd.train --help``."""

    model: str = option("cnn", "model")
    dataset: str = option("digits", "data set: " + ", ".join(DATASETS))
    data_dir: str = option("data", "directory holding the mnist/cifar files")
    download: bool = option(
        False, "download mnist/cifar into --data-dir if missing (needs internet)"
    )
    synthetic: bool = option(False, "random data shaped like --dataset, for throughput (no files)")
    input_shape: str = option("3,32,32", "C,H,W of --dataset synthetic")
    num_classes: int = option(10, "classes of --dataset synthetic")
    synthetic_samples: int = option(4096, "training samples of synthetic data")
    epochs: int = option(15, "passes over the training set")
    batch_size: int = option(32, "samples per rank per step")
    lr: float = option(
        0.01, "base learning rate per rank; scaled by the world size (not with --adasum)"
    )
    momentum: float = option(0.9, "SGD momentum (AdamW: beta1)")
    weight_decay: float = option(1e-4, "L2 regularisation (decoupled for AdamW)")
    optimizer: str = option("sgd", "sgd or adamw")
    scheduler: str = option("warm", "warm (linear warm-up then cosine), cosine, step, constant")
    warmup_epochs: float = option(2.0, "epochs of linear warm-up from lr to lr * world size")
    accum_steps: int = option(1, "backward passes per update (Horovod backward_passes_per_step)")
    amp: str = option(
        "off",
        "mixed precision: bf16 (CPU, GPU), fp16 with GradScaler (GPU), or auto "
        "(fp16 on a GPU, bf16 on CPU; what --use-mixed-precision sets)",
    )
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
    channels_last: bool = option(False, "NHWC memory format for conv nets")
    pin_memory: bool | None = option(None, "page-locked host batches (default: on with CUDA)")
    loader_workers: int = option(
        0, "background processes preparing batches (0: batches sliced in place)"
    )
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)")
    test_batch_size: int = option(0, "samples per evaluation batch (0: max(256, --batch-size))")
    seed: int = option(42, "random seed (same on every rank)")
    device: str = option("auto", "auto, cpu or cuda")
    gpu: int = option(
        -1,
        "GPU index of a single-process run (-1: under horovodrun, each rank's "
        "local rank; alone, GPU 0)",
    )
    threads: int = option(0, "compute threads per rank (0: cores / ranks on this host)")
    strategy: str = option("allreduce", "how gradients become updates: " + ", ".join(STRATEGIES))
    workers: int = option(
        2, "worker processes of the shared-buffer strategies (hogwild, sync, ...)"
    )
    shards: int = option(2, "locks of --strategy sharded: the buffer is cut into this many shards")
    eval_interval: float = option(0.5, "shared-buffer strategies: seconds between test evaluations")
    on_worker_failure: str = option(
        "abort", "a shared-buffer worker died: abort (stop the rest) or continue (the rest finish)"
    )
    out: str = option("runs/train", "run directory: metrics, summary, plots, checkpoint")
    resume: str = option(
        "",
        "continue a run: --resume alone takes --out's checkpoint; --resume PATH "
        "a checkpoint file or run directory (--epochs counts every epoch)",
    )
    overwrite: bool = option(
        False, "start over in an --out that holds an earlier run's results (deleting them)"
    )
    checkpoint: bool = option(True, "save a checkpoint in --out after every epoch")
    commit_every: int = option(
        100,
        "elastic runs (horovodrun --min-np/--max-np): steps between "
        "in-memory commits of the training state; a lost rank costs at most "
        "this many steps redone (every epoch end commits too)",
    )
    keep_checkpoints: bool = option(
        False, "also keep each epoch's checkpoint as checkpoint-epochN.pt"
    )
    dry_run: bool = option(False, "one epoch of two batches, to check the set-up quickly")
    progress: bool = option(True, "show a progress bar on rank 0")
    log_interval: int = option(
        0, "batches between progress lines when stderr is not a terminal (0: one line every 10 s)"
    )
    tensorboard: bool = option(
        False,
        "also write TensorBoard event files into --out (the scalars of metrics.jsonl, per epoch)",
    )
    profile: bool = option(
        False,
        "record GPU (NVML/GPM) and CPU utilisation into --out: "
        "profile[-rankN].csv/json/png, one sampler per rank",
    )
    profile_interval: float = option(0.1, "seconds between --profile samples")

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # TOML `resume = true`, or a Python caller
            self.resume = RESUME_OUT if self.resume else ""
        _check_types(self)
        _check_choices(self)
        _check_ranges(self)
        _check_combinations(self)
        _parse_shape(self.input_shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``input_shape`` parsed as (C, H, W)."""
        return _parse_shape(self.input_shape)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse_shape(text: str) -> tuple[int, int, int]:
    """``--input-shape`` C,H,W as three ints >= 1, or a UsageError naming the form."""
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--input-shape must be C,H,W like 3,32,32 (got {text!r})") from None
    if min(c, h, w) < 1:
        raise UsageError(f"--input-shape entries must be >= 1 (got {text!r})")
    return c, h, w


def _check_choices(cfg: "TrainConfig") -> None:
    """Every flag with a fixed set of values holds one of them."""
    from .models import NAMES  # late: models imports torch

    _choice("model", cfg.model, NAMES)
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("scheduler", cfg.scheduler, SCHEDULERS)
    _choice("amp", cfg.amp, AMP_MODES)
    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("device", cfg.device, DEVICES)
    _choice("on_worker_failure", cfg.on_worker_failure, FAILURE_MODES)


def _check_at_least(cfg: "TrainConfig", low: int, names: Sequence[str]) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise UsageError(f"--{_flag(name)} must be >= {low} (got {getattr(cfg, name)})")


def _check_ranges(cfg: "TrainConfig") -> None:
    """Every numeric flag within its range, one line naming the first that is not."""
    _check_at_least(
        cfg,
        1,
        (
            "epochs",
            "batch_size",
            "accum_steps",
            "num_classes",
            "synthetic_samples",
            "workers",
            "shards",
            "commit_every",
        ),
    )
    if not 2 <= cfg.num_classes <= MAX_CLASSES:
        raise UsageError(
            f"--num-classes must be between 2 and {MAX_CLASSES:,} (got "
            f"{cfg.num_classes:,}): every rank keeps a classes x classes "
            "confusion matrix"
        )
    if not cfg.lr > 0:
        raise UsageError(f"--lr must be > 0 (got {cfg.lr}); try 0.01")
    if not 0 <= cfg.momentum < 1:
        raise UsageError(f"--momentum must be in [0, 1) (got {cfg.momentum})")
    for name in ("bucket_mb", "profile_interval", "eval_interval"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{_flag(name)} must be > 0 (got {getattr(cfg, name)})")
    _check_at_least(
        cfg,
        0,
        (
            "weight_decay",
            "warmup_epochs",
            "grad_clip",
            "loader_workers",
            "threads",
            "test_batch_size",
            "log_interval",
            "gradient_predivide_factor",
        ),
    )
    from .profiler.sampler import MAX_INTERVAL_S

    if cfg.profile_interval > MAX_INTERVAL_S:
        raise UsageError(
            f"--profile-interval must be <= {MAX_INTERVAL_S:.0f} seconds (got "
            f"{cfg.profile_interval:g})"
        )
    if cfg.gpu < -1:
        raise UsageError(f"--gpu must be a GPU index >= 0 (got {cfg.gpu})")


def _check_combinations(cfg: "TrainConfig") -> None:
    """Flags that exclude each other, and those the shared-buffer strategies cannot honour."""
    if cfg.gpu >= 0 and cfg.device == "cpu":
        raise UsageError(
            f"--gpu {cfg.gpu} and --device cpu (or --no-cuda) exclude each other; drop one"
        )
    if cfg.adasum and cfg.gradient_predivide_factor not in (0.0, 1.0):
        raise UsageError("--gradient-predivide-factor applies to averaging, not --adasum; drop one")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite deletes it; pick one")
    if cfg.strategy in SHARED_STRATEGIES:
        _check_shared(cfg)


def _check_shared(cfg: "TrainConfig") -> None:
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
    for flag in ("fp16_allreduce", "adasum", "resume"):
        if getattr(cfg, flag):
            raise UsageError(f"--{_flag(flag)} applies to --strategy allreduce only; drop it")
    if cfg.strategy == "sharded" and cfg.shards < 2:
        raise UsageError(f"--strategy sharded needs --shards >= 2 (got {cfg.shards})")
    if cfg.strategy == "sync" and cfg.on_worker_failure == "continue":
        raise UsageError(
            "--strategy sync waits for every worker at each step, so it cannot "
            "continue without one; use --on-worker-failure abort"
        )


def _field_type(f: dataclasses.Field) -> type:
    """The Python type a field holds (``bool | None`` fields hold a bool)."""
    if f.default is None:
        return bool if "bool" in str(f.type) else str
    return float if isinstance(f.default, float) else type(f.default)


def _check_types(cfg: Any) -> None:
    """Values from TOML or Python callers must match the field types (int is fine for float),
    and every float must be finite: the one check behind every float flag."""
    for f in dataclasses.fields(cfg):
        value, want = getattr(cfg, f.name), _field_type(f)
        if value is None and f.default is None:
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            ok = True
        if not ok:
            raise UsageError(f"--{_flag(f.name)} must be {want.__name__}, got {value!r}")
        if want is float and not math.isfinite(getattr(cfg, f.name)):
            raise UsageError(f"--{_flag(f.name)} must be a finite number (got {value!r})")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


RESUME_OUT = "<--out>"  # `--resume` alone: the checkpoint in --out


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every help line; the description and examples keep their line breaks."""


def build_parser(
    cls: type = TrainConfig,
    prog: str = "python -m hvdsgd.train",
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, defaults shown in help."""
    from . import __version__
    from .models import NAMES  # late: models imports torch

    p = ArgumentParser(
        prog=prog, description=description or cls.__doc__, epilog=epilog, formatter_class=_Formatter
    )
    p.add_argument("--version", action="version", version=version_line(__version__))
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of field = value defaults (top level, or all under one [train] table)",
    )
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        flag, help_ = "--" + _flag(f.name), f.metadata["help"]
        if f.name == "model":
            p.add_argument(
                flag,
                dest=f.name,
                default=f.default,
                metavar="MODEL",
                help=f"{help_}: {', '.join(NAMES)}",
            )
        elif f.name == "resume":
            p.add_argument(
                flag,
                dest=f.name,
                nargs="?",
                const=RESUME_OUT,
                default=f.default,
                metavar="PATH",
                help=help_,
            )
        elif f.type in ("bool", bool) or isinstance(f.default, bool):
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=help_,
            )
        elif f.name == "amp":  # `--amp` alone means bf16
            p.add_argument(
                flag,
                dest=f.name,
                nargs="?",
                const="bf16",
                default=f.default,
                choices=AMP_MODES,
                help=help_,
            )
        elif f.type in ("bool | None",):
            p.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        else:
            kind = type(f.default) if f.default is not None else str
            p.add_argument(
                flag, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(), help=help_
            )
    # Horovod's example scripts' flags, for users who bring their launch lines along.
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
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
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
