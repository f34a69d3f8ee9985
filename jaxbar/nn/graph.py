"""Layers of a Flax NNX model: by graph path, and in forward order from an abstract trace.

Paths are the dotted NNX graph paths (`stage1.block0.conv1`, `blocks.0.attn.query`). The
forward trace runs the model under `jax.eval_shape` (no FLOPs) with each convolution, dense
layer and batch norm tapped, which gives the call order, the shapes and which batch norm
reads a convolution's output directly (the pairs batch-norm folding needs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "LayerCall",
    "Trace",
    "WEIGHT_LAYERS",
    "modules",
    "trace",
]

#: The stock layer types with a kernel that maps onto crossbars.
WEIGHT_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


def modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every submodule by dotted graph path (the root is absent)."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and path}


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One weight-layer call of a forward pass.

    Attributes:
      path: the layer's graph path.
      input_shape: shape of its input.
      kernel_shape: shape of its kernel.
      output_shape: shape of its output.
    """

    path: str
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Trace:
    """What one abstract forward pass saw.

    Attributes:
      calls: the weight layers' calls in forward order (a layer called twice appears twice).
      conv_bn: (convolution path, batch-norm path) for every batch norm whose input is a
        convolution's output, unchanged.
    """

    calls: tuple[LayerCall, ...]
    conv_bn: tuple[tuple[str, str], ...]


class _Tape:
    def __init__(self):
        self.calls: list[LayerCall] = []
        self.outputs: dict[int, str] = {}
        self.conv_bn: list[tuple[str, str]] = []


def _tapped(base: type) -> type:
    """A subclass of a stock layer whose calls are written to the instance's `_tape`."""
    if issubclass(base, nnx.BatchNorm):
        def __call__(self, x, *args, **kwargs):
            conv = self._tape.outputs.get(id(x))
            if conv is not None:
                self._tape.conv_bn.append((conv, self._tape_path))
            return base.__call__(self, x, *args, **kwargs)
    else:
        def __call__(self, x, *args, **kwargs):
            y = base.__call__(self, x, *args, **kwargs)
            self._tape.calls.append(LayerCall(self._tape_path, tuple(x.shape),
                                              tuple(self.kernel.shape), tuple(y.shape)))
            if isinstance(self, nnx.Conv):
                self._tape.outputs[id(y)] = self._tape_path
            return y
    return type(f"Tapped{base.__name__}", (base,), {"__call__": __call__})


_TAPPED = {t: _tapped(t) for t in (*WEIGHT_LAYERS, nnx.BatchNorm)}


def trace(model: nnx.Module, example: Any,
          forward: Callable[[nnx.Module, Any], Any] | None = None) -> Trace:
    """Runs `forward(model, example)` abstractly and records its layers.

    Args:
      model: any NNX model (not changed).
      example: an input (array, `jax.ShapeDtypeStruct` or pytree of them); only its shapes
        and dtypes matter.
      forward: how to call the model (default `model(example)`).

    Returns:
      The `Trace`.
    """
    forward = forward or (lambda m, x: m(x))
    tape = _Tape()
    swapped = []
    for path, m in modules(model).items():
        tapped = _TAPPED.get(type(m))
        if tapped is not None:
            object.__setattr__(m, "__class__", tapped)
            m._tape, m._tape_path = tape, path
            swapped.append((m, type(m).__mro__[1]))
    try:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                                example)
        # Split after tapping, so the tapped classes are in the graph definition; the state may
        # be abstract (`nnx.eval_shape`).
        graphdef, state = nnx.split(model)
        jax.eval_shape(lambda st, x: forward(nnx.merge(graphdef, st), x), state, abstract)
    finally:
        for m, base in swapped:
            object.__setattr__(m, "__class__", base)
            del m._tape, m._tape_path
    return Trace(tuple(tape.calls), tuple(tape.conv_bn))
