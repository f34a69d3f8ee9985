"""Device non-idealities: programming error and read noise (PHYSICS §2).

An error model gives the standard deviation `s(g)` of a cell at target
conductance g; errors are `s(g)·ε` with `ε ~ N(0, 1)` (reparameterized, so
gradients flow through the target conductances).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbar.config import DeviceConfig, NoiseConfig

__all__ = ["clip_conductances", "noise_std", "program_cells"]


def noise_std(g: jax.Array, noise: NoiseConfig) -> jax.Array:
    """Per-cell standard deviation `s(g)` of an error model.

    Args:
      g: target conductances (normalized to g_max = 1).
      noise: the model: independent (sigma), proportional (sigma·g) or custom (fn(g)).

    Returns:
      An array broadcastable to `g`.
    """
    if noise.model == "independent":
        return jnp.full_like(g, noise.sigma)
    if noise.model == "proportional":
        return noise.sigma * jnp.abs(g)
    if noise.model == "custom":
        return jnp.asarray(noise.fn(g), dtype=g.dtype)
    return jnp.zeros_like(g)


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
    eps = jax.random.normal(key, g.shape, dtype=g.dtype)
    return clip_conductances(g + noise_std(g, noise) * eps, device)
