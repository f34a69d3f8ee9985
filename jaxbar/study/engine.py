"""Top-1 accuracy of a network over Monte Carlo trials: `evaluate`, `accuracy_stats`.

`evaluate` is `monte_carlo` with a hit counter: images and labels in padded batches, per
trial the correct predictions per class (see `jaxbar.study.montecarlo` for how trials are
programmed, looped and sharded).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy import stats

from jaxbar.nn.analogize import analog_layers
from jaxbar.nn.params_io import check_finite
from jaxbar.study.montecarlo import default_strategy, monte_carlo_stacked, shard_layout

__all__ = ["EvalResult", "accuracy_stats", "default_strategy", "evaluate", "hit_counter"]


@dataclasses.dataclass
class EvalResult:
    """Accuracy over trials.

    Attributes:
      accuracies: top-1 accuracy of each trial.
      n_images: evaluation images.
      seconds: wall time of the evaluation (compilation included).
      per_class: (T, C) per-class accuracy of each trial, if requested.
    """

    accuracies: np.ndarray
    n_images: int
    seconds: float
    per_class: np.ndarray | None = None

    @property
    def mean(self) -> float:
        """The mean accuracy over trials."""
        return float(np.mean(self.accuracies))

    @property
    def ci95(self) -> tuple[float, float]:
        """The 95% interval of the mean accuracy (see `accuracy_stats`)."""
        return accuracy_stats(self.accuracies)["ci95"]


#: How `accuracy_stats` computes its interval (stored beside it in results).
CI95_METHOD = "95% Student t-interval of the mean over trials, clipped to [0, 1]"


def accuracy_stats(acc) -> dict:
    """Mean, std (ddof 1) and the 95% t-interval of the mean over trials.

    Accuracies lie in [0, 1], so the interval is clipped to it (a few trials with a wide
    spread would otherwise reach beyond 100%).

    Returns:
      {"mean", "std", "ci95": (lo, hi), "ci95_method": `CI95_METHOD`}.
    """
    acc = np.asarray(acc, dtype=np.float64)
    n = len(acc)
    if n == 0:
        raise ValueError("accuracy_stats needs at least one trial's accuracy")
    mean = float(acc.mean())
    if n < 2:
        return {"mean": mean, "std": 0.0, "ci95": (mean, mean), "ci95_method": CI95_METHOD}
    std = float(acc.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std,
            "ci95": (max(mean - half, 0.0), min(mean + half, 1.0)), "ci95_method": CI95_METHOD}


def _batches(images, labels, batch_size, multiple: int = 1):
    """(nb, B, ...) images and (nb, B) labels as numpy; padding has label -1.

    The last batch is padded to `batch_size`, then every batch to `B`, the next multiple of
    `multiple` (the data-axis shards), at its end, so each real image keeps its batch and
    position (and with them its read-noise draws) whatever the sharding.
    """
    n = len(images)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    x = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    y = np.concatenate([labels, np.full(pad, -1, labels.dtype)])
    x = x.reshape(nb, batch_size, *images.shape[1:])
    y = y.reshape(nb, batch_size)
    extra = -(-batch_size // multiple) * multiple - batch_size
    if extra:
        x = np.concatenate([x, np.zeros((nb, extra, *images.shape[1:]), x.dtype)], axis=1)
        y = np.concatenate([y, np.full((nb, extra), -1, y.dtype)], axis=1)
    return x, y


@functools.lru_cache(maxsize=16)
def hit_counter(num_classes: int):
    """`(model, (images, labels)) -> (2, C)`: per class, correct top-1 and labelled images.

    One function object per class count, so `monte_carlo`'s compilation cache serves every
    evaluation of a model structure. Padding (label -1) counts nowhere; integer counts are
    exact in any summation order.
    """
    C = num_classes

    def count(model, batch):
        x, y = batch
        hit = (jnp.argmax(model(x), -1) == y).astype(jnp.float32)
        onehot = jax.nn.one_hot(jnp.where(y >= 0, y, 0) if C > 1 else 0 * y, C)
        onehot = onehot * (y >= 0)[:, None]
        return jnp.stack([hit @ onehot, onehot.sum(0)])

    return count


def evaluate(model: nnx.Module, images: np.ndarray, labels: np.ndarray,
             keys: jax.Array | None = None, *, batch_size: int = 256,
             strategy: str = "auto", trial_chunk: int | None = None,
             num_classes: int | None = None, progress: bool = True,
             shard: bool = True) -> EvalResult:
    """Top-1 accuracy of `model` on (images, labels) for each trial key.

    With several devices, trials shard over them; a chunk of fewer trials than devices
    (e.g. a single trial) also shards every batch over devices (see `_shards`). Accuracies
    equal those of one device either way. After `jax.distributed.initialize()` every
    process must call this with the same arguments; each gets all results.

    Args:
      model: an analog model (`jaxbar.analogize`, calibrated) or a digital one (evaluated
        once, keys ignored).
      images: preprocessed images (N, H, W, C).
      labels: int labels (N,).
      keys: (T,) trial keys; None = one trial with `key(0)`.
      batch_size: images per forward pass.
      strategy: "map", "vmap" or "auto" (by backend).
      trial_chunk: trials per compiled call (bounds memory; default 8 for vmap, 4 for map;
        when at least the device count, rounded up to a multiple of it).
      num_classes: also return per-class accuracy when given.
      progress: show a progress bar over trial chunks (on process 0).
      shard: spread over all devices (`jax.device_count()`, every process's devices after
        `jax.distributed.initialize()`); False runs on this process's first device.

    Returns:
      An `EvalResult`.

    Raises:
      ValueError: bad `strategy`, `batch_size`, `trial_chunk` or keys, images and labels
        that do not match, non-finite weights (naming the layer), or (multi-process)
        processes passed different inputs.
      ConvergenceError: an IR-drop solve did not converge with `on_nonconvergence: error`
        (naming the layer).
    """
    t0 = time.perf_counter()
    for name, v in (("batch_size", batch_size), ("trial_chunk", trial_chunk)):
        if v is not None and not (isinstance(v, int | np.integer) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"evaluate needs as many labels as images (at least one), got "
                         f"{len(images)} images and {len(labels)} labels")
    check_finite(model)
    if keys is None or not analog_layers(model):  # a digital model needs one pass
        keys = jax.random.split(jax.random.key(0), 1)
    if not keys.shape or keys.shape[0] < 1:
        raise ValueError(f"keys must be an array of T >= 1 trial keys, got shape "
                         f"{keys.shape}")
    strategy = default_strategy() if strategy == "auto" else strategy
    if strategy not in ("map", "vmap"):
        raise ValueError(f"strategy must be 'map', 'vmap' or 'auto', got {strategy!r}")
    T = keys.shape[0]
    chunk = trial_chunk or min(T, 8 if strategy == "vmap" else 4)
    # Batches padded at their ends to a multiple of the data shards the engine will use.
    d = shard_layout(chunk, jax.device_count() if shard else 1)[2]
    xs, ys = _batches(images, labels, batch_size, d)
    tot = monte_carlo_stacked(model, keys, hit_counter(num_classes or 1), (xs, ys),
                              strategy=strategy, chunk=chunk, progress=progress,
                              shard=shard).sum(1)  # (T, 2, C)
    acc = tot[:, 0].sum(1) / tot[:, 1].sum(1)
    per_class = tot[:, 0] / np.maximum(tot[:, 1], 1) if num_classes else None
    return EvalResult(acc, int(len(images)), time.perf_counter() - t0, per_class)
