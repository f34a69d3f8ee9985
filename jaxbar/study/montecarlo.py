"""Monte Carlo over trials of an analogized model: `monte_carlo(analog, keys, fn)`.

A trial is a PRNG key. For each key the model is programmed (`program_model`) inside the
compiled function and `fn` computes whatever the user measures: accuracy, perplexity, an
error norm, raw outputs. With data given as batches, all batches of a trial run on that
trial's conductances as one `lax.scan`, each batch with fresh read noise. The trial axis runs
as `lax.map` (the CPU default: `vmap` over weight sets makes XLA:CPU convolutions several
times slower), or `vmap` (the accelerator default), in Python-level chunks so memory stays
bounded and progress shows.

With several devices (of one process, or of all after `jax.distributed.initialize()`) the
trial axis is split over a ("trials", "data") mesh by `shard_map`; a chunk with fewer trials
than devices also splits every batch over "data", left to the compiler so results equal the
single-device ones bit for bit (see `shard_layout`).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxbar.config import ConfigError
from jaxbar.core import ir
from jaxbar.nn.analogize import ReadCount, analog_layers, map_batches, program_model, stack_batches

__all__ = ["default_strategy", "monte_carlo", "monte_carlo_stacked", "shard_layout"]


def default_strategy() -> str:
    """`map` on CPU, `vmap` on accelerators."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def shard_layout(chunk: int, devices: int, split_batches: bool = True
                 ) -> tuple[int, int, int]:
    """How a chunk of trials spreads over `devices` devices.

    A chunk of at least `devices` trials is rounded up to a multiple of `devices` and
    sharded over trials only. A smaller one cannot occupy every device with whole trials:
    its trials shard over the largest device-count divisor that divides the chunk (no
    padded trials) and every batch over the remaining factor; without batches to split, the
    chunk is padded with repeated trials instead.

    Args:
      chunk: trials per compiled call, as requested.
      devices: devices to spread over.
      split_batches: whether the data has a within-batch axis that may be split.

    Returns:
      (trials per call, trial-axis shards, data-axis shards); the shards multiply to
      `devices`.
    """
    if chunk < devices and split_batches:
        t = math.gcd(chunk, devices)
        return chunk, t, devices // t
    return -(-chunk // devices) * devices, devices, 1


@functools.lru_cache(maxsize=8)
def _mesh(trial_shards: int, data_shards: int) -> jax.sharding.Mesh:
    """A ("trials", "data") mesh over every device of every process (auto-sharded axes)."""
    return jax.make_mesh((trial_shards, data_shards), ("trials", "data"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def trial_runner(graphdef, fn: Callable, strategy: str, batched: bool, digital: bool,
                 trial_shards: int = 1, data_shards: int = 1):
    """The jitted `(state, keys, batches, args) -> fn's outputs stacked over keys`.

    Cached: the same arguments, however passed, give the same function (and its
    compilations), so a sweep over traced config numbers compiles once.

    Args:
      graphdef: the model's `nnx` graph definition.
      fn: `(model, *args)`, or with `batched`, `(model, batch, *args)` per batch.
      strategy: "map" or "vmap" over the trials of one device.
      batched: `batches` is a pytree of stacked batches, scanned by `map_batches`.
      digital: the model has no analog layer (keys unused).
      trial_shards: devices the trial axis is split over (manually, by `shard_map`).
      data_shards: devices every batch is split over. This axis is left to the compiler
        (auto sharding), so random draws and batch-wide reductions are those of the
        unsharded program and results equal the single-device ones.

    Returns:
      With one device in all, the jitted function. Otherwise one over
      `_mesh(trial_shards, data_shards)` expecting `state` and `args` replicated, `batches`
      sharded over "data" on their within-batch axis and `keys` over "trials" (see
      `_global`); its result is replicated on every device, so every process can read it.
    """
    return _build_runner(graphdef, fn, strategy, bool(batched), bool(digital),
                         int(trial_shards), int(data_shards))


@functools.lru_cache(maxsize=64)
def _build_runner(graphdef, fn, strategy, batched, digital, trial_shards, data_shards):
    """`trial_runner` for normalized arguments."""
    P = jax.sharding.PartitionSpec

    def trial(state, key, batches, args):
        model = nnx.merge(graphdef, state, copy=True)  # variables of this trace level
        if not digital:
            program_model(model, key)  # once per trial, inside the compiled function
        if not batched:
            return fn(model, *args)

        def step(m, batch):
            if data_shards > 1:  # keep the batch split through the scan
                batch = jax.tree.map(
                    lambda a: jax.lax.with_sharding_constraint(a, P("data")), batch)
            return fn(m, batch, *args)

        # Only the read-noise positions change from batch to batch.
        return map_batches(model, step, batches, carried=ReadCount)

    def trials(state, keys, batches, args):
        f = lambda k: trial(state, k, batches, args)  # noqa: E731
        return jax.vmap(f)(keys) if strategy == "vmap" else jax.lax.map(f, keys)

    if trial_shards * data_shards == 1:
        return jax.jit(trials)
    # Trials are split by hand (each device loops over its own with the chosen strategy);
    # "data" stays automatic inside, see above.
    mesh = _mesh(trial_shards, data_shards)
    on = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))  # noqa: E731
    body = jax.shard_map(trials, mesh=mesh, in_specs=(P(), P("trials"), P(), P()),
                         out_specs=P("trials"), axis_names={"trials"}, check_vma=False)
    return jax.jit(body, in_shardings=(on(), on("trials"), on(None, "data"), on()),
                   out_shardings=on())


def _global(tree, sharding: jax.sharding.NamedSharding):
    """`tree` with every array leaf a global array over `sharding`.

    Each process fills the shards on its own devices from its own copy of the leaf: no data
    crosses processes (`jax.device_put` would all-gather every leaf to check it is equal
    everywhere, the whole data set included). Python numbers stay as they are; jit
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

    Arrays longer than `max_rows` enter by an evenly strided subset of rows, so a large data
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


def _check_keys(keys: Any) -> jax.Array:
    keys = jnp.asarray(keys)
    if keys.ndim != 1 or not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or not len(keys):
        raise ConfigError("keys must be a non-empty 1-D array of typed PRNG keys "
                          "(jax.random.split(jax.random.key(seed), trials))")
    return keys


def monte_carlo_stacked(analog: nnx.Module, keys: jax.Array, fn: Callable[..., Any],
                        batches: Any, *args: Any, strategy: str = "auto",
                        chunk: int | None = None, progress: bool = True,
                        shard: bool = True) -> Any:
    """`monte_carlo` with batches already stacked (or none): the engine behind it.

    Args:
      analog: an analogized model, or a digital one (nothing programmed; keys unused).
      keys: (T,) trial keys.
      fn: `(model, *args) -> pytree` when `batches` is None, else
        `(model, batch, *args) -> pytree`, called per batch.
      batches: None, or a pytree whose leaves have a leading batch-index axis and a
        within-batch axis next (`stack_batches`); the latter is split over devices when a
        chunk holds fewer trials than there are devices.
      *args: pytrees of arrays passed to `fn`, replicated.
      strategy: "map", "vmap" or "auto", as for `monte_carlo`.
      chunk: trials per compiled call, as for `monte_carlo`.
      progress: show a progress bar over chunks.
      shard: split over all devices, as for `monte_carlo`.

    Returns:
      `fn`'s outputs as NumPy arrays, with a leading trial axis (then a batch axis when
      `batches` is given).
    """
    if strategy == "auto":
        strategy = default_strategy()
    if strategy not in ("map", "vmap"):
        raise ConfigError(f"strategy = {strategy!r} is invalid: expected 'map', 'vmap' or 'auto'")
    keys = _check_keys(keys)
    if chunk is not None and not (isinstance(chunk, int | np.integer) and chunk >= 1):
        raise ConfigError(f"chunk = {chunk!r} is invalid: expected an integer >= 1")
    T = len(keys)
    batched = batches is not None
    batch = None
    if batched:
        leaves = jax.tree.leaves(batches)
        if not leaves or any(np.ndim(a) < 2 for a in leaves):
            raise ConfigError("batches must be arrays with a batch-index axis and a "
                              "within-batch axis (see jaxbar.stack_batches)")
        batch = int(np.shape(leaves[0])[1])
    devices = jax.device_count() if shard else 1
    chunk = int(chunk or min(T, 8 if strategy == "vmap" else 4))
    chunk, t, d = shard_layout(chunk, devices, batched)
    if batched and batch % d:  # a batch that does not split evenly stays whole
        chunk, t, d = shard_layout(chunk, devices, False)
    digital = not analog_layers(analog)
    graphdef, state = nnx.split(analog)
    # Traced config numbers as floats: an integer sigma (`0` in YAML) would otherwise be
    # traced as int32 and compile a second copy of the same structure.
    state = jax.tree.map(lambda v: float(v) if type(v) is int else v, state)
    run = trial_runner(graphdef, fn, strategy, batched, digital, t, d)
    if devices == 1:
        batches, args = jax.tree.map(jnp.asarray, (batches, args))  # once, not per chunk
        place_keys = lambda ks: ks  # noqa: E731
    else:
        if jax.process_count() > 1:  # each process fills its devices from its own copy
            fp = _fingerprint(batches, args, keys, state, chunk)
            if len(set(multihost_utils.process_allgather(np.uint32(fp)).tolist())) > 1:
                raise ConfigError("monte_carlo: processes passed different models, configs, "
                                  "data or keys")
        P, mesh = jax.sharding.PartitionSpec, _mesh(t, d)
        state, args = _global((state, args), jax.sharding.NamedSharding(mesh, P()))
        batches = _global(batches, jax.sharding.NamedSharding(mesh, P(None, "data")))
        by_trial = jax.sharding.NamedSharding(mesh, P("trials"))
        place_keys = lambda ks: _global(ks, by_trial)  # noqa: E731
    out = []
    with tqdm(total=T, desc="trials", unit="trial",
              disable=not progress or T == 1 or jax.process_index() != 0) as bar:
        for i in range(0, T, chunk):
            ks = keys[i:i + chunk]
            n = len(ks)
            if n < chunk:  # one compiled shape: pad the last chunk with repeats
                ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], chunk - n, axis=0)])
            try:
                res = run(state, place_keys(ks), batches, args)
            except Exception as e:  # a ConvergenceError of a callback arrives wrapped
                carried = ir.convergence_error(e)
                if carried is None or carried is e:
                    raise
                raise carried from e
            out.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], res))
            bar.update(n)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


def monte_carlo(analog: nnx.Module, keys: jax.Array, fn: Callable[..., Any], *args: Any,
                batches: Iterable[Any] | None = None, strategy: str = "auto",
                chunk: int | None = None, progress: bool = True, shard: bool = True) -> Any:
    """`fn` on the programmed model for every trial key, stacked over keys.

    Two forms:

    - `monte_carlo(analog, keys, fn, *args)`: `fn(model, *args) -> pytree` once per trial
      (loop over data yourself with `jaxbar.map_batches`).
    - `monte_carlo(analog, keys, fn, *args, batches=data)`: `fn(model, batch, *args) ->
      pytree` for every batch of `data`, any finite iterable of equally shaped batches
      (pytrees of arrays: images and labels, token ids, sequences; e.g. `zip(xs, ys)` or a
      data loader). All batches of a trial run on its conductances, each with fresh read
      noise; the outputs have a batch axis after the trial axis, to reduce as you need.

    `fn` runs traced, once for all trials: close over no large arrays (pass them in `args`
    or `batches`). Compilations are cached per (model structure, `fn`), so a sweep over
    config numbers with the same `fn` object compiles once.

    Args:
      analog: from `jaxbar.analogize` (calibrated if its config needs it). It is not changed.
        A model without analog layers runs every trial unprogrammed.
      keys: (T,) trial keys, e.g. `jax.random.split(jax.random.key(0), T)`.
      fn: the measurement, see above.
      *args: pytrees of arrays passed to `fn` (data, labels, ...), the same for every trial.
      batches: the data as batches (see above); they are stacked into one array per leaf.
      strategy: "map" (`lax.map`), "vmap" or "auto" (map on CPU, vmap elsewhere).
      chunk: trials per compiled call (default 8 for vmap, 4 for map; rounded up to a
        multiple of the device count when at least that).
      progress: show a progress bar over chunks.
      shard: split the trials (and, for small chunks, the batches) over all devices when
        there are several; after `jax.distributed.initialize()` every process must call
        this with the same arguments, and each gets all results.

    Returns:
      `fn`'s outputs with a leading trial axis of length T, as NumPy arrays.

    Raises:
      ConfigError: bad keys, strategy or chunk, batches of different shapes, or
        (multi-process) processes that passed different inputs.
      ConvergenceError: an IR-drop solve did not converge with `on_nonconvergence: error`.
    """
    stacked = None if batches is None else stack_batches(batches)
    return monte_carlo_stacked(analog, keys, fn, stacked, *args, strategy=strategy,
                               chunk=chunk, progress=progress, shard=shard)
