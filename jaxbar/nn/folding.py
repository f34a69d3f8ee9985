"""Batch-norm folding (PHYSICS.md §7)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar.nn.layers import BatchNorm, Identity


def fold_batchnorm(model: nnx.Module) -> nnx.Module:
    """Folds every batch norm into the convolution before it.

    With ``s = gamma / sqrt(var + eps)``: ``W' = s * W`` (per output channel) and
    ``b' = s * (b - mean) + beta`` (``b = 0`` for a convolution without bias, which gains one);
    the batch norm is replaced by :class:`~jaxbar.nn.layers.Identity`. Computed in float64 and
    stored as float32. The input model is not modified.

    Args:
        model: a model with a ``conv_bn_pairs()`` method (all jaxbar models).

    Returns:
        The folded copy (``bn_folded = True``).
    """
    folded = nnx.clone(model)
    for conv, owner, attr in folded.conv_bn_pairs():
        bn = getattr(owner, attr)
        if not isinstance(bn, BatchNorm):
            continue
        s = np.asarray(bn.scale[...], np.float64) / np.sqrt(
            np.asarray(bn.var[...], np.float64) + bn.epsilon)
        w = np.asarray(conv.kernel[...], np.float64) * s
        b = 0.0 if conv.bias is None else np.asarray(conv.bias[...], np.float64)
        b = s * (b - np.asarray(bn.mean[...], np.float64)) + np.asarray(bn.bias[...], np.float64)
        conv.kernel[...] = jnp.asarray(w, jnp.float32)
        if conv.bias is None:
            conv.bias = nnx.Param(jnp.asarray(b, jnp.float32))
        else:
            conv.bias[...] = jnp.asarray(b, jnp.float32)
        setattr(owner, attr, Identity(name=bn.name))
    folded.bn_folded = True
    return folded


__all__ = ["fold_batchnorm"]
