"""What a network's mapping costs in hardware: arrays, cells, reads and conversions per layer.

`cost(model, config, input_shape)` places every analog layer as `jaxbar.core.mapping` and
`jaxbar.core.mvm` do (PHYSICS §1, §3–5) and counts, for one forward call on an input of
`input_shape`, the arrays and cells it occupies, the array reads, the DAC and ADC conversions
and the digital operations after the ADC (PHYSICS §10). With an `EnergyTable` it also
reports energy. Counts come from shapes alone: the model is traced abstractly, never run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml
from flax import nnx

from jaxbar.config import ConfigError, CrossbarConfig, load_yaml
from jaxbar.core import mapping
from jaxbar.nn.analogize import analog_layers, analogize, digital_model, network_config
from jaxbar.nn.graph import trace

__all__ = ["COUNTS", "CostReport", "EnergyTable", "LayerCost", "cost", "format_cost",
           "layer_cost"]

#: The counted quantities, in report order.
COUNTS = ("arrays", "cells", "mvms", "array_reads", "cell_reads", "dac_conversions",
          "adc_conversions", "shift_adds", "adds", "multiplies")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """The hardware one weight-layer call uses (PHYSICS §10).

    Attributes:
      path: the layer's graph path.
      kind: "conv" or "dense".
      groups: G, separate (K, N) matrices (conv feature groups, einsum batch axes).
      K, N: rows and columns of each matrix.
      input_slices: J, array reads per input vector (bit-serial inputs), else 1.
      arrays: physical arrays holding the layer's conductances (all groups).
      array_shape: (rows, columns) of one array.
      cells: programmed cells (weight cells, both cells of a differential pair, every weight
        slice, offset unit columns).
      mvms: input vectors applied per call (output positions × groups).
      array_reads: activations of one array by one input vector (or input slice).
      cell_reads: cells read over all array reads.
      dac_conversions: input values converted per call (per input slice when bit-serial).
      adc_conversions: array outputs digitized per call.
      shift_adds: digital shift-and-adds: input slices digitized separately, weight slices.
      adds: digital additions and subtractions: row-partition partial sums, digitally
        subtracted differential pairs, offset subtraction (unit column, or the row sums of
        the inputs and the subtraction of the zero-weight current).
      multiplies: digital multiplications: the rescale of each output, the offset term per
        weight slice, drift-compensation gains.
      energy: energy per call by component (in the table's unit), or None without a table.
    """

    path: str
    kind: str
    groups: int
    K: int
    N: int
    input_slices: int
    arrays: int
    array_shape: tuple[int, int]
    cells: int
    mvms: int
    array_reads: int
    cell_reads: int
    dac_conversions: int
    adc_conversions: int
    shift_adds: int
    adds: int
    multiplies: int
    energy: dict[str, float] | None = None

    @property
    def utilization(self) -> float:
        """Programmed cells over the cells of the arrays used."""
        return self.cells / (self.arrays * self.array_shape[0] * self.array_shape[1])


@dataclasses.dataclass(frozen=True)
class EnergyTable:
    """Energy per operation (one unit for all entries, e.g. pJ); see docs/energy_example.yaml.

    Attributes:
      unit: the unit of every entry (a label).
      adc_conversion: one ADC conversion at `adc_bits`.
      adc_bits: the resolution `adc_conversion` is given at.
      adc_bit_factor: multiplies an ADC conversion's energy per bit above `adc_bits` (and
        divides it per bit below); 2 is the Walden figure-of-merit scaling.
      dac_conversion: one DAC conversion at `dac_bits`.
      dac_bits: the resolution `dac_conversion` is given at.
      dac_bit_factor: like `adc_bit_factor`, for the DAC.
      cell_read: one cell read once (its share of an array read).
      shift_add, add, multiply: one digital operation.
      sources: free text saying where the numbers come from.
    """

    unit: str = "pJ"
    adc_conversion: float = 0.0
    adc_bits: int = 8
    adc_bit_factor: float = 2.0
    dac_conversion: float = 0.0
    dac_bits: int = 8
    dac_bit_factor: float = 2.0
    cell_read: float = 0.0
    shift_add: float = 0.0
    add: float = 0.0
    multiply: float = 0.0
    sources: str = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("unit", "sources"):
                if not isinstance(v, str):
                    raise ConfigError(f"energy.{f.name} = {v!r} is invalid: expected text")
            elif f.name in ("adc_bits", "dac_bits"):
                if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 32:
                    raise ConfigError(f"energy.{f.name} = {v!r} is invalid: expected an "
                                      "integer in [1, 32]")
            elif (not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
                  or v < 0 or (f.name.endswith("factor") and v <= 0)):
                allowed = "a number > 0" if f.name.endswith("factor") else "a number >= 0"
                raise ConfigError(f"energy.{f.name} = {v!r} is invalid: expected {allowed}")

    @classmethod
    def from_dict(cls, d: Any) -> EnergyTable:
        """A table from a mapping with the field names (unknown keys are an error)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"an energy table must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown energy table key {unknown[0]!r}; allowed: "
                              f"{', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> EnergyTable:
        """A table from a YAML (or JSON) file."""
        try:
            d = load_yaml(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read energy table {path}: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse energy table {path}: {' '.join(str(e).split())}"
                              ) from e
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    def adc(self, bits: int) -> float:
        """Energy of one conversion of a `bits`-bit ADC (an ideal one, 0 bits: `adc_bits`)."""
        return self.adc_conversion * self.adc_bit_factor ** ((bits or self.adc_bits)
                                                             - self.adc_bits)

    def dac(self, bits: int) -> float:
        """Energy of one conversion of a `bits`-bit DAC (an ideal one, 0 bits: `dac_bits`)."""
        return self.dac_conversion * self.dac_bit_factor ** ((bits or self.dac_bits)
                                                             - self.dac_bits)


@dataclasses.dataclass(frozen=True)
class CostReport:
    """The cost of one forward call, per analog layer call and in total.

    Attributes:
      input_shape: the input the model was traced with (batch axis included).
      layers: one `LayerCost` per analog layer call, in forward order (a layer called twice,
        e.g. shared weights, appears twice).
      unit: the energy unit, or None without an energy table.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerCost, ...]
    unit: str | None = None

    @property
    def total(self) -> dict[str, int]:
        """Every count summed over the layer calls; a layer called twice holds its arrays once."""
        first = list({lc.path: lc for lc in reversed(self.layers)}.values())
        return {c: sum(getattr(lc, c) for lc in (first if c in ("arrays", "cells")
                                                 else self.layers)) for c in COUNTS}

    @property
    def energy(self) -> dict[str, float] | None:
        """Energy by component summed over the layers (None without a table)."""
        if self.unit is None:
            return None
        out: dict[str, float] = {}
        for lc in self.layers:
            for k, v in lc.energy.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-compatible dicts."""
        layers = []
        for lc in self.layers:
            d = dataclasses.asdict(lc)
            d["array_shape"] = list(lc.array_shape)
            d["utilization"] = lc.utilization
            layers.append(d)
        return {"input_shape": list(self.input_shape), "unit": self.unit, "layers": layers,
                "total": self.total, "energy": self.energy}


def layer_cost(path: str, kind: str, groups: int, K: int, N: int, vectors: int,
               config: CrossbarConfig, energy: EnergyTable | None = None) -> LayerCost:
    """The cost of one layer call: `vectors` input vectors into each of `groups` K×N matrices.

    Args:
      path: the layer's name (a label).
      kind: "conv" or "dense" (a label).
      groups: separate matrices of the layer.
      K: each matrix's rows.
      N: each matrix's columns.
      vectors: input vectors per matrix (a convolution: its output positions).
      config: the layer's crossbar config.
      energy: an energy table, or None.

    Returns:
      The `LayerCost` (PHYSICS §10).
    """
    lay = mapping.layout(K, N, config)
    m, inp, adc = config.mapping, config.inputs, config.adc
    pr, pc, S = len(lay.row_sizes), len(lay.col_sizes), m.slices
    differential = m.scheme == "differential"
    P = 2 if differential else 1
    interleaved = differential and config.parasitics.interleaved and \
        config.parasitics.topology != "none"
    unit = pc if (not differential and m.offset_subtraction == "unit_column") else 0
    J = inp.num_slices
    J_adc = J if inp.bit_serial and adc.per_input_slice else 1
    P_adc = 2 if differential and m.subtract == "digital" else 1

    arrays_per_matrix = pr * pc * S * (1 if interleaved else P)
    rows = (config.array.rows or lay.rows) * (2 if interleaved else 1)
    cols = (config.array.cols or lay.cols) + (1 if unit else 0)
    cells = K * N * S * P + K * unit * S  # a unit column has a cell on every used row
    mvms = groups * vectors
    columns = N + unit  # digitized columns of one row partition, weight slice and polarity
    adc_per_mvm = pr * S * P_adc * columns * J_adc
    shift_adds = (J_adc - 1) * pr * S * P_adc * columns + (S - 1) * N
    adds = (pr - 1) * S * N
    if P_adc == 2:
        adds += pr * S * columns
    multiplies = N
    if unit:
        adds += pr * S * N
    elif not differential:  # digital offset: Σ_k x_q[k], g_zero·Σ per slice, subtract
        adds += (K - 1) + S * N
        multiplies += S
    if config.device.drift.active and config.device.drift.compensation != "none":
        multiplies += pr * S * P_adc * columns
    lc = LayerCost(
        path=path, kind=kind, groups=groups, K=K, N=N, input_slices=J,
        arrays=groups * arrays_per_matrix, array_shape=(rows, cols),
        cells=groups * cells, mvms=mvms,
        array_reads=mvms * J * arrays_per_matrix, cell_reads=mvms * J * cells,
        dac_conversions=mvms * K * J, adc_conversions=mvms * adc_per_mvm,
        shift_adds=mvms * shift_adds, adds=mvms * adds, multiplies=mvms * multiplies)
    if energy is None:
        return lc
    dac_bits = inp.slice_bits if inp.bit_serial else inp.bits
    return dataclasses.replace(lc, energy={
        "adc": lc.adc_conversions * energy.adc(adc.bits),
        "dac": lc.dac_conversions * energy.dac(dac_bits),
        "cells": lc.cell_reads * energy.cell_read,
        "digital": (lc.shift_adds * energy.shift_add + lc.adds * energy.add
                    + lc.multiplies * energy.multiply),
    })


def cost(model: nnx.Module, config: Any = None, input_shape: tuple[int, ...] | None = None, *,
         energy: EnergyTable | str | Path | None = None) -> CostReport:
    """The hardware cost of one forward call of a network on crossbars (PHYSICS §10).

    Args:
      model: an NNX model, analog (from `analogize`, with its layers' configs, calibrated
        input ranges included) or not. It may be abstract (`nnx.eval_shape`); it is not run.
      config: what `analogize` accepts (a preset name, a path, a dict, a `CrossbarConfig`, a
        `NetworkConfig`); None uses an analog model's own layer configs. Batch-norm folding
        changes no shape and is ignored.
      input_shape: the shape of one forward call's input, batch axis included, e.g.
        (1, 32, 32, 3); None: `(1, *model.input_shape)` for models that declare it.
      energy: an `EnergyTable` or the path of its YAML file, for energy per call.

    Returns:
      A `CostReport`: one `LayerCost` per analog layer call, in forward order. Digital layers
      and the digital parts of the network (activations, pooling, biases) are not counted.

    Raises:
      ConfigError: no config for a model that is not analog, no input shape, or a bad
        energy table.
    """
    analog = analog_layers(model)
    if config is None and not analog:
        raise ConfigError("cost: the model has no analog layers; pass a config (a preset name, "
                          "a file, a CrossbarConfig or a NetworkConfig)")
    digital = digital_model(model) if analog else model
    if config is not None:
        net = dataclasses.replace(network_config(config), fold_batchnorm=False)
        analog = analog_layers(analogize(digital, net))
    if input_shape is None:
        if not hasattr(model, "input_shape"):
            raise ConfigError(f"cost: {type(model).__name__} declares no input_shape; pass one "
                              "(batch axis included, e.g. (1, 32, 32, 3))")
        input_shape = (1, *model.input_shape)
    input_shape = tuple(int(v) for v in input_shape)
    if isinstance(energy, str | Path):
        energy = EnergyTable.load(energy)
    example = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    layers = []
    for call in trace(digital, example).calls:
        if call.path not in analog:
            continue
        layer, op = analog[call.path]
        matrices = jax.eval_shape(op.kernel.matrices,
                                  jax.ShapeDtypeStruct(call.kernel_shape, jnp.float32))
        G, K, N = matrices.shape
        vectors = math.prod(call.output_shape) // (G * N)
        kind = "conv" if isinstance(layer, nnx.Conv) else "dense"
        layers.append(layer_cost(call.path, kind, G, K, N, vectors, op.config, energy))
    return CostReport(input_shape, tuple(layers), None if energy is None else energy.unit)


def _si(v: float) -> str:
    """A number to 3 significant digits with an SI suffix: 36.9k, 1.2M."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def format_cost(report: CostReport) -> str:
    """The report as a text table: one line per layer call and a total line."""
    cols = ("layer", "G×K×N", "J", "arrays", "use", "cells", "MVMs", "reads", "DAC", "ADC",
            "shift+", "add", "mul")
    if report.unit is not None:
        cols += (f"E/{report.unit}",)
    rows = []
    for lc in report.layers:
        row = [lc.path, f"{lc.groups}×{lc.K}×{lc.N}", str(lc.input_slices), str(lc.arrays),
               f"{100 * lc.utilization:.0f}%"]
        row += [_si(getattr(lc, c)) for c in ("cells", "mvms", "array_reads", "dac_conversions",
                                               "adc_conversions", "shift_adds", "adds",
                                               "multiplies")]
        if lc.energy is not None:
            row.append(_si(sum(lc.energy.values())))
        rows.append(row)
    t = report.total
    total = ["total", "", "", str(t["arrays"]), ""]
    total += [_si(t[c]) for c in ("cells", "mvms", "array_reads", "dac_conversions",
                                  "adc_conversions", "shift_adds", "adds", "multiplies")]
    if report.unit is not None:
        total.append(_si(sum(report.energy.values())))
    rows.append(total)
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    fmt = lambda r: "  ".join(  # noqa: E731
        v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths,
                                                                             strict=True)))
    lines = [fmt(cols), *(fmt(r) for r in rows)]
    if report.unit is not None:
        e = report.energy
        lines.append("energy per call: " + ", ".join(
            f"{k} {_si(v)}" for k, v in e.items()) + f" (total {_si(sum(e.values()))} "
            f"{report.unit})")
    return "\n".join(lines)
