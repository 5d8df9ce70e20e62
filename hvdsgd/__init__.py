"""hvdsgd: parallel and distributed training of neural networks with PyTorch.

- ``python -m hvdsgd.train``: synchronous data-parallel SGD on Horovod (Gloo on CPUs,
  NCCL on GPUs), one host or many.
- ``hvdsgd._C``: the compiled update kernels over flat float32 buffers.
"""

from .config import TrainConfig, parse_args
from .errors import UsageError

__version__ = "0.1.0"

__all__ = ["TrainConfig", "UsageError", "parse_args", "sgd_step", "train", "__version__"]


def __getattr__(name):
    # Lazy: importing hvdsgd must not import Horovod or the compiled module.
    if name == "sgd_step":
        from ._C import sgd_step

        return sgd_step
    if name == "train":
        from .train import train

        return train
    raise AttributeError(f"module 'hvdsgd' has no attribute {name!r}")
