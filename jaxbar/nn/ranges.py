"""Learnable input (DAC) and ADC ranges for hardware-aware training.

A layer's crossbar config holds its ranges as floats. To learn them, `attach` gives each analog
layer a `LearnedRanges` parameter, and the layer then computes with ranges taken from it:

- input range `[0, m]` or `[-m, m]` with `m = exp(log_max)` (its sign is fixed);
- per weight slice, an ADC range of width `w = exp(log_width)`: `[-w/2, w/2]` when the
  calibrated range is symmetric (a sign-magnitude ADC stays one), otherwise
  `[w·(c - 1/2), w·(c + 1/2)]` with the center `c` in units of the width.

Both parameterizations keep `lo < hi` by construction and are scale-free, so one learning
rate suits every layer. The number of ADC levels stays that of the initial range.

The input range enters exactly through the linearity of the array: feeding `x·x_max/m` to a
layer whose config says `x_max` and rescaling its output by `m/x_max` is the layer with
range `m`. The ADC is applied to the pre-ADC array outputs of the core
(`jaxbar.core.mvm.array_outputs`) with the learned ranges, followed by the core's digital
steps with the ADC switched off; with the initial values this equals the core's result.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar.config import CrossbarConfig
from jaxbar.core import adc_circuits, converters, mapping, mvm

__all__ = [
    "LearnedRanges",
    "RangeSpec",
    "host_ranges",
    "init_ranges",
    "learned_product",
    "range_spec",
    "range_values",
]

#: A layer's range parameters: ``{"input_log_max": (), "adc_log_width": (S,),
#: "adc_center": (S,)}`` (the ADC entries only when the layer has an ADC).
LayerRanges = dict[str, jax.Array]

_LOG_BOUND = 60.0  # exp(±60) is far outside any useful range and still finite in float32
_CENTER_BOUND = 1e3


@dataclasses.dataclass(frozen=True)
class RangeSpec:
    """The static part of a layer's learnable ranges.

    Attributes:
      signed: the input range is `[-m, m]` (else `[0, m]`).
      adc: the layer has a quantizing ADC.
      symmetric: per weight slice, whether its ADC range is `[-h, h]`.
      levels: per weight slice, the ADC levels.
    """

    signed: bool
    adc: bool
    symmetric: tuple[bool, ...] = ()
    levels: tuple[int, ...] = ()


@functools.lru_cache(maxsize=1024)
def _adc_off(config: CrossbarConfig) -> CrossbarConfig:
    return config.replace(adc=config.adc.ideal())


@functools.lru_cache(maxsize=1024)
def _initial_adc(config: CrossbarConfig, K: int, N: int) -> tuple[tuple[float, float], ...]:
    if config.adc.bits == 0:
        return ()
    return converters.adc_ranges(config, mapping.layout(K, N, config).rows)


def range_spec(config: CrossbarConfig, K: int, N: int) -> RangeSpec:
    """The static range structure of a K×N layer under `config` (ranges filled in)."""
    ranges = _initial_adc(config, K, N)
    if not ranges:
        return RangeSpec(signed=config.inputs.signed, adc=False)
    levels = converters.adc_slice_levels(config)
    return RangeSpec(
        signed=config.inputs.signed,
        adc=True,
        symmetric=tuple(lv == 2**config.adc.bits - 1 for lv in levels),
        levels=tuple(levels),
    )


class LearnedRanges(nnx.Param):
    """A layer's learnable range parameters.

    `{"input_log_max": (), "adc_log_width": (S,), "adc_center": (S,)}`, the ADC entries only
    when the layer has an ADC.
    """


def init_ranges(config: CrossbarConfig, K: int, N: int) -> LayerRanges:
    """Range parameters at a K×N layer's configured ranges (input and ADC ranges filled in)."""
    p = {"input_log_max": jnp.asarray(math.log(config.inputs.x_max), jnp.float32)}
    adc = _initial_adc(config, K, N)
    if adc:
        lo = np.array([r[0] for r in adc], np.float64)
        hi = np.array([r[1] for r in adc], np.float64)
        width = hi - lo
        p["adc_log_width"] = jnp.asarray(np.log(width), jnp.float32)
        p["adc_center"] = jnp.asarray((lo + hi) / 2 / width, jnp.float32)
    return p


def range_values(params: LayerRanges, spec: RangeSpec):
    """The ranges a layer's parameters stand for.

    Args:
      params: the layer's range parameters.
      spec: its static structure.

    Returns:
      `(m, lo, hi)`: the input range magnitude (scalar) and the ADC range bounds per weight
      slice (`(S,)` arrays; None without an ADC). `lo < hi` always.
    """
    m = jnp.exp(jnp.clip(params["input_log_max"], -_LOG_BOUND, _LOG_BOUND))
    if not spec.adc:
        return m, None, None
    w = jnp.exp(jnp.clip(params["adc_log_width"], -_LOG_BOUND, _LOG_BOUND))
    sym = jnp.asarray(spec.symmetric)
    # |c| <= 1e3 keeps c ± 1/2 distinct in float32, so lo < hi holds strictly.
    c = jnp.where(sym, 0.0, jnp.clip(params["adc_center"], -_CENTER_BOUND, _CENTER_BOUND))
    return m, w * (c - 0.5), w * (c + 0.5)


def learned_product(x: jax.Array, prog: mvm.Programmed, config: CrossbarConfig,
                    params: LayerRanges, key: jax.Array | None, op: mvm.ArrayOp) -> jax.Array:
    """A layer's analog product with its input and ADC ranges from `params`.

    Args:
      x: the layer's inputs (as for `mvm.matmul` or `mvm.conv`).
      prog: its programmed crossbar.
      config: its crossbar config (the ranges the parameters started from).
      params: its range parameters.
      key: read-noise key.
      op: its array op.

    Returns:
      The product, in the units of the ideal one.
    """
    K, N = prog.shape
    spec = range_spec(config, K, N)
    m, lo, hi = range_values(params, spec)
    x0 = config.inputs.x_max
    # Pre-ADC outputs (J, *batch, pr, S, P, M); J = 1 unless digitized per input slice.
    y, x_q = mvm.array_outputs(x * (x0 / m), prog, config, key, op)
    if spec.adc:
        shape = (len(spec.levels), 1, 1)
        levels = jnp.asarray(np.array(spec.levels).reshape(shape), y.dtype)
        adc = config.adc
        if adc.ideal_components and not adc.stochastic_rounding:
            y = converters.quantize_uniform(y, lo.reshape(shape), hi.reshape(shape), levels)
        else:  # the circuit's thresholds move with the learned range
            y = adc_circuits.convert(y, lo.reshape(shape), hi.reshape(shape), levels, adc,
                                     prog.adc, mvm.rounding_key(config, key))
    if config.inputs.bit_serial and config.adc.per_input_slice:
        w = jnp.asarray(converters.input_slice_weights(config.inputs), y.dtype)
        y = jnp.tensordot(w, y, axes=(0, 0))
    else:
        y = y[0]
    return mvm.digital_readout(y, x_q, prog, _adc_off(config), op) * (m / x0)


def host_ranges(params: LayerRanges, spec: RangeSpec):
    """The ranges of a layer's parameters as floats: `(input range, ADC ranges or None)`."""
    m, lo, hi = range_values(jax.tree.map(np.asarray, params), spec)
    m = float(m)
    inp = (-m, m) if spec.signed else (0.0, m)
    if not spec.adc:
        return inp, None
    adc = []
    for s, a, b in zip(spec.symmetric, np.asarray(lo), np.asarray(hi), strict=True):
        a, b = float(a), float(b)
        if s:  # exactly symmetric, so the ADC stays sign-magnitude when read back
            h = max(abs(a), abs(b))
            a, b = -h, h
        adc.append((a, b))
    return inp, tuple(adc)
