"""Hardware-aware fine-tuning: optax training under simulated crossbar noise, checkpoints."""

from jaxbar.train.augment import batch_indices, epoch_permutation, random_crop_flip
from jaxbar.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from jaxbar.train.loop import TrainOptions, Trainer, TrainState, clip_kernel, read_log
from jaxbar.train.ranges import (
    LearnedRangesAnalog,
    init_ranges,
    range_values,
    ranges_to_calibration,
    with_learned_ranges,
)

__all__ = [
    "CheckpointError",
    "LearnedRangesAnalog",
    "TrainOptions",
    "TrainState",
    "Trainer",
    "batch_indices",
    "clip_kernel",
    "epoch_permutation",
    "init_ranges",
    "latest_checkpoint",
    "random_crop_flip",
    "range_values",
    "ranges_to_calibration",
    "read_log",
    "restore_checkpoint",
    "save_checkpoint",
    "with_learned_ranges",
]
