"""Calibration of input (DAC) and ADC ranges from data (PHYSICS §3, §4, §7).

Ranges are fitted on calibration inputs: the input range at a percentile of |x|,
and each weight slice's ADC range at the inner P% of the pre-ADC array outputs
(profiled with the ADC off and without device errors).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import CrossbarConfig
from jaxbar.core import mapping, mvm

__all__ = [
    "calibrated_adc_ranges",
    "calibrate",
    "input_range",
    "percentile_range",
    "pre_adc_outputs",
    "pre_adc_samples",
    "ranges_from_samples",
    "slice_samples",
    "subsample",
    "with_ranges",
]

_MAX_SAMPLES = 1 << 22  # percentiles from at most 4M evenly spaced values


def subsample(values) -> np.ndarray:
    """Values as a flat float64 array, evenly thinned to at most 4M values.

    Percentiles stay exact enough, and memory bounded.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size > _MAX_SAMPLES:
        v = v[:: math.ceil(v.size / _MAX_SAMPLES)]
    return v


def percentile_range(values, percentile: float) -> tuple[float, float]:
    """The range covering the inner `percentile` % of values (never empty)."""
    v = subsample(values)
    tail = (100.0 - percentile) / 2
    lo, hi = (float(q) for q in np.percentile(v, [tail, 100.0 - tail]))
    if not hi > lo:  # constant values: a tiny range around them
        pad = 1e-6 * max(1.0, abs(lo))
        lo, hi = lo - pad, hi + pad
    return lo, hi


def input_range(x, percentile: float = 99.99, signed: bool | None = None) -> tuple[float, float]:
    """The DAC range `[-m, m]` or `[0, m]` with m the `percentile` of |x|.

    Args:
      x: calibration inputs of the layer.
      percentile: percentile of |x| that sets the full scale.
      signed: force signed/unsigned; None = signed iff any input is negative.

    Returns:
      (lo, hi) for `config.inputs.range`.
    """
    v = subsample(x)
    if signed is None:
        signed = bool((v < 0).any())
    m = float(np.percentile(np.abs(v), percentile))
    if not m > 0:
        m = 1.0
    return (-m, m) if signed else (0.0, m)


def pre_adc_outputs(x, W, config: CrossbarConfig, op: mvm.ArrayOp | None = None) -> jax.Array:
    """Pre-ADC array outputs of the real and unit columns (ADC and device errors off).

    Traceable: a layer inside a compiled forward computes them in the program and sends
    them to the host (`slice_samples` there needs no JAX).

    Args:
      x: calibration inputs (NHWC images with a conv `op`).
      W: the (K, N) weight matrix.
      config: the layer's crossbar config, with its input range set.
      op: the array op (dense by default).

    Returns:
      (J, *batch, pr, S, P, M') outputs: M' the real and offset unit columns, not padding.
    """
    quiet = config.replace(adc=config.adc.ideal(), **{
        "device.programming_error": {"model": "none", "sigma": 0.0},
        "device.read_noise": {"model": "none", "sigma": 0.0}})
    prog = mvm.program(jnp.asarray(W), quiet)
    y, _ = mvm.array_outputs(jnp.asarray(x), prog, quiet, op=op)  # (J, *batch, pr, S, P, M)
    lay = mapping.layout(*prog.shape, config)
    units = np.arange(len(lay.col_index), y.shape[-1])  # offset unit columns, if any
    return y[..., np.concatenate([lay.out_index, units])]


def slice_samples(y) -> list[np.ndarray]:
    """One flat sample per weight slice of `pre_adc_outputs` (NumPy only)."""
    y = np.asarray(y)
    return [subsample(y[..., s, :, :]) for s in range(y.shape[-3])]


def pre_adc_samples(x, W, config: CrossbarConfig, op: mvm.ArrayOp | None = None
                    ) -> list[np.ndarray]:
    """One flat sample of pre-ADC outputs per weight slice (arguments of `pre_adc_outputs`)."""
    return slice_samples(pre_adc_outputs(x, W, config, op))


def ranges_from_samples(samples: list[np.ndarray], percentile: float = 99.98,
                        symmetric: bool = False, power_of_two: bool = False
                        ) -> tuple[tuple[float, float], ...]:
    """ADC ranges (one per weight slice) covering the inner `percentile` % of samples.

    Args:
      samples: pre-ADC values per weight slice.
      percentile: inner percentage covered (99.98 in the paper).
      symmetric: make each range [-h, h] (a sign-magnitude ADC).
      power_of_two: snap each slice's range to a power of two (in array units), so
        that slice ranges differ by powers of two.
    """
    ranges = []
    for v in samples:
        lo, hi = percentile_range(v, percentile)
        if symmetric or power_of_two:
            h = max(abs(lo), abs(hi))
            if power_of_two:
                h = 2.0 ** math.ceil(math.log2(h))
            lo, hi = (-h, h) if lo < 0 or symmetric else (0.0, h)
        ranges.append((lo, hi))
    return tuple(ranges)


def calibrated_adc_ranges(x, W, config: CrossbarConfig, percentile: float = 99.98,
               op: mvm.ArrayOp | None = None, symmetric: bool = False,
               power_of_two: bool = False) -> tuple[tuple[float, float], ...]:
    """Per-weight-slice ADC ranges from the pre-ADC outputs of `x` (see `ranges_from_samples`).

    Returns:
      One (lo, hi) per weight slice, LSB slice first, in array output units.
    """
    return ranges_from_samples(pre_adc_samples(x, W, config, op), percentile, symmetric,
                               power_of_two)


def with_ranges(config: CrossbarConfig, input_rng, adc_rngs) -> CrossbarConfig:
    """The config with an input range and (if it is "calibrated") the ADC ranges filled in."""
    cfg = config.replace(**{"inputs.range": tuple(input_rng)})
    if cfg.adc.range == "calibrated" and adc_rngs is not None:
        rngs = tuple(tuple(r) for r in adc_rngs)
        cfg = cfg.replace(**{"adc.range": rngs if len(rngs) > 1 else rngs[0]})
    return cfg


def calibrate(x, W, config: CrossbarConfig, input_percentile: float = 99.99,
              adc_percentile: float = 99.98, op: mvm.ArrayOp | None = None,
              signed: bool | None = None, symmetric: bool = False,
              power_of_two: bool = False) -> CrossbarConfig:
    """Fills in the input range and (when it is "calibrated") the ADC range of a layer.

    Args:
      x: calibration inputs of the layer (disjoint from evaluation data).
      W: the (K, N) weight matrix.
      config: the layer's crossbar config.
      input_percentile: percentile of |x| for the DAC full scale.
      adc_percentile: inner percentage of pre-ADC values covered by the ADC.
      op: the array op (dense by default).
      signed: force signed/unsigned inputs (None: from the data).
      symmetric: make each ADC range [-h, h] (see `ranges_from_samples`).
      power_of_two: snap each slice's ADC range to a power of two.

    Returns:
      The config with `inputs.range` and, if `adc.range == "calibrated"`, `adc.range` set.
    """
    cfg = config.replace(**{"inputs.range": input_range(x, input_percentile, signed)})
    rngs = None
    if cfg.adc.range == "calibrated":
        rngs = calibrated_adc_ranges(x, W, cfg, adc_percentile, op, symmetric, power_of_two)
    return with_ranges(cfg, cfg.inputs.range, rngs)
