"""Running a network on simulated crossbars: the analog contraction.

Every convolution and dense layer is programmed onto its own crossbars; pooling,
residual adds, activations, batch norm and biases stay digital (PHYSICS §7).
A trial is a PRNG key: each layer's conductances come from
`fold_in(trial_key, layer_id(name))`, so memory does not grow with trials.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.core import mvm
from jaxbar.nn.contraction import DIGITAL, explicit_padding
from jaxbar.nn.models import named_layers

__all__ = ["Analog", "LayerConfigs", "layer_id", "program_network"]

#: Resolved per-layer crossbar configs (None: the layer runs digitally).
LayerConfigs = Mapping[str, CrossbarConfig | None]


def layer_id(name: str) -> int:
    """A stable integer per layer name, folded into the trial key."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _config(configs: LayerConfigs, name: str) -> CrossbarConfig | None:
    if name not in configs:
        raise ConfigError(f"layer {name!r} has no analog configuration; known layers: "
                          f"{', '.join(configs)}")
    return configs[name]


def _layer_key(key, name):
    return None if key is None else jax.random.fold_in(key, layer_id(name))


def program_network(model: nnx.Module, configs: LayerConfigs,
                    trial_key: jax.Array | None) -> dict[str, mvm.Programmed]:
    """Programs every analog layer of a model for one trial.

    Args:
      model: a jaxbar model (its Conv/Dense kernels are mapped).
      configs: resolved per-layer configs.
      trial_key: the trial's key (programming error), or None when error-free.

    Returns:
      Layer name → programmed crossbar (digital layers are absent).
    """
    out = {}
    for name, layer in named_layers(model).items():
        cfg = _config(configs, name)
        if cfg is None:
            continue
        kernel = layer.kernel[...]
        W = kernel.reshape(-1, kernel.shape[-1])
        out[name] = mvm.program_at_time(W, cfg, _layer_key(trial_key, name))
    return out


@dataclasses.dataclass(frozen=True)
class Analog:
    """A contraction that computes each layer on its programmed crossbars.

    Attributes:
      configs: resolved per-layer crossbar configs (None entries stay digital).
      programmed: layer → programmed crossbar from `program_network`; when None, each
        layer is programmed on the fly from `trial_key` (for single forward passes and
        training, where the kernels change every step).
      trial_key: the trial's key (used only when `programmed` is None).
      read_key: key of this forward pass's read noise (folded per layer).
    """

    configs: LayerConfigs
    programmed: Mapping[str, mvm.Programmed] | None = None
    trial_key: jax.Array | None = None
    read_key: jax.Array | None = None

    def _programmed(self, name, kernel, cfg):
        if self.programmed is not None and name in self.programmed:
            return self.programmed[name]
        W = kernel.reshape(-1, kernel.shape[-1])
        return mvm.program_at_time(W, cfg, _layer_key(self.trial_key, name))

    def conv(self, name, x, kernel, *, strides, padding):
        cfg = _config(self.configs, name)
        if cfg is None:
            return DIGITAL.conv(name, x, kernel, strides=strides, padding=padding)
        if kernel.ndim != 4:
            raise ConfigError(f"layer {name!r}: only 2-D convolutions are supported, got a "
                              f"kernel of shape {kernel.shape}")
        pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
        prog = self._programmed(name, kernel, cfg)
        return mvm.conv(x, prog, cfg, tuple(kernel.shape), tuple(strides), pads,
                        key=_layer_key(self.read_key, name))

    def dense(self, name, x, kernel):
        cfg = _config(self.configs, name)
        if cfg is None:
            return DIGITAL.dense(name, x, kernel)
        prog = self._programmed(name, kernel, cfg)
        return mvm.matmul(x, prog, cfg, key=_layer_key(self.read_key, name))


def forward(model: nnx.Module, x: jax.Array, configs: LayerConfigs | None,
            key: jax.Array | None = None) -> jax.Array:
    """One analog forward pass (programming and read noise from `key`); digital if None."""
    if configs is None:
        return model(x)
    tk = rk = None
    if key is not None:
        tk, rk = jax.random.split(key)
    return model(jnp.asarray(x), Analog(configs, None, tk, rk))
