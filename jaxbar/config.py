"""The crossbar configuration tree: frozen, validated, hashable dataclasses.

A `CrossbarConfig` describes one analog core (array size, weight and input
encoding, device non-idealities, converters, parasitics and their solver). It is
hashable, so it can be a static argument under `jax.jit`, and round-trips through plain dicts,
JSON and YAML. Every field is validated on construction; a bad value raises
`ConfigError` naming the dotted field path and the allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import yaml

from jaxbar.measured_devices import DEVICE_PRESETS, load_table

__all__ = [
    "ADCConfig",
    "ArrayConfig",
    "ConfigError",
    "CrossbarConfig",
    "DeviceConfig",
    "DriftConfig",
    "IVConfig",
    "IRSolverConfig",
    "InputsConfig",
    "MappingConfig",
    "NoiseConfig",
    "ParasiticsConfig",
    "WeightsConfig",
    "PRESETS",
    "SOLVER_KEYS",
    "load_yaml",
    "move_solver_keys",
    "parse_override",
    "solver_key",
]


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field path."""


class _YamlLoader(yaml.SafeLoader):
    """YAML's safe loader that also reads `1e-5`, `2E3` and `.5e-2` as floats.

    YAML 1.1 needs a dot and a signed exponent, so it reads `1e-5` as a string.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parses YAML text (a config file or a `--set` value) with numbers as people write them.

    Args:
      text: the YAML text.

    Returns:
      The parsed value; `1e-5` is the float 1e-05, as in JSON.

    Raises:
      yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def parse_override(item: str, option: str = "--set") -> tuple[str, Any]:
    """Splits a `KEY=VALUE` command-line override and parses its value as YAML.

    Args:
      item: the text given, e.g. `adc.bits=6` or `device.programming_error={sigma: 0.02}`.
      option: the option's name, for the error message.

    Returns:
      (dotted key, value).

    Raises:
      ConfigError: no `=`, an empty key, or a value that is not valid YAML.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{option} needs KEY=VALUE (e.g. {option} adc.bits=6), got {item!r}")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"{option} {item!r}: the value is not valid YAML: {detail}") from e


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path} = {value!r} is invalid: expected {allowed}")


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_real(path: str, v: Any, allowed: str = "a finite number") -> None:
    if not _is_real(v) or math.isnan(v) or math.isinf(v):
        _fail(path, v, allowed)


def _concrete(v: Any) -> bool:
    """False for traced (swept) values, which are validated where they are created."""
    return not isinstance(v, jax.core.Tracer)


def _check_nonnegative(obj: Any, path: str, *names: str) -> None:
    """Each named field of `obj` a finite number >= 0 (traced values are skipped)."""
    for name in names:
        v = getattr(obj, name)
        if _concrete(v):
            _check_real(f"{path}.{name}", v, "a finite number >= 0")
            if v < 0:
                _fail(f"{path}.{name}", v, "a finite number >= 0")


def _check_int(path: str, v: Any, lo: int, hi: int | None = None) -> None:
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        _fail(path, v, allowed)


def _check_choice(path: str, v: Any, choices: tuple[str, ...]) -> None:
    if v not in choices:
        _fail(path, v, "one of " + ", ".join(repr(c) for c in choices))


def _tuplify(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_tuplify(x) for x in v)
    return v


def _floats(obj: Any, *names: str) -> None:
    """Integer values of traced (sweepable) fields become floats.

    `sigma: 0` in YAML must not trace as int32 and compile a second time.
    """
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, int) and not isinstance(v, bool):
            object.__setattr__(obj, n, float(v))


def _bits(v: Any) -> Any:
    """`None` and "ideal" mean an ideal converter, like 0."""
    return 0 if v is None or v == "ideal" else v


@dataclasses.dataclass(frozen=True)
class ArrayConfig:
    """Physical array size; larger matrices are partitioned (PHYSICS §5).

    Attributes:
      rows: maximum rows (inputs) per array; None = unlimited.
      cols: maximum columns (outputs) per array; None = unlimited.
    """

    rows: int | None = None
    cols: int | None = None

    def _validate(self, path: str) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if v is not None:
                _check_int(f"{path}.{name}", v, 1)


@dataclasses.dataclass(frozen=True)
class WeightsConfig:
    """Weight clipping and quantization (PHYSICS §1.1–1.2).

    Attributes:
      bits: signed weight bits (0 = unquantized; otherwise >= 2, one sign bit).
      clip_percentile: p in (50, 100]; 100 clips at max|W|.
    """

    bits: int = 0
    clip_percentile: float = 100.0

    def _validate(self, path: str) -> None:
        if self.bits != 0:
            _check_int(f"{path}.bits", self.bits, 2, 32)
        _check_real(f"{path}.clip_percentile", self.clip_percentile)
        if not 50.0 < self.clip_percentile <= 100.0:
            _fail(f"{path}.clip_percentile", self.clip_percentile, "a number in (50, 100]")


@dataclasses.dataclass(frozen=True)
class MappingConfig:
    """How signed weights become conductances (PHYSICS §1.3).

    Attributes:
      scheme: "differential" (a pair of one-sided cells per weight) or "offset"
        (one cell per weight, zero weight mid-range).
      slices: number of weight bit slices (1 = unsliced).
      subtract: differential only: subtract the pair currents "analog" (before
        the ADC) or "digital" (digitize both).
      offset_subtraction: offset only: subtract the zero-weight current
        "digital"ly (exact) or via an analog "unit_column".
    """

    scheme: str = "differential"
    slices: int = 1
    subtract: str = "analog"
    offset_subtraction: str = "digital"

    def _validate(self, path: str) -> None:
        _check_choice(f"{path}.scheme", self.scheme, ("differential", "offset"))
        _check_int(f"{path}.slices", self.slices, 1)
        _check_choice(f"{path}.subtract", self.subtract, ("analog", "digital"))
        _check_choice(
            f"{path}.offset_subtraction", self.offset_subtraction, ("digital", "unit_column")
        )


NOISE_MODELS = ("none", "independent", "proportional", "polynomial", "saturating", "table",
                "custom")
DISTRIBUTIONS = ("normal", "laplace", "uniform")


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """A conductance error model: `g' = g + s(g)·ε` (PHYSICS §2).

    Conductances are normalized (g_max = 1); `s(g)` is the standard deviation of a cell
    at conductance g, and `ε` has zero mean and unit variance.

    Attributes:
      model: "none"; "independent" (s = sigma); "proportional" (s = sigma·g);
        "polynomial" (s = scale·max(Σ_i coeffs[i]·g^i, 0)); "saturating"
        (s = scale·a·(1 - exp(-g/b)), coeffs = (a, b)); "table" (s = scale·σ interpolated
        linearly in a table of measured (g, σ) points, held constant beyond its ends);
        "custom" (s = scale·fn(g)).
      sigma: the error scale of "independent" and "proportional" (>= 0).
      coeffs: the numbers of "polynomial" and "saturating" (kept, unused, by other models,
        so a preset's error can be switched off and on again in a sweep).
      table: "table": (g, σ) points with strictly increasing g. In a dict or YAML config it
        may also be the path of a .csv / .npy file with two columns (see
        `jaxbar.measured_devices.load_table`).
      distribution: of ε: "normal", "laplace" or "uniform" (each with unit variance).
        Read noise is drawn in output space and must be "normal".
      scale: multiplies s(g) of "polynomial", "saturating", "table" and "custom" (>= 0;
        a sweepable noise scale for device presets).
      fn: for "custom": a JAX-traceable function g -> standard deviation. It is
        compared by identity, so define it once (not as a fresh lambda per call).
    """

    model: str = "none"
    sigma: float = 0.0
    coeffs: tuple[float, ...] = ()
    table: tuple[tuple[float, float], ...] = ()
    distribution: str = "normal"
    scale: float = 1.0
    fn: Callable[[Any], Any] | None = dataclasses.field(default=None, compare=True)

    def __post_init__(self):
        _floats(self, "sigma", "scale")
        object.__setattr__(self, "coeffs", _tuplify(self.coeffs))
        table = self.table
        if isinstance(table, str):  # a file of measured points
            table = load_table(table)
        object.__setattr__(self, "table", _tuplify(table))

    def _validate(self, path: str) -> None:
        _check_choice(f"{path}.model", self.model, NOISE_MODELS)
        _check_nonnegative(self, path, "sigma", "scale")
        _check_choice(f"{path}.distribution", self.distribution, DISTRIBUTIONS)
        c = self.coeffs
        if not isinstance(c, tuple):
            _fail(f"{path}.coeffs", c, "a list of numbers")
        for v in c:
            _check_real(f"{path}.coeffs", v, "a list of finite numbers")
        if self.model == "polynomial" and not c:
            _fail(f"{path}.coeffs", list(c), "at least one coefficient (c0, c1, ...) for "
                  "model 'polynomial'")
        if self.model == "saturating":
            if len(c) != 2 or not c[0] >= 0 or not c[1] > 0:
                _fail(f"{path}.coeffs", list(c), "[a, b] with a >= 0 and b > 0 for model "
                      "'saturating'")
        _validate_table(f"{path}.table", self.table, self.model == "table")
        if self.model == "custom" and not callable(self.fn):
            _fail(f"{path}.fn", self.fn, "a callable g -> sigma(g) when model is 'custom'")
        if self.model != "custom" and self.fn is not None:
            _fail(f"{path}.fn", self.fn, "None unless model is 'custom'")

    @property
    def active(self) -> bool:
        """Structural: a model other than "none" draws errors (sigma may be traced)."""
        return self.model != "none"


def _validate_table(path: str, table: Any, required: bool) -> None:
    allowed = "(g, sigma) pairs with strictly increasing g >= 0 and sigma >= 0"
    if not isinstance(table, tuple):
        _fail(path, table, allowed)
    if not required and not table:
        return
    if len(table) < 2:
        _fail(path, list(table), "at least two " + allowed)
    for i, pair in enumerate(table):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            _fail(f"{path}[{i}]", pair, allowed)
        for v in pair:
            _check_real(f"{path}[{i}]", v, allowed)
        if pair[0] < 0 or pair[1] < 0:
            _fail(f"{path}[{i}]", list(pair), allowed)
        if i and not pair[0] > table[i - 1][0]:
            _fail(f"{path}[{i}]", list(pair), allowed)


DRIFT_MODELS = ("none", "power_law")
COMPENSATIONS = ("none", "global", "per_column")


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """Conductance drift after programming (PHYSICS §2), and its compensation.

    A cell programmed to g0 reads, `time` seconds after programming ended,
    `g = g0·((time + t0)/t0)^(-ν)` with a per-cell exponent
    `ν = |ν̄(g0) + σ_ν(g0)·ε|`, where ν̄ and σ_ν are polynomials in ln g0 clipped to
    their ranges. Optional accumulated 1/f noise adds
    `|g|·min(q / max(g0^p, 1e-3), q_max)·sqrt(ln((time + t0 + t_read)/(2·t_read)))·ε`.

    Attributes:
      model: "none" or "power_law".
      t0: seconds from the start of programming to the first read (the fit's reference time).
      nu_mean: coefficients of ν̄ in powers of ln g0 (c0, c1, ...).
      nu_mean_range: (lo, hi) clip of ν̄.
      nu_std: coefficients of σ_ν in powers of ln g0.
      nu_std_range: (lo, hi) clip of σ_ν.
      noise: () for none, or (q, p, q_max) of the accumulated 1/f noise.
      t_read: the read duration in the 1/f noise formula (s).
      compensation: "none"; "global" (one digital gain per array, from reading the array
        with one-hot inputs at t0 and at `time`); "per_column" (one gain per column).
      reference: what the baseline read at t0 sees: the "programmed" conductances
        (realistic) or the "target" ones (an ideal, error-free reference).
    """

    model: str = "none"
    t0: float = 20.0
    nu_mean: tuple[float, ...] = (0.0,)
    nu_mean_range: tuple[float, float] = (0.0, 1.0)
    nu_std: tuple[float, ...] = (0.0,)
    nu_std_range: tuple[float, float] = (0.0, 1.0)
    noise: tuple[float, ...] = ()
    t_read: float = 250e-9
    compensation: str = "none"
    reference: str = "programmed"

    def __post_init__(self):
        for name in ("nu_mean", "nu_mean_range", "nu_std", "nu_std_range", "noise"):
            object.__setattr__(self, name, _tuplify(getattr(self, name)))
        _floats(self, "t0", "t_read")

    def _validate(self, path: str) -> None:
        _check_choice(f"{path}.model", self.model, DRIFT_MODELS)
        for name in ("t0", "t_read"):
            v = getattr(self, name)
            _check_real(f"{path}.{name}", v, "a finite number > 0 (seconds)")
            if not v > 0:
                _fail(f"{path}.{name}", v, "a finite number > 0 (seconds)")
        for name in ("nu_mean", "nu_std"):
            v = getattr(self, name)
            if not (isinstance(v, tuple) and v):
                _fail(f"{path}.{name}", v, "a non-empty list of coefficients")
            for c in v:
                _check_real(f"{path}.{name}", c, "a list of finite numbers")
        for name in ("nu_mean_range", "nu_std_range"):
            v = getattr(self, name)
            allowed = "[lo, hi] with 0 <= lo <= hi"
            if not (isinstance(v, tuple) and len(v) == 2):
                _fail(f"{path}.{name}", v, allowed)
            for c in v:
                _check_real(f"{path}.{name}", c, allowed)
            if not 0 <= v[0] <= v[1]:
                _fail(f"{path}.{name}", list(v), allowed)
        n = self.noise
        allowed = "[] or [q, p, q_max] with q, q_max >= 0"
        if not isinstance(n, tuple) or len(n) not in (0, 3):
            _fail(f"{path}.noise", n, allowed)
        for c in n:
            _check_real(f"{path}.noise", c, allowed)
        if n and (n[0] < 0 or n[2] < 0):
            _fail(f"{path}.noise", list(n), allowed)
        _check_choice(f"{path}.compensation", self.compensation, COMPENSATIONS)
        _check_choice(f"{path}.reference", self.reference, ("programmed", "target"))

    @property
    def active(self) -> bool:
        """Whether drift is modelled (a model other than "none")."""
        return self.model != "none"


IV_MODELS = ("linear", "sinh", "table")


@dataclasses.dataclass(frozen=True)
class IVConfig:
    """A cell's read current versus its voltage, per unit conductance (PHYSICS §2).

    A cell of conductance g at normalized voltage v (the DAC output, or one input slice of
    it) carries `g·f(v)`.

    Attributes:
      model: "linear" (f(v) = v), "sinh" (f(v) = sinh(k·v)/k) or "table" (f interpolated
        linearly in `table`, odd in v).
      k: the sinh model's nonlinearity (> 0): the full-scale read voltage over the
        device's characteristic voltage.
      table: "table": (v, i) points of f for v >= 0, starting at (0, 0), with strictly
        increasing v and non-decreasing i; beyond the last point f continues along the
        last segment. In a dict or YAML config it may also be the path of a .csv / .npy
        file with two columns.
    """

    model: str = "linear"
    k: float = 1.0
    table: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        _floats(self, "k")
        table = self.table
        if isinstance(table, str):
            table = load_table(table)
        object.__setattr__(self, "table", _tuplify(table))

    def _validate(self, path: str) -> None:
        _check_choice(f"{path}.model", self.model, IV_MODELS)
        if _concrete(self.k):
            _check_real(f"{path}.k", self.k, "a finite number > 0")
            if not self.k > 0:
                _fail(f"{path}.k", self.k, "a finite number > 0")
        t = self.table
        allowed = ("(v, i) points starting at (0, 0), with strictly increasing v and "
                   "non-decreasing i")
        if not isinstance(t, tuple):
            _fail(f"{path}.table", t, allowed)
        if self.model != "table" and not t:
            return
        if len(t) < 2:
            _fail(f"{path}.table", list(t), "at least two " + allowed)
        for i, pair in enumerate(t):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                _fail(f"{path}.table[{i}]", pair, allowed)
            for v in pair:
                _check_real(f"{path}.table[{i}]", v, allowed)
            if i == 0 and pair != (0, 0):
                _fail(f"{path}.table[0]", list(pair), "[0, 0] (no current without voltage)")
            if i and not (pair[0] > t[i - 1][0] and pair[1] >= t[i - 1][1]):
                _fail(f"{path}.table[{i}]", list(pair), allowed + " (a monotone I-V)")
        if t[-1][1] <= 0:
            _fail(f"{path}.table", list(t), "a table whose current rises above 0")

    @property
    def linear(self) -> bool:
        """Whether the read is linear (f(v) = v): the array product needs no I-V step."""
        return self.model == "linear"


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Memory-cell properties (PHYSICS §0–2).

    Attributes:
      on_off_ratio: Gmax/Gmin (> 1); None = infinite (g_min = 0).
      cell_bits: quantize each cell to 2^cell_bits conductance levels; None = analog.
      programming_error: static per trial (drawn in `program`).
      read_noise: fresh on every MVM (drawn in `matmul`).
      clip: after programming error, clip conductances at "zero" (g >= 0) or
        to the "range" [g_min, 1].
      drift: conductance drift after programming and its compensation.
      time: seconds after programming at which the arrays are used (>= 0; with drift).
      iv: the cells' read current versus voltage (linear by default).
      preset: the device preset these settings started from (a label; in a dict config,
        `preset: pcm` fills in the preset's values and the other keys override them).
    """

    on_off_ratio: float | None = None
    cell_bits: int | None = None
    programming_error: NoiseConfig = NoiseConfig()
    read_noise: NoiseConfig = NoiseConfig()
    clip: str = "zero"
    drift: DriftConfig = DriftConfig()
    time: float = 0.0
    iv: IVConfig = IVConfig()
    preset: str | None = None

    def __post_init__(self):
        _floats(self, "on_off_ratio", "time")

    def _validate(self, path: str) -> None:
        if self.on_off_ratio is not None and _concrete(self.on_off_ratio):
            _check_real(f"{path}.on_off_ratio", self.on_off_ratio, "a number > 1, or null")
            if not self.on_off_ratio > 1:
                _fail(f"{path}.on_off_ratio", self.on_off_ratio, "a number > 1, or null")
        if self.cell_bits is not None:
            _check_int(f"{path}.cell_bits", self.cell_bits, 1, 32)
        self.programming_error._validate(f"{path}.programming_error")
        self.read_noise._validate(f"{path}.read_noise")
        if self.read_noise.distribution != "normal":
            _fail(f"{path}.read_noise.distribution", self.read_noise.distribution,
                  "'normal' (read noise is drawn in output space, as a sum of many cells)")
        _check_choice(f"{path}.clip", self.clip, ("zero", "range"))
        if not isinstance(self.drift, DriftConfig):
            _fail(f"{path}.drift", self.drift, "a drift section")
        self.drift._validate(f"{path}.drift")
        if _concrete(self.time):
            _check_real(f"{path}.time", self.time, "a finite number >= 0 (seconds)")
            if self.time < 0:
                _fail(f"{path}.time", self.time, "a finite number >= 0 (seconds)")
        if not isinstance(self.iv, IVConfig):
            _fail(f"{path}.iv", self.iv, "an I-V section")
        self.iv._validate(f"{path}.iv")
        if self.preset is not None and not isinstance(self.preset, str):
            _fail(f"{path}.preset", self.preset, "a preset name or null")

    @property
    def g_min(self) -> float:
        """The lowest conductance, 1/on_off_ratio (0 for an infinite ratio)."""
        return 0.0 if self.on_off_ratio is None else 1.0 / self.on_off_ratio

    @classmethod
    def from_preset(cls, name: str) -> DeviceConfig:
        """A device preset of `jaxbar.measured_devices` ("pcm", "sonos", "reram")."""
        return _section_from_dict("device", cls, {"preset": name})


@dataclasses.dataclass(frozen=True)
class InputsConfig:
    """The DAC (PHYSICS §3).

    Attributes:
      bits: DAC bits (0 = ideal: no clipping, no quantization).
      range: (lo, hi) = (-m, m) for signed (sign-magnitude) or (0, m) unsigned.
      bit_serial: apply the input magnitude `slice_bits` bits at a time.
      slice_bits: bits per input slice when bit-serial.
    """

    bits: int = 0
    range: tuple[float, float] = (-1.0, 1.0)
    bit_serial: bool = False
    slice_bits: int = 1

    def __post_init__(self):
        object.__setattr__(self, "range", _tuplify(self.range))

    def _validate(self, path: str) -> None:
        _check_int(f"{path}.bits", self.bits, 0, 32)
        rng = self.range
        allowed = "[-m, m] (signed) or [0, m] (unsigned) with m > 0"
        if not (isinstance(rng, tuple) and len(rng) == 2):
            _fail(f"{path}.range", rng, allowed)
        for v in rng:
            _check_real(f"{path}.range", v, allowed)
        lo, hi = rng
        if not (hi > 0 and (lo == 0 or lo == -hi)):
            _fail(f"{path}.range", list(rng), allowed)
        if self.signed and self.bits == 1:
            _fail(f"{path}.bits", self.bits, "0 or >= 2 for a signed (sign-magnitude) range")
        if not isinstance(self.bit_serial, bool):
            _fail(f"{path}.bit_serial", self.bit_serial, "true or false")
        _check_int(f"{path}.slice_bits", self.slice_bits, 1)
        if self.bit_serial:
            if not 1 <= self.bits <= 24:
                _fail(f"{path}.bits", self.bits,
                      "an integer in [1, 24] when bit_serial is true (slicing needs a DAC)")
            if self.slice_bits > self.magnitude_bits:
                _fail(
                    f"{path}.slice_bits",
                    self.slice_bits,
                    f"an integer in [1, {self.magnitude_bits}] (the input magnitude bits)",
                )

    @property
    def signed(self) -> bool:
        """Whether the inputs are signed (sign-magnitude, range [-m, m])."""
        return self.range[0] < 0

    @property
    def x_max(self) -> float:
        """The input full scale m."""
        return float(self.range[1])

    @property
    def magnitude_bits(self) -> int:
        """m: bits of the input magnitude (B_in, or B_in - 1 for sign-magnitude)."""
        return self.bits - 1 if self.signed else self.bits

    @property
    def num_slices(self) -> int:
        """J: MVMs per input vector."""
        return -(-self.magnitude_bits // self.slice_bits) if self.bit_serial else 1


ADC_MODES = ("max", "granular", "calibrated")
#: ADC architectures (PHYSICS §4.1): an ideal quantizer or a circuit model with component errors.
ADC_MODELS = ("quantizer", "ramp", "sar", "pipeline", "cyclic")
#: The component-error fields of each circuit model (a nonzero one elsewhere is an error).
_ADC_SIGMAS = {
    "ramp": ("sigma_capacitor", "sigma_comparator"),
    "sar": ("sigma_capacitor", "sigma_comparator"),
    "pipeline": ("sigma_c1", "sigma_c2", "sigma_cpar", "sigma_comparator"),
    "cyclic": ("sigma_c1", "sigma_c2", "sigma_cpar", "sigma_comparator"),
    "quantizer": (),
}
_ALL_ADC_SIGMAS = ("sigma_capacitor", "sigma_comparator", "sigma_c1", "sigma_c2", "sigma_cpar")


@dataclasses.dataclass(frozen=True)
class ADCConfig:
    """The ADC (PHYSICS §4), in array output units.

    Attributes:
      bits: ADC bits (0 = ideal: no clipping, no quantization).
      range: None (only with an ideal ADC), (lo, hi), one (lo, hi) per weight
        slice (LSB slice first), or "max" | "granular" | "calibrated".
        "calibrated" marks a range a calibration fills in; using it unfilled is
        an error.
      per_input_slice: with bit-serial inputs, digitize every input slice (and
        shift-and-add digitally) instead of accumulating in analog first.
      model: the converter circuit (PHYSICS §4.1): "quantizer" (ideal uniform
        quantizer), "ramp", "sar", "pipeline" or "cyclic".
      gain_db: open-loop gain of the circuit's amplifier in dB (> 0); None = infinite.
      sigma_capacitor: ramp, SAR: capacitor mismatch of a unit capacitor (relative;
        a capacitor of n units has an error sigma·sqrt(n) units).
      sigma_comparator: comparator offset relative to the reference voltage (half the
        converter's full scale).
      symmetric_cdac: ramp: the ramp comes from a sign-magnitude capacitive DAC (true) or a
        unipolar one (false).
      split_cdac: SAR: a split capacitive DAC with a bridge capacitor.
      group_size: SAR, pipeline, cyclic: columns sharing one converter (>= 1).
      sigma_c1, sigma_c2, sigma_cpar: pipeline, cyclic: relative errors of the two stage
        capacitors and the parasitic capacitance (relative to a unit capacitor).
      stochastic_rounding: quantizer: round up with probability equal to the fractional
        level (fresh per conversion) instead of to the nearest level.
    """

    bits: int = 0
    range: Any = None
    per_input_slice: bool = False
    model: str = "quantizer"
    gain_db: float | None = None
    sigma_capacitor: float = 0.0
    sigma_comparator: float = 0.0
    symmetric_cdac: bool = True
    split_cdac: bool = False
    group_size: int = 1
    sigma_c1: float = 0.0
    sigma_c2: float = 0.0
    sigma_cpar: float = 0.0
    stochastic_rounding: bool = False

    def __post_init__(self):
        object.__setattr__(self, "range", _tuplify(self.range))
        _floats(self, *_ALL_ADC_SIGMAS)
        if self.gain_db is not None:
            _floats(self, "gain_db")

    def _validate(self, path: str) -> None:
        _check_int(f"{path}.bits", self.bits, 0, 32)
        if not isinstance(self.per_input_slice, bool):
            _fail(f"{path}.per_input_slice", self.per_input_slice, "true or false")
        self._validate_circuit(path)
        rng = self.range
        if rng is None:
            if self.bits > 0:
                _fail(f"{path}.range", rng, "[lo, hi], per-slice ranges, 'max', 'granular' or "
                      "'calibrated' when bits > 0")
            return
        if isinstance(rng, str):
            _check_choice(f"{path}.range", rng, ADC_MODES)
            return
        allowed = "[lo, hi] with lo < hi, a list of them (one per weight slice), or a mode"
        pairs = self.ranges
        if pairs is None:
            _fail(f"{path}.range", rng, allowed)
        for i, pair in enumerate(pairs):
            p = f"{path}.range" if self.per_slice is False else f"{path}.range[{i}]"
            if not (isinstance(pair, tuple) and len(pair) == 2):
                _fail(p, pair, allowed)
            for v in pair:
                _check_real(p, v, allowed)
            if not pair[0] < pair[1]:
                _fail(p, list(pair), "[lo, hi] with lo < hi")

    def _validate_circuit(self, path: str) -> None:
        model = self.model
        _check_choice(f"{path}.model", model, ADC_MODELS)
        if model != "quantizer" and self.bits < 2:
            _fail(f"{path}.bits", self.bits, f"an integer in [2, 24] with model {model!r} (a "
                  "circuit model converts to bits; 0 is only the ideal quantizer)")
        if model != "quantizer" and self.bits > 24:
            _fail(f"{path}.bits", self.bits, f"an integer in [2, 24] with model {model!r}")
        _check_nonnegative(self, path, *_ALL_ADC_SIGMAS)
        for name in _ALL_ADC_SIGMAS:
            v = getattr(self, name)
            if _concrete(v) and v != 0 and name not in _ADC_SIGMAS[model]:
                users = [m for m, names in _ADC_SIGMAS.items() if name in names]
                _fail(f"{path}.{name}", v, f"0 with model {model!r} (it is a parameter of "
                      f"{' and '.join(repr(m) for m in users)})")
        g = self.gain_db
        if g is not None and _concrete(g):
            _check_real(f"{path}.gain_db", g, "a number of dB > 0, or null (infinite gain)")
            if not g > 0:
                _fail(f"{path}.gain_db", g, "a number of dB > 0, or null (infinite gain)")
        if g is not None and model == "quantizer":
            _fail(f"{path}.gain_db", g, "null with model 'quantizer' (it has no amplifier)")
        for name, users in (("symmetric_cdac", ("ramp",)), ("split_cdac", ("sar",)),
                            ("stochastic_rounding", ("quantizer",))):
            v = getattr(self, name)
            if not isinstance(v, bool):
                _fail(f"{path}.{name}", v, "true or false")
            default = name == "symmetric_cdac"
            if v != default and model not in users:
                _fail(f"{path}.{name}", v, f"{default!r} with model {model!r} (it is a "
                      f"setting of {users[0]!r})")
        _check_int(f"{path}.group_size", self.group_size, 1)
        if self.group_size != 1 and model not in ("sar", "pipeline", "cyclic"):
            _fail(f"{path}.group_size", self.group_size, f"1 with model {model!r} (groups of "
                  "columns share a 'sar', 'pipeline' or 'cyclic' converter)")
        if self.stochastic_rounding and self.bits == 0:
            _fail(f"{path}.stochastic_rounding", True, "false with an ideal ADC (bits = 0)")

    def ideal(self) -> ADCConfig:
        """The same conversion placement (`per_input_slice`) with an ideal ADC (bits = 0)."""
        return ADCConfig(per_input_slice=self.per_input_slice)

    @property
    def ideal_components(self) -> bool:
        """The converter is today's quantizer: no amplifier error and no mismatch (concretely)."""
        if self.model == "quantizer":
            return True
        values = [getattr(self, n) for n in _ALL_ADC_SIGMAS]
        return self.gain_db is None and all(_concrete(v) and v == 0 for v in values)

    @property
    def random(self) -> bool:
        """The circuit draws component errors per trial (a sigma is nonzero or swept)."""
        if self.model == "quantizer":
            return False
        return not all(_concrete(v) and v == 0 for v in (getattr(self, n)
                                                         for n in _ALL_ADC_SIGMAS))

    @property
    def per_slice(self) -> bool:
        """Whether `range` holds one (lo, hi) per weight slice."""
        return isinstance(self.range, tuple) and bool(self.range) and isinstance(
            self.range[0], tuple
        )

    @property
    def ranges(self) -> tuple[tuple[float, float], ...] | None:
        """The explicit ranges as a tuple of pairs, or None for a mode / ideal."""
        if not isinstance(self.range, tuple) or not self.range:
            return None
        return self.range if self.per_slice else (self.range,)


TOPOLOGIES = ("none", "input_source", "gated_source")


@dataclasses.dataclass(frozen=True)
class ParasiticsConfig:
    """Wire resistance (PHYSICS §6): the circuit; resistances normalized, r = Rp·Gmax.

    How the circuit is solved is set in `IRSolverConfig` (section `ir_solver`).

    Attributes:
      topology: "none" | "input_source" | "gated_source".
      r_row: row-line (input-source) or supply-line (gated-source) segment resistance.
      r_col: bit-line segment resistance.
      interleaved: differential pairs share one bit line.
      r_driver: terminal resistance at the driver end.
      r_integrator: terminal resistance at the integrator end.
    """

    topology: str = "none"
    r_row: float = 0.0
    r_col: float = 0.0
    interleaved: bool = False
    r_driver: float = 0.0
    r_integrator: float = 0.0

    def __post_init__(self):
        _floats(self, "r_row", "r_col", "r_driver", "r_integrator")

    def _validate(self, path: str) -> None:
        _check_choice(f"{path}.topology", self.topology, TOPOLOGIES)
        _check_nonnegative(self, path, "r_row", "r_col", "r_driver", "r_integrator")
        if not isinstance(self.interleaved, bool):
            _fail(f"{path}.interleaved", self.interleaved, "true or false")


@dataclasses.dataclass(frozen=True)
class IRSolverConfig:
    """Settings of the IR-drop solver (`jaxbar.core.ir`) for the `parasitics` circuit.

    Each field is also read under its `parasitics.` key (`parasitics.tol` is `ir_solver.tol`;
    see `SOLVER_KEYS`); one setting given both ways with different values is a `ConfigError`.

    Attributes:
      tol: relative tolerance of the output currents; None (default): 1e-5 for float32
        solves, 1e-6 for float64 (`jaxbar.core.ir.default_tol`: float32 resolves a few 1e-6
        on arrays of a thousand rows).
      max_iters: iteration limit of the solver.
      on_nonconvergence: "error" | "warn" | "ignore".
      batch_chunk: input vectors solved at a time (None = automatic).
      precompute: "input_source" arrays are linear in their inputs, so `program` solves
        each array's transfer matrix once (N adjoint solves) and every MVM is then an
        exact ideal product with it; false solves the circuit on every MVM instead
        (cheaper only for very few input vectors). "gated_source" always solves per MVM:
        its input bits switch cells on and off.
      cpu_kernel: on the CPU backend, "input_source" transfer matrices and "gated_source"
        ladders are computed by the numba kernels of `jaxbar.core.ir` (many times faster than
        the XLA solver; the transfer kernel falls back to it where its Gauss-Seidel passes
        converge slowly); false: always the XLA solver.
    """

    tol: float | None = None
    max_iters: int = 1000
    on_nonconvergence: str = "error"
    batch_chunk: int | None = None
    precompute: bool = True
    cpu_kernel: bool = True

    def __post_init__(self):
        _floats(self, "tol")

    def _validate(self, path: str) -> None:
        if self.tol is not None:
            _check_real(f"{path}.tol", self.tol, "a number in (0, 1) or null")
            if not 0 < self.tol < 1:
                _fail(f"{path}.tol", self.tol, "a number in (0, 1) or null")
        _check_int(f"{path}.max_iters", self.max_iters, 1)
        _check_choice(f"{path}.on_nonconvergence", self.on_nonconvergence,
                      ("error", "warn", "ignore"))
        if self.batch_chunk is not None:
            _check_int(f"{path}.batch_chunk", self.batch_chunk, 1)
        if not isinstance(self.precompute, bool):
            _fail(f"{path}.precompute", self.precompute, "true or false")
        if not isinstance(self.cpu_kernel, bool):
            _fail(f"{path}.cpu_kernel", self.cpu_kernel, "true or false")


#: The `ir_solver` fields that are also read as `parasitics.<field>`.
SOLVER_KEYS = tuple(f.name for f in dataclasses.fields(IRSolverConfig))
_MISSING = object()


def move_solver_keys(d: Mapping[str, Any]) -> dict[str, Any]:
    """A crossbar dict with the solver settings under `parasitics` moved to `ir_solver`.

    Args:
      d: a (possibly partial) crossbar config dict (anything else is returned as it is).

    Returns:
      A copy in which `parasitics.<key>` for every key of `SOLVER_KEYS` is `ir_solver.<key>`
      (`d` itself when there is nothing to move).

    Raises:
      ConfigError: a setting given in both places with different values, naming both.
    """
    par = d.get("parasitics") if isinstance(d, Mapping) else None
    if not isinstance(par, Mapping) or not set(par) & set(SOLVER_KEYS):
        return d  # type: ignore[return-value]
    solver = d.get("ir_solver", {})
    if not isinstance(solver, Mapping):
        _fail("ir_solver", solver, "a mapping")
    solver = dict(solver)
    for k in SOLVER_KEYS:
        v = par.get(k, _MISSING)
        if v is _MISSING:
            continue
        if solver.get(k, v) != v:
            raise ConfigError(f"parasitics.{k} = {v!r} and ir_solver.{k} = {solver[k]!r} "
                              f"disagree: set ir_solver.{k} only")
        solver[k] = v
    return {**d, "parasitics": {k: v for k, v in par.items() if k not in SOLVER_KEYS},
            "ir_solver": solver}


def solver_key(key: str) -> str:
    """The dotted key a setting is stored under: `parasitics.tol` -> `ir_solver.tol`."""
    section, _, leaf = key.partition(".")
    return f"ir_solver.{leaf}" if section == "parasitics" and leaf in SOLVER_KEYS else key


_SECTIONS = {
    "array": ArrayConfig,
    "weights": WeightsConfig,
    "mapping": MappingConfig,
    "device": DeviceConfig,
    "inputs": InputsConfig,
    "adc": ADCConfig,
    "parasitics": ParasiticsConfig,
    "ir_solver": IRSolverConfig,
}


@dataclasses.dataclass(frozen=True)
class CrossbarConfig:
    """The whole analog core. See the module docstring and PHYSICS.md."""

    array: ArrayConfig = ArrayConfig()
    weights: WeightsConfig = WeightsConfig()
    mapping: MappingConfig = MappingConfig()
    device: DeviceConfig = DeviceConfig()
    inputs: InputsConfig = InputsConfig()
    adc: ADCConfig = ADCConfig()
    parasitics: ParasiticsConfig = ParasiticsConfig()
    ir_solver: IRSolverConfig = IRSolverConfig()

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                _fail(name, section, f"a {cls.__name__}")
            section._validate(name)
        self._validate_cross()

    def _validate_cross(self) -> None:
        w, m, adc = self.weights, self.mapping, self.adc
        if m.slices > 1:
            if w.bits == 0:
                _fail("mapping.slices", m.slices, "1 when weights.bits is 0 (slicing needs "
                      "quantized weights)")
            top = w.bits - 1 if m.scheme == "differential" else w.bits
            if (m.slices - 1) * self.slice_bits >= top:
                _fail("mapping.slices", m.slices,
                      f"at most a count that leaves every slice >= 1 bit of the {top} "
                      f"{'magnitude ' if m.scheme == 'differential' else ''}bits")
        if adc.per_slice and len(adc.range) != m.slices:
            _fail("adc.range", adc.range,
                  f"{m.slices} [lo, hi] pairs (one per weight slice, LSB first)")
        if adc.range == "granular" and adc.bits > 0 and (w.bits == 0 or self.inputs.bits == 0):
            _fail("adc.range", "granular", "a mode other than 'granular' unless weights.bits "
                  "and inputs.bits are both > 0")
        p = self.parasitics
        if p.interleaved and p.topology != "none":
            if m.scheme != "differential":
                _fail("parasitics.interleaved", True, "false for the offset scheme")
            if m.subtract != "analog":
                _fail("parasitics.interleaved", True,
                      "false with mapping.subtract = 'digital' (interleaving subtracts in analog)")
        if not self.device.iv.linear and p.topology != "none":
            _fail("device.iv.model", self.device.iv.model, "'linear' when parasitics.topology "
                  "is not 'none' (nonlinear cells with IR drop are not supported yet)")
        if p.topology == "gated_source":
            if not (self.inputs.bit_serial and self.inputs.slice_bits == 1):
                _fail("parasitics.topology", "gated_source",
                      "a topology other than 'gated_source' unless inputs are bit-serial with "
                      "slice_bits = 1 (the cells are gated by input bits)")

    # ---- derived structure -------------------------------------------------
    @property
    def slice_bits(self) -> int:
        """b: bits per weight slice (PHYSICS §1.3)."""
        bw, s = self.weights.bits, self.mapping.slices
        if s == 1:
            return bw
        if bw % s == 0:
            return bw // s
        top = bw - 1 if self.mapping.scheme == "differential" else bw
        return -(-top // s)

    # ---- construction and serialization ------------------------------------
    def replace(self, **changes: Any) -> CrossbarConfig:
        """Returns a copy with changes; dotted keys reach into sections.

        Example: `cfg.replace(**{"adc.bits": 6, "device.programming_error.sigma": 0.05})`
        or `cfg.replace(adc=ADCConfig(bits=6, range="max"))`.
        """
        d = self.to_dict(_keep_callables=True)
        if "device.preset" in changes:  # a new preset replaces the device section first
            changes = dict(changes)
            preset = changes.pop("device.preset")
            d["device"] = (_device_preset("device.preset", preset) if preset is not None
                           else _asdict(DeviceConfig()))
        changes = _solver_changes(changes)
        for key, value in changes.items():
            if isinstance(value, _DATACLASSES):
                value = _asdict(value)
            node = d
            *parents, leaf = key.split(".")
            for i, part in enumerate(parents):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"unknown field {'.'.join(parents[: i + 1])!r}")
                node = node[part]
            if not isinstance(node, dict) or leaf not in node:
                raise ConfigError(f"unknown field {key!r}")
            node[leaf] = value
        return CrossbarConfig.from_dict(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CrossbarConfig:
        """Builds a validated config from the documented dict schema.

        Unknown keys are an error; omitted keys take their defaults.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(d).__name__}")
        _reject_unknown("", d, _SECTIONS)
        par = d.get("parasitics")
        moved = [k for k in SOLVER_KEYS if isinstance(par, Mapping) and k in par]
        d = move_solver_keys(d)
        try:
            kwargs = {}
            for name, sec_cls in _SECTIONS.items():
                if name in d:
                    kwargs[name] = _section_from_dict(name, sec_cls, d[name])
            return cls(**kwargs)
        except ConfigError as e:  # name a setting the way it is written
            key = next((k for k in moved if str(e).startswith(f"ir_solver.{k} ")), None)
            if key is None:
                raise
            raise ConfigError(f"{e} (given as parasitics.{key})") from None

    def to_dict(self, _keep_callables: bool = False) -> dict[str, Any]:
        """The config as plain JSON-compatible dicts and lists."""
        d = _asdict(self)
        fn = self.device.programming_error.fn, self.device.read_noise.fn
        for key, f in zip(("programming_error", "read_noise"), fn, strict=True):
            if f is None:
                d["device"][key].pop("fn")
            elif not _keep_callables:
                raise ConfigError(f"device.{key}.fn is a Python function and cannot be "
                                  "serialized; use a device preset or a look-up table instead")
        return d

    def to_json(self, **kwargs: Any) -> str:
        """The config as JSON (`json.dumps` keyword arguments pass through)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> CrossbarConfig:
        """A config from JSON text (see `from_dict`)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"invalid JSON config: {e}") from e

    def to_yaml(self) -> str:
        """The config as YAML."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> CrossbarConfig:
        """A config from YAML text (see `from_dict`)."""
        try:
            return cls.from_dict(load_yaml(text) or {})
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML config: {e}") from e

    @classmethod
    def load(cls, path_or_preset: str) -> CrossbarConfig:
        """A preset name, or a .json / .yaml / .yml file."""
        if path_or_preset in PRESETS:
            return PRESETS[path_or_preset]()
        from pathlib import Path

        p = Path(path_or_preset)
        if not p.is_file():
            raise ConfigError(f"{path_or_preset!r} is neither a preset ({', '.join(PRESETS)}) "
                              "nor an existing file")
        text = p.read_text()
        return cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)

    def save(self, path: str) -> None:
        """Writes the config to a .json or .yaml file."""
        from pathlib import Path

        p = Path(path)
        p.write_text(self.to_json(indent=2) if p.suffix == ".json" else self.to_yaml())

    # ---- presets -------------------------------------------------------------
    @classmethod
    def ideal(cls) -> CrossbarConfig:
        """Every effect off: the analog result equals `x @ W` to float rounding."""
        return cls()

    @classmethod
    def paper_baseline(cls) -> CrossbarConfig:
        """The baseline of Xiao et al. 2022.

        Differential, 8-bit weights, inputs and ADC, 1152×256 arrays, on/off ratio 100, ADC
        range calibrated per layer.
        """
        return cls(
            array=ArrayConfig(rows=1152, cols=256),
            weights=WeightsConfig(bits=8),
            mapping=MappingConfig(scheme="differential", slices=1, subtract="analog"),
            device=DeviceConfig(on_off_ratio=100.0),
            inputs=InputsConfig(bits=8, range=(-1.0, 1.0)),
            adc=ADCConfig(bits=8, range="calibrated"),
        )


PRESETS: dict[str, Callable[[], CrossbarConfig]] = {
    "ideal": CrossbarConfig.ideal,
    "paper_baseline": CrossbarConfig.paper_baseline,
}

_DATACLASSES = (CrossbarConfig, NoiseConfig, DriftConfig, IVConfig, *_SECTIONS.values())


def _solver_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """`replace` changes with the solver settings under `parasitics` renamed to `ir_solver`.

    Raises:
      ConfigError: one setting given twice with different values, naming both keys.
    """
    out: dict[str, Any] = {}
    given: dict[str, str] = {}

    def put(key: str, value: Any, as_given: str) -> None:
        if key in out and out[key] != value:
            raise ConfigError(f"{given[key]} = {out[key]!r} and {as_given} = {value!r} "
                              f"disagree: set {key} only")
        out[key], given[key] = value, as_given

    for key, value in changes.items():
        if key == "parasitics" and isinstance(value, Mapping):
            value = dict(value)
            for k in SOLVER_KEYS:
                if k in value:
                    put(f"ir_solver.{k}", value.pop(k), f"parasitics.{k}")
        put(solver_key(key), value, key)
    return out


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_asdict(v) for v in obj]
    return obj


def _reject_unknown(path: str, d: Mapping[str, Any], known: Mapping[str, Any]) -> None:
    for k in d:
        if k not in known:
            where = f"{path}.{k}" if path else k
            raise ConfigError(f"unknown config key {where!r}; allowed: {', '.join(known)}")


def _section_from_dict(path: str, cls: type, d: Any) -> Any:
    if isinstance(d, cls):
        return d
    if cls is DeviceConfig and isinstance(d, str):  # `device: pcm`
        d = {"preset": d}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path} must be a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(path, d, fields)
    if cls is DeviceConfig and d.get("preset") is not None:
        d = {**_device_preset(f"{path}.preset", d["preset"]), **d}
    kwargs = {}
    for k, v in d.items():
        if k in ("programming_error", "read_noise"):
            kwargs[k] = _section_from_dict(f"{path}.{k}", NoiseConfig, v)
        elif k == "drift":
            kwargs[k] = _section_from_dict(f"{path}.{k}", DriftConfig, v)
        elif k == "iv" and cls is DeviceConfig:
            kwargs[k] = _section_from_dict(f"{path}.{k}", IVConfig, v)
        elif k in ("bits",):
            kwargs[k] = _bits(v)
        elif k == "table" and isinstance(v, str):
            try:
                kwargs[k] = load_table(v)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}.table = {v!r} is invalid: {e}") from e
        else:
            kwargs[k] = _tuplify(v)
    return cls(**kwargs)


def _device_preset(path: str, name: Any) -> dict[str, Any]:
    if name not in DEVICE_PRESETS:
        _fail(path, name, "one of " + ", ".join(repr(n) for n in DEVICE_PRESETS))
    fit = {k: v for k, v in DEVICE_PRESETS[name]().items() if k != "preset"}
    device = _section_from_dict(path, DeviceConfig, fit)
    return _asdict(dataclasses.replace(device, preset=name))


# ---- pytrees: the numbers a sweep varies are leaves, everything else is structure ----------
# Passed as a normal (non-static) argument to a jitted function, a config's leaves are traced,
# so sweeping sigma, the on/off ratio or the wire resistances does not recompile; passed as a
# static argument, the whole config is hashed.
_PYTREE_LEAVES = {
    NoiseConfig: ("sigma", "scale"),
    DeviceConfig: ("on_off_ratio", "programming_error", "read_noise", "time", "iv"),
    IVConfig: ("k",),
    ParasiticsConfig: ("r_row", "r_col", "r_driver", "r_integrator"),
    ADCConfig: ("gain_db", *_ALL_ADC_SIGMAS),
    CrossbarConfig: tuple(_SECTIONS),
}


def _register(cls: type) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    leaves = _PYTREE_LEAVES.get(cls, ())
    static = tuple(n for n in names if n not in leaves)

    def flatten(obj):
        return tuple(getattr(obj, n) for n in leaves), tuple(getattr(obj, n) for n in static)

    def unflatten(aux, children):
        obj = object.__new__(cls)  # no validation: children may be tracers or placeholders
        for n, v in zip(leaves, children, strict=True):
            object.__setattr__(obj, n, v)
        for n, v in zip(static, aux, strict=True):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)


for _cls in (*_SECTIONS.values(), NoiseConfig, IVConfig, CrossbarConfig):
    _register(_cls)
