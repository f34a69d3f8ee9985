"""Learnable input (DAC) and ADC ranges for hardware-aware training.

A layer's crossbar config holds its ranges as static floats (configs are hashable, so they can
be static under ``jit``). To learn them, :class:`LearnedRangesAnalog` computes each layer like
:class:`jaxbar.nn.analog.Analog` but takes the ranges from traced parameters:

- input range ``[0, m]`` or ``[-m, m]`` with ``m = exp(log_max)`` (its sign is fixed);
- per weight slice, an ADC range of width ``w = exp(log_width)``: ``[-w/2, w/2]`` when the
  calibrated range is symmetric (a sign-magnitude ADC stays one), otherwise
  ``[w·(c - 1/2), w·(c + 1/2)]`` with the center ``c`` in units of the width.

Both parameterizations keep ``lo < hi`` by construction and are scale-free, so one learning
rate suits every layer. The number of ADC levels stays that of the initial range.

The input range enters exactly through the linearity of the array: feeding ``x·x_max/m`` to a
layer whose config says ``x_max`` and rescaling its output by ``m/x_max`` is the layer with
range ``m``. The ADC is applied to the pre-ADC array outputs of the core
(:func:`jaxbar.core.mvm.array_outputs`) with the learned ranges, followed by the core's digital
steps with the ADC switched off; with the initial values this equals the core's result.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.core import converters, mapping, mvm
from jaxbar.nn.analog import LayerConfigs, layer_id
from jaxbar.nn.calibrate import Calibration, LayerCalibration
from jaxbar.nn.contraction import DIGITAL, explicit_padding

__all__ = [
    "LearnedRangesAnalog",
    "RangeSpec",
    "init_ranges",
    "range_spec",
    "range_values",
    "ranges_to_calibration",
    "with_learned_ranges",
]

#: A layer's range parameters: ``{"input_log_max": (), "adc_log_width": (S,),
#: "adc_center": (S,)}`` (the ADC entries only when the layer has an ADC).
LayerRanges = dict[str, jax.Array]

_LOG_BOUND = 60.0  # exp(±60) is far outside any useful range and still finite in float32
_CENTER_BOUND = 1e3


@dataclasses.dataclass(frozen=True)
class RangeSpec:
    """The static part of a layer's learnable ranges.

    Attributes:
      signed: the input range is ``[-m, m]`` (else ``[0, m]``).
      adc: the layer has a quantizing ADC.
      symmetric: per weight slice, whether its ADC range is ``[-h, h]``.
      levels: per weight slice, the ADC levels.
    """

    signed: bool
    adc: bool
    symmetric: tuple[bool, ...] = ()
    levels: tuple[int, ...] = ()


@functools.lru_cache(maxsize=1024)
def _adc_off(config: CrossbarConfig) -> CrossbarConfig:
    return config.replace(**{"adc.bits": 0, "adc.range": None})


@functools.lru_cache(maxsize=1024)
def _initial_adc(config: CrossbarConfig, K: int, N: int) -> tuple[tuple[float, float], ...]:
    if config.adc.bits == 0:
        return ()
    return converters.adc_ranges(config, mapping.layout(K, N, config).rows)


def range_spec(config: CrossbarConfig, K: int, N: int) -> RangeSpec:
    """The static range structure of a K×N layer under ``config`` (ranges filled in)."""
    ranges = _initial_adc(config, K, N)
    if not ranges:
        return RangeSpec(signed=config.inputs.signed, adc=False)
    levels = converters.adc_slice_levels(config)
    return RangeSpec(
        signed=config.inputs.signed,
        adc=True,
        symmetric=tuple(lv == 2**config.adc.bits - 1 for lv in levels),
        levels=tuple(levels),
    )


def init_ranges(configs: LayerConfigs, shapes: Mapping[str, tuple[int, ...]]
                ) -> dict[str, LayerRanges]:
    """Range parameters initialized at each analog layer's configured ranges.

    Args:
      configs: resolved per-layer configs (input and ADC ranges filled in, e.g. calibrated).
      shapes: kernel shape of every layer (``jaxbar.nn.models.layer_shapes``).

    Returns:
      Layer name → range parameters, for the analog layers only.

    Raises:
      ConfigError: a layer's ADC range is an unfilled "calibrated".
    """
    out = {}
    for name, cfg in configs.items():
        if cfg is None:
            continue
        shape = shapes[name]
        K, N = int(np.prod(shape[:-1])), int(shape[-1])
        p = {"input_log_max": jnp.asarray(math.log(cfg.inputs.x_max), jnp.float32)}
        adc = _initial_adc(cfg, K, N)
        if adc:
            lo = np.array([r[0] for r in adc], np.float64)
            hi = np.array([r[1] for r in adc], np.float64)
            width = hi - lo
            p["adc_log_width"] = jnp.asarray(np.log(width), jnp.float32)
            p["adc_center"] = jnp.asarray((lo + hi) / 2 / width, jnp.float32)
        out[name] = p
    return out


def range_values(params: LayerRanges, spec: RangeSpec):
    """The ranges a layer's parameters stand for.

    Args:
      params: the layer's range parameters.
      spec: its static structure.

    Returns:
      ``(m, lo, hi)``: the input range magnitude (scalar) and the ADC range bounds per weight
      slice (``(S,)`` arrays; None without an ADC). ``lo < hi`` always.
    """
    m = jnp.exp(jnp.clip(params["input_log_max"], -_LOG_BOUND, _LOG_BOUND))
    if not spec.adc:
        return m, None, None
    w = jnp.exp(jnp.clip(params["adc_log_width"], -_LOG_BOUND, _LOG_BOUND))
    sym = jnp.asarray(spec.symmetric)
    # |c| <= 1e3 keeps c ± 1/2 distinct in float32, so lo < hi holds strictly.
    c = jnp.where(sym, 0.0, jnp.clip(params["adc_center"], -_CENTER_BOUND, _CENTER_BOUND))
    return m, w * (c - 0.5), w * (c + 0.5)


def _layer_key(key, name):
    return None if key is None else jax.random.fold_in(key, layer_id(name))


@dataclasses.dataclass(frozen=True)
class LearnedRangesAnalog:
    """The analog contraction with input and ADC ranges taken from (traced) parameters.

    Layers without range parameters compute exactly like :class:`jaxbar.nn.analog.Analog`.
    Every layer is programmed on the fly from ``trial_key`` (training changes the kernels at
    every step).

    Attributes:
      configs: resolved per-layer crossbar configs (None entries stay digital).
      ranges: layer name → range parameters (:func:`init_ranges`).
      trial_key: key of the programming error (folded per layer, as in evaluation).
      read_key: key of this forward pass's read noise (folded per layer).
    """

    configs: LayerConfigs
    ranges: Mapping[str, LayerRanges]
    trial_key: jax.Array | None = None
    read_key: jax.Array | None = None

    def _config(self, name):
        if name not in self.configs:
            raise ConfigError(f"layer {name!r} has no analog configuration; known layers: "
                              f"{', '.join(self.configs)}")
        return self.configs[name]

    def _layer(self, name, x, kernel, cfg, op, core):
        W = kernel.reshape(-1, kernel.shape[-1])
        K, N = W.shape
        prog = mvm.program_at_time(W, cfg, _layer_key(self.trial_key, name))
        rk = _layer_key(self.read_key, name)
        op = op(mapping.layout(K, N, cfg))
        params = self.ranges.get(name)
        if params is None:  # fixed ranges: exactly the core's layer
            return core(x, prog, rk)
        spec = range_spec(cfg, K, N)
        m, lo, hi = range_values(params, spec)
        x0 = cfg.inputs.x_max
        # Pre-ADC outputs (J, *batch, pr, S, P, M); J = 1 unless digitized per input slice.
        y, x_q = mvm.array_outputs(x * (x0 / m), prog, cfg, rk, op)
        if spec.adc:
            shape = (len(spec.levels), 1, 1)
            levels = jnp.asarray(np.array(spec.levels).reshape(shape), y.dtype)
            y = converters.quantize_uniform(y, lo.reshape(shape), hi.reshape(shape), levels)
        return self._digital(y, x_q, prog, cfg, op) * (m / x0)

    @staticmethod
    def _digital(y, x_q, prog, cfg, op):
        """Shift-and-add of input slices, then the core's digital steps with the ADC done."""
        if cfg.inputs.bit_serial and cfg.adc.per_input_slice:
            w = jnp.asarray(converters.input_slice_weights(cfg.inputs), y.dtype)
            y = jnp.tensordot(w, y, axes=(0, 0))
        else:
            y = y[0]
        # The core's offset subtraction, slice recombination, partition sums and rescaling.
        return mvm.digital_readout(y, x_q, prog, _adc_off(cfg), op)

    def conv(self, name, x, kernel, *, strides, padding):
        cfg = self._config(name)
        if cfg is None:
            return DIGITAL.conv(name, x, kernel, strides=strides, padding=padding)
        if kernel.ndim != 4:
            raise ConfigError(f"layer {name!r}: only 2-D convolutions are supported, got a "
                              f"kernel of shape {kernel.shape}")
        pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)

        def op(lay):
            return mvm.conv_op(lay, tuple(kernel.shape), tuple(strides), pads)

        def core(x, prog, key):
            return mvm.conv(x, prog, cfg, tuple(kernel.shape), tuple(strides), pads, key=key)

        return self._layer(name, x, kernel, cfg, op, core)

    def dense(self, name, x, kernel):
        cfg = self._config(name)
        if cfg is None:
            return DIGITAL.dense(name, x, kernel)
        return self._layer(name, x, kernel, cfg, mvm.dense_op,
                           lambda x, prog, key: mvm.matmul(x, prog, cfg, key=key))


def _host_ranges(params: LayerRanges, spec: RangeSpec):
    m, lo, hi = range_values(jax.tree.map(np.asarray, params), spec)
    m = float(m)
    inp = (-m, m) if spec.signed else (0.0, m)
    if not spec.adc:
        return inp, None
    adc = []
    for s, a, b in zip(spec.symmetric, np.asarray(lo), np.asarray(hi), strict=True):
        a, b = float(a), float(b)
        if s:  # exactly symmetric, so the ADC stays sign-magnitude when read back
            h = max(abs(a), abs(b))
            a, b = -h, h
        adc.append((a, b))
    return inp, tuple(adc)


def ranges_to_calibration(ranges: Mapping[str, LayerRanges], configs: LayerConfigs,
                          shapes: Mapping[str, tuple[int, ...]], meta: dict | None = None
                          ) -> Calibration:
    """Learned ranges as a :class:`~jaxbar.nn.calibrate.Calibration` (a calibration file).

    ``jaxbar evaluate --calibration FILE`` applies the input ranges to every layer and the ADC
    ranges to layers whose configured ADC range is ``calibrated``.

    Args:
      ranges: range parameters.
      configs: the per-layer configs they belong to.
      shapes: kernel shape of every layer.
      meta: stored in the file's ``meta``.

    Returns:
      The calibration.
    """
    layers = {}
    for name, params in ranges.items():
        shape = shapes[name]
        spec = range_spec(configs[name], int(np.prod(shape[:-1])), int(shape[-1]))
        inp, adc = _host_ranges(params, spec)
        layers[name] = LayerCalibration(inp, adc)
    return Calibration(layers, dict(meta or {}, source="learned ranges (jaxbar finetune)"))


def with_learned_ranges(configs: LayerConfigs, ranges: Mapping[str, LayerRanges],
                        shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Per-layer configs with the learned input and ADC ranges written in (for evaluation).

    Args:
      configs: the per-layer configs the ranges were trained with.
      ranges: range parameters.
      shapes: kernel shape of every layer.

    Returns:
      Layer name → config; layers without range parameters are unchanged.
    """
    out = dict(configs)
    for name, params in ranges.items():
        cfg = configs[name]
        shape = shapes[name]
        spec = range_spec(cfg, int(np.prod(shape[:-1])), int(shape[-1]))
        inp, adc = _host_ranges(params, spec)
        changes = {"inputs.range": inp}
        if adc is not None:
            changes["adc.range"] = adc if len(adc) > 1 else adc[0]
        out[name] = cfg.replace(**changes)
    return out
