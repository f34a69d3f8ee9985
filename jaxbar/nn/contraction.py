"""Contractions: the injection point through which every convolution and dense layer computes.

Layers never call ``lax.conv`` or ``jnp.dot`` themselves. They call a *contraction* object passed
into the forward pass with the layer's unique dotted name, so an analog crossbar simulator (or a
recorder, or a calibrator) can replace the exact float path layer by layer, the way AQT injects
quantization through ``dot_general``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

#: Padding as Keras means it: ``"same"``, ``"valid"`` (case-insensitive) or explicit
#: ``((top, bottom), (left, right))`` pairs.
Padding = str | Sequence[tuple[int, int]]

_CONV_DIMS = ("NHWC", "HWIO", "NHWC")


@runtime_checkable
class Contraction(Protocol):
    """What a network needs to compute its convolutions and dense layers.

    Implementations must be pure functions of their arguments (and of their own immutable
    configuration), so a whole network runs under ``jit``.
    """

    def conv(
        self, name: str, x: Array, kernel: Array, *, strides: tuple[int, int], padding: Padding
    ) -> Array:
        """2-D convolution without bias.

        Args:
            name: the layer's unique dotted path, e.g. ``"stage1.block0.conv1"``.
            x: inputs, NHWC.
            kernel: weights, HWIO.
            strides: ``(sh, sw)``.
            padding: Keras padding (see :data:`Padding`); ``"same"`` follows TensorFlow, which
                pads the extra row/column at the bottom/right (see :func:`explicit_padding`).

        Returns:
            The NHWC output.
        """
        ...

    def dense(self, name: str, x: Array, kernel: Array) -> Array:
        """Matrix product ``x @ kernel`` without bias.

        Args:
            name: the layer's unique dotted path, e.g. ``"head.dense"``.
            x: inputs ``(..., K)``.
            kernel: weights ``(K, N)``.

        Returns:
            ``(..., N)``.
        """
        ...


def explicit_padding(
    padding: Padding,
    in_hw: Sequence[int],
    kernel_hw: Sequence[int],
    strides: Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Converts Keras padding to explicit ``((top, bottom), (left, right))`` pads.

    ``"same"`` matches TensorFlow exactly: the output size is ``ceil(in / stride)`` and the total
    padding ``max((out - 1) * stride + k - in, 0)`` is split with the smaller half first, so with
    stride 2 on an even input a 3x3 kernel is padded ``(0, 1)``.

    Args:
        padding: ``"same"``, ``"valid"`` or explicit pairs.
        in_hw: input spatial size ``(H, W)``.
        kernel_hw: kernel spatial size ``(kh, kw)``.
        strides: ``(sh, sw)``.

    Returns:
        Two ``(before, after)`` pairs.
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return ((0, 0), (0, 0))
        if mode != "same":
            raise ValueError(f"padding must be 'same', 'valid' or explicit pairs, got {padding!r}")
        pads = []
        for n, k, s in zip(in_hw, kernel_hw, strides, strict=True):
            out = -(-int(n) // int(s))
            total = max((out - 1) * int(s) + int(k) - int(n), 0)
            pads.append((total // 2, total - total // 2))
        return (pads[0], pads[1])
    pairs = tuple((int(a), int(b)) for a, b in padding)
    if len(pairs) != 2:
        raise ValueError(f"explicit padding needs two (before, after) pairs, got {padding!r}")
    return (pairs[0], pairs[1])


@dataclasses.dataclass(frozen=True)
class Digital:
    """The exact floating-point path: ``lax.conv_general_dilated`` and ``jnp.dot``.

    Args:
        precision: matmul precision; ``HIGHEST`` by default so that accelerators do not silently
            use reduced-precision (e.g. TF32) products.
    """

    precision: lax.Precision | None = lax.Precision.HIGHEST

    def conv(
        self, name: str, x: Array, kernel: Array, *, strides: tuple[int, int], padding: Padding
    ) -> Array:
        del name
        pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=tuple(strides),
            padding=pads,
            dimension_numbers=_CONV_DIMS,
            precision=self.precision,
        )

    def dense(self, name: str, x: Array, kernel: Array) -> Array:
        del name
        return jnp.matmul(x, kernel, precision=self.precision)


#: The default contraction of every model's forward pass.
DIGITAL = Digital()


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One recorded layer call (see :class:`Recorder`)."""

    name: str
    kind: str  # "conv" or "dense"
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    strides: tuple[int, int] | None = None
    padding: Padding | None = None


class Recorder:
    """A contraction that computes like ``inner`` and records each layer call in order.

    Meant for abstract evaluation (``jax.eval_shape``) to list layers, shapes and call order.

    Args:
        inner: the contraction that computes the results (default :data:`DIGITAL`).
    """

    def __init__(self, inner: Contraction | None = None):
        self.inner = DIGITAL if inner is None else inner
        self.calls: list[LayerCall] = []

    def conv(self, name, x, kernel, *, strides, padding):
        y = self.inner.conv(name, x, kernel, strides=strides, padding=padding)
        self.calls.append(
            LayerCall(name, "conv", tuple(x.shape), tuple(kernel.shape), tuple(y.shape),
                      tuple(strides), padding)
        )
        return y

    def dense(self, name, x, kernel):
        y = self.inner.dense(name, x, kernel)
        self.calls.append(
            LayerCall(name, "dense", tuple(x.shape), tuple(kernel.shape), tuple(y.shape))
        )
        return y
