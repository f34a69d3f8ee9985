"""Batch-norm folding (PHYSICS §7): each batch norm that reads a convolution's output goes into it.

The conv → batch-norm pairs come from an abstract forward trace of the model
(`jaxbar.nn.graph.trace`), so any NNX model folds, not only jaxbar's ResNets.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar.nn.graph import modules, trace
from jaxbar.nn.models import Identity

__all__ = ["conv_bn_pairs", "fold_batchnorm"]


def _example(model: nnx.Module, example: Any):
    if example is not None:
        return example
    if not hasattr(model, "input_shape"):
        raise ValueError(f"{type(model).__name__} has no input_shape: pass an example input")
    return jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)


def conv_bn_pairs(model: nnx.Module, example: Any = None) -> list[tuple[str, str]]:
    """(convolution path, batch-norm path) for every batch norm fed by a convolution alone.

    Args:
      model: any NNX model.
      example: an input (only its shape and dtype matter); default `(1, *model.input_shape)`.
    """
    return list(trace(model, _example(model, example)).conv_bn)


def fold_batchnorm(model: nnx.Module, example: Any = None) -> nnx.Module:
    """Folds every batch norm into the convolution before it.

    With `s = gamma / sqrt(var + eps)`: `W' = s * W` (per output channel) and
    `b' = s * (b - mean) + beta` (`b = 0` for a convolution without bias, which gains one);
    the batch norm is replaced by `Identity`. Computed in float64 and stored as float32. The
    input model is not modified.

    Args:
      model: any NNX model whose batch norms run in inference mode after their convolutions.
      example: an input to trace the model with (default `(1, *model.input_shape)`).

    Returns:
      The folded copy (`bn_folded = True` when the model has that attribute).
    """
    folded = nnx.clone(model)
    pairs = conv_bn_pairs(folded, example)
    mods = modules(folded)
    for conv_path, bn_path in pairs:
        conv, bn = mods[conv_path], mods[bn_path]
        s = np.asarray(bn.scale[...], np.float64) / np.sqrt(
            np.asarray(bn.var[...], np.float64) + bn.epsilon)
        w = np.asarray(conv.kernel[...], np.float64) * s
        b = 0.0 if conv.bias is None else np.asarray(conv.bias[...], np.float64)
        b = s * (b - np.asarray(bn.mean[...], np.float64)) + np.asarray(bn.bias[...], np.float64)
        conv.kernel[...] = jnp.asarray(w, jnp.float32)
        if conv.bias is None:
            conv.bias = nnx.Param(jnp.asarray(b, jnp.float32))
            conv.use_bias = True
        else:
            conv.bias[...] = jnp.asarray(b, jnp.float32)
        *owner, attr = bn_path.split(".")
        parent = mods[".".join(owner)] if owner else folded
        if isinstance(parent, nnx.List):
            parent[int(attr)] = Identity()
        else:
            setattr(parent, attr, Identity())
    if hasattr(folded, "bn_folded"):
        folded.bn_folded = True
    return folded
