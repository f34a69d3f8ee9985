"""ADC circuit models (PHYSICS §4.1): ramp, SAR, pipeline and cyclic converters.

Each converter is a pure function of the analog value and its instance's component errors,
which `draw_errors` draws once per trial (at programming) for every ADC instance of a layer.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import ADCConfig, ConfigError
from jaxbar.core import converters

__all__ = [
    "ADCErrors",
    "CDAC",
    "cdac",
    "cdac_levels",
    "column_instances",
    "convert",
    "draw_errors",
    "inverse_gain",
    "stochastic_round",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ADCErrors:
    """One trial's converter errors, expanded to the columns each instance serves.

    All values are in converter code units (one LSB of the B-bit converter); shapes are
    (pr, S, P, M, ·) with P = 1 after analog differential subtraction.

    Attributes:
      thresholds: ramp: the comparison level of every code c = 1 … 2^B − 1 (ideally c),
        comparator offset included, sorted (its counter counts the levels below the input).
      cdac: SAR: its CDAC's per-bit numbers (`CDAC`).
      stage_gain: pipeline, cyclic: the residue gain of every stage (ideally 2).
      stage_ref: pipeline, cyclic: the reference subtracted per unit digit, in units of the
        reference voltage (ideally 1).
      offsets: SAR: its comparator's offset (one value); pipeline, cyclic: comparator offsets,
        (upper, lower) per stage then the last comparator's (2B − 1 values).
    """

    thresholds: jax.Array | None = None
    cdac: CDAC | None = None
    stage_gain: jax.Array | None = None
    stage_ref: jax.Array | None = None
    offsets: jax.Array | None = None


def inverse_gain(adc: ADCConfig):
    """1/A for an amplifier of `gain_db` dB (0 for infinite gain)."""
    return 0.0 if adc.gain_db is None else 10.0 ** (-jnp.asarray(adc.gain_db) / 20.0)


def column_instances(cols: int, partitions: int, extra: int, group_size: int) -> np.ndarray:
    """Which converter instance of its row of arrays each column uses (static).

    Args:
      cols: columns per array (the padded partition width).
      partitions: column partitions pc; the M = pc·cols + extra columns are laid out as the
        arrays' columns, then `extra` unit columns (one per partition).
      extra: 0, or pc offset unit columns, each the last column of its array.
      group_size: columns per converter; groups never straddle two arrays.

    Returns:
      (M,) int instance ids in [0, partitions · ⌈(cols + extra/pc)/group_size⌉).
    """
    width = cols + (1 if extra else 0)
    per_array = -(-width // group_size)
    m = np.arange(partitions * cols)
    ids = (m // cols) * per_array + (m % cols) // group_size
    unit = np.arange(extra) * per_array + cols // group_size
    return np.concatenate([ids, unit]).astype(np.int32)


def _bits_of(codes: np.ndarray, nbits: int) -> np.ndarray:
    return ((codes[:, None] >> np.arange(nbits)[None, :]) & 1).astype(np.float32)


class CDAC(NamedTuple):
    """A sign-magnitude capacitive DAC as per-bit numbers (PHYSICS §4.1).

    The magnitude level of a code with bits b_n is `V_ref · Σ b_n weight_n / (gain +
    Σ b_n load_n)`, in code units: linear in the switched capacitors, divided by the
    amplifier's settling factor `1 + 1/(A β)`, which grows with the switched capacitance.
    Where that factor is a constant (infinite gain, or the split CDAC's fixed feedback) it
    is folded into the weights and `load` and `gain` are None.

    Attributes:
      weight: (..., B − 1) the switched capacitors over the reference capacitor.
      load: (..., B − 1) the capacitors over the feedback capacitor, times 1/A; or None.
      gain: (...) 1 + 1/A; or None.
    """

    weight: jax.Array
    load: jax.Array | None = None
    gain: jax.Array | None = None


def cdac(adc: ADCConfig, eps: jax.Array, sigma) -> CDAC:
    """A sign-magnitude CDAC with mismatched capacitors (`ramp` with `symmetric_cdac`, `sar`).

    Args:
      adc: the ADC config (bits, architecture, gain).
      eps: (..., B + 1) standard normal draws, one per capacitor.
      sigma: the unit-capacitor mismatch.

    Returns:
      Its per-bit weights; ideal components give exactly `weight_n = 2^n/2^(B−1)`.
    """
    B = adc.bits
    inv_a = inverse_gain(adc)
    n = np.arange(B - 1)
    if adc.model == "sar" and adc.split_cdac:
        # LSB array: bits n < H (caps 2^n) and a unit termination cap; MSB array: the other
        # bits (caps 2^(n−H)); a bridge capacitor C_b = 2^H/(2^H − 1) joins them.
        H = B // 2
        size = np.where(n < H, 2.0**n, 2.0 ** (n - H))
        caps = size + sigma * np.sqrt(size) * eps[..., : B - 1]
        c_term = 1.0 + sigma * eps[..., B - 1]
        cb0 = 2.0**H / (2.0**H - 1.0)
        c_b = (cb0 + sigma * np.sqrt(cb0) * eps[..., B])[..., None]
        low = n < H
        c_lsb = (c_term + jnp.sum(jnp.where(low, caps, 0.0), axis=-1))[..., None]
        c_msb = jnp.sum(jnp.where(low, 0.0, caps), axis=-1)[..., None]
        den = (c_lsb + c_b) * (c_msb + c_b) - c_b**2
        return CDAC(caps * jnp.where(low, c_b, c_lsb + c_b) / den / (1.0 + inv_a))
    caps = 2.0**n + sigma * 2.0 ** (n / 2) * eps[..., : B - 1]
    half = 2.0 ** (B - 1)
    c_ref = (half + sigma * 2.0 ** ((B - 1) / 2) * eps[..., B - 1])[..., None]
    if adc.gain_db is None:
        return CDAC(caps / c_ref)
    c_fb = (half + sigma * 2.0 ** ((B - 1) / 2) * eps[..., B])[..., None]
    gain = jnp.broadcast_to(1.0 + inv_a, eps.shape[:-1]).astype(eps.dtype)
    return CDAC(caps / c_ref, inv_a * caps / c_fb, gain)


def cdac_levels(adc: ADCConfig, eps: jax.Array, sigma) -> jax.Array:
    """Comparison levels T(c), c = 1 … 2^B − 1, of the converter's CDAC (PHYSICS §4.1).

    Args:
      adc: the ADC config (bits, architecture, gain).
      eps: (..., B + 1) standard normal draws, one per capacitor.
      sigma: the unit-capacitor mismatch.

    Returns:
      (..., 2^B − 1) levels in code units; ideal components give exactly T(c) = c.
    """
    B = adc.bits
    inv_a = inverse_gain(adc)
    c = np.arange(1, 2**B)
    if adc.model == "ramp" and not adc.symmetric_cdac:  # unipolar: B binary caps + reference
        n = np.arange(B)
        caps = 2.0**n + sigma * 2.0 ** (n / 2) * eps[..., :B]
        c_ref = 2.0**B + sigma * 2.0 ** (B / 2) * eps[..., B]
        total = _dot_bits(_bits_of(c, B), caps)
        ratio = 1.0 + inv_a * (c_ref[..., None] + total) / c_ref[..., None]
        return (2.0**B * total / c_ref[..., None]) / ratio
    half = 2.0 ** (B - 1)  # the reference voltage in code units
    s = c - 2 ** (B - 1)
    bits = _bits_of(np.abs(s), B - 1)
    dac = cdac(adc, eps, sigma)
    mag = half * _dot_bits(bits, dac.weight)
    if dac.load is not None:
        mag = mag / (dac.gain[..., None] + _dot_bits(bits, dac.load))
    return half + np.sign(s).astype(np.float32) * mag


def _dot_bits(bits: np.ndarray, caps: jax.Array) -> jax.Array:
    """Σ_n bit_n(code) · C_n for every code: (codes, n) · (..., n) → (..., codes)."""
    return jnp.sum(caps[..., None, :] * jnp.asarray(bits), axis=-1)


def _normal(key, shape, dtype):
    return jnp.zeros(shape, dtype) if key is None else jax.random.normal(key, shape, dtype)


def draw_errors(adc: ADCConfig, lead: tuple[int, ...], cols: int, partitions: int,
                extra: int, key: jax.Array | None, dtype=jnp.float32) -> ADCErrors:
    """Draws one trial's component errors for every converter instance of a layer.

    Args:
      adc: the ADC config (a circuit model).
      lead: (pr, S, P) of the array outputs the converters digitize.
      cols: columns per array.
      partitions: column partitions.
      extra: offset unit columns (0 or `partitions`), see `column_instances`.
      key: the layer's ADC key; None only when no error is random (`adc.random` false).
      dtype: float dtype of the errors.

    Returns:
      The errors expanded to the (pr, S, P, M) columns.

    Raises:
      ConfigError: a random error without a key.
    """
    if key is None and adc.random:
        raise ConfigError(f"adc.model = {adc.model!r} draws component errors: program the "
                          "crossbar with a PRNG key")
    B, vref = adc.bits, 2.0 ** (adc.bits - 1)
    ids = column_instances(cols, partitions, extra, adc.group_size)
    k_cap, k_cmp = (None, None) if key is None else tuple(jax.random.split(key))
    if adc.model == "ramp":  # one CDAC per array, one comparator per column
        eps = _normal(k_cap, (*lead, partitions, B + 1), dtype)
        levels = jnp.sort(cdac_levels(adc, eps, adc.sigma_capacitor), axis=-1)
        owner = np.minimum(np.arange(len(ids)) // cols, partitions - 1)
        owner[partitions * cols:] = np.arange(extra)
        offset = adc.sigma_comparator * vref * _normal(k_cmp, (*lead, len(ids)), dtype)
        return ADCErrors(thresholds=levels[..., owner, :] - offset[..., None])
    count = int(ids.max()) + 1
    if adc.model == "sar":
        eps = _normal(k_cap, (*lead, count, B + 1), dtype)
        dac = jax.tree.map(lambda a: a[..., ids, :] if a.ndim > len(lead) + 1 else a[..., ids],
                           cdac(adc, eps, adc.sigma_capacitor))
        offset = adc.sigma_comparator * vref * _normal(k_cmp, (*lead, count, 1), dtype)
        return ADCErrors(cdac=dac, offsets=offset[..., ids, :])
    stages = B - 1 if adc.model == "pipeline" else 1
    eps = _normal(k_cap, (3, *lead, count, stages), dtype)
    c1 = 1.0 + adc.sigma_c1 * eps[0]
    c2 = 1.0 + adc.sigma_c2 * eps[1]
    c_par = adc.sigma_cpar * eps[2]
    settle = 1.0 / (1.0 + inverse_gain(adc) * (c1 + c2 + c_par) / c1)  # 1/(1 + 1/(A·β))
    gain, ref = (1.0 + c2 / c1) * settle, c2 / c1 * settle
    n_cmp = 2 * B - 1 if adc.model == "pipeline" else 3
    offsets = adc.sigma_comparator * vref * _normal(k_cmp, (*lead, count, n_cmp), dtype)
    if adc.model == "cyclic":  # one stage reused for every bit
        gain = jnp.broadcast_to(gain, (*lead, count, B - 1))
        ref = jnp.broadcast_to(ref, (*lead, count, B - 1))
        offsets = jnp.concatenate([jnp.tile(offsets[..., :2], B - 1), offsets[..., 2:]], -1)
    return ADCErrors(stage_gain=gain[..., ids, :], stage_ref=ref[..., ids, :],
                     offsets=offsets[..., ids, :])


@jax.custom_jvp
def _straight_through(u: jax.Array, code: jax.Array) -> jax.Array:
    """`code`, with the derivative of `u` (the converter passes gradients straight through)."""
    return code


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[1], tangents[0]


def _count_below(w: jax.Array, thresholds: jax.Array, bits: int) -> jax.Array:
    """The number of a column's sorted levels below `w`, by bisection: B look-ups.

    A level exactly at `w` counts when that makes the code even, so ideal levels give the
    round-half-to-even of the quantizer.
    """
    table = thresholds.astype(w.dtype)
    T = table.shape[-1]
    cols = int(np.prod(table.shape[:-1]))
    flat = table.reshape(-1)
    base = (jnp.arange(cols, dtype=jnp.int32) * T).reshape(table.shape[:-1])
    code = jnp.zeros(w.shape, jnp.int32)
    for i in reversed(range(bits)):
        cand = code + 2**i
        level = jnp.take(flat, base + cand - 1, mode="clip")
        up = (w > level) | ((w == level) & (cand % 2 == 0))
        code = jnp.where(up, cand, code)
    return code


def _successive_approximation(w: jax.Array, dac: CDAC, offset: jax.Array,
                              bits: int) -> jax.Array:
    """A SAR conversion: B comparisons with the CDAC's level for each trial code.

    The first comparison, at mid-scale, decides the sign. Then trial code c + 2^i switches
    one more capacitor onto the magnitude: for positive codes the magnitude's bits are c's
    lower bits; for negative ones, m = 2^(B−1) − c, the trial magnitude is the complement's
    bits above i plus bit i. Either way the trial level adds capacitor i to those already
    kept (positive: bits accepted; negative: bits rejected), so no level table is needed.
    At exactly its level a comparison decides for the even code (trial codes are even
    except in the last step), as the quantizer rounds half to even.
    """
    half = 2.0 ** (bits - 1)
    weight = dac.weight.astype(w.dtype)
    center = half - offset[..., 0].astype(w.dtype)
    pos = w >= center
    sign = jnp.where(pos, half, -half)
    code = jnp.where(pos, 2 ** (bits - 1), 0)
    num = jnp.zeros_like(w)
    den = None if dac.load is None else jnp.broadcast_to(dac.gain.astype(w.dtype), w.shape)
    above = w - center  # with finite gain: w >= center + sign·num/den ⟺ above·den >= sign·num
    for i in reversed(range(bits - 1)):
        t_num = num + weight[..., i]
        if den is None:
            lhs, rhs = w, center + sign * t_num
        else:
            t_den = den + dac.load[..., i].astype(w.dtype)
            lhs, rhs = above * t_den, sign * t_num
        up = (lhs >= rhs) if i > 0 else (lhs > rhs)
        code = code + jnp.where(up, 2**i, 0)
        keep = up == pos
        num = jnp.where(keep, t_num, num)
        if den is not None:
            den = jnp.where(keep, t_den, den)
    return code


def _pipeline(w: jax.Array, errors: ADCErrors, bits: int) -> jax.Array:
    """1.5-bit stages (B − 1 of them, or one reused) and a final comparator."""
    vref = 2.0 ** (bits - 1)
    gain, ref, off = (a.astype(w.dtype) for a in (errors.stage_gain, errors.stage_ref,
                                                  errors.offsets))
    r = w - vref
    code = jnp.zeros(w.shape, jnp.int32)
    for n in range(bits - 1):
        high = r > vref / 4 + off[..., 2 * n]
        low = r < -vref / 4 + off[..., 2 * n + 1]
        d = high.astype(jnp.int32) - low.astype(jnp.int32)
        code = code + (d + 1) * 2 ** (bits - 2 - n)
        r = gain[..., n] * r - d.astype(w.dtype) * ref[..., n] * vref
    last = off[..., 2 * bits - 2]
    return code + ((r > last) | ((r == last) & (code % 2 == 1))).astype(jnp.int32)


def stochastic_round(u: jax.Array, key: jax.Array) -> jax.Array:
    """Rounds up with probability equal to the fractional part (straight-through gradient)."""
    low = jnp.floor(u)
    up = jax.random.uniform(key, u.shape, u.dtype) < (u - low)
    return _straight_through(u, low + up.astype(u.dtype))


def convert(y: jax.Array, lo, hi, levels, adc: ADCConfig, errors: ADCErrors | None,
            key: jax.Array | None = None) -> jax.Array:
    """Digitizes array outputs (..., pr, S, P, M) with a circuit model or stochastic rounding.

    Args:
      y: array outputs.
      lo: the lower range limit per weight slice, broadcastable to y.
      hi: the upper range limit, likewise.
      levels: the level count, likewise.
      adc: the ADC config.
      errors: the layer's converter errors for this trial (from `draw_errors`); None for the
        quantizer.
      key: a fresh key per conversion, for stochastic rounding.

    Returns:
      Values on the quantizer's levels `lo + k·Δ`, with straight-through gradients inside
      the range.
    """
    step = (hi - lo) / (levels - 1)
    u = (jnp.clip(y, lo, hi) - lo) / step
    if adc.model == "quantizer":
        if not adc.stochastic_rounding:
            return lo + converters.round_ste(u) * step
        if key is None:
            raise ValueError("adc.stochastic_rounding is on: pass a PRNG key to matmul")
        return lo + stochastic_round(u, key) * step
    if errors is None:
        raise ConfigError(f"adc.model = {adc.model!r}: the crossbar was programmed without "
                          "converter errors (program it with this config)")
    w = u + 0.5  # thresholds at half levels: code c covers w in [c, c + 1)
    if errors.thresholds is not None:
        code = _count_below(w, errors.thresholds, adc.bits)
    elif errors.cdac is not None:
        code = _successive_approximation(w, errors.cdac, errors.offsets, adc.bits)
    else:
        code = _pipeline(w, errors, adc.bits)
    code = jnp.clip(code, 0, levels - 1).astype(y.dtype)
    return lo + _straight_through(u, code) * step
