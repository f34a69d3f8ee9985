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
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.core import adc_circuits, conv2d, converters, devices, mapping

__all__ = [
    "ArrayOp",
    "Programmed",
    "analog_matmul",
    "array_outputs",
    "conv",
    "conv_op",
    "dense_op",
    "digital_readout",
    "drift",
    "matmul",
    "program",
    "program_at_time",
    "rounding_key",
]


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
      reference: with drift compensation, the baseline column reads at t0
        (pr, S, P', M), P' = 1 after analog differential subtraction; else None.
      gain: after `drift` with compensation, the digital gains applied to the ADC
        outputs (pr, S, 1, 1) per array or (pr, S, P', M) per column; else None.
      effective: what an ideal array op contracts the inputs with, when it is not `g`
        itself (pr, rows, S, P', M), computed once in `program` rather than on every MVM:
        `g+ - g-` for a differential pair subtracted in analog (P' = 1), or, for
        "input_source" parasitics, the arrays' transfer matrices with IR drop (row k holds
        the column currents when row k alone is driven at 1); else None. Leave it None
        when building a `Programmed` by hand.
      adc: with an ADC circuit model, the trial's converter errors per column
        (`adc_circuits.ADCErrors`, PHYSICS §4.1); else None.
      ir_info: with "input_source" parasitics and `precompute`, the `SolveInfo` of the
        transfer solves of every array (`crossbar_ir.array_currents`: which path computed
        them, sweeps, error); else None.
    """

    g: jax.Array
    w_max: jax.Array
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    reference: jax.Array | None = None
    gain: jax.Array | None = None
    effective: jax.Array | None = None
    adc: adc_circuits.ADCErrors | None = None
    ir_info: Any = None


def _analog_diff(config: CrossbarConfig) -> bool:
    return config.mapping.scheme == "differential" and config.mapping.subtract == "analog"


def _subtracted(g: jax.Array, config: CrossbarConfig) -> jax.Array:
    """Tiles as the array outputs see them: `g+ - g-` (P = 1) for an analog-subtracted pair."""
    return g[:, :, :, :1] - g[:, :, :, 1:] if _analog_diff(config) else g


def _effective(g: jax.Array, config: CrossbarConfig,
               shape: tuple[int, int]):
    """`Programmed.effective` for g (None: contract with g itself) and its `SolveInfo`.

    The info is that of the transfer solves, None without them.
    """
    topology = config.parasitics.topology
    if topology == "input_source" and config.ir_solver.precompute:
        return _ir_transfer(g, config, shape)
    if topology == "none" and _analog_diff(config):
        return _subtracted(g, config), None
    return None, None


def _ir_transfer(g: jax.Array, config: CrossbarConfig, shape: tuple[int, int]):
    """Transfer matrices of input-source arrays with IR drop and the solves' `SolveInfo`.

    The matrices are tiles (pr, rows, S, P', M).

    The circuit is linear in the row voltages, so the column currents for inputs u are
    exactly `u @ T`, with T's row k the currents when row k alone is driven at 1. The
    solver finds T for all rows at once from N adjoint solves per array.

    Each row is driven on top of a uniform input 10/K (which is solved too and subtracted),
    so the solver's tolerance applies relative to at least ten mean rows' currents. Driven
    alone, rows far from the integrators can carry currents 10^4 times smaller than the
    others at large r: their own relative accuracy is irrelevant to any real input and below
    float32 rounding (stalling the solver). A larger uniform drive would cost accuracy in the
    subtraction. In an interleaved pair that uniform drive's currents cancel between the
    polarities (weights of zero mean), and a row's own output can lie below the float32
    rounding of its cells' currents: the solves converge relative to the currents of both
    polarities added (`error_scale="cells"`), the scale of the rounding.
    """
    from jaxbar.core import crossbar_ir  # deferred: only parasitic runs need the solver

    lay = mapping.layout(*shape, config)
    K = shape[0]
    probe = jnp.full((1, K), 10.0 / K, g.dtype)
    u = jnp.concatenate([jnp.eye(K, dtype=g.dtype) + probe, probe])
    y, info = crossbar_ir.array_currents(u[None], g, config, lay, error_scale="cells",
                                         with_info=True)
    y = y[0, :K] - y[0, K:]
    if lay.trivial_rows:  # (K, 1, S, P', M) → (1, K, S, P', M)
        return jnp.moveaxis(y, 1, 0), info
    y = jnp.pad(y, [(0, 1)] + [(0, 0)] * (y.ndim - 1))  # padding rows drive nothing
    pr = len(lay.row_index)
    return y[jnp.asarray(lay.row_index), jnp.arange(pr)[:, None]], info


def _contracted(programmed: Programmed, config: CrossbarConfig, dtype) -> jax.Array:
    """The tiles an ideal array op contracts with (no parasitics)."""
    if programmed.effective is not None:
        return programmed.effective.astype(dtype)
    return _subtracted(programmed.g.astype(dtype), config)


def _unit_column(config: CrossbarConfig) -> bool:
    return config.mapping.scheme == "offset" and config.mapping.offset_subtraction == "unit_column"


def _tile(a: jax.Array, lay: mapping.Layout) -> jax.Array:
    """(K, N, ...) → (pr, rows, pc·cols, ...) with zero padding."""
    if lay.trivial_rows and lay.trivial_cols:
        return a[None]
    pad = [(0, 1), (0, 1)] + [(0, 0)] * (a.ndim - 2)
    a = jnp.pad(a, pad)
    return a[lay.row_index][:, :, lay.col_index]


def program(W: jax.Array, config: CrossbarConfig, key: jax.Array | None = None, *,
            finalize: bool = True) -> Programmed:
    """Maps a weight matrix onto crossbar conductances and programs them.

    Args:
      W: weights, shape (K, N).
      config: the crossbar config (static).
      key: PRNG key of this trial; programming error is drawn from it (needed only
        when `config.device.programming_error` is on). The same key gives the
        same conductances.
      finalize: also compute `Programmed.effective` (an IR-drop transfer matrix is a
        circuit solve); False when the conductances change again before use (`drift`).

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
    masked = not (lay.trivial_rows and lay.trivial_cols) or _unit_column(config)
    target = g
    g = devices.program_cells(g, key, config.device)
    if masked:
        g = jnp.where(mask, g, 0.0)
    reference = None
    drift_cfg = config.device.drift
    if drift_cfg.active and drift_cfg.compensation != "none":
        if drift_cfg.reference == "target":
            reference = _column_reads(jnp.where(mask, target, 0.0) if masked else target, config)
        else:
            reference = _column_reads(g, config)
    p = Programmed(g=g, w_max=w_max, shape=(K, N), reference=reference,
                   adc=_adc_errors(g, config, lay, key))
    return _with_effective(p, config) if finalize else p


_ADC_STREAM = 0x41444343  # folded into the programming key: converter errors draw their own


def _adc_errors(g: jax.Array, config: CrossbarConfig, lay: mapping.Layout,
                key: jax.Array | None) -> adc_circuits.ADCErrors | None:
    """The converter errors of a trial, for an ADC circuit model (PHYSICS §4.1)."""
    if config.adc.model == "quantizer":
        return None
    k_adc = None if key is None else jax.random.fold_in(key, _ADC_STREAM)
    pc = len(lay.col_sizes)
    lead = (g.shape[0], g.shape[2], 1 if _analog_diff(config) else g.shape[3])
    return adc_circuits.draw_errors(config.adc, lead, lay.cols, pc,
                                    pc if _unit_column(config) else 0, k_adc, g.dtype)


def _with_effective(p: Programmed, config: CrossbarConfig) -> Programmed:
    effective, info = _effective(p.g, config, p.shape)
    return dataclasses.replace(p, effective=effective, ir_info=info)


def _column_reads(g: jax.Array, config: CrossbarConfig) -> jax.Array:
    """What a drift-compensation read sees: Σ_rows |column output| over one-hot inputs.

    Returns (pr, S, P', M): P' = 1 when a differential pair is subtracted in analog.
    """
    return jnp.sum(jnp.abs(_subtracted(g, config)), axis=1)


_DRIFT_STREAM = 0x44726966  # folded into the programming key: drift draws its own numbers


def drift(programmed: Programmed, t: jax.Array | float, config: CrossbarConfig,
          key: jax.Array | None = None) -> Programmed:
    """Ages a programmed crossbar to `t` seconds after programming (PHYSICS §2).

    Applies `config.device.drift` to the conductances at t0 and, with drift compensation,
    reads every array with one-hot inputs and sets the digital gains
    `reference read / read at t` that `matmul` applies after the ADC.

    Args:
      programmed: from `program` (the state at t0).
      t: seconds after programming (>= 0); may be traced, so a sweep over time compiles once.
      config: the crossbar config (static).
      key: PRNG key of the drift exponents and accumulated noise (needed when they are
        random). Reusing a key with different t gives the same cells at different times.

    Returns:
      The crossbar at time t (unchanged when drift is off).
    """
    d = config.device.drift
    if not d.active:
        return programmed
    g = devices.drift_conductances(programmed.g, t, d, key)
    gain = None
    if d.compensation != "none":
        ref = programmed.reference
        if ref is None:
            ref = _column_reads(programmed.g, config)
        gain = devices.compensation_gain(ref, _column_reads(g, config), d.compensation)
    return _with_effective(dataclasses.replace(programmed, g=g, gain=gain), config)


def program_at_time(W: jax.Array, config: CrossbarConfig,
                    key: jax.Array | None = None) -> Programmed:
    """`program`, then `drift` to `config.device.time`: the crossbar as used for inference.

    The drift key is folded from `key`, so one trial key fixes both programming error and
    drift. Without a drift model this is `program`.
    """
    if not config.device.drift.active:
        return program(W, config, key)
    p = program(W, config, key, finalize=False)  # effective is found once, at time t
    k_drift = None if key is None else jax.random.fold_in(key, _DRIFT_STREAM)
    return drift(p, config.device.time, config, k_drift)


class ArrayOp(NamedTuple):
    """How the inputs of a layer meet its arrays: a dense product or a convolution.

    Attributes:
      contract: `(u, g) -> y`: input slices u of shape (J, *batch, K-like) and tiles
        g (pr, rows, S, P, M) → array outputs (J, *out_batch, pr, S, P, M).
      row_sum: `x_q -> Σ_k x_q[k]` per output position (*out_batch,), for the
        digital offset subtraction.
      patches: `x -> (*out_batch, K)` im2col patches, for effects that need every
        MVM's input vector explicitly (parasitics); identity for dense layers.
    """

    contract: Callable[[jax.Array, jax.Array], jax.Array]
    row_sum: Callable[[jax.Array], jax.Array]
    patches: Callable[[jax.Array], jax.Array]


def dense_op(lay: mapping.Layout) -> ArrayOp:
    """The array op of a dense layer: every input vector is one MVM per array."""

    def contract(u, g):
        if lay.trivial_rows:
            u = u[..., None, :]
        else:
            pad = [(0, 0)] * (u.ndim - 1) + [(0, 1)]
            u = jnp.pad(u, pad)[..., lay.row_index]  # (J, *batch, pr, rows)
        pr, rows, S, P, M = g.shape
        y = jnp.einsum("...pk,pkz->...pz", u, g.reshape(pr, rows, S * P * M)) if pr > 1 else (
            u[..., 0, :] @ g.reshape(rows, S * P * M))[..., None, :]
        return y.reshape(*y.shape[:-1], S, P, M)

    return ArrayOp(contract, lambda x_q: jnp.sum(x_q, axis=-1), lambda x: x)


def conv_op(lay: mapping.Layout, kernel_shape: tuple[int, int, int, int],
            strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]],
            dilation: tuple[int, int] = (1, 1)) -> ArrayOp:
    """The array op of a convolution with im2col semantics (PHYSICS §5).

    Each output pixel is one MVM of its receptive-field patch (rows in (kh, kw, c_in)
    order). Without per-MVM effects this is computed exactly by `lax.conv` with the
    tiles' conductances as kernels: a row partition is a kernel that is zero outside
    its rows, so no patches are materialized.

    Args:
      lay: the layout of the (kh·kw·c_in) × c_out matrix.
      kernel_shape: (kh, kw, c_in, c_out).
      strides: window strides.
      padding: explicit ((top, bottom), (left, right)) padding.
      dilation: kernel dilation (the receptive field skips `dilation - 1` pixels).
    """
    kh, kw, cin, _ = kernel_shape
    dilation = tuple(int(d) for d in dilation)
    K = kh * kw * cin
    dims = ("NHWC", "HWIO", "NHWC")
    hp = jax.lax.Precision.HIGHEST
    part = np.zeros(K, dtype=np.int32)
    row = np.zeros(K, dtype=np.int32)
    for p, idx in enumerate(lay.row_index):
        real = idx < K
        part[idx[real]] = p
        row[idx[real]] = np.flatnonzero(real)

    def conv(u, kernel):
        lead = u.shape[:-3]
        y = conv2d.conv2d(u.reshape(-1, *u.shape[-3:]), kernel, strides, padding,
                          dilation=dilation, precision=hp)
        return y.reshape(*lead, *y.shape[1:])

    def contract(u, g):
        pr, rows, S, P, M = g.shape
        if pr == 1:
            kernel = g[0, :K].reshape(kh, kw, cin, S * P * M)
        else:  # (K, pr, Z): each row of the kernel belongs to exactly one partition
            sel = jnp.asarray(part[:, None] == np.arange(pr)[None, :], dtype=g.dtype)
            kernel = (g[part, row][:, None] * sel[:, :, None, None, None])
            kernel = kernel.reshape(kh, kw, cin, pr * S * P * M)
        y = conv(u, kernel)
        return y.reshape(*y.shape[:-1], pr, S, P, M)

    def row_sum(x_q):
        return conv(x_q, jnp.ones((kh, kw, cin, 1), dtype=x_q.dtype))[..., 0]

    def patches(x):
        lead = x.shape[:-3]
        pt = jax.lax.conv_general_dilated_patches(
            x.reshape(-1, *x.shape[-3:]), (kh, kw), strides, padding,
            rhs_dilation=dilation, dimension_numbers=dims, precision=hp)
        # Patch features come out in (c_in, kh, kw) order; rows are (kh, kw, c_in).
        pt = pt.reshape(*pt.shape[:-1], cin, kh, kw)
        pt = jnp.moveaxis(pt, -3, -1).reshape(*pt.shape[:-3], K)
        return pt.reshape(*lead, *pt.shape[1:])

    return ArrayOp(contract, row_sum, patches)


def _read_noise(y, u, g, config, key, contract):
    """Adds per-MVM read noise, sampled exactly in output space.

    Independent Gaussian cell errors `s(g)·ε` contribute `Σ_k u_k s_k ε_k` to a
    column: a Gaussian with variance `Σ_k u_k² s(g_k)²`, drawn fresh per MVM.
    """
    if key is None:
        raise ValueError("read noise is on (device.read_noise): pass a PRNG key to matmul")
    var = devices.noise_std(g, config.device.read_noise) ** 2
    if _analog_diff(config):
        var = jnp.sum(var, axis=3, keepdims=True)
    v = contract(u * u, var)
    pos = v > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)  # finite gradient at v = 0
    return y + std * jax.random.normal(key, y.shape, dtype=y.dtype)


def _check_inputs(x, programmed):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(programmed.g.dtype)
    return x


def array_outputs(x: jax.Array, programmed: Programmed, config: CrossbarConfig,
                  key: jax.Array | None = None, op: ArrayOp | None = None,
                  quantized: bool = False):
    """Pre-ADC array outputs and the DAC outputs (for calibration and analysis).

    Args:
      x: inputs, (..., K) for a dense op (the default) or NHWC images for a conv op.
      programmed: from `program`.
      config: the crossbar config.
      key: PRNG key for read noise.
      op: the array op (`dense_op` by default).
      quantized: `x` are already DAC outputs.

    Returns:
      (y, x_q): y of shape (J, *batch, pr, S, P, M) in array output units (J input
      slices, or 1 after analog accumulation; P = 1 after analog differential
      subtraction), and the DAC outputs x_q.
    """
    lay = mapping.layout(*programmed.shape, config)
    op = dense_op(lay) if op is None else op
    x_q = x if quantized else converters.dac(_check_inputs(x, programmed) / config.inputs.x_max,
                                             config.inputs)
    g = programmed.g.astype(x_q.dtype)
    _check_supported(config)
    if _solves_per_mvm(programmed, config):
        from jaxbar.core import crossbar_ir  # deferred: only parasitic runs need the solver

        u = converters.input_slices(op.patches(x_q), config.inputs)
        y = crossbar_ir.array_currents(u, g, config, lay, key=key)
    else:
        u = devices.read_current(converters.input_slices(x_q, config.inputs), config.device.iv)
        y = op.contract(u, _contracted(programmed, config, x_q.dtype))
        if config.device.read_noise.active:
            y = _read_noise(y, u, g, config, key, op.contract)
    if config.inputs.bit_serial and not config.adc.per_input_slice:
        y = _shift_add_inputs(y, config)  # analog accumulation before the ADC
    return y, x_q


def _check_supported(config: CrossbarConfig) -> None:
    if config.parasitics.topology == "input_source" and config.device.read_noise.active:
        raise ConfigError("device.read_noise together with parasitics needs "
                          "parasitics.topology: gated_source (input_source is not supported)")


def _solves_per_mvm(programmed: Programmed, config: CrossbarConfig) -> bool:
    """Parasitics without a precomputed transfer matrix: every MVM is a circuit solve."""
    return config.parasitics.topology != "none" and programmed.effective is None


def _shift_add_inputs(y: jax.Array, config: CrossbarConfig) -> jax.Array:
    w = jnp.asarray(converters.input_slice_weights(config.inputs), dtype=y.dtype)
    return jnp.tensordot(w, y, axes=(0, 0))[None]


def _adc(y: jax.Array, config: CrossbarConfig, rows: int,
         errors: adc_circuits.ADCErrors | None = None, key: jax.Array | None = None
         ) -> jax.Array:
    """Digitizes (..., S, P, M) array outputs with per-slice ranges (and circuit errors)."""
    adc = config.adc
    if adc.bits == 0:
        return y
    ranges = converters.adc_ranges(config, rows)
    levels = converters.adc_slice_levels(config)

    def per_slice(values):  # (S,) → (S, 1, 1), broadcasting over polarity and columns
        return jnp.stack([jnp.asarray(v, dtype=y.dtype) for v in values]).reshape(-1, 1, 1)

    lo, hi = per_slice([r[0] for r in ranges]), per_slice([r[1] for r in ranges])
    if adc.ideal_components and not adc.stochastic_rounding:
        return converters.quantize_uniform(y, lo, hi, per_slice(levels))
    return adc_circuits.convert(y, lo, hi, per_slice(levels), adc, errors, key)


_ROUNDING_STREAM = 0x53524E44  # folded into the read key: stochastic rounding's draws


def rounding_key(config: CrossbarConfig, key: jax.Array | None) -> jax.Array | None:
    """The key of the ADC's stochastic rounding, folded from a read key (None when it is off).

    Raises:
      ValueError: stochastic rounding without a key.
    """
    if not config.adc.stochastic_rounding:
        return None
    if key is None:
        raise ValueError("adc.stochastic_rounding is on: pass a PRNG key to matmul")
    return jax.random.fold_in(key, _ROUNDING_STREAM)


def _converted_outputs(x_q, programmed, config, key, op) -> jax.Array:
    """Array MVMs of every input slice, ADC and shift-and-add: (*batch, pr, S, P, M).

    Bit-serial inputs without parasitics run as a `lax.scan` over input slices, so the
    J slices of the inputs are never materialized at once (memory traffic dominates).
    """
    lay = mapping.layout(*programmed.shape, config)
    inp = config.inputs
    _check_supported(config)
    errors, k_round = programmed.adc, rounding_key(config, key)
    if not inp.bit_serial or _solves_per_mvm(programmed, config):
        y, _ = array_outputs(x_q, programmed, config, key, op, quantized=True)
        y = _adc(y, config, lay.rows, errors, k_round)
        return (_shift_add_inputs(y, config) if inp.bit_serial and config.adc.per_input_slice
                else y)[0]
    g = programmed.g.astype(x_q.dtype)
    g_eff = _contracted(programmed, config, x_q.dtype)
    n = converters.input_magnitudes(x_q, inp)
    weights = jnp.asarray(converters.input_slice_weights(inp), dtype=x_q.dtype)

    def body(acc, k):
        u = devices.read_current(converters.input_slice(x_q, n, k, inp)[None], config.device.iv)
        y = op.contract(u, g_eff)
        if config.device.read_noise.active:
            rk = None if key is None else jax.random.fold_in(key, k)
            y = _read_noise(y, u, g, config, rk, op.contract)
        if config.adc.per_input_slice:
            y = _adc(y, config, lay.rows, errors,
                     None if k_round is None else jax.random.fold_in(k_round, k))
        return acc + weights[k] * y[0], None

    shape = jax.eval_shape(lambda: op.contract(x_q[None], g_eff)).shape[1:]
    acc, _ = jax.lax.scan(body, jnp.zeros(shape, x_q.dtype), jnp.arange(inp.num_slices))
    return acc if config.adc.per_input_slice else _adc(acc, config, lay.rows, errors, k_round)


def digital_readout(y: jax.Array, x_q: jax.Array, programmed: Programmed,
                    config: CrossbarConfig, op: ArrayOp) -> jax.Array:
    """The digital steps after the ADC: (*batch, pr, S, P, M) → (*batch, N).

    Drift-compensation gains, differential subtraction, the offset unit column or row-sum
    subtraction, partition sums, slice recombination and the rescale to `x @ W` units.

    Args:
      y: ADC outputs (or pre-ADC array outputs, to read out without an ADC).
      x_q: the DAC outputs the arrays saw (for the digital offset subtraction).
      programmed: the layer's crossbar.
      config: its crossbar config.
      op: its array op (`dense_op` or `conv_op`).
    """
    K, N = programmed.shape
    lay = mapping.layout(K, N, config)
    if programmed.gain is not None:  # drift compensation, applied digitally after the ADC
        y = y * programmed.gain.astype(y.dtype)
    y = y[..., 0, :] - y[..., 1, :] if y.shape[-2] == 2 else y[..., 0, :]
    if _unit_column(config):  # analog offset reference, digitized like the columns
        pc = len(lay.col_sizes)
        main, unit = y[..., :-pc], y[..., -pc:]
        y = (main.reshape(*main.shape[:-1], pc, lay.cols) - unit[..., None]).reshape(main.shape)
    y = jnp.sum(y, axis=-3)  # digital partial sums of the row partitions: (*batch, S, M)
    if config.mapping.scheme == "offset" and not _unit_column(config):
        g_zero = jnp.asarray(mapping.zero_weight_conductances(config), dtype=y.dtype)
        y = y - g_zero[:, None] * op.row_sum(x_q)[..., None, None]
    rec = mapping.slice_recombination(config)
    if len(rec) == 1:  # unsliced: the identity, as a view XLA fuses (a product over S would not)
        y = y[..., 0, :]
    else:
        y = jnp.einsum("...sm,s->...m", y, jnp.asarray(rec, dtype=y.dtype))
    y = y * (programmed.w_max * config.inputs.x_max * mapping.output_scale(config))
    return y if lay.trivial_cols else y[..., lay.out_index]


def matmul(x: jax.Array, programmed: Programmed, config: CrossbarConfig,
           key: jax.Array | None = None) -> jax.Array:
    """The analog product `y ≈ x @ W` on a programmed crossbar.

    Args:
      x: inputs, shape (..., K).
      programmed: from `program(W, config, key)`.
      config: the same crossbar config (static).
      key: PRNG key for read noise and the ADC's stochastic rounding (fresh per call;
        needed only when one of them is on).

    Returns:
      y of shape (..., N), in the units of `x @ W`.
    """
    K, N = programmed.shape
    x = _check_inputs(x, programmed)
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features but the crossbar has K = {K} rows")
    op = dense_op(mapping.layout(K, N, config))
    x_q = converters.dac(x / config.inputs.x_max, config.inputs)
    return digital_readout(_converted_outputs(x_q, programmed, config, key, op), x_q, programmed,
                    config, op)


def conv(x: jax.Array, programmed: Programmed, config: CrossbarConfig,
         kernel_shape: tuple[int, int, int, int], strides: tuple[int, int] = (1, 1),
         padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
         key: jax.Array | None = None, dilation: tuple[int, int] = (1, 1)) -> jax.Array:
    """An analog 2-D convolution (NHWC, HWIO) with im2col semantics (PHYSICS §5).

    Args:
      x: NHWC inputs (extra leading axes allowed).
      programmed: `program(kernel.reshape(kh·kw·c_in, c_out), config, key)`.
      config: the crossbar config (static).
      kernel_shape: (kh, kw, c_in, c_out).
      strides: window strides.
      padding: explicit ((top, bottom), (left, right)).
      key: PRNG key for read noise.
      dilation: kernel dilation.

    Returns:
      NHWC outputs, each pixel the analog MVM of its receptive field.
    """
    kh, kw, cin, cout = kernel_shape
    if programmed.shape != (kh * kw * cin, cout):
        raise ValueError(f"programmed shape {programmed.shape} does not match kernel "
                         f"{kernel_shape} (expected {(kh * kw * cin, cout)})")
    x = _check_inputs(x, programmed)
    op = conv_op(mapping.layout(*programmed.shape, config), kernel_shape, tuple(strides),
                 tuple(tuple(p) for p in padding), tuple(dilation))
    x_q = converters.dac(x / config.inputs.x_max, config.inputs)
    return digital_readout(_converted_outputs(x_q, programmed, config, key, op), x_q, programmed,
                    config, op)


def analog_matmul(x: jax.Array, W: jax.Array, config: CrossbarConfig,
                  key: jax.Array | None = None) -> jax.Array:
    """`program` then `matmul`: one trial's analog `x @ W`.

    Compiled once per config and shapes. A config that holds traced values (one swept by
    `vmap`) is traced along with the caller's transform instead.

    Args:
      x: inputs (..., K).
      W: weights (K, N).
      config: the crossbar config (static).
      key: PRNG key; split into a programming key (programming error and drift to
        `config.device.time`) and a read-noise key.

    Returns:
      y of shape (..., N).
    """
    try:
        hash(config)
    except TypeError:  # traced settings: not a compile-time constant
        return _analog_matmul(x, W, config, key)
    return _analog_matmul_jit(x, W, config, key)


def _analog_matmul(x, W, config, key):
    k_prog = k_read = None
    if key is not None:
        k_prog, k_read = jax.random.split(key)
    return matmul(x, program_at_time(W, config, k_prog), config, k_read)


# Outside `jit`, the operations would otherwise run (and compile) one by one.
_analog_matmul_jit = jax.jit(_analog_matmul, static_argnames="config")
