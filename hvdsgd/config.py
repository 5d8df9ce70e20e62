"""Training configuration: one typed dataclass, validated on construction.

Every field carries its one-line doc in ``metadata["help"]``; the command line is generated
from the fields (defaults shown in ``--help``), and ``--config FILE.toml`` supplies defaults
that explicit flags override.
"""
from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError

DATASETS = ("digits", "mnist", "cifar10", "cifar100", "synthetic")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("warm", "cosine", "step", "constant")
AMP_MODES = ("off", "bf16", "fp16")
STRATEGIES = ("allreduce", "hogwild", "lockfree", "atomic", "locked", "sharded", "sync",
              "async-apply", "async-deferred")
SHARED_STRATEGIES = STRATEGIES[1:]  # one shared-memory buffer, CPU worker processes
FAILURE_MODES = ("abort", "continue")
DEVICES = ("auto", "cpu", "cuda")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """What to train, on what, and how; see ``python -m hvdsgd.train --help``."""

    model: str = _f("cnn", "model name (see hvdsgd.models.NAMES)")
    dataset: str = _f("digits", "data set: " + ", ".join(DATASETS))
    data_dir: str = _f("data", "directory holding the mnist/cifar files")
    download: bool = _f(False, "download mnist/cifar into --data-dir if missing (needs internet)")
    synthetic: bool = _f(False, "random data shaped like --dataset, for throughput (no files)")
    input_shape: str = _f("3,32,32", "C,H,W of --dataset synthetic")
    num_classes: int = _f(10, "classes of --dataset synthetic")
    synthetic_samples: int = _f(4096, "training samples of synthetic data")
    epochs: int = _f(15, "passes over the training set")
    batch_size: int = _f(32, "samples per rank per step")
    lr: float = _f(0.01, "base learning rate per rank; scaled by the world size (not with --adasum)")
    momentum: float = _f(0.9, "SGD momentum (AdamW: beta1)")
    weight_decay: float = _f(1e-4, "L2 regularisation (decoupled for AdamW)")
    optimizer: str = _f("sgd", "sgd or adamw")
    scheduler: str = _f("warm", "warm (linear warm-up then cosine), cosine, step, constant")
    warmup_epochs: float = _f(2.0, "epochs of linear warm-up from lr to lr * world size")
    accum_steps: int = _f(1, "backward passes per update (Horovod backward_passes_per_step)")
    amp: str = _f("off", "mixed precision: bf16 (CPU, GPU) or fp16 with GradScaler (GPU)")
    fp16_allreduce: bool = _f(False, "compress gradients to fp16 for the allreduce")
    adasum: bool = _f(False, "combine gradients with Adasum instead of averaging")
    bucket_mb: float = _f(25.0, "CPU: allreduce gradients in groups of about this many MB (as DDP)")
    channels_last: bool = _f(False, "NHWC memory format for conv nets")
    pin_memory: bool | None = _f(None, "page-locked host batches (default: on with CUDA)")
    loader_workers: int = _f(0, "background processes preparing batches (0: batches sliced in place)")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    seed: int = _f(42, "random seed (same on every rank)")
    device: str = _f("auto", "auto, cpu or cuda")
    threads: int = _f(0, "compute threads per rank (0: cores / ranks on this host)")
    strategy: str = _f("allreduce", "how gradients become updates: " + ", ".join(STRATEGIES))
    workers: int = _f(2, "worker processes of the shared-buffer strategies (hogwild, sync, ...)")
    shards: int = _f(2, "locks of --strategy sharded: the buffer is cut into this many shards")
    eval_interval: float = _f(0.5, "shared-buffer strategies: seconds between test evaluations")
    on_worker_failure: str = _f("abort", "a shared-buffer worker died: abort (stop the rest) "
                                "or continue (the rest finish)")
    out: str = _f("runs/train", "run directory: metrics, summary, plots, checkpoint")
    resume: bool = _f(False, "continue from the checkpoint in --out")
    checkpoint: bool = _f(True, "save a checkpoint in --out after every epoch")
    keep_checkpoints: bool = _f(False, "also keep each epoch's checkpoint as checkpoint-epochN.pt")
    dry_run: bool = _f(False, "one epoch of two batches, to check the set-up quickly")
    progress: bool = _f(True, "show a progress bar on rank 0")
    profile: bool = _f(False, "record GPU (NVML/GPM) and CPU utilisation into --out: "
                       "profile[-rankN].csv/json/png, one sampler per rank")
    profile_interval: float = _f(0.1, "seconds between --profile samples")

    def __post_init__(self) -> None:
        from .models import NAMES  # late: models imports torch

        _check_types(self)
        _choice("model", self.model, NAMES)
        _choice("dataset", self.dataset, DATASETS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("amp", self.amp, AMP_MODES)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("device", self.device, DEVICES)
        _choice("on_worker_failure", self.on_worker_failure, FAILURE_MODES)
        for name in ("epochs", "batch_size", "accum_steps", "num_classes", "synthetic_samples",
                     "workers", "shards"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{_flag(name)} must be >= 1 (got {getattr(self, name)})")
        if self.num_classes < 2:
            raise UsageError(f"--num-classes must be >= 2 (got {self.num_classes})")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0 (got {self.lr}); try 0.01")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1) (got {self.momentum})")
        if not self.bucket_mb > 0:
            raise UsageError(f"--bucket-mb must be > 0 (got {self.bucket_mb})")
        for name in ("weight_decay", "warmup_epochs", "grad_clip", "loader_workers", "threads"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{_flag(name)} must be >= 0 (got {getattr(self, name)})")
        if not self.profile_interval > 0:
            raise UsageError(f"--profile-interval must be > 0 seconds (got {self.profile_interval})")
        if not self.eval_interval > 0:
            raise UsageError(f"--eval-interval must be > 0 seconds (got {self.eval_interval})")
        if self.strategy in SHARED_STRATEGIES:
            _check_shared(self)
        self.shape  # validates input_shape

    @property
    def shape(self) -> tuple[int, int, int]:
        """``input_shape`` parsed as (C, H, W)."""
        try:
            c, h, w = (int(v) for v in self.input_shape.split(","))
        except ValueError:
            raise UsageError(f"--input-shape must be C,H,W like 3,32,32 (got {self.input_shape!r})")
        if min(c, h, w) < 1:
            raise UsageError(f"--input-shape entries must be >= 1 (got {self.input_shape!r})")
        return c, h, w

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_shared(cfg: "TrainConfig") -> None:
    """Flags that the shared-buffer strategies (CPU processes, C++ SGD kernel) cannot honour."""
    s = f"--strategy {cfg.strategy}"
    if cfg.device == "cuda":
        raise UsageError(f"{s} trains on CPU worker processes; drop --device cuda "
                         "or use --strategy allreduce")
    if cfg.optimizer != "sgd":
        raise UsageError(f"{s} updates with the C++ SGD kernel; use --optimizer sgd")
    if cfg.amp == "fp16":
        raise UsageError(f"{s} runs on CPU, where fp16 autocast has no loss scaling; use --amp bf16")
    for flag in ("fp16_allreduce", "adasum", "resume"):
        if getattr(cfg, flag):
            raise UsageError(f"--{_flag(flag)} applies to --strategy allreduce only; drop it")
    if cfg.strategy == "sharded" and cfg.shards < 2:
        raise UsageError(f"--strategy sharded needs --shards >= 2 (got {cfg.shards})")
    if cfg.strategy == "sync" and cfg.on_worker_failure == "continue":
        raise UsageError("--strategy sync waits for every worker at each step, so it cannot "
                         "continue without one; use --on-worker-failure abort")


def _check_types(cfg: Any) -> None:
    """Values from TOML or Python callers must match the field types (int is fine for float)."""
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if default is None or value is None:
            continue
        want = float if isinstance(default, float) else type(default)
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(cfg, f.name, float(value))
            ok = True
        if not ok:
            raise UsageError(f"{f.name} must be {want.__name__}, got {value!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one UsageError line instead of usage + exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every help line; the description and examples keep their line breaks."""


def build_parser(cls: type = TrainConfig, prog: str = "python -m hvdsgd.train",
                 description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field, defaults shown in help."""
    p = _Parser(prog=prog, description=description or cls.__doc__, epilog=epilog,
                formatter_class=_Formatter)
    p.add_argument("--config", metavar="FILE", help="TOML file of field = value defaults")
    for f in dataclasses.fields(cls):
        flag, help_ = "--" + _flag(f.name), f.metadata["help"]
        if f.type in ("bool", bool) or isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=help_)
        elif f.name == "amp":  # `--amp` alone means bf16
            p.add_argument(flag, dest=f.name, nargs="?", const="bf16", default=f.default,
                           choices=AMP_MODES, help=help_)
        elif f.type in ("bool | None",):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_)
        else:
            kind = type(f.default) if f.default is not None else str
            p.add_argument(flag, dest=f.name, type=kind, default=f.default,
                           metavar=f.name.upper(), help=help_)
    return p


def load_toml(path: str, cls: type = TrainConfig) -> dict[str, Any]:
    """Field values from a TOML file (``lr = 0.1`` or ``batch-size = 64``, top level or [train])."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file")
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path}: not valid TOML ({e})")
    data = data.get("train", data)
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
    if known.config:
        parser.set_defaults(**load_toml(known.config, cls))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    return cls(**args)
