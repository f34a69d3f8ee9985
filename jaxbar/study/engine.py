"""The Monte Carlo trial engine: a network's accuracy over many programmed trials.

A trial is a PRNG key. Per trial, every layer is programmed once (programming
error drawn from `fold_in(trial_key, layer)`), then all evaluation batches run on
those conductances (`lax.scan`), each batch with fresh read noise. The trial axis
runs as `lax.map` (CPU: `vmap` over weight sets makes XLA:CPU convolutions 5–7×
slower than a loop), `vmap` (accelerators) or a mix (`lax.map` over chunks that
are vmapped), in Python-level chunks so memory stays bounded and progress shows.

With several devices (of one process, or of all after `jax.distributed.initialize()`)
the trial axis is split over a ("trials", "data") mesh by `shard_map`; a chunk with fewer
trials than devices also splits every batch over "data", left to the compiler so results
equal the single-device ones bit for bit (see `_shards`, `_runner`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from scipy import stats
from tqdm.auto import tqdm

from jaxbar.core import parasitics
from jaxbar.nn.analogize import ReadCount, analog_layers, map_batches, program_model
from jaxbar.nn.params_io import check_finite

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


def default_strategy() -> str:
    """`map` on CPU, `vmap` on accelerators."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def _shards(chunk: int, devices: int) -> tuple[int, int, int]:
    """How a chunk of trials spreads over `devices` devices.

    A chunk of at least `devices` trials is rounded up to a multiple of `devices` and
    sharded over trials only. A smaller one cannot occupy every device with whole trials:
    its trials shard over the largest device-count divisor that divides the chunk (no
    padded trials) and every batch over the remaining factor.

    Args:
      chunk: trials per compiled call, as requested.
      devices: devices to spread over.

    Returns:
      (trials per call, trial-axis shards, data-axis shards); the shards multiply to
      `devices`.
    """
    if chunk >= devices:
        return -(-chunk // devices) * devices, devices, 1
    t = math.gcd(chunk, devices)
    return chunk, t, devices // t


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


@functools.lru_cache(maxsize=8)
def _mesh(trial_shards: int, data_shards: int) -> jax.sharding.Mesh:
    """A ("trials", "data") mesh over every device of every process (auto-sharded axes)."""
    return jax.make_mesh((trial_shards, data_shards), ("trials", "data"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _runner(graphdef, strategy: str, C: int, digital: bool, trial_shards: int = 1,
            data_shards: int = 1):
    """A jitted `(state, xs, ys, keys) -> (T, 2, C)` hit/count tensor.

    Cached: the same arguments, however passed, give the same function (and its
    compilations); see `_build_runner`.
    """
    return _build_runner(graphdef, strategy, int(C), bool(digital), int(trial_shards),
                         int(data_shards))


@functools.lru_cache(maxsize=64)
def _build_runner(graphdef, strategy: str, C: int, digital: bool, trial_shards: int,
                  data_shards: int):
    """The jitted `(state, xs, ys, keys) -> (T, 2, C)` hit/count tensor.

    Args:
      graphdef: the model's `nnx` graph definition.
      strategy: "map" or "vmap" over the trials of one device.
      C: classes counted separately (1: overall accuracy only).
      digital: evaluate without crossbars (keys unused).
      trial_shards: devices the trial axis is split over (manually, by `shard_map`).
      data_shards: devices every batch is split over. This axis is left to the compiler
        (auto sharding), so random draws, batch-wide reductions and the counts' sums are
        those of the unsharded program and results equal the single-device ones.

    Returns:
      With one device in all, the jitted function. Otherwise one over
      `_mesh(trial_shards, data_shards)` expecting `state` replicated, `xs` and `ys` sharded
      over "data" on their batch axis and `keys` over "trials" (see `_global`); its result is
      replicated on every device, so every process can read it.
    """
    P = jax.sharding.PartitionSpec

    def trial(state, xs, ys, key):
        net = nnx.merge(graphdef, state, copy=True)
        if not digital:
            program_model(net, key)  # once per trial

        def step(m, batch):
            xb, yb = batch
            if data_shards > 1:  # keep the batch split through the scan
                xb = jax.lax.with_sharding_constraint(xb, P("data"))
                yb = jax.lax.with_sharding_constraint(yb, P("data"))
            hit = (jnp.argmax(m(xb), -1) == yb).astype(jnp.float32)
            onehot = jax.nn.one_hot(jnp.where(yb >= 0, yb, 0) if C > 1 else 0 * yb, C)
            onehot = onehot * (yb >= 0)[:, None]
            # Counted per batch position, summed once at the end: a data-sharded batch needs
            # no cross-device sum per batch (integer counts: exact in any order).
            return jnp.stack([hit[:, None] * onehot, onehot])

        # Only the read-noise positions change from batch to batch.
        tot = map_batches(net, step, (xs, ys), carried=ReadCount).sum(0)
        return tot.sum(1)

    def trials(state, xs, ys, ks):
        f = lambda k: trial(state, xs, ys, k)  # noqa: E731
        return jax.vmap(f)(ks) if strategy == "vmap" else jax.lax.map(f, ks)

    if trial_shards * data_shards == 1:
        return jax.jit(trials)
    # Trials are split by hand (each device loops over its own with the chosen strategy);
    # "data" stays automatic inside, see above.
    mesh = _mesh(trial_shards, data_shards)
    on = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))  # noqa: E731
    body = jax.shard_map(trials, mesh=mesh, in_specs=(P(), P(), P(), P("trials")),
                         out_specs=P("trials"), axis_names={"trials"}, check_vma=False)
    return jax.jit(body, in_shardings=(on(), on(None, "data"), on(None, "data"),
                                       on("trials")), out_shardings=on())


def _global(tree, sharding: jax.sharding.NamedSharding):
    """`tree` with every array leaf a global array over `sharding`.

    Each process fills the shards on its own devices from its own copy of the leaf: no data
    crosses processes (`jax.device_put` would all-gather every leaf to check it is equal
    everywhere, the whole image set included). Python numbers stay as they are; jit
    replicates them, traced and weakly typed as on one device.
    """

    def put(x):
        if isinstance(x, (bool, int, float, complex)):
            return x
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        a = np.asarray(x)
        a = a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)


def _fingerprint(*trees, max_rows: int = 1024) -> int:
    """A CRC of the leaves, to check that processes agree on their inputs.

    Arrays longer than `max_rows` enter by an evenly strided subset of rows, so a large image
    set costs little.
    """
    crc = 0
    for leaf in jax.tree.leaves(trees):
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(leaf)
        rows = a[:: -(-len(a) // max_rows)] if a.ndim and len(a) > max_rows else a
        crc = zlib.crc32(np.ascontiguousarray(rows).tobytes(),
                         zlib.crc32(repr((a.dtype.str, a.shape)).encode(), crc))
    return crc


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
    strategy = default_strategy() if strategy == "auto" else strategy
    if strategy not in ("map", "vmap"):
        raise ValueError(f"strategy must be 'map', 'vmap' or 'auto', got {strategy!r}")
    for name, v in (("batch_size", batch_size), ("trial_chunk", trial_chunk)):
        if v is not None and not (isinstance(v, int | np.integer) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"evaluate needs as many labels as images (at least one), got "
                         f"{len(images)} images and {len(labels)} labels")
    check_finite(model)
    digital = not analog_layers(model)
    graphdef, state = nnx.split(model)
    # Traced config numbers as floats: an integer sigma (`0` in YAML) would otherwise be
    # traced as int32 and compile a second copy of the same structure.
    state = jax.tree.map(lambda v: float(v) if type(v) is int else v, state)
    if keys is None or digital:
        keys = jax.random.split(jax.random.key(0), 1)
    if not keys.shape or keys.shape[0] < 1:
        raise ValueError(f"keys must be an array of T >= 1 trial keys, got shape "
                         f"{keys.shape}")
    T = keys.shape[0]
    devices = jax.device_count() if shard else 1
    chunk, t, d = _shards(trial_chunk or min(T, 8 if strategy == "vmap" else 4), devices)
    xs, ys = _batches(images, labels, batch_size, d)
    # Layer configs are state: swept numbers (sigma, ...) are traced and the compiled
    # function is reused for every configuration of the same structure.
    run = _runner(graphdef, strategy, num_classes or 1, digital, t, d)
    if devices == 1:
        xs, ys = jnp.asarray(xs), jnp.asarray(ys)  # once, not per chunk
        place_keys = lambda ks: ks  # noqa: E731
    else:
        if jax.process_count() > 1:  # each process fills its devices from its own copy
            fp = _fingerprint(images, labels, keys, state, batch_size, chunk)
            if len(set(multihost_utils.process_allgather(np.uint32(fp)).tolist())) > 1:
                raise ValueError("evaluate: processes passed different models, configs, "
                                 "images, labels or keys")
        P, mesh = jax.sharding.PartitionSpec, _mesh(t, d)
        state = _global(state, jax.sharding.NamedSharding(mesh, P()))
        xs, ys = _global((xs, ys), jax.sharding.NamedSharding(mesh, P(None, "data")))
        by_trial = jax.sharding.NamedSharding(mesh, P("trials"))
        place_keys = lambda ks: _global(ks, by_trial)  # noqa: E731
    out = []
    bar = tqdm(total=T, desc="trials", unit="trial",
               disable=not progress or T == 1 or jax.process_index() != 0)
    for i in range(0, T, chunk):
        ks = keys[i:i + chunk]
        if ks.shape[0] < chunk:  # keep one compiled shape: pad the last chunk
            ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], chunk - ks.shape[0], axis=0)])
        try:
            res = np.asarray(run(state, xs, ys, place_keys(ks)))[: min(chunk, T - i)]
        except Exception as e:  # a ConvergenceError of a callback arrives wrapped
            carried = parasitics.convergence_error(e)
            if carried is None or carried is e:
                raise
            raise carried from e
        out.append(res)
        bar.update(res.shape[0])
    bar.close()
    tot = np.concatenate(out)  # (T, 2, C)
    acc = tot[:, 0].sum(1) / tot[:, 1].sum(1)
    per_class = tot[:, 0] / np.maximum(tot[:, 1], 1) if num_classes else None
    return EvalResult(acc, int(len(images)), time.perf_counter() - t0, per_class)
