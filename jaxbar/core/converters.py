"""Converters: uniform quantizers, the DAC with bit-serial inputs, the ADC.

PHYSICS §3–4. Rounding is half to even and passes gradients straight through
(the quantizer's derivative is 1 inside its range and 0 where it clips).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbar.config import ConfigError, CrossbarConfig, InputsConfig

__all__ = [
    "adc_levels",
    "adc_ranges",
    "adc_slice_levels",
    "dac",
    "input_magnitudes",
    "input_slice",
    "input_slices",
    "input_slice_weights",
    "quantize_uniform",
    "round_ste",
]


@jax.custom_jvp
def round_ste(x: jax.Array) -> jax.Array:
    """Rounds half to even with a straight-through (identity) gradient."""
    return jnp.round(x)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    # A custom rule instead of `x + stop_gradient(round(x) - x)`: no extra forward work.
    return round_ste(primals[0]), tangents[0]


def quantize_uniform(y: jax.Array, lo, hi, levels) -> jax.Array:
    """Uniform quantizer with `levels` levels on [lo, hi] (PHYSICS §4).

    `q(y) = lo + round((clip(y, lo, hi) - lo) / Δ)·Δ` with `Δ = (hi - lo)/(levels - 1)`.

    Args:
      y: values to quantize.
      lo: lower range limit (a scalar or an array broadcastable against `y`).
      hi: upper range limit (likewise).
      levels: number of levels (>= 2), scalar or broadcastable array.

    Returns:
      The quantized values, with straight-through gradients inside the range.
    """
    step = (hi - lo) / (levels - 1)
    # Clipped in two halves around the scaling (the upper limit in level units): a maximum
    # directly followed by a minimum becomes an XLA `clamp`, which XLA:CPU cannot fuse into
    # the convolutions' YNNPACK subgraphs, while `maximum` and `minimum` alone it can.
    idx = round_ste(jnp.minimum((jnp.maximum(y, lo) - lo) / step, levels - 1))
    return lo + idx * step


def adc_levels(lo: float, hi: float, bits: int) -> int:
    """Levels of a `bits`-bit converter on [lo, hi]: symmetric ranges are sign-magnitude."""
    return 2**bits - 1 if lo == -hi else 2**bits


def adc_slice_levels(config: CrossbarConfig) -> tuple[int, ...]:
    """ADC levels per weight slice, decided from the config's structure (no traced values)."""
    adc, S = config.adc, config.mapping.slices
    if adc.range in ("max", "granular"):
        split = config.mapping.scheme == "differential" and config.mapping.subtract == "digital"
        sym = _max_symmetric(config, split)
        return (2**adc.bits - 1 if sym else 2**adc.bits,) * S
    pairs = adc.ranges if adc.per_slice else adc.ranges * S
    return tuple(adc_levels(lo, hi, adc.bits) for lo, hi in pairs)


def dac(x_n: jax.Array, inputs: InputsConfig) -> jax.Array:
    """Quantizes normalized inputs `x_n = x / x_max` (PHYSICS §3).

    Args:
      x_n: inputs divided by the input range's magnitude `m`.
      inputs: the DAC settings; `bits = 0` is ideal (no clipping, no rounding).

    Returns:
      `x_q` in [0, 1] (unsigned) or [-1, 1] (signed, sign-magnitude).
    """
    if inputs.bits == 0:
        return x_n
    if inputs.signed:
        return quantize_uniform(x_n, -1.0, 1.0, 2**inputs.bits - 1)
    return quantize_uniform(x_n, 0.0, 1.0, 2**inputs.bits)


def input_slice_weights(inputs: InputsConfig) -> tuple[float, ...]:
    """Shift-and-add weights `(2^s-1)/(2^m-1)·2^(k·s)` of the J input slices, LSB first."""
    if not inputs.bit_serial:
        return (1.0,)
    s, m = inputs.slice_bits, inputs.magnitude_bits
    return tuple((2**s - 1) / (2**m - 1) * 2 ** (k * s) for k in range(inputs.num_slices))


def input_slices(x_q: jax.Array, inputs: InputsConfig) -> jax.Array:
    """Splits DAC outputs into bit-serial input slices (PHYSICS §3).

    Args:
      x_q: DAC outputs, shape (..., K).
      inputs: the DAC settings.

    Returns:
      Shape (J, ..., K): slice k is `sign·digit_k/(2^s-1)` of the magnitude integer
      `round(|x_q|·(2^m-1))`, LSB first; J = 1 (x_q itself) unless bit-serial.
      Gradients pass straight through: `Σ_k w_k·slice_k` has derivative 1 in `x_q`.
    """
    if not inputs.bit_serial:
        return x_q[None]
    return _input_slices(x_q, inputs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _input_slices(x_q: jax.Array, inputs: InputsConfig) -> jax.Array:
    s, m = inputs.slice_bits, inputs.magnitude_bits
    n = jnp.round(jnp.abs(x_q) * (2**m - 1)).astype(jnp.int32)
    shifts = jnp.arange(inputs.num_slices, dtype=jnp.int32).reshape((-1,) + (1,) * x_q.ndim) * s
    digits = ((n[None] >> shifts) & (2**s - 1)).astype(x_q.dtype)
    return jnp.sign(x_q)[None] * digits * (1.0 / (2**s - 1))


@_input_slices.defjvp
def _input_slices_jvp(inputs, primals, tangents):
    # Straight-through: spread the tangent so that the recombined input sees derivative 1.
    (x_q,), (t,) = primals, tangents
    share = t / sum(input_slice_weights(inputs))
    return _input_slices(x_q, inputs), jnp.broadcast_to(share[None], (inputs.num_slices,
                                                                     *x_q.shape))


def input_magnitudes(x_q: jax.Array, inputs: InputsConfig) -> jax.Array:
    """The magnitude integers `round(|x_q|·(2^m-1))` of bit-serial inputs (int32, no gradient)."""
    m = inputs.magnitude_bits
    return jnp.round(jnp.abs(jax.lax.stop_gradient(x_q)) * (2**m - 1)).astype(jnp.int32)


def input_slice(x_q: jax.Array, n: jax.Array, k, inputs: InputsConfig) -> jax.Array:
    """Input slice k (may be traced) of bit-serial inputs: `sign·digit_k/(2^s-1)`.

    Args:
      x_q: DAC outputs (carries the straight-through gradient).
      n: `input_magnitudes(x_q, inputs)`.
      k: slice index, LSB first.
      inputs: the DAC settings.
    """
    s = inputs.slice_bits
    u = ((n >> (k * s)) & (2**s - 1)).astype(x_q.dtype)
    if s > 1:
        u = u * (1.0 / (2**s - 1))
    if inputs.signed:  # unsigned inputs skip a pass over x_q per slice
        u = jnp.sign(jax.lax.stop_gradient(x_q)) * u
    return _ste_share(x_q, u, 1.0 / sum(input_slice_weights(inputs)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _ste_share(x_q, value, share):
    return value


@_ste_share.defjvp
def _ste_share_jvp(share, primals, tangents):
    # `value` is built from stop_gradient(x_q): its tangent is x_q's, times its share.
    return primals[1], tangents[0] * share


def _max_range(config: CrossbarConfig, rows: int, polarity_split: bool):
    """The largest possible array output range.

    Written without comparisons on g_min, so the on/off ratio may be a traced (swept) value.
    """
    g_range = 1.0 - config.device.g_min
    signed = config.inputs.signed
    if config.mapping.scheme == "differential" and not polarity_split:
        return -rows * g_range, rows * g_range  # x·(g+ - g-) ∈ [-g_range, g_range]
    return (-float(rows) if signed else 0.0), float(rows)  # x·g, g ∈ [g_min, 1]


def _max_symmetric(config: CrossbarConfig, polarity_split: bool) -> bool:
    return (config.mapping.scheme == "differential" and not polarity_split) or config.inputs.signed


def adc_ranges(config: CrossbarConfig, rows: int) -> tuple[tuple[float, float], ...]:
    """The ADC range of each weight slice, LSB slice first, in array output units.

    Args:
      config: the crossbar config (with a filled-in ADC range).
      rows: rows of the largest array partition of the layer (for "max"/"granular").

    Returns:
      One (lo, hi) per weight slice.

    Raises:
      ConfigError: an unfilled "calibrated" range.
    """
    adc, S = config.adc, config.mapping.slices
    split = config.mapping.scheme == "differential" and config.mapping.subtract == "digital"
    if adc.range == "calibrated":
        raise ConfigError(
            "adc.range = 'calibrated' has not been filled in: calibrate the layer "
            "(jaxbar.calibration / jaxbar calibrate) or give explicit [lo, hi] ranges"
        )
    if adc.range == "max":
        return (_max_range(config, rows, split),) * S
    if adc.range == "granular":
        w, inp = config.weights, config.inputs
        g_range = 1.0 - config.device.g_min
        if S > 1:
            lsb_g = g_range / (2**config.slice_bits - 1)
        elif config.mapping.scheme == "differential":
            lsb_g = g_range / (2 ** (w.bits - 1) - 1)
        else:
            lsb_g = g_range / (2**w.bits - 1)
        if inp.bit_serial and adc.per_input_slice:
            lsb_x = 1.0 / (2**inp.slice_bits - 1)
        else:
            lsb_x = 1.0 / (2**inp.magnitude_bits - 1)
        step = lsb_g * lsb_x
        B = adc.bits
        if _max_symmetric(config, split):
            h = step * (2 ** (B - 1) - 1)
            return ((-h, h),) * S
        return ((0.0, step * (2**B - 1)),) * S
    return tuple(adc.ranges) if adc.per_slice else tuple(adc.ranges) * S
