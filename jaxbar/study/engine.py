"""The Monte Carlo trial engine: a network's accuracy over many programmed trials.

A trial is a PRNG key. Per trial, every layer is programmed once (programming
error drawn from `fold_in(trial_key, layer)`), then all evaluation batches run on
those conductances (`lax.scan`), each batch with fresh read noise. The trial axis
runs as `lax.map` (CPU: `vmap` over weight sets makes XLA:CPU convolutions 5–7×
slower than a loop), `vmap` (accelerators) or a mix (`lax.map` over chunks that
are vmapped), in Python-level chunks so memory stays bounded and progress shows.
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
from tqdm.auto import tqdm

from jaxbar.nn.analog import Analog, LayerConfigs, program_network

__all__ = ["EvalResult", "accuracy_stats", "default_strategy", "evaluate"]


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
        return float(np.mean(self.accuracies))

    @property
    def ci95(self) -> tuple[float, float]:
        return accuracy_stats(self.accuracies)["ci95"]


def accuracy_stats(acc) -> dict:
    """Mean, std (ddof 1) and the 95% t-interval of the mean over trials."""
    acc = np.asarray(acc, dtype=np.float64)
    n = len(acc)
    mean = float(acc.mean())
    if n < 2:
        return {"mean": mean, "std": 0.0, "ci95": (mean, mean)}
    std = float(acc.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": (mean - half, mean + half)}


def default_strategy() -> str:
    """`map` on CPU, `vmap` on accelerators."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def _batches(images, labels, batch_size):
    n = len(images)
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    x = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    y = np.concatenate([labels, np.full(pad, -1, labels.dtype)])
    return (jnp.asarray(x.reshape(nb, batch_size, *images.shape[1:])),
            jnp.asarray(y.reshape(nb, batch_size)))


@functools.lru_cache(maxsize=64)
def _runner(graphdef, strategy: str, C: int, digital: bool, devices: int = 1):
    """A jitted `(state, xs, ys, keys, configs) -> (T, 2, C)` hit/count tensor."""

    def trial(state, xs, ys, key, configs):
        net = nnx.merge(graphdef, state)
        programmed, rk = None, None
        if not digital:
            tk, rk = jax.random.split(key)
            programmed = program_network(net, configs, tk)  # once per trial

        def body(carry, batch):
            xb, yb, i = batch
            if digital:
                logits = net(xb)
            else:
                logits = net(xb, Analog(configs, programmed, None, jax.random.fold_in(rk, i)))
            hit = (jnp.argmax(logits, -1) == yb).astype(jnp.float32)
            onehot = jax.nn.one_hot(jnp.where(yb >= 0, yb, 0) if C > 1 else 0 * yb, C)
            onehot = onehot * (yb >= 0)[:, None]
            return carry + jnp.stack([hit @ onehot, onehot.sum(0)]), None

        tot, _ = jax.lax.scan(body, jnp.zeros((2, C)), (xs, ys, jnp.arange(xs.shape[0])))
        return tot

    def trials(state, xs, ys, ks, configs):
        f = lambda k: trial(state, xs, ys, k, configs)  # noqa: E731
        return jax.vmap(f)(ks) if strategy == "vmap" else jax.lax.map(f, ks)

    if devices == 1:
        return jax.jit(trials)
    # Shard the trial axis over all devices; each runs its trials with the chosen strategy.
    mesh = jax.make_mesh((devices,), ("trials",))
    P = jax.sharding.PartitionSpec
    sharded = jax.jit(jax.shard_map(trials, mesh=mesh,
                                    in_specs=(P(), P(), P(), P("trials"), P()),
                                    out_specs=P("trials"), check_vma=False))
    spread = jax.sharding.NamedSharding(mesh, P("trials"))

    def run(state, xs, ys, ks, configs):
        return sharded(state, xs, ys, jax.device_put(ks, spread), configs)

    run._cache_size = sharded._cache_size
    return run


def evaluate(model: nnx.Module, configs: LayerConfigs | None, images: np.ndarray,
             labels: np.ndarray, keys: jax.Array | None = None, *, batch_size: int = 256,
             strategy: str = "auto", trial_chunk: int | None = None,
             num_classes: int | None = None, progress: bool = True,
             shard: bool = True) -> EvalResult:
    """Top-1 accuracy of `model` on (images, labels) for each trial key.

    Args:
      model: a jaxbar model.
      configs: resolved per-layer crossbar configs; None evaluates digitally (one "trial").
      images: preprocessed images (N, H, W, C).
      labels: int labels (N,).
      keys: (T,) trial keys; None = one error-free trial.
      batch_size: images per forward pass.
      strategy: "map", "vmap" or "auto" (by backend).
      trial_chunk: trials per compiled call (bounds memory; default 8 for vmap, 4 for map;
        rounded up to a multiple of the device count).
      num_classes: also return per-class accuracy when given.
      progress: show a progress bar over trial chunks.
      shard: shard trials over all devices (`jax.device_count()`, every host's devices
        after `jax.distributed.initialize()`).

    Returns:
      An `EvalResult`.
    """
    t0 = time.perf_counter()
    strategy = default_strategy() if strategy == "auto" else strategy
    if strategy not in ("map", "vmap"):
        raise ValueError(f"strategy must be 'map', 'vmap' or 'auto', got {strategy!r}")
    xs, ys = _batches(np.asarray(images, np.float32), np.asarray(labels, np.int32), batch_size)
    graphdef, state = nnx.split(model)
    if keys is None:
        keys = jax.random.split(jax.random.key(0), 1)
    T = keys.shape[0]
    devices = jax.device_count() if shard else 1
    chunk = trial_chunk or min(T, 8 if strategy == "vmap" else 4)
    chunk = -(-chunk // devices) * devices  # whole trials per device
    # Configs go in as pytrees: swept numbers (sigma, ...) are traced and the compiled
    # function is reused for every configuration of the same structure.
    run = _runner(graphdef, strategy, num_classes or 1, configs is None, devices)
    out = []
    bar = tqdm(total=T, desc="trials", unit="trial", disable=not progress or T == 1)
    for i in range(0, T, chunk):
        ks = keys[i:i + chunk]
        if ks.shape[0] < chunk:  # keep one compiled shape: pad the last chunk
            ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], chunk - ks.shape[0], axis=0)])
        res = np.asarray(run(state, xs, ys, ks, configs))[: min(chunk, T - i)]
        out.append(res)
        bar.update(res.shape[0])
    bar.close()
    tot = np.concatenate(out)  # (T, 2, C)
    acc = tot[:, 0].sum(1) / tot[:, 1].sum(1)
    per_class = tot[:, 0] / np.maximum(tot[:, 1], 1) if num_classes else None
    return EvalResult(acc, int(len(images)), time.perf_counter() - t0, per_class)
