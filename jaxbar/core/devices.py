"""Device non-idealities: programming error, read noise, drift and the read I-V (PHYSICS §2).

Every model is a pure function of normalized conductances (g_max = 1) and, where it is
random, an explicit PRNG key:

- an error model gives the standard deviation `s(g)` of a cell at conductance g; errors
  are `s(g)·ε` with `ε` of zero mean and unit variance (reparameterized, so gradients
  flow through the conductances);
- drift ages programmed conductances to a time t after programming, with a per-cell
  power-law exponent and optional accumulated 1/f noise;
- drift compensation reads each array with a known input at t0 and at t and corrects
  its outputs digitally by the ratio;
- the read I-V turns a row's normalized voltage into each cell's current per unit
  conductance.

Measured devices come as presets or as look-up tables of (g, σ) points
(`jaxbar.measured_devices`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import DeviceConfig, DriftConfig, IVConfig, NoiseConfig

__all__ = [
    "accumulated_noise_std",
    "clip_conductances",
    "compensation_gain",
    "drift_conductances",
    "drift_exponent_stats",
    "drift_exponents",
    "noise_std",
    "program_cells",
    "read_current",
    "unit_noise",
]

def read_current(v: jax.Array, iv: IVConfig) -> jax.Array:
    """The current of a unit-conductance cell at normalized voltage v (PHYSICS §2).

    A column then carries `Σ_k g_k·f(v_k)`, so a layer's array product is the linear one with
    every row voltage replaced by `f(v)`.

    Args:
      v: row voltages, normalized to the DAC full scale (DAC outputs or input slices).
      iv: the I-V model.

    Returns:
      `f(v)`: v itself for the linear model (the same array, no operation),
      `sinh(k·v)/k` for "sinh", or the odd, piecewise-linear table.
    """
    if iv.model == "linear":
        return v
    if iv.model == "sinh":
        k = jnp.asarray(iv.k, v.dtype)
        return jnp.sinh(k * v) / k
    pts = np.asarray(iv.table, dtype=np.float64)
    vs = np.concatenate([-pts[:0:-1, 0], pts[:, 0]])  # odd extension through (0, 0)
    cs = np.concatenate([-pts[:0:-1, 1], pts[:, 1]])
    end_v, end_i = pts[-1]
    slope = (pts[-1, 1] - pts[-2, 1]) / (pts[-1, 0] - pts[-2, 0])
    inside = jnp.interp(v, jnp.asarray(vs, v.dtype), jnp.asarray(cs, v.dtype))
    # Beyond the table (an ideal DAC is not clipped): along the last segment, on either side.
    beyond = jnp.sign(v) * end_i + (v - jnp.sign(v) * end_v) * slope
    return jnp.where(jnp.abs(v) > end_v, beyond.astype(v.dtype), inside)


_LOG_FLOOR = 1e-7  # ln g of an (almost) empty cell: the drift fits are clipped there anyway


def noise_std(g: jax.Array, noise: NoiseConfig) -> jax.Array:
    """Per-cell standard deviation `s(g)` of an error model.

    Args:
      g: conductances (normalized to g_max = 1).
      noise: the model (see `NoiseConfig`).

    Returns:
      An array of the shape of `g`.
    """
    m = noise.model
    if m == "independent":
        return jnp.full_like(g, noise.sigma)
    if m == "proportional":
        return noise.sigma * jnp.abs(g)
    if m == "polynomial":
        return noise.scale * jnp.maximum(_horner(g, noise.coeffs), 0.0)
    if m == "saturating":
        a, b = noise.coeffs
        return noise.scale * a * -jnp.expm1(-jnp.maximum(g, 0.0) / b)
    if m == "table":
        pts = np.asarray(noise.table, dtype=np.float64)
        xp, fp = jnp.asarray(pts[:, 0], g.dtype), jnp.asarray(pts[:, 1], g.dtype)
        return noise.scale * jnp.interp(g, xp, fp)
    if m == "custom":
        return noise.scale * jnp.asarray(noise.fn(g), dtype=g.dtype)
    return jnp.zeros_like(g)


def unit_noise(key: jax.Array, shape: tuple[int, ...], dtype, distribution: str) -> jax.Array:
    """Zero-mean, unit-variance noise: "normal", "laplace" or "uniform"."""
    if distribution == "laplace":  # Laplace(b) has variance 2b²
        return jax.random.laplace(key, shape, dtype) / math.sqrt(2.0)
    if distribution == "uniform":  # U(-a, a) has variance a²/3
        return jax.random.uniform(key, shape, dtype, -math.sqrt(3.0), math.sqrt(3.0))
    return jax.random.normal(key, shape, dtype)


def clip_conductances(g: jax.Array, device: DeviceConfig) -> jax.Array:
    """Clips programmed conductances at zero, or to [g_min, 1] (`device.clip`)."""
    if device.clip == "range":
        return jnp.clip(g, device.g_min, 1.0)
    return jnp.maximum(g, 0.0)


def program_cells(g: jax.Array, key: jax.Array | None, device: DeviceConfig) -> jax.Array:
    """Applies programming error to target conductances, then clips.

    Args:
      g: target conductances, any shape.
      key: PRNG key of this trial (required when programming error is on).
      device: the device settings.

    Returns:
      Programmed conductances, same shape as `g`.
    """
    noise = device.programming_error
    if not noise.active:
        return g
    if key is None:
        raise ValueError("programming error is on (device.programming_error): pass a PRNG key")
    eps = unit_noise(key, g.shape, g.dtype, noise.distribution)
    return clip_conductances(g + noise_std(g, noise) * eps, device)


# ---- drift -----------------------------------------------------------------------------------
def _poly_log(g: jax.Array, coeffs: tuple[float, ...], lo: float, hi: float) -> jax.Array:
    return jnp.clip(_horner(jnp.log(jnp.maximum(jnp.abs(g), _LOG_FLOOR)), coeffs), lo, hi)


def _horner(v: jax.Array, coeffs: tuple[float, ...]) -> jax.Array:
    """Σ_i coeffs[i]·v^i."""
    out = jnp.zeros_like(v)
    for c in reversed(coeffs):
        out = out * v + c
    return out


def drift_exponent_stats(g0: jax.Array, drift: DriftConfig) -> tuple[jax.Array, jax.Array]:
    """Mean and spread of the drift exponent of cells at conductance g0.

    Returns:
      (ν̄(g0), σ_ν(g0)): polynomials in ln g0 clipped to their ranges.
    """
    return (_poly_log(g0, drift.nu_mean, *drift.nu_mean_range),
            _poly_log(g0, drift.nu_std, *drift.nu_std_range))


def drift_exponents(g0: jax.Array, drift: DriftConfig, key: jax.Array | None) -> jax.Array:
    """Per-cell drift exponents `ν = |ν̄(g0) + σ_ν(g0)·ε|`, `ε ~ N(0, 1)`.

    The fold at zero keeps conductances from growing with time, as in the published PCM
    model. `key` may be None only when every σ_ν is zero.
    """
    mean, std = drift_exponent_stats(g0, drift)
    if all(c == 0 for c in drift.nu_std) or drift.nu_std_range[1] == 0:
        return mean
    if key is None:
        raise ValueError("device.drift has a random exponent (nu_std): pass a PRNG key")
    return jnp.abs(mean + std * jax.random.normal(key, g0.shape, g0.dtype))


def accumulated_noise_std(g0: jax.Array, t: jax.Array, drift: DriftConfig) -> jax.Array:
    """Relative std of the 1/f noise accumulated from programming to `t` (s after t0).

    `min(q / max(g0^p, 1e-3), q_max)·sqrt(ln((t + t0 + t_read)/(2·t_read)))`.
    """
    q, p, q_max = drift.noise
    a = jnp.abs(g0)
    live = a > 1e-12  # where-guard: the gradient of a^p is infinite at 0
    a_p = jnp.where(live, jnp.where(live, a, 1.0) ** p, 0.0)
    qs = jnp.minimum(q / jnp.maximum(a_p, 1e-3), q_max)
    t_abs = t + drift.t0
    return qs * jnp.sqrt(jnp.log((t_abs + drift.t_read) / (2.0 * drift.t_read)))


def drift_conductances(g0: jax.Array, t: jax.Array | float, drift: DriftConfig,
                       key: jax.Array | None) -> jax.Array:
    """Ages programmed conductances to `t` seconds after programming ended.

    `g = g0·((t + t0)/t0)^(-ν)`, plus accumulated 1/f noise `|g|·s(g0, t)·ε` when
    `drift.noise` is set; the result is clipped at zero. Empty cells (g0 = 0) stay empty.

    Args:
      g0: conductances right after programming (at t0), any shape.
      t: time after programming in seconds (>= 0; may be traced).
      drift: the drift model.
      key: PRNG key (exponents and noise), or None for a deterministic model.

    Returns:
      Conductances at t, the shape of `g0`.
    """
    if not drift.active:
        return g0
    k_nu = k_noise = None
    if key is not None:
        k_nu, k_noise = jax.random.split(key)
    nu = drift_exponents(g0, drift, k_nu)
    t = jnp.asarray(t, g0.dtype)
    g = g0 * jnp.power((t + drift.t0) / drift.t0, -nu)
    if drift.noise:
        if key is None:
            raise ValueError("device.drift.noise is on: pass a PRNG key")
        s = accumulated_noise_std(g0, t, drift)
        g = g + jnp.abs(g) * s * jax.random.normal(k_noise, g0.shape, g0.dtype)
    return jnp.maximum(g, 0.0)


def compensation_gain(reference: jax.Array, now: jax.Array, mode: str) -> jax.Array:
    """Digital gains that undo drift: baseline read / read at t.

    Args:
      reference: per-column reads at t0 (..., P, M) (sums of |column output| over one-hot
        inputs on every row).
      now: the same reads at time t.
      mode: "global" (one gain per array: the reads summed over its columns) or
        "per_column".

    Returns:
      Gains broadcastable to the array outputs (..., P, M); 1 where a read is empty.
    """
    if mode == "global":
        reference = jnp.sum(reference, axis=(-2, -1), keepdims=True)
        now = jnp.sum(now, axis=(-2, -1), keepdims=True)
    pos = now > 0
    return jnp.where(pos, reference / jnp.where(pos, now, 1.0), 1.0)
