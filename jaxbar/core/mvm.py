"""The analog matrix product: `program`, `matmul`, `analog_matmul`.

Composes mapping (PHYSICS §1), devices (§2), DAC (§3), ADC (§4) and tiling (§5):

    W ──program──► Programmed (tiles of conductances, per slice and polarity)
    x ──DAC──► input slices ──array MVM (+ read noise)──► ADC ──► digital
        (offset subtraction, shift-and-add, partition sums, rescale) ──► y ≈ x @ W

Without parasitics every array MVM of a layer is one batched matrix product of
the input slices with all tiles at once; differential pairs with analog
subtraction are folded into one matrix `g+ - g-` (exact by linearity).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.core import converters, devices, mapping

__all__ = ["Programmed", "analog_matmul", "array_outputs", "matmul", "program"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Programmed:
    """A programmed crossbar: the conductances of one layer for one trial.

    Attributes:
      g: (pr, rows, S, P, M) conductances: row partition, row within the tile,
        weight slice, polarity (2 differential: +, -; 1 offset), and the padded
        columns of all column partitions (pc·cols), plus, for an offset unit
        column, pc extra columns at the end. Padding cells are 0.
      w_max: the weight scale (scalar).
      shape: (K, N) of the weight matrix (static).
    """

    g: jax.Array
    w_max: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))


def _unit_column(config: CrossbarConfig) -> bool:
    return config.mapping.scheme == "offset" and config.mapping.offset_subtraction == "unit_column"


def _tile(a: jax.Array, lay: mapping.Layout) -> jax.Array:
    """(K, N, ...) → (pr, rows, pc·cols, ...) with zero padding."""
    if lay.trivial_rows and lay.trivial_cols:
        return a[None]
    pad = [(0, 1), (0, 1)] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, pad)
    return a[lay.row_index][:, :, lay.col_index]


def program(W: jax.Array, config: CrossbarConfig, key: jax.Array | None = None) -> Programmed:
    """Maps a weight matrix onto crossbar conductances and programs them.

    Args:
      W: weights, shape (K, N).
      config: the crossbar config (static).
      key: PRNG key of this trial; programming error is drawn from it (needed only
        when `config.device.programming_error` is on). The same key gives the
        same conductances.

    Returns:
      A `Programmed` pytree.
    """
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"W must have shape (K, N), got {W.shape}")
    if not jnp.issubdtype(W.dtype, jnp.floating):
        W = W.astype(jnp.float32)
    K, N = W.shape
    lay = mapping.layout(K, N, config)
    w, w_max = mapping.clip_and_scale(W, config.weights.clip_percentile)
    g = mapping.conductances(mapping.slice_weights(w, config), config)  # (S, P, K, N)
    g = _tile(jnp.moveaxis(g, (0, 1), (2, 3)), lay)  # (pr, rows, M, S, P)
    g = jnp.moveaxis(g, 2, 4)  # (pr, rows, S, P, M)
    mask = jnp.asarray(lay.mask)[:, :, None, None, :]
    if _unit_column(config):
        g_zero = jnp.asarray(mapping.zero_weight_conductances(config), dtype=g.dtype)
        pr, rows, S = g.shape[0], g.shape[1], g.shape[2]
        unit = jnp.broadcast_to(g_zero[None, None, :, None, None],
                                (pr, rows, S, 1, len(lay.col_sizes)))
        g = jnp.concatenate([g, unit], axis=-1)
        row_mask = jnp.asarray(lay.row_index < K)[:, :, None, None, None]
        mask = jnp.concatenate([jnp.broadcast_to(mask, g.shape[:4] + mask.shape[-1:]),
                                jnp.broadcast_to(row_mask, unit.shape)], axis=-1)
    g = devices.program_cells(g, key, config.device)
    if not (lay.trivial_rows and lay.trivial_cols) or _unit_column(config):
        g = jnp.where(mask, g, 0.0)
    return Programmed(g=g, w_max=w_max, shape=(K, N))


def _read_noise(y, u, g, config, key):
    """Adds per-MVM read noise, sampled exactly in output space.

    Independent Gaussian cell errors `s(g)·ε` contribute `Σ_k u_k s_k ε_k` to a
    column: a Gaussian with variance `Σ_k u_k² s(g_k)²`, drawn fresh per MVM.
    """
    var = devices.noise_std(g, config.device.read_noise) ** 2
    if config.mapping.scheme == "differential" and config.mapping.subtract == "analog":
        var = jnp.sum(var, axis=3, keepdims=True)
    v = _contract(u * u, var)
    pos = v > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)  # finite gradient at v = 0
    if key is None:
        raise ValueError("read noise is on (device.read_noise): pass a PRNG key to matmul")
    return y + std * jax.random.normal(key, y.shape, dtype=y.dtype)


def _contract(u: jax.Array, g: jax.Array) -> jax.Array:
    """(J, B, pr, rows) × (pr, rows, S, P, M) → (J, B, pr, S, P, M)."""
    J, B, pr, rows = u.shape
    _, _, S, P, M = g.shape
    if pr == 1:
        y = u.reshape(J * B, rows) @ g.reshape(rows, S * P * M)
        return y.reshape(J, B, 1, S, P, M)
    y = jnp.einsum("jbpk,pkz->jbpz", u, g.reshape(pr, rows, S * P * M))
    return y.reshape(J, B, pr, S, P, M)


def array_outputs(x: jax.Array, programmed: Programmed, config: CrossbarConfig,
                  key: jax.Array | None = None):
    """Pre-ADC array outputs and the DAC outputs, for calibration and analysis.

    Args:
      x: inputs, shape (B, K).
      programmed: from `program`.
      config: the crossbar config.
      key: PRNG key for read noise.

    Returns:
      (y, x_q): y of shape (J, B, pr, S, P, M) in array output units (J input
      slices, or 1 after analog accumulation; P = 1 after analog differential
      subtraction) and the DAC outputs x_q of shape (B, K).
    """
    K, _ = programmed.shape
    lay = mapping.layout(*programmed.shape, config)
    x_q = converters.dac(x / config.inputs.x_max, config.inputs)
    u = converters.input_slices(x_q, config.inputs)  # (J, B, K)
    if lay.trivial_rows:
        u = u[:, :, None, :]
    else:
        u = jnp.pad(u, [(0, 0), (0, 0), (0, 1)])[:, :, lay.row_index]  # (J, B, pr, rows)
    g = programmed.g.astype(u.dtype)
    if config.parasitics.topology != "none":
        from jaxbar.core import crossbar_ir  # deferred: the solver is heavy to import

        y = crossbar_ir.array_currents(u, g, config, lay)
        if config.device.read_noise.active:
            raise ConfigError("device.read_noise together with parasitics is not supported yet")
    else:
        if config.mapping.scheme == "differential" and config.mapping.subtract == "analog":
            y = _contract(u, g[:, :, :, :1] - g[:, :, :, 1:])
        else:
            y = _contract(u, g)
        if config.device.read_noise.active:
            y = _read_noise(y, u, g, config, key)
    if config.inputs.bit_serial and not config.adc.per_input_slice:
        y = _shift_add_inputs(y, config)  # analog accumulation before the ADC
    return y, x_q


def _shift_add_inputs(y: jax.Array, config: CrossbarConfig) -> jax.Array:
    w = jnp.asarray(converters.input_slice_weights(config.inputs), dtype=y.dtype)
    return jnp.tensordot(w, y, axes=(0, 0))[None]


def _adc(y: jax.Array, config: CrossbarConfig, rows: int) -> jax.Array:
    """Digitizes (J, B, pr, S, P, M) array outputs with per-slice ranges."""
    if config.adc.bits == 0:
        return y
    ranges = converters.adc_ranges(config, rows)
    lo = np.array([r[0] for r in ranges])
    hi = np.array([r[1] for r in ranges])
    levels = np.array([converters.adc_levels(a, b, config.adc.bits) for a, b in ranges])
    shape = (len(ranges), 1, 1)
    cast = lambda a: jnp.asarray(a.reshape(shape), dtype=y.dtype)  # noqa: E731
    return converters.quantize_uniform(y, cast(lo), cast(hi), cast(levels))


def matmul(x: jax.Array, programmed: Programmed, config: CrossbarConfig,
           key: jax.Array | None = None) -> jax.Array:
    """The analog product `y ≈ x @ W` on a programmed crossbar.

    Args:
      x: inputs, shape (..., K).
      programmed: from `program(W, config, key)`.
      config: the same crossbar config (static).
      key: PRNG key for read noise (fresh per call; needed only when read noise is on).

    Returns:
      y of shape (..., N), in the units of `x @ W`.
    """
    x = jnp.asarray(x)
    K, N = programmed.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but the crossbar has K = {K} rows")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(programmed.g.dtype)
    batch = x.shape[:-1]
    lay = mapping.layout(K, N, config)
    y, x_q = array_outputs(x.reshape(-1, K), programmed, config, key)
    y = _adc(y, config, lay.rows)
    if config.inputs.bit_serial and config.adc.per_input_slice:
        y = _shift_add_inputs(y, config)
    y = y[0]  # (B, pr, S, P, M)
    if y.shape[3] == 2:  # digital differential subtraction
        y = y[:, :, :, 0] - y[:, :, :, 1]
    else:
        y = y[:, :, :, 0]
    if _unit_column(config):  # analog offset reference, digitized like the columns
        pc = len(lay.col_sizes)
        main, unit = y[..., :-pc], y[..., -pc:]
        y = (main.reshape(*main.shape[:-1], pc, lay.cols) - unit[..., None]).reshape(main.shape)
    y = jnp.sum(y, axis=1)  # digital partial sums of the row partitions: (B, S, M)
    if config.mapping.scheme == "offset" and not _unit_column(config):
        g_zero = jnp.asarray(mapping.zero_weight_conductances(config), dtype=y.dtype)
        y = y - g_zero[None, :, None] * jnp.sum(x_q, axis=-1)[:, None, None]
    rec = jnp.asarray(mapping.slice_recombination(config), dtype=y.dtype)
    y = jnp.tensordot(y, rec, axes=(1, 0))  # (B, M)
    y = y * (programmed.w_max * config.inputs.x_max * mapping.output_scale(config))
    if not lay.trivial_cols:
        y = y[:, lay.out_index]
    return y.reshape(*batch, N)


def analog_matmul(x: jax.Array, W: jax.Array, config: CrossbarConfig,
                  key: jax.Array | None = None) -> jax.Array:
    """`program` then `matmul`: one trial's analog `x @ W`.

    Args:
      x: inputs (..., K).
      W: weights (K, N).
      config: the crossbar config (static).
      key: PRNG key; split into a programming key and a read-noise key.

    Returns:
      y of shape (..., N).
    """
    k_prog = k_read = None
    if key is not None:
        k_prog, k_read = jax.random.split(key)
    return matmul(x, program(W, config, k_prog), config, k_read)
