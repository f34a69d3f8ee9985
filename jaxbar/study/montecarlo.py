"""Monte Carlo over trials of an analogized model: `monte_carlo(analog, keys, fn)`.

A trial is a PRNG key. For each key the model is programmed (`program_model`) inside the
compiled function and `fn(model, *args)` computes whatever the user measures: accuracy,
perplexity, an error norm, raw outputs. The trial axis runs as `lax.map` (the CPU default:
`vmap` over weight sets makes XLA:CPU convolutions several times slower), `vmap` (the
accelerator default), in Python-level chunks so memory stays bounded and progress shows,
and is split over all devices with `shard_map` when there are several.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxbar.config import ConfigError
from jaxbar.nn.analogize import program_model

__all__ = ["monte_carlo"]


@functools.lru_cache(maxsize=32)
def _runner(graphdef, fn: Callable, strategy: str, devices: int):
    """The jitted `(state, keys, args) -> stacked fn outputs` over one chunk of keys."""

    def trial(state, key, args):
        model = nnx.merge(graphdef, state, copy=True)  # variables of this trace level
        program_model(model, key)  # once per trial, inside the compiled function
        return fn(model, *args)

    def trials(state, keys, args):
        f = lambda k: trial(state, k, args)  # noqa: E731
        return jax.vmap(f)(keys) if strategy == "vmap" else jax.lax.map(f, keys)

    if devices == 1:
        return jax.jit(trials)
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((devices,), ("trials",))
    return jax.jit(jax.shard_map(trials, mesh=mesh, in_specs=(P(), P("trials"), P()),
                                 out_specs=P("trials"), check_vma=False))


def monte_carlo(analog: nnx.Module, keys: jax.Array, fn: Callable[..., Any], *args: Any,
                strategy: str = "auto", chunk: int | None = None, progress: bool = True,
                shard: bool = True) -> Any:
    """`fn(programmed model, *args)` for every trial key, stacked over keys.

    Args:
      analog: from `jaxbar.analogize` (calibrated if its config needs it). It is not changed.
      keys: (T,) trial keys, e.g. `jax.random.split(jax.random.key(0), T)`.
      fn: `(model, *args) -> pytree` of arrays. It runs traced: loop over batches with
        `jaxbar.map_batches` (or `lax.scan`), not in Python, and close over no large arrays
        (pass data through `args`, which are traced once for all trials).
      *args: pytrees of arrays passed to `fn` (data, labels, ...).
      strategy: "map" (`lax.map`), "vmap" or "auto" (map on CPU, vmap elsewhere).
      chunk: trials per compiled call (default 8 for vmap, 4 for map; rounded up to a
        multiple of the device count when sharding).
      progress: show a progress bar over chunks.
      shard: split the trials over all devices when there are several.

    Returns:
      `fn`'s outputs with a leading trial axis of length T, as NumPy arrays.
    """
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy not in ("map", "vmap"):
        raise ConfigError(f"strategy = {strategy!r} is invalid: expected 'map', 'vmap' or 'auto'")
    keys = jnp.asarray(keys)
    if keys.ndim != 1 or not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) or not len(keys):
        raise ConfigError("keys must be a non-empty 1-D array of typed PRNG keys "
                          "(jax.random.split(jax.random.key(seed), trials))")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"chunk = {chunk!r} is invalid: expected an integer >= 1")
    T = len(keys)
    devices = jax.device_count() if shard else 1
    chunk = chunk or min(T, 8 if strategy == "vmap" else 4)
    chunk = -(-chunk // devices) * devices
    graphdef, state = nnx.split(analog)
    run = _runner(graphdef, fn, strategy, devices)
    out = []
    with tqdm(total=T, desc="trials", unit="trial", disable=not progress or T == 1) as bar:
        for i in range(0, T, chunk):
            ks = keys[i:i + chunk]
            n = len(ks)
            if n < chunk:  # one compiled shape: pad the last chunk with repeats
                ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], chunk - n, axis=0)])
            res = run(state, ks, args)
            out.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], res))
            bar.update(n)
    return jax.tree.map(lambda *parts: np.concatenate(parts), *out)
