"""Per-layer calibration of a network's input and ADC ranges (PHYSICS §7).

Two digital passes over calibration images: the first profiles each analog
layer's inputs (DAC full scale at a percentile of |x|; signed when the layer sees
negative inputs, e.g. the first layer or one fed by a residual add without ReLU),
the second profiles its pre-ADC array outputs with that input range, the ADC off
and no device errors (the ADC range covers the inner P % per weight slice).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar import calibration as cal
from jaxbar.config import ConfigError
from jaxbar.core import mapping, mvm
from jaxbar.nn.analog import LayerConfigs
from jaxbar.nn.contraction import DIGITAL, explicit_padding
from jaxbar.nn.models import layer_names
from jaxbar.nn.network_config import NetworkConfig

__all__ = ["Calibration", "LayerCalibration", "calibrate_network", "check_layer_patterns",
           "resolve_layers"]


@dataclasses.dataclass(frozen=True)
class LayerCalibration:
    """Calibrated ranges of one layer.

    Attributes:
      input_range: (lo, hi) of the DAC.
      adc_range: one (lo, hi) per weight slice, or None when the ADC range is not calibrated.
    """

    input_range: tuple[float, float]
    adc_range: tuple[tuple[float, float], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibration results of a network, by layer name; saved as JSON."""

    layers: dict[str, LayerCalibration]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        d = {"meta": self.meta, "layers": {
            n: {"input_range": list(c.input_range),
                "adc_range": None if c.adc_range is None else [list(r) for r in c.adc_range]}
            for n, c in self.layers.items()}}
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            d = json.loads(Path(path).read_text())
            layers = {n: LayerCalibration(tuple(c["input_range"]), None if c.get("adc_range")
                                          is None else tuple(tuple(r) for r in c["adc_range"]))
                      for n, c in d["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read calibration file {path}: {e}") from e
        return cls(layers, d.get("meta", {}))


class _Profiler:
    """A digital contraction that samples each analog layer's inputs or pre-ADC outputs."""

    def __init__(self, net: NetworkConfig, input_ranges: dict | None):
        self.net = net
        self.input_ranges = input_ranges
        self.samples: dict[str, list] = {}

    def _record(self, name, x, kernel, op_fn):
        cfg = self.net.crossbar_for(name)
        if cfg is None:
            return
        if self.input_ranges is None:
            self.samples.setdefault(name, []).append(cal._sample(x))
        elif cfg.adc.range == "calibrated":
            cfg = cfg.replace(**{"inputs.range": self.input_ranges[name]})
            W = kernel.reshape(-1, kernel.shape[-1])
            op = op_fn(mapping.layout(*W.shape, cfg))
            per_slice = cal.pre_adc_samples(x, W, cfg, op)
            self.samples.setdefault(name, []).append(per_slice)

    def conv(self, name, x, kernel, *, strides, padding):
        pads = explicit_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
        self._record(name, x, kernel,
                     lambda lay: mvm.conv_op(lay, tuple(kernel.shape), tuple(strides), pads))
        return DIGITAL.conv(name, x, kernel, strides=strides, padding=padding)

    def dense(self, name, x, kernel):
        self._record(name, x, kernel, mvm.dense_op)
        return DIGITAL.dense(name, x, kernel)


def _run(model, images, batch_size, profiler):
    for i in range(0, len(images), batch_size):
        model(jnp.asarray(images[i:i + batch_size]), profiler)


def calibrate_network(model: nnx.Module, net: NetworkConfig, images: np.ndarray,
                      batch_size: int = 100) -> Calibration:
    """Calibrates every analog layer of `model` on preprocessed `images`.

    Args:
      model: a jaxbar model (already batch-norm folded if `net.fold_batchnorm`).
      net: the network config (which layers are analog, percentiles, ADC modes).
      images: preprocessed calibration images, disjoint from the evaluation set.
      batch_size: images per forward pass.

    Returns:
      The per-layer `Calibration`.
    """
    check_layer_patterns(net, layer_names(model))
    s = net.calibration
    p1 = _Profiler(net, None)
    _run(model, images, batch_size, p1)
    inputs = {n: cal.input_range(np.concatenate(v), s.input_percentile)
              for n, v in p1.samples.items()}
    p2 = _Profiler(net, inputs)
    _run(model, images, batch_size, p2)
    layers = {}
    for name, rng in inputs.items():
        adc = None
        if name in p2.samples:
            per_slice = [np.concatenate(v) for v in zip(*p2.samples[name], strict=True)]
            adc = cal.ranges_from_samples(per_slice, s.adc_percentile, s.symmetric,
                                          s.power_of_two)
        layers[name] = LayerCalibration(rng, adc)
    meta = {"images": int(len(images)), "settings": dataclasses.asdict(s)}
    return Calibration(layers, meta)


def check_layer_patterns(net: NetworkConfig, names: list[str]) -> None:
    """Checks that every per-layer override pattern of a network config matches a layer.

    Args:
      net: the network config.
      names: the model's analog layer names.

    Raises:
      ConfigError: naming the first pattern that matches no layer, and listing the names.
    """
    for pattern, _ in net.layers:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(f"layers[{pattern!r}] matches no layer of the model; its layers "
                              f"are {', '.join(names)}")


def resolve_layers(model: nnx.Module, net: NetworkConfig,
                   calibration: Calibration | None = None) -> LayerConfigs | None:
    """Per-layer crossbar configs with calibrated ranges filled in.

    Args:
      model: the jaxbar model.
      net: the network config.
      calibration: calibrated ranges; required when a layer's ADC range is "calibrated".

    Returns:
      Layer name → config (None: digital), or None when the whole network is digital.

    Raises:
      ConfigError: naming the layer, when a needed calibration is missing; naming the
        pattern and listing the layers, when a `layers` pattern matches no layer.
    """
    if net.crossbar is None:
        return None
    names = layer_names(model)
    check_layer_patterns(net, names)
    out = {}
    for name in names:
        cfg = net.crossbar_for(name)
        if cfg is not None and calibration is not None and name in calibration.layers:
            c = calibration.layers[name]
            cfg = cal.with_ranges(cfg, c.input_range, c.adc_range)
        if cfg is not None and cfg.adc.range == "calibrated" and cfg.adc.bits > 0:
            raise ConfigError(f"layer {name!r} needs a calibrated ADC range: pass a "
                              "calibration (jaxbar calibrate) or calibrate on the fly")
        out[name] = cfg
    return out
