"""Hardware-aware training of any Flax NNX model: `fit(model, loss_fn, optimizer, data)`.

Every step programs the analog layers live from a fresh trial key (`program_model(...,
live=True)`): new programming errors and read noise each step (noise injection), with
straight-through gradients through the quantizers, reaching the weights. A model without
analog layers trains digitally with the same loop, as a control. Optionally the analog kernels
are clipped after each update. Learnable input and ADC ranges
(`jaxbar.nn.analogize.attach_learned_ranges`) are parameters and train with the weights.

All randomness of step `s` comes from `fold_in(key(seed), s)` and its batch from
`(seed, epoch)`, so a run resumed from a checkpoint continues bit for bit like an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxbar.config import ConfigError
from jaxbar.nn.analogize import ANALOG_STATE, analog_layers, clear_programming, program_model
from jaxbar.train.augment import batch_indices
from jaxbar.train.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from jaxbar.train.loop import clip_percentiles, clip_weights

__all__ = ["FitResult", "fit"]


@dataclasses.dataclass
class FitResult:
    """What `fit` did.

    Attributes:
      losses: the loss of every step run by this call (resumed steps excluded).
      steps: the global steps completed.
      seconds: wall time of this call (compilation included).
    """

    losses: np.ndarray
    steps: int
    seconds: float


def _check_clip(weight_clip):
    ok = weight_clip is None or weight_clip == "mapped" or (
        isinstance(weight_clip, int | float) and not isinstance(weight_clip, bool)
        and weight_clip > 0)
    if not ok:
        raise ConfigError(f"weight_clip = {weight_clip!r} is invalid: expected None, 'mapped' or "
                          "a positive number of standard deviations")


def _batch_fn(data, batch_size: int, seed: int) -> Callable[[int], Any]:
    if callable(data):
        return data
    arrays = tuple(np.asarray(a) for a in (data if isinstance(data, Sequence) else (data,)))
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ConfigError("fit: the data arrays have different lengths "
                          f"{[len(a) for a in arrays]}")
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n):
        raise ConfigError(f"batch_size = {batch_size!r} is invalid: expected an integer in "
                          f"[1, {n}] (the training examples)")

    def batch(step):
        idx = batch_indices(seed, step, n, batch_size)
        out = tuple(jnp.asarray(a[idx]) for a in arrays)
        return out if len(out) > 1 else out[0]

    return batch


def fit(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], jax.Array],
        optimizer: optax.GradientTransformation, data: Any, *, steps: int,
        batch_size: int = 128, seed: int = 0, weight_clip: str | float | None = None,
        checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
        progress: bool = True) -> FitResult:
    """Trains `model`'s parameters in place through its analog forward pass.

    Args:
      model: an analogized model (`jaxbar.analogize`, calibrated if its config needs it) or
        any NNX model (trained digitally).
      loss_fn: `(model, batch) -> scalar loss`. Mutations it makes to non-parameter state
        (batch-norm statistics in training mode) are kept.
      optimizer: an optax transformation.
      data: arrays `(x, y, ...)` sampled in epochs of `batch_size` from `seed`, or a function
        `step -> batch`.
      steps: the global step to train to (a resumed run continues from its checkpoint).
      batch_size: examples per step (with array data).
      seed: seeds the batches and every step's programming error and read noise.
      weight_clip: after each update clip every analog kernel (every weight layer's of a
        digital model): None, "mapped" (to the range its mapping uses, `±w_max` at
        `weights.clip_percentile`) or k (to `±k·std`).
      checkpoint_dir: resume from its latest checkpoint and write new ones there.
      checkpoint_every: steps between checkpoints (0: only at the end).
      progress: show a progress bar.

    Returns:
      A `FitResult`. The model holds the trained parameters; program it again before use.
    """
    t0 = time.perf_counter()
    _check_clip(weight_clip)
    if not (isinstance(steps, int) and steps >= 0):
        raise ConfigError(f"steps = {steps!r} is invalid: expected an integer >= 0")
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 0):
        raise ConfigError(f"checkpoint_every = {checkpoint_every!r} is invalid: expected >= 0")
    batch = _batch_fn(data, batch_size, seed)
    analog = bool(analog_layers(model))
    percentiles = clip_percentiles(model)
    clear_programming(model)
    graphdef, params, trial, rest = nnx.split(model, nnx.Param, ANALOG_STATE, ...)
    opt_state = optimizer.init(params)
    start = 0
    if checkpoint_dir is not None and (path := latest_checkpoint(checkpoint_dir)) is not None:
        (params, rest, opt_state), start, _ = restore_checkpoint(path, (params, rest, opt_state))
        params, rest, opt_state = jax.tree.map(jnp.asarray, (params, rest, opt_state))
    base = jax.random.key(seed)

    def loss_of(params, rest, b, key):
        m = nnx.merge(graphdef, params, trial, rest, copy=True)
        if analog:
            program_model(m, key, live=True)
        loss = loss_fn(m, b)
        return loss, nnx.split(m, nnx.Param, ANALOG_STATE, ...)[3]

    @jax.jit
    def step_fn(params, rest, opt_state, b, step):
        key = jax.random.fold_in(base, step)
        (loss, new_rest), grads = jax.value_and_grad(loss_of, has_aux=True)(params, rest, b, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if weight_clip is not None:
            m = nnx.merge(graphdef, params, trial, new_rest, copy=True)
            clip_weights(m, weight_clip, percentiles)
            params = nnx.state(m, nnx.Param)
        return params, new_rest, opt_state, loss

    losses = []
    for s in tqdm(range(start, steps), desc="steps", disable=not progress,
                  initial=start, total=steps):
        params, rest, opt_state, loss = step_fn(params, rest, opt_state, batch(s), s)
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"fit: the loss of step {s} is {losses[-1]}")
        done = s + 1
        if checkpoint_dir is not None and (done == steps or (
                checkpoint_every and done % checkpoint_every == 0)):
            save_checkpoint(checkpoint_dir, done, (params, rest, opt_state),
                            meta={"seed": seed, "losses": json.dumps(losses[-10:])})
    nnx.update(model, params, rest)
    return FitResult(np.asarray(losses), max(steps, start), time.perf_counter() - t0)
