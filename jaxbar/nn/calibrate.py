"""Per-layer calibration of an analog model's input and ADC ranges (PHYSICS §7).

Two digital passes over calibration data: the first profiles each analog layer's inputs (DAC
full scale at a percentile of |x|; signed when the layer sees negative inputs, e.g. the first
layer or one fed by a residual add without ReLU), the second profiles its pre-ADC array
outputs with that input range, the ADC off and no device errors (the ADC range covers the
inner P % per weight slice). A `Calibration` holds the ranges by layer path and is saved as
JSON, so a calibration can be reused (`apply_calibration`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxbar import calibration as cal
from jaxbar.config import ConfigError
from jaxbar.nn.analogize import Samples, analog_layers, clear_programming, learned_ranges

__all__ = ["Calibration", "LayerCalibration", "apply_calibration", "calibrate_model",
           "learned_calibration"]


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
        """Writes the calibration as JSON."""
        d = {"meta": self.meta, "layers": {
            n: {"input_range": list(c.input_range),
                "adc_range": None if c.adc_range is None else [list(r) for r in c.adc_range]}
            for n, c in self.layers.items()}}
        Path(path).write_text(json.dumps(d, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Reads a calibration written by `save` (a `ConfigError` names a bad file)."""
        try:
            d = json.loads(Path(path).read_text())
            layers = {n: LayerCalibration(tuple(c["input_range"]), None if c.get("adc_range")
                                          is None else tuple(tuple(r) for r in c["adc_range"]))
                      for n, c in d["layers"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot read calibration file {path}: {e}") from e
        return cls(layers, d.get("meta", {}))


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, np.ndarray | jax.Array):
        return (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    return data


def calibrate_model(analog: nnx.Module, data: Any, *, batch_size: int = 100,
                    forward: Callable[[nnx.Module, Any], Any] | None = None):
    """Calibrates each analog layer's DAC and ADC ranges from data, in place (PHYSICS §7).

    Two digital passes: the first sets each layer's input range from a percentile of its
    |inputs| (signed when it sees negative inputs), the second each weight slice's ADC range
    from the inner percentage of its pre-ADC outputs (with the ADC and device errors off).
    Percentiles come from the config's `calibration` settings. Stored conductances are
    cleared, since the configs change: program the model afterwards.

    Args:
      analog: from `analogize`.
      data: an array of inputs (split into batches of `batch_size`) or an iterable of batches.
      batch_size: inputs per forward pass when `data` is an array.
      forward: `forward(model, batch)` runs one batch (default `model(batch)`, op by op).
        A compiled forward such as `nnx.jit(lambda m, b: m(b))` profiles too (samples leave
        the program by callbacks) and is several times faster on a model's first
        calibration; its ranges agree with the default's to float rounding.

    Returns:
      The calibrated ranges (`jaxbar.nn.calibrate.Calibration`, saved as JSON by `.save`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size!r} is invalid: expected an integer >= 1")
    forward = forward or (lambda m, b: m(b))
    layers = analog_layers(analog)
    if not layers:
        return Calibration({}, {})

    count = []

    def run(modes, configs):
        for p, (_, op) in layers.items():
            op.mode = modes[p]
            op.samples = Samples(configs[p])
        try:
            count.clear()
            for batch in _batches(data, batch_size):
                forward(analog, batch)
                count.append(len(jax.tree.leaves(batch)[0]))
            jax.effects_barrier()  # samples from compiled code arrive by callbacks, asynchronously
            if not count:
                raise ConfigError("calibrate_model: the calibration data is empty")
            return {p: op.samples.items for p, (_, op) in layers.items()}
        finally:
            for _, op in layers.values():
                op.mode = "analog"
                del op.samples

    clear_programming(analog)  # profiling runs the digital product
    configs = {p: op.config for p, (_, op) in layers.items()}
    inputs = {p: cal.input_range(np.concatenate(v), layers[p][1].settings.input_percentile)
              for p, v in run(dict.fromkeys(layers, "inputs"), configs).items()}
    modes = {p: "adc" if op.config.adc.range == "calibrated" else "digital"
             for p, (_, op) in layers.items()}
    profiled = {p: configs[p].replace(**{"inputs.range": inputs[p]}) for p in layers}
    adc_samples = run(modes, profiled) if "adc" in modes.values() else {}
    result = {}
    for p, (_, op) in layers.items():
        s, adc = op.settings, None
        if op.config.adc.range == "calibrated":
            per_slice = [np.concatenate(v) for v in zip(*adc_samples[p], strict=True)]
            adc = cal.ranges_from_samples(per_slice, s.adc_percentile, s.symmetric,
                                          s.power_of_two)
        op.crossbar.set_value(cal.with_ranges(op.config, inputs[p], adc))
        result[p] = LayerCalibration(inputs[p], adc)
    settings = next(iter(layers.values()))[1].settings
    return Calibration(result, {"images": int(sum(count)),
                                "settings": dataclasses.asdict(settings)})




def apply_calibration(analog: nnx.Module, calibration: Calibration) -> None:
    """Writes a calibration's ranges into the analog layers' configs, in place.

    Every layer's input range is set, and its ADC ranges where its configured ADC range is
    "calibrated". Layers the calibration does not name keep their configs.

    Raises:
      ConfigError: the calibration names a layer the model does not have as analog.
    """
    layers = analog_layers(analog)
    unknown = [p for p in calibration.layers if p not in layers]
    if unknown:
        raise ConfigError(f"the calibration names layers that are not analog in this model: "
                          f"{', '.join(unknown[:5])}; analog layers: {', '.join(layers)}")
    clear_programming(analog)
    for path, c in calibration.layers.items():
        op = layers[path][1]
        op.crossbar.set_value(cal.with_ranges(op.config, c.input_range, c.adc_range))


def learned_calibration(analog: nnx.Module, meta: dict | None = None) -> Calibration:
    """The learned ranges of an analog model (`attach_learned_ranges`) as a `Calibration`."""
    layers = {p: LayerCalibration(inp, adc) for p, (inp, adc) in learned_ranges(analog).items()}
    return Calibration(layers, dict(meta or {}, source="learned ranges"))
