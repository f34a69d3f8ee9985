"""NNX layers whose contractions go through an injected :class:`~jaxbar.nn.contraction.Contraction`.

Convolution and dense layers hold a ``kernel`` (and optional ``bias``) parameter and a static,
unique dotted ``name``; they call ``contraction.conv(name, ...)`` / ``contraction.dense(name, ...)``
and add the bias digitally. Batch normalization, pooling and activations are digital and exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxbar.nn.contraction import DIGITAL, Contraction, Padding

Array = jax.Array

#: Keras' default batch-normalization epsilon.
KERAS_BN_EPSILON = 1e-3


def _normal_init(key: Array, shape: tuple[int, ...], std: float) -> Array:
    """``N(0, std^2)`` initial values.

    With a concrete key the values are drawn by NumPy from a seed taken from the key (no XLA
    compilation per shape, which costs ~1 s each on a small CPU); under a JAX transformation
    (``jit``, ``eval_shape``) with ``jax.random`` (same distribution, other values).
    """
    if isinstance(key, jax.core.Tracer):
        return std * jax.random.normal(key, shape, jnp.float32)
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(values * np.float32(std))


def _const(shape: tuple[int, ...], value: float) -> Array:
    return jnp.asarray(np.full(shape, value, np.float32))


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class Conv(nnx.Module):
    """2-D convolution (NHWC inputs, HWIO kernel) routed through a contraction.

    Args:
        in_features: input channels.
        out_features: output channels (filters).
        kernel_size: ``k`` or ``(kh, kw)``.
        name: unique dotted layer path, e.g. ``"stage1.block0.conv1"``.
        strides: ``s`` or ``(sh, sw)``.
        padding: Keras padding: ``"same"`` (TensorFlow semantics), ``"valid"`` or explicit pairs.
        use_bias: whether a bias is added (digitally) after the contraction.
        rngs: random streams for the kernel initialization (He normal, ``std = sqrt(2 / fan_in)``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        *,
        name: str,
        strides: int | Sequence[int] = 1,
        padding: Padding = "same",
        use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        kh, kw = _pair(kernel_size)
        std = float(np.sqrt(2.0 / (kh * kw * in_features)))
        self.kernel = nnx.Param(_normal_init(rngs.params(), (kh, kw, in_features, out_features),
                                             std))
        self.bias = nnx.Param(_const((out_features,), 0.0)) if use_bias else None
        self.name = name
        self.strides = _pair(strides)
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))

    def __call__(self, x: Array, contraction: Contraction = DIGITAL) -> Array:
        y = contraction.conv(
            self.name, x, self.kernel[...], strides=self.strides, padding=self.padding
        )
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Dense(nnx.Module):
    """Dense layer ``x @ kernel (+ bias)`` routed through a contraction.

    Args:
        in_features: K.
        out_features: N.
        name: unique dotted layer path, e.g. ``"head.dense"``.
        use_bias: whether a bias is added (digitally).
        rngs: random streams for the kernel initialization (normal,
            ``std = sqrt(2 / (K + N))``, Glorot).
    """

    def __init__(
        self, in_features: int, out_features: int, *, name: str, use_bias: bool = True,
        rngs: nnx.Rngs,
    ):
        std = float(np.sqrt(2.0 / (in_features + out_features)))
        self.kernel = nnx.Param(_normal_init(rngs.params(), (in_features, out_features), std))
        self.bias = nnx.Param(_const((out_features,), 0.0)) if use_bias else None
        self.name = name

    def __call__(self, x: Array, contraction: Contraction = DIGITAL) -> Array:
        y = contraction.dense(self.name, x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class BatchNorm(nnx.Module):
    """Batch normalization over the last axis with Keras semantics.

    Inference (``train=False``) uses the running statistics:
    ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta``. Training normalizes with the batch
    statistics (biased variance) and updates the running ones with ``momentum`` as Keras does.

    Args:
        num_features: channels.
        name: dotted path, e.g. ``"stage1.block0.bn1"``.
        epsilon: added to the variance (Keras default 1e-3).
        momentum: running-average momentum (Keras default 0.99).
    """

    def __init__(
        self, num_features: int, *, name: str, epsilon: float = KERAS_BN_EPSILON,
        momentum: float = 0.99,
    ):
        self.scale = nnx.Param(_const((num_features,), 1.0))
        self.bias = nnx.Param(_const((num_features,), 0.0))
        self.mean = nnx.BatchStat(_const((num_features,), 0.0))
        self.var = nnx.BatchStat(_const((num_features,), 1.0))
        self.name = name
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)

    def __call__(self, x: Array, train: bool = False) -> Array:
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1.0 - m) * lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1.0 - m) * lax.stop_gradient(var)
        else:
            mean, var = self.mean[...], self.var[...]
        inv = self.scale[...] * lax.rsqrt(var + self.epsilon)
        return (x - mean) * inv + self.bias[...]


class Identity(nnx.Module):
    """A no-op that stands where a folded batch normalization was.

    Args:
        name: dotted path of the layer it replaces.
    """

    def __init__(self, *, name: str = ""):
        self.name = name

    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        return x


def avg_pool(x: Array, pool: int | Sequence[int], strides: int | Sequence[int] | None = None
             ) -> Array:
    """Keras ``AveragePooling2D`` with ``"valid"`` padding on NHWC inputs."""
    ph, pw = _pair(pool)
    sh, sw = _pair(strides) if strides is not None else (ph, pw)
    s = lax.reduce_window(x, 0.0, lax.add, (1, ph, pw, 1), (1, sh, sw, 1), "VALID")
    return s / (ph * pw)


def max_pool(x: Array, pool: int | Sequence[int], strides: int | Sequence[int] | None = None
             ) -> Array:
    """Keras ``MaxPooling2D`` with ``"valid"`` padding on NHWC inputs."""
    ph, pw = _pair(pool)
    sh, sw = _pair(strides) if strides is not None else (ph, pw)
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, ph, pw, 1), (1, sh, sw, 1), "VALID")
