"""Hardware-aware fine-tuning: optax training under simulated crossbar noise, checkpoints.

`fit` trains any (analogized) Flax NNX model with a user loss.

`Trainer` runs the analog network (fresh programming error and read noise every step, from the
same per-layer configs evaluation uses) in a jitted optax step; `jaxbar finetune`
(`jaxbar.train.cli`) wraps it for the CIFAR ResNets.
"""

from jaxbar.train.augment import batch_indices, epoch_permutation, random_crop_flip
from jaxbar.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from jaxbar.train.fit import FitResult, fit
from jaxbar.train.loop import (
    Trainer,
    TrainOptions,
    TrainState,
    clip_kernel,
    clip_percentiles,
    clip_weights,
    read_log,
)
from jaxbar.train.optim import make_optimizer, make_schedule

__all__ = [
    "CheckpointError",
    "FitResult",
    "TrainOptions",
    "TrainState",
    "Trainer",
    "batch_indices",
    "clip_kernel",
    "clip_percentiles",
    "clip_weights",
    "epoch_permutation",
    "fit",
    "latest_checkpoint",
    "make_optimizer",
    "make_schedule",
    "random_crop_flip",
    "read_log",
    "restore_checkpoint",
    "save_checkpoint",
]
