"""The hardware cost report: counts worked out by hand from the mapping rules (PHYSICS §10)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import jaxbar
from jaxbar.cli import main
from jaxbar.config import ConfigError, CrossbarConfig
from jaxbar.nn.cost import EnergyTable, cost, format_cost
from jaxbar.nn.models import resnet20

BASE = CrossbarConfig.paper_baseline()


class Wrap(nnx.Module):
    """One layer as a model (`analogize` maps a model's submodules)."""

    def __init__(self, make):
        self.layer = make(nnx.Rngs(0))

    def __call__(self, x):
        return self.layer(x)


def wrapped(make):
    return nnx.eval_shape(lambda: Wrap(make))


@pytest.fixture(scope="module")
def resnet():
    return nnx.eval_shape(lambda: resnet20(rngs=nnx.Rngs(0)))


def _layer(report, path):
    (lc,) = [lc for lc in report.layers if lc.path == path]
    return lc


def test_resnet20_layer_by_hand(resnet):
    """stage2.block0.conv1: 3×3 conv, 16 → 32 channels, stride 2, on a 32×32×16 input.

    im2col: one array row per (kh, kw, c_in) = 3·3·16 = 144 rows, one column per output
    channel (32). With stride 2 and SAME padding the output is 16×16, so 256 MVMs per image.
    paper_baseline: 1152×256 arrays hold the 144×32 matrix in one tile; a differential pair is
    two arrays (g+ and g−), subtracted in analog, so one ADC conversion per column and MVM.
    """
    rows, cols, positions = 3 * 3 * 16, 32, 16 * 16
    base = _layer(cost(resnet, BASE), "stage2.block0.conv1")
    assert (base.K, base.N, base.groups, base.kind) == (rows, cols, 1, "conv")
    assert base.mvms == positions
    assert base.arrays == 2 and base.array_shape == (1152, 256)
    assert base.cells == rows * cols * 2
    assert base.array_reads == positions * 2
    assert base.dac_conversions == positions * rows
    assert base.adc_conversions == positions * cols
    assert base.shift_adds == 0 and base.adds == 0  # one tile, one slice, analog subtraction
    assert base.multiplies == positions * cols      # the rescale to x @ W units
    assert base.utilization == pytest.approx(rows * cols * 2 / (2 * 1152 * 256))

    # 4 weight slices of 2 bits: 4 differential pairs = 8 arrays, each with its own ADCs;
    # recombining 4 slices takes 3 shift-and-adds per output.
    sl = _layer(cost(resnet, BASE.replace(**{"mapping.slices": 4})), "stage2.block0.conv1")
    assert sl.arrays == 8 and sl.cells == rows * cols * 8
    assert sl.array_reads == positions * 8
    assert sl.dac_conversions == positions * rows  # the slices share their inputs
    assert sl.adc_conversions == positions * cols * 4
    assert sl.shift_adds == positions * cols * 3

    # Bit-serial inputs, 1 bit at a time: signed 8-bit inputs have 7 magnitude bits, so 7
    # reads of each array per MVM, accumulated in analog before one conversion per column.
    bs = _layer(cost(resnet, BASE.replace(**{"inputs.bit_serial": True})),
                "stage2.block0.conv1")
    assert bs.input_slices == 7
    assert bs.arrays == 2 and bs.array_reads == positions * 2 * 7
    assert bs.dac_conversions == positions * rows * 7
    assert bs.adc_conversions == positions * cols and bs.shift_adds == 0

    # Digitizing every input bit (unsigned range: 8 magnitude bits): 8 conversions per column,
    # 7 shift-and-adds to combine them.
    ps = _layer(cost(resnet, BASE.replace(**{"inputs.bit_serial": True,
                                              "adc.per_input_slice": True,
                                              "inputs.range": (0.0, 1.0)})),
                "stage2.block0.conv1")
    assert ps.input_slices == 8
    assert ps.adc_conversions == positions * cols * 8
    assert ps.shift_adds == positions * cols * 7


def test_resnet20_totals(resnet):
    """Whole-network totals: every layer is on its own arrays; the head is one MVM."""
    r = cost(resnet, BASE)
    assert len(r.layers) == 22 and r.layers[-1].path == "head.dense"
    weights = sum(lc.K * lc.N for lc in r.layers)
    stage1 = 6 * 144 * 16
    stage2 = 144 * 32 + 5 * 288 * 32 + 16 * 32  # first conv, five more, 1×1 shortcut
    stage3 = 288 * 64 + 5 * 576 * 64 + 32 * 64
    assert weights == 27 * 16 + stage1 + stage2 + stage3 + 64 * 10
    assert r.total["cells"] == 2 * weights
    assert r.total["arrays"] == 2 * 22
    # ADC conversions = output activations of every analog layer (one per column and MVM)
    assert r.total["adc_conversions"] == (16 * 32 * 32 * 7 + 32 * 16 * 16 * 7 + 64 * 8 * 8 * 7
                                          + 10)


def test_tiling_offset_unit_column_and_energy():
    """A 2000×300 dense layer on 1152×256 arrays: 2 row and 2 column partitions.

    Offset mapping with 2 weight slices and a unit column per column partition.
    """
    model = wrapped(lambda r: nnx.Linear(2000, 300, rngs=r))
    cfg = BASE.replace(**{"mapping.scheme": "offset", "mapping.slices": 2,
                          "mapping.offset_subtraction": "unit_column"})
    table = EnergyTable(adc_conversion=1.0, adc_bits=6, dac_conversion=0.5, dac_bits=8,
                        cell_read=0.01, shift_add=0.1, add=0.2, multiply=3.0)
    (lc,) = cost(model, cfg, (5, 2000), energy=table).layers
    pr = pc = S = 2
    assert lc.mvms == 5
    assert lc.arrays == pr * pc * S
    assert lc.array_shape == (1152, 256 + 1)
    unit_cells = 2000 * pc * S  # one cell per used row, per column partition and slice
    assert lc.cells == 2000 * 300 * S + unit_cells
    assert lc.array_reads == 5 * 8
    assert lc.cell_reads == 5 * lc.cells
    per_mvm_adc = pr * S * (300 + pc)
    assert lc.adc_conversions == 5 * per_mvm_adc
    # per MVM: slice recombination 1×300; partial sums (pr−1)·S·300; unit subtraction pr·S·300
    assert lc.shift_adds == 5 * 300
    assert lc.adds == 5 * (1 * S * 300 + pr * S * 300)
    assert lc.multiplies == 5 * 300
    e = lc.energy
    assert e["adc"] == pytest.approx(lc.adc_conversions * 1.0 * 2 ** (8 - 6))
    assert e["dac"] == pytest.approx(5 * 2000 * 0.5)
    assert e["cells"] == pytest.approx(lc.cell_reads * 0.01)
    assert e["digital"] == pytest.approx(5 * (300 * 0.1 + 1800 * 0.2 + 300 * 3.0))


def test_digital_offset_and_digital_pair_subtraction():
    model = wrapped(lambda r: nnx.Linear(100, 20, rngs=r))
    (off,) = cost(model, BASE.replace(**{"mapping.scheme": "offset"}), (1, 100)).layers
    assert off.arrays == 1 and off.cells == 100 * 20
    assert off.adds == 99 + 20  # Σ_k x_q[k], then one subtraction per column
    assert off.multiplies == 20 + 1  # rescale, and g_zero·Σ x_q
    (dd,) = cost(model, BASE.replace(**{"mapping.subtract": "digital"}), (1, 100)).layers
    assert dd.adc_conversions == 2 * 20 and dd.adds == 20 and dd.arrays == 2


class Twice(nnx.Module):
    def __init__(self, rngs):
        self.layer = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.layer(self.layer(x))


def test_a_shared_layer_holds_its_arrays_once():
    r = cost(nnx.eval_shape(lambda: Twice(nnx.Rngs(0))), BASE, (3, 8))
    assert [lc.path for lc in r.layers] == ["layer", "layer"]
    assert r.total["arrays"] == 2 and r.total["cells"] == 8 * 8 * 2
    assert r.total["mvms"] == 6 and r.total["adc_conversions"] == 6 * 8


def test_grouped_conv_and_einsum():
    conv = wrapped(lambda r: nnx.Conv(8, 16, (3, 3), feature_group_count=4, padding="VALID",
                                      rngs=r))
    (lc,) = cost(conv, "ideal", (2, 10, 10, 8)).layers
    assert (lc.groups, lc.K, lc.N) == (4, 3 * 3 * 2, 4)
    assert lc.mvms == 4 * 2 * 8 * 8  # one MVM per output position per group
    assert lc.arrays == 4 * 2 and lc.cells == 4 * 18 * 4 * 2
    ein = wrapped(lambda r: nnx.Einsum("bhd,hdk->bhk", (4, 8, 5), rngs=r))
    (le,) = cost(ein, "ideal", (3, 4, 8)).layers
    assert (le.groups, le.K, le.N, le.mvms) == (4, 8, 5, 12)
    assert le.dac_conversions == 12 * 8 and le.adc_conversions == 12 * 5


def test_analog_model_uses_its_own_configs(resnet):
    analog = jaxbar.analogize(resnet, {"crossbar": BASE.to_dict(),
                                       "layers": {"head.*": "digital"}})
    r = jaxbar.cost(analog, None, (1, 32, 32, 3))
    assert len(r.layers) == 21 and "head.dense" not in {lc.path for lc in r.layers}
    assert "total" in format_cost(r)


def test_errors(resnet, tmp_path):
    with pytest.raises(ConfigError, match="no analog layers"):
        cost(resnet)
    with pytest.raises(ConfigError, match="input_shape"):
        cost(wrapped(lambda r: nnx.Linear(3, 2, rngs=r)), "ideal")
    with pytest.raises(ConfigError, match="energy.add"):
        EnergyTable(add=-1.0)
    bad = tmp_path / "e.yaml"
    bad.write_text("adc_conversion: 1\nbogus: 2\n")
    with pytest.raises(ConfigError, match="bogus"):
        EnergyTable.load(bad)


def test_example_energy_table_loads():
    t = EnergyTable.load("docs/energy_example.yaml")
    assert t.unit == "pJ" and t.adc(8) == t.adc_conversion and t.adc(9) == 2 * t.adc_conversion


def test_cli(tmp_path, capsys, resnet):
    out = tmp_path / "c.json"
    assert main(["cost", "--model", "resnet20", "--set", "mapping.slices=4",
                 "--energy", "docs/energy_example.yaml", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage2.block0.conv1" in text and "energy per call" in text
    d = json.loads(out.read_text())
    want = cost(resnet, BASE.replace(**{"mapping.slices": 4})).total
    assert d["total"] == want
    assert np.isclose(sum(d["energy"].values()), sum(sum(lc["energy"].values())
                                                     for lc in d["layers"]))
    assert main(["cost", "--model", "resnet20", "--energy", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxbar cost: error: cannot read energy table")


def test_no_flops(resnet):
    """The trace is abstract: an abstract (never initialized) model suffices."""
    assert isinstance(nnx.state(resnet, nnx.Param).stem.conv.kernel.get_value(),
                      jax.ShapeDtypeStruct)
