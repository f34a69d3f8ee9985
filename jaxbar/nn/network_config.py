"""A network's analog configuration: a crossbar config, calibration settings, per-layer overrides.

JSON/YAML schema (all keys optional):
```
{"crossbar": {...CrossbarConfig schema...} | null,     # null = the whole network digital
 "calibration": {"input_percentile": 99.99, "adc_percentile": 99.98, "samples": 500,
                 "split": "train", "symmetric": false, "power_of_two": false},
 "fold_batchnorm": false,
 "layers": {"stem.conv": {"adc": {"bits": 10}},        # deep-merged into "crossbar"
            "head.*": "digital"}}                       # fnmatch patterns, in order
```
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxbar.config import ConfigError, CrossbarConfig, load_yaml, move_solver_keys

__all__ = ["CalibrationSettings", "NetworkConfig", "NETWORK_PRESETS"]


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """How input and ADC ranges are calibrated (PHYSICS §7).

    Attributes:
      input_percentile: percentile of |activations| for each layer's DAC full scale.
      adc_percentile: inner percentage of pre-ADC values each ADC range covers.
      samples: calibration images (taken from `split`, disjoint from evaluation).
      split: the data split the calibration images come from.
      symmetric: sign-magnitude ADC ranges [-h, h].
      power_of_two: snap slice ranges to powers of two.
    """

    input_percentile: float = 99.99
    adc_percentile: float = 99.98
    samples: int = 500
    split: str = "train"
    symmetric: bool = False
    power_of_two: bool = False

    def __post_init__(self):
        for name in ("input_percentile", "adc_percentile"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 50 < v <= 100):
                raise ConfigError(f"calibration.{name} = {v!r} is invalid: expected (50, 100]")
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ConfigError(f"calibration.samples = {self.samples!r} is invalid: expected >= 1")


def _merge(base: dict, patch: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """The analog configuration of a whole network (hashable).

    Attributes:
      crossbar: the default crossbar of every layer; None runs the network digitally.
      calibration: calibration settings.
      fold_batchnorm: fold batch norm into the preceding convolutions before mapping.
      layers: per-layer overrides as (fnmatch pattern, JSON text of a partial crossbar
        dict, or "digital"), applied in order.
    """

    crossbar: CrossbarConfig | None = CrossbarConfig()
    calibration: CalibrationSettings = CalibrationSettings()
    fold_batchnorm: bool = False
    layers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for pattern, text in self.layers:
            if text != "digital":
                self.crossbar_for(pattern, _check=text)

    def crossbar_for(self, name: str, _check: str | None = None) -> CrossbarConfig | None:
        """The crossbar config of layer `name` (None: computed digitally)."""
        if self.crossbar is None:
            return None
        d = self.crossbar.to_dict(_keep_callables=True)
        overrides = [("", _check)] if _check is not None else [
            (p, t) for p, t in self.layers if fnmatch.fnmatchcase(name, p)]
        for pattern, text in overrides:
            if text == "digital":
                return None
            try:
                d = _merge(d, move_solver_keys(json.loads(text)))
            except ConfigError as e:
                raise ConfigError(f"layers[{pattern!r}]: {e}") from e
        try:
            return CrossbarConfig.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}") from e

    # ---- serialization ---------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkConfig:
        """A network config from the documented schema (or a bare crossbar config)."""
        known = {"crossbar", "calibration", "fold_batchnorm", "layers"}
        unknown = set(d) - known
        if unknown:
            # A bare crossbar config is accepted too.
            if unknown <= {"array", "weights", "mapping", "device", "inputs", "adc",
                           "parasitics", "ir_solver"} and not set(d) & known:
                return cls(crossbar=CrossbarConfig.from_dict(d))
            raise ConfigError(f"unknown network config keys {sorted(unknown)}; allowed: "
                              f"{sorted(known)} (or a bare crossbar config)")
        cb = d.get("crossbar", {})
        layers = d.get("layers", {}) or {}
        if not isinstance(layers, Mapping):
            raise ConfigError("layers must map layer-name patterns to overrides")
        cal = d.get("calibration") or {}
        known_cal = {f.name for f in dataclasses.fields(CalibrationSettings)}
        if not isinstance(cal, Mapping) or set(cal) - known_cal:
            raise ConfigError(f"calibration = {cal!r} is invalid: expected a mapping of "
                              f"{', '.join(sorted(known_cal))}")
        return cls(
            crossbar=None if cb is None else CrossbarConfig.from_dict(cb),
            calibration=CalibrationSettings(**cal),
            fold_batchnorm=bool(d.get("fold_batchnorm", False)),
            layers=tuple((str(p), "digital" if v in ("digital", None) else
                          json.dumps(v, sort_keys=True)) for p, v in layers.items()),
        )

    def to_dict(self) -> dict[str, Any]:
        """The config in the documented schema (JSON-serializable)."""
        return {
            "crossbar": None if self.crossbar is None else self.crossbar.to_dict(),
            "calibration": dataclasses.asdict(self.calibration),
            "fold_batchnorm": self.fold_batchnorm,
            "layers": {p: (t if t == "digital" else json.loads(t)) for p, t in self.layers},
        }

    @classmethod
    def load(cls, spec: str) -> NetworkConfig:
        """A preset name (`digital`, `ideal`, `paper_baseline`) or a JSON/YAML file."""
        if spec in NETWORK_PRESETS:
            return NETWORK_PRESETS[spec]()
        p = Path(spec)
        if not p.is_file():
            raise ConfigError(f"{spec!r} is neither a preset ({', '.join(NETWORK_PRESETS)}) "
                              "nor an existing file")
        text = p.read_text()
        try:
            d = json.loads(text) if p.suffix == ".json" else load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot parse {spec}: {' '.join(str(e).split())}") from e
        if d is not None and not isinstance(d, Mapping):
            raise ConfigError(f"{spec}: a network config must be a mapping, got "
                              f"{type(d).__name__}")
        try:
            return cls.from_dict(d or {})
        except ConfigError as e:
            raise ConfigError(f"{spec}: {e}") from e

    def replace(self, **changes: Any) -> NetworkConfig:
        """All changes at once, validated together.

        Keys are dotted crossbar fields (`"adc.bits": 6`), calibration settings
        (`"calibration.samples": 100`) or top-level fields.
        """
        top = {k: v for k, v in changes.items() if k in
               {"crossbar", "calibration", "fold_batchnorm", "layers"}}
        cal = {k.split(".", 1)[1]: v for k, v in changes.items()
               if k.startswith("calibration.")}
        cross = {k: v for k, v in changes.items() if k not in top and k not in
                 {f"calibration.{c}" for c in cal}}
        out = dataclasses.replace(self, **top)
        if cal:
            known = {f.name for f in dataclasses.fields(CalibrationSettings)}
            unknown = sorted(set(cal) - known)
            if unknown:
                raise ConfigError(f"unknown field 'calibration.{unknown[0]}'; calibration "
                                  f"settings are {', '.join(sorted(known))}")
            out = dataclasses.replace(
                out, calibration=dataclasses.replace(out.calibration, **cal))
        if cross:
            if out.crossbar is None:
                raise ConfigError("cannot change crossbar fields of a digital network config")
            out = dataclasses.replace(out, crossbar=out.crossbar.replace(**cross))
        return out


NETWORK_PRESETS = {
    "digital": lambda: NetworkConfig(crossbar=None),
    "ideal": lambda: NetworkConfig(crossbar=CrossbarConfig.ideal()),
    "paper_baseline": lambda: NetworkConfig(crossbar=CrossbarConfig.paper_baseline()),
}
