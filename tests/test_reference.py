"""Tests of the NumPy reference (tests/reference.py) against closed forms worked out by hand."""

from __future__ import annotations

import copy
from fractions import Fraction as F

import numpy as np
import pytest

try:
    from tests import reference as ref
except ImportError:  # tests/ is not a package: pytest puts it on sys.path instead
    import reference as ref


def make_cfg(**overrides) -> dict:
    """A full config with every effect off; ``overrides`` maps section -> {key: value}."""
    cfg = {
        "array": {"rows": None, "cols": None},
        "weights": {"bits": 0, "clip_percentile": 100.0},
        "mapping": {
            "scheme": "differential",
            "slices": 1,
            "subtract": "analog",
            "offset_subtraction": "digital",
        },
        "device": {
            "on_off_ratio": None,
            "cell_bits": None,
            "programming_error": {"model": "none", "sigma": 0.0},
            "read_noise": {"model": "none", "sigma": 0.0},
            "clip": "zero",
        },
        "inputs": {"bits": 0, "range": [0.0, 1.0], "bit_serial": False, "slice_bits": 1},
        "adc": {"bits": 0, "range": None, "per_input_slice": False},
        "parasitics": {"topology": "none"},
    }
    cfg = copy.deepcopy(cfg)
    for section, values in overrides.items():
        cfg[section].update(values)
    return cfg


# The six mappings: (scheme, slices, subtraction option).
MAPPINGS = [
    {"scheme": "differential", "slices": 1, "subtract": "analog"},
    {"scheme": "differential", "slices": 1, "subtract": "digital"},
    {"scheme": "offset", "slices": 1, "offset_subtraction": "digital"},
    {"scheme": "offset", "slices": 1, "offset_subtraction": "unit_column"},
    {"scheme": "differential", "slices": 2, "subtract": "analog"},
    {"scheme": "differential", "slices": 3, "subtract": "digital"},
    {"scheme": "offset", "slices": 2, "offset_subtraction": "digital"},
    {"scheme": "offset", "slices": 3, "offset_subtraction": "unit_column"},
]
MAPPING_IDS = [
    f"{m['scheme']}-S{m['slices']}-{m.get('subtract', m.get('offset_subtraction'))}"
    for m in MAPPINGS
]


def on_grid_weights(rng, K, N, bits, w_max):
    """Weights exactly on the B-bit grid with ``max|W| = w_max`` (so quantization is exact)."""
    top = 2 ** (bits - 1) - 1
    W_int = rng.integers(-top, top + 1, size=(K, N))
    W_int[0, 0] = top
    return W_int * (w_max / top)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, max_size, expected",
    [
        (1152, 512, [384, 384, 384]),
        (100, 48, [33, 33, 34]),
        (4608, 1152, [1152] * 4),
        (10, 4, [3, 3, 4]),
        (11, 4, [3, 4, 4]),
        (7, 7, [7]),
        (7, 100, [7]),
        (7, None, [7]),
        (5, 1, [1] * 5),
    ],
)
def test_partition_sizes(n, max_size, expected):
    assert ref.partition_sizes(n, max_size) == expected


def test_quantize_uniform_levels_and_ties():
    # [0, 4] with 5 levels: Δ = 1, grid 0..4. Index ties round half to even.
    y = np.array([-3.0, 0.0, 0.5, 1.5, 2.5, 3.5, 2.4, 2.6, 7.0])
    q = ref.quantize_uniform(y, 0.0, 4.0, 5)
    np.testing.assert_array_equal(q, [0, 0, 0, 2, 2, 4, 2, 3, 4])
    # [-2, 2] with 5 levels: index = y + 2, so y = -1.5, -0.5, 0.5, 1.5 are index ties
    # 0.5, 1.5, 2.5, 3.5 -> 0, 2, 2, 4 -> -2, 0, 0, 2.
    q = ref.quantize_uniform(np.array([-1.5, -0.5, 0.5, 1.5]), -2.0, 2.0, 5)
    np.testing.assert_array_equal(q, [-2, 0, 0, 2])
    # Asymmetric [-1, 3] with 5 levels: y = 0.5 is index 1.5 -> 2 -> 1; y = 1.5 -> 2.5 -> 2 -> 1.
    q = ref.quantize_uniform(np.array([0.5, 1.5]), -1.0, 3.0, 5)
    np.testing.assert_array_equal(q, [1, 1])
    # [0, 1] with 9 levels (Δ = 1/8, exact): 3/16 is index 1.5 -> 2 -> 1/4; 5/16 -> 2.5 -> 2.
    q = ref.quantize_uniform(np.array([3 / 16, 5 / 16, 7 / 16]), 0.0, 1.0, 9)
    np.testing.assert_array_equal(q, [0.25, 0.25, 0.5])


def test_adc_levels_and_adc():
    assert ref.adc_levels(-1.0, 1.0, 3) == 7
    assert ref.adc_levels(0.0, 1.0, 3) == 8
    assert ref.adc_levels(-1.0, 2.0, 3) == 8
    assert ref.adc_levels(-0.5, 0.25, 8) == 256
    # 3 bits on [-3, 3]: 7 levels, Δ = 1, index = y + 3 (odd at y = 0), so ±0.5 are index
    # ties 3.5 / 2.5 -> 4 / 2 -> ±1, and 2.5 -> 5.5 -> 6 -> 3.
    # 3 bits on [0, 7]: 8 levels, Δ = 1, index = y: 0.5 -> 0, 1.5 -> 2.
    np.testing.assert_array_equal(ref.adc([0.5, -0.5, 2.5, 9.0], (-3.0, 3.0), 3), [1, -1, 3, 3])
    np.testing.assert_array_equal(ref.adc([0.5, 1.5, -2.0, 9.0], (0.0, 7.0), 3), [0, 2, 0, 7])
    # Ideal ADC: untouched whatever the range.
    np.testing.assert_array_equal(ref.adc([0.5, 9.0], (0.0, 1.0), 0), [0.5, 9.0])
    np.testing.assert_array_equal(ref.adc([0.5, 9.0], None, None), [0.5, 9.0])


def test_dac():
    # Unsigned 2 bits: 4 levels on [0, 1] (Δ = 1/3). Clipping to [0, 1].
    q = ref.dac(np.array([-0.2, 0.1, 0.5, 0.9, 1.7]), 2, signed=False)
    np.testing.assert_allclose(q, [0, 0, 2 / 3, 1, 1], rtol=0, atol=1e-15)
    # Unsigned 1 bit: levels {0, 1}; 0.5 is an index tie -> 0.
    np.testing.assert_array_equal(ref.dac(np.array([0.5, 0.51]), 1, signed=False), [0, 1])
    # Signed 2 bits: 3 levels {-1, 0, 1} (Δ = 1); ±0.5 are index ties 0.5 / 1.5 -> 0 / 2.
    q = ref.dac(np.array([-0.5, 0.5, -0.49, 0.49, -3.0]), 2, signed=True)
    np.testing.assert_array_equal(q, [-1, 1, 0, 0, -1])
    # Signed 4 bits: 15 levels, 7 magnitude steps.
    q = ref.dac(np.array([3 / 7 + 0.01, -1.0, 0.0]), 4, signed=True)
    np.testing.assert_allclose(q, [3 / 7, -1, 0], rtol=0, atol=1e-15)
    # Ideal DAC: neither clips nor quantizes.
    np.testing.assert_array_equal(ref.dac(np.array([-0.3, 1.7]), 0, signed=False), [-0.3, 1.7])


@pytest.mark.parametrize(
    "bits, slices, scheme, b",
    [
        (8, 1, "differential", 8),
        (8, 2, "differential", 4),
        (8, 2, "offset", 4),
        (8, 3, "differential", 3),
        (8, 3, "offset", 3),
        (7, 2, "differential", 3),
        (7, 2, "offset", 4),
        (8, 8, "differential", 1),
        (5, 3, "differential", 2),
        (5, 3, "offset", 2),
    ],
)
def test_weight_slices_recombine(bits, slices, scheme, b):
    assert ref.weight_slice_bits(bits, slices, scheme) == b
    top = 2 ** (bits - 1) - 1
    W_int = np.arange(-top, top + 1).reshape(1, -1)
    digits = ref.weight_slices(W_int, bits, slices, scheme)
    assert len(digits) == slices
    total = sum(2 ** (i * b) * d for i, d in enumerate(digits))
    target = W_int if scheme == "differential" else W_int + 2 ** (bits - 1)
    np.testing.assert_array_equal(total, target)
    for d in digits:
        assert d.dtype.kind == "i"
        assert np.all(np.abs(d) <= 2**b - 1)
        if scheme == "differential":
            assert np.all(d * W_int >= 0)  # sign-magnitude: every digit has the weight's sign
        else:
            assert np.all(d >= 0)


def test_weight_slices_by_hand():
    # W_int = -5 at 4 bits, 2 slices of 2 bits. Differential: |-5| = 0b0101 -> digits 1, 1,
    # carrying the sign: -1, -1. Offset: -5 + 8 = 3 = 0b0011 -> digits 3, 0.
    d = ref.weight_slices(np.array([-5, 6]), 4, 2, "differential")
    np.testing.assert_array_equal(d, [[-1, 2], [-1, 1]])
    d = ref.weight_slices(np.array([-5, 6]), 4, 2, "offset")
    np.testing.assert_array_equal(d, [[3, 2], [0, 3]])


@pytest.mark.parametrize(
    "bits, signed, s",
    [(4, False, 1), (4, False, 2), (4, False, 3), (8, True, 2), (5, True, 4), (3, False, 5)],
)
def test_input_digits_recombine(bits, signed, s):
    m = bits - 1 if signed else bits
    n = np.arange(-(2**m - 1) if signed else 0, 2**m)
    x_q = n / (2**m - 1)
    digits = ref.input_digits(x_q, bits, signed, s)
    factors = ref.input_slice_factors(bits, signed, s)
    assert len(digits) == len(factors) == -(-m // s)
    for k, f in enumerate(factors):
        assert f == pytest.approx((2**s - 1) / (2**m - 1) * 2 ** (k * s))
    np.testing.assert_allclose(
        sum(f * d for f, d in zip(factors, digits, strict=True)), x_q, rtol=0, atol=1e-14
    )
    for d in digits:
        ints = d * (2**s - 1)
        np.testing.assert_allclose(ints, np.round(ints), atol=1e-12)
        assert np.all(np.abs(ints) <= 2**s - 1 + 1e-12)
        assert np.all(d * x_q >= 0)


def test_input_digits_by_hand():
    # 4-bit unsigned, 2-bit slices: x_q = 13/15, n = 13 = 0b1101 -> digits 1, 3 -> inputs
    # 1/3, 1; shift-and-add 3/15 · (1/3 + 4 · 1) = 13/15.
    d = ref.input_digits(np.array([13 / 15]), 4, False, 2)
    np.testing.assert_allclose(d, [[1 / 3], [1.0]], atol=1e-15)
    # 4-bit signed (3 magnitude bits), 1-bit slices: x_q = -5/7 -> n = 5 = 0b101 -> -1, 0, -1.
    d = ref.input_digits(np.array([-5 / 7]), 4, True, 1)
    np.testing.assert_array_equal(d, [[-1.0], [0.0], [-1.0]])


def test_weight_max_and_cells():
    W = np.arange(-50.0, 51.0)  # 101 values; 95th percentile 45, 5th percentile -45
    assert ref.weight_max(W, 100.0) == 50.0
    assert ref.weight_max(W, 95.0) == pytest.approx(45.0)
    assert ref.weight_max(W + 20.0, 95.0) == pytest.approx(65.0)  # larger of |65|, |-25|
    assert ref.weight_max(np.zeros(4), 100.0) == 1.0
    # 2 cell bits on [0.2, 1]: levels 0.2 + 0.8·{0, 1/3, 2/3, 1}.
    g = ref.quantize_cells(np.array([0.2, 0.4, 0.5, 0.75, 1.0]), 0.2, 0.8, 2)
    np.testing.assert_allclose(g, [0.2, 0.2 + 0.8 / 3, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0])


def test_max_adc_ranges():
    # R = 6 (rows 12 at 6 -> 6, 6). On/off ratio 5: g_min = 0.2, g_range = 0.8.
    W = np.ones((12, 3))
    for mapping, signed, expected in [
        ({"scheme": "differential", "subtract": "analog"}, False, (-4.8, 4.8)),
        ({"scheme": "differential", "subtract": "analog"}, True, (-4.8, 4.8)),
        ({"scheme": "differential", "subtract": "digital"}, False, (0.0, 6.0)),
        ({"scheme": "differential", "subtract": "digital"}, True, (-6.0, 6.0)),
        ({"scheme": "offset"}, False, (0.0, 6.0)),
        ({"scheme": "offset"}, True, (-6.0, 6.0)),
    ]:
        cfg = make_cfg(
            mapping=mapping,
            device={"on_off_ratio": 5.0},
            inputs={"range": [-1.0, 1.0] if signed else [0.0, 1.0]},
            adc={"bits": 8, "range": "max"},
            array={"rows": 6},
        )
        mapping_ = ref.conductances(W, cfg)
        ((lo, hi),) = ref.adc_ranges(cfg, mapping_, 6)
        assert (lo, hi) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Exactness: every mapping with every effect off is x @ W
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", MAPPINGS, ids=MAPPING_IDS)
@pytest.mark.parametrize("on_off", [None, 10.0])
@pytest.mark.parametrize("signed", [False, True])
def test_all_effects_off_is_exact(mapping, on_off, signed):
    rng = np.random.default_rng(0)
    K, N, B = 13, 7, 3
    sliced = mapping["slices"] > 1
    bits = 8 if sliced else 0
    W = on_grid_weights(rng, K, N, 8, 0.37) if sliced else rng.normal(size=(K, N))
    x = rng.uniform(-1.5 if signed else 0.0, 1.5, size=(B, K))
    x_range = [-1.5, 1.5] if signed else [0.0, 1.5]
    for array in ({"rows": None, "cols": None}, {"rows": 5, "cols": 3}):
        cfg = make_cfg(
            mapping=mapping,
            weights={"bits": bits},
            device={"on_off_ratio": on_off},
            inputs={"range": x_range},
            array=array,
        )
        y = ref.ref_matmul(x, W, cfg)
        assert y.shape == (B, N) and y.dtype == np.float64
        np.testing.assert_allclose(y, x @ W, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mapping", MAPPINGS, ids=MAPPING_IDS)
@pytest.mark.parametrize(
    "signed, s, per_input_slice",
    [(False, 1, False), (False, 3, True), (True, 2, True), (True, 1, False)],
)
def test_bit_serial_with_ideal_adc_is_exact(mapping, signed, s, per_input_slice):
    # Inputs and weights on their grids, so quantization is lossless: the result is x @ W.
    rng = np.random.default_rng(1)
    K, N, B_in = 9, 4, 6
    m = B_in - 1 if signed else B_in
    W = on_grid_weights(rng, K, N, 6, 2.0)
    n = rng.integers(-(2**m - 1) if signed else 0, 2**m, size=(2, K))
    x = n / (2**m - 1) * 3.0
    cfg = make_cfg(
        mapping=mapping,
        weights={"bits": 6},
        device={"on_off_ratio": 20.0},
        inputs={
            "bits": B_in,
            "range": [-3.0, 3.0] if signed else [0.0, 3.0],
            "bit_serial": True,
            "slice_bits": s,
        },
        adc={"bits": 0, "range": "max", "per_input_slice": per_input_slice},
        array={"rows": 4},
    )
    np.testing.assert_allclose(ref.ref_matmul(x, W, cfg), x @ W, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# One column worked by hand, per mapping, with ADC and finite on/off ratio
# --------------------------------------------------------------------------------------------
#
# Common setup: on/off ratio 4 -> g_min = 1/4, g_range = 3/4.
# W = [[1.0], [-0.5]] (K = 2 rows, N = 1 column), 3-bit weights: w_max = 1, 3 magnitude steps,
#   W_int = round([3, -1.5]) = [3, -2] (half to even), w_q = [1, -2/3].
# x = [[2.0, 1.0]], unsigned 2-bit inputs on [0, 2]: x_n = [1, 0.5] -> 4 levels, 0.5·3 = 1.5
#   rounds to 2 -> x_q = [1, 2/3]; Σ x_q = 5/3.
# Ideal quantized result W_q·x_q·w_max·x_max = (1 - 4/9)·2 = 10/9 for every mapping.
# Output scale y = y_arr · w_max · x_max / (g_range · c) = y_arr · 2 / (3/4 · c).

X_HAND = np.array([[2.0, 1.0]])
W_HAND = np.array([[1.0], [-0.5]])


def hand_cfg(mapping, adc_range, adc_bits=3):
    return make_cfg(
        mapping=mapping,
        weights={"bits": 3},
        device={"on_off_ratio": 4.0},
        inputs={"bits": 2, "range": [0.0, 2.0]},
        adc={"bits": adc_bits, "range": adc_range},
    )


HAND_CASES = [
    # Differential, analog subtraction, c = 1.
    #   g+ = [1, 1/4], g- = [1/4, 1/4 + 3/4·2/3] = [1/4, 3/4];
    #   I+ - I- = 1·(3/4) + 2/3·(-1/2) = 5/12.
    #   ADC 3 bits on [-1, 1]: 7 levels, Δ = 1/3; (5/12 + 1)·3 = 4.25 -> 4 -> 1/3.
    #   y = 1/3 · 2 / (3/4) = 8/9.
    ({"scheme": "differential", "subtract": "analog"}, [-1.0, 1.0], F(8, 9)),
    # Differential, digital subtraction, c = 1. ADC 3 bits on [0, 2]: 8 levels, Δ = 2/7.
    #   I+ = 1·1 + 2/3·1/4 = 7/6 -> (7/6)·(7/2) = 49/12 = 4.08 -> 4 -> 8/7;
    #   I- = 1·1/4 + 2/3·3/4 = 3/4 -> (3/4)·(7/2) = 2.625 -> 3 -> 6/7.
    #   y_arr = 2/7; y = 2/7 · 2 / (3/4) = 16/21.
    ({"scheme": "differential", "subtract": "digital"}, [0.0, 2.0], F(16, 21)),
    # Offset, digital subtraction, c = 3/7. Levels W_int + 4 = [7, 2] of 0..7:
    #   g = 1/4 + 3/4·[7/7, 2/7] = [1, 13/28]; g_zero = 1/4 + 3/4·4/7 = 19/28.
    #   I = 1 + 2/3·13/28 = 55/42. ADC [0, 2], Δ = 2/7: (55/42)·(7/2) = 4.58 -> 5 -> 10/7.
    #   offset = 19/28 · 5/3 = 95/84; y_arr = 10/7 - 95/84 = 25/84.
    #   y = 25/84 · 2 / (3/4 · 3/7) = 50/27.
    ({"scheme": "offset", "offset_subtraction": "digital"}, [0.0, 2.0], F(50, 27)),
    # Offset, unit column: as above, but the unit column current 95/84 is digitized too:
    #   (95/84)·(7/2) = 3.96 -> 4 -> 8/7; y_arr = 10/7 - 8/7 = 2/7; y = 2/7 · 56/9 = 16/9.
    ({"scheme": "offset", "offset_subtraction": "unit_column"}, [0.0, 2.0], F(16, 9)),
    # Differential, 2 slices: 3 bits not divisible by 2 -> b = ceil(2/2) = 1, c = 3.
    #   |W_int| = [3, 2] = [0b11, 0b10]: slice 0 digits [1, 0], slice 1 digits [1, -1] (signed).
    #   Slice 0: g+ - g- = 3/4·[1, 0]; I0 = 3/4. ADC [-1, 1], Δ = 1/3: 1.75·3 = 5.25 -> 5 -> 2/3.
    #   Slice 1: g+ - g- = 3/4·[1, -1]; I1 = 3/4 - 1/2 = 1/4. ADC [-0.6, 0.6], Δ = 0.2:
    #     0.85 / 0.2 = 4.25 -> 4 -> 0.2.
    #   y_arr = (2^1 - 1)·(2/3 + 2·0.2) = 16/15; y = 16/15 · 2 / (3/4 · 3) = 128/135.
    (
        {"scheme": "differential", "slices": 2, "subtract": "analog"},
        [[-1.0, 1.0], [-0.6, 0.6]],
        F(128, 135),
    ),
    # Offset, 2 slices: b = ceil(3/2) = 2, c = 3. W_int + 4 = [7, 2] in base 4:
    #   slice 0 digits [3, 2], slice 1 digits [1, 0]; zero (4) has digits 0 and 1.
    #   Slice 0: g = 1/4 + 3/4·[1, 2/3] = [1, 3/4], g_zero = 1/4; I0 = 1 + 2/3·3/4 = 3/2.
    #     ADC [0, 2], Δ = 2/7: 1.5·3.5 = 5.25 -> 5 -> 10/7; minus 1/4·5/3: y0 = 85/84.
    #   Slice 1: g = 1/4 + 3/4·[1/3, 0] = [1/2, 1/4], g_zero = 1/2; I1 = 1/2 + 1/6 = 2/3.
    #     ADC [0, 1], Δ = 1/7: (2/3)·7 = 4.67 -> 5 -> 5/7; minus 1/2·5/3: y1 = -5/42.
    #   y_arr = (2^2 - 1)·(85/84 - 4·5/42) = 135/84; y = 135/84 · 2 / (3/4 · 3) = 10/7.
    (
        {"scheme": "offset", "slices": 2, "offset_subtraction": "digital"},
        [[0.0, 2.0], [0.0, 1.0]],
        F(10, 7),
    ),
]


@pytest.mark.parametrize(
    "mapping, adc_range, expected", HAND_CASES, ids=[str(c[0]) for c in HAND_CASES]
)
def test_hand_worked_column(mapping, adc_range, expected):
    y = ref.ref_matmul(X_HAND, W_HAND, hand_cfg(mapping, adc_range))
    assert y.shape == (1, 1)
    assert y[0, 0] == pytest.approx(float(expected), rel=1e-13)
    # With an ideal ADC every mapping gives the quantized product 10/9.
    y = ref.ref_matmul(X_HAND, W_HAND, hand_cfg(mapping, adc_range, adc_bits=0))
    assert y[0, 0] == pytest.approx(10 / 9, rel=1e-13)


def test_row_partitions_digitize_separately():
    # Differential analog, unsigned ideal inputs, unquantized weights, g_min = 0.
    # W = [1, 1, 1, 1]^T, x = [1, 1, 1, 1]: one array sees 4, which a [-2, 2] ADC clips to 2.
    # With rows = 2 each partition sees 2 (in range), and 2 + 2 = 4 digitally.
    W = np.ones((4, 1))
    x = np.ones((1, 4))
    cfg = make_cfg(adc={"bits": 4, "range": [-2.0, 2.0]})
    assert ref.ref_matmul(x, W, cfg)[0, 0] == pytest.approx(2.0)
    cfg["array"]["rows"] = 2
    assert ref.ref_matmul(x, W, cfg)[0, 0] == pytest.approx(4.0)


def test_cell_quantization_and_zero_weight_conductance():
    # Offset, unquantized weights, g_min = 0, 2-bit cells (levels 0, 1/3, 2/3, 1), ideal ADC.
    # W = [1, -0.2]^T: g = (w + 1)/2 = [1, 0.4] -> [1, 1/3] (0.4·3 = 1.2 -> 1).
    # The zero-weight conductance 1/2 is quantized too: 1.5 -> 2 (tie, half to even) -> 2/3.
    # x = [1, 0.5]: I = 1 + 1/6 = 7/6; offset 2/3 · 3/2 = 1; y = (7/6 - 1) / (1/2) = 1/3.
    W = np.array([[1.0], [-0.2]])
    x = np.array([[1.0, 0.5]])
    for option in ("digital", "unit_column"):
        cfg = make_cfg(
            mapping={"scheme": "offset", "offset_subtraction": option}, device={"cell_bits": 2}
        )
        assert ref.ref_matmul(x, W, cfg)[0, 0] == pytest.approx(1 / 3, rel=1e-13)
    # Differential with g_min = 1/4 and 2-bit cells: levels 1/4 + 3/4·{0, 1/3, 2/3, 1}.
    # g+ = [1, 1/4], g- = [1/4, 1/4 + 3/4·0.2 = 0.4] -> [1/4, 1/2] (0.2·3 = 0.6 -> 1).
    # I+ - I- = 3/4 - 1/2·1/4 = 5/8; y = 5/8 / (3/4) = 5/6.
    cfg = make_cfg(device={"cell_bits": 2, "on_off_ratio": 4.0})
    assert ref.ref_matmul(x, W, cfg)[0, 0] == pytest.approx(5 / 6, rel=1e-13)


def test_leading_axes_broadcast():
    rng = np.random.default_rng(3)
    W, x = rng.normal(size=(5, 3)), rng.normal(size=(2, 4, 5))
    cfg = make_cfg(inputs={"range": [-1.0, 1.0]})
    y = ref.ref_matmul(x, W, cfg)
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(y, x @ W, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Offset-mapping ADC clipping
# --------------------------------------------------------------------------------------------


def test_offset_adc_clipping():
    # Offset, unquantized, g_min = 0: g = (w + 1)/2, g_zero = 1/2, c = 1/2, so
    # y = (ADC(Σ g x) - Σ x / 2) · 2 (w_max = x_max = 1). ADC 8 bits on [0, 1]: 256 levels,
    # Δ = 1/255; 0 and 1 are levels.
    W = np.ones((4, 1))  # every cell at g = 1
    cfg = make_cfg(mapping={"scheme": "offset"}, adc={"bits": 8, "range": [0.0, 1.0]})
    # x = 1/4 each: current 1 (the top level, not clipped): y = (1 - 1/2)·2 = 1 = x @ W.
    assert ref.ref_matmul(np.full((1, 4), 0.25), W, cfg)[0, 0] == pytest.approx(1.0)
    # x = 1 each: current 4 clips to 1; the digital offset 4/2 = 2 is still subtracted:
    # y = (1 - 2)·2 = -2, although x @ W = 4 (the clipped current loses the signal entirely).
    assert ref.ref_matmul(np.ones((1, 4)), W, cfg)[0, 0] == pytest.approx(-2.0)
    # Negative weights (g = 0) and an ADC floor at 0.25: current 0 clips up to 0.25, so
    # y = (0.25 - 2)·2 = -3.5 instead of -4.
    cfg["adc"]["range"] = [0.25, 1.0]
    y = ref.ref_matmul(np.ones((1, 4)), -W, cfg)[0, 0]
    # 0.25 is the bottom level of [0.25, 1]: exact.
    assert y == pytest.approx(-3.5)
    # The same saturating case with a unit column: the unit column current 4·1/2 = 2 clips to
    # 1 as well, so the output is (1 - 1)·2 = 0.
    cfg = make_cfg(
        mapping={"scheme": "offset", "offset_subtraction": "unit_column"},
        adc={"bits": 8, "range": [0.0, 1.0]},
    )
    assert ref.ref_matmul(np.ones((1, 4)), W, cfg)[0, 0] == pytest.approx(0.0, abs=1e-15)
    # Differential mapping on the symmetric [-1, 1] range clips the same column at +1:
    # y = 1 · w_max · x_max / g_range = 1.
    cfg = make_cfg(adc={"bits": 8, "range": [-1.0, 1.0]})
    assert ref.ref_matmul(np.ones((1, 4)), W, cfg)[0, 0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Granular ADC with enough bits is lossless
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mapping", MAPPINGS, ids=MAPPING_IDS)
@pytest.mark.parametrize(
    "signed, bit_serial, per_input_slice",
    [(False, False, False), (True, False, False), (False, True, True), (True, True, False)],
)
def test_granular_adc_is_lossless(mapping, signed, bit_serial, per_input_slice):
    rng = np.random.default_rng(2)
    K, N, B_w, B_in, s = 11, 5, 5, 4, 2
    W = rng.normal(size=(K, N))
    x_max = 2.5
    x = rng.uniform(-3.0 if signed else -0.5, 3.0, size=(3, K))  # some inputs clip
    cfg = make_cfg(
        mapping=mapping,
        weights={"bits": B_w},
        inputs={
            "bits": B_in,
            "range": [-x_max, x_max] if signed else [0.0, x_max],
            "bit_serial": bit_serial,
            "slice_bits": s,
        },
        adc={"bits": 20, "range": "granular", "per_input_slice": per_input_slice},
        array={"rows": 4, "cols": 2},
    )
    # Closed form: quantized weights times quantized inputs.
    w_max = np.max(np.abs(W))
    W_q = np.round(W / w_max * (2 ** (B_w - 1) - 1)) / (2 ** (B_w - 1) - 1) * w_max
    if signed:
        steps = 2 ** (B_in - 1) - 1
        x_q = np.round(np.clip(x / x_max, -1, 1) * steps) / steps * x_max
    else:
        steps = 2**B_in - 1
        x_q = np.round(np.clip(x / x_max, 0, 1) * steps) / steps * x_max
    y = ref.ref_matmul(x, W, cfg)
    np.testing.assert_allclose(y, x_q @ W_q, rtol=1e-9, atol=1e-9)
    # Too few bits for the same granular step: the ADC clips and the result changes.
    cfg["adc"]["bits"] = 3
    assert not np.allclose(ref.ref_matmul(x, W, cfg), x_q @ W_q, rtol=1e-6, atol=1e-6)


def test_granular_step_by_hand():
    # Differential unsliced, 5-bit weights (LSB_g = 1/15), unsigned 4-bit inputs (LSB_x = 1/15):
    # Δ = 1/225, signed "max" range -> [-Δ·(2^7 - 1), Δ·(2^7 - 1)] at 8 bits.
    cfg = make_cfg(weights={"bits": 5}, inputs={"bits": 4}, adc={"bits": 8, "range": "granular"})
    mapping = ref.conductances(np.ones((3, 2)), cfg)
    ((lo, hi),) = ref.adc_ranges(cfg, mapping, 3)
    assert (lo, hi) == pytest.approx((-127 / 225, 127 / 225))
    # Offset unsliced 5 bits (LSB_g = 1/31), bit-serial 2-bit slices per input slice
    # (LSB_x = 1/3): unsigned range [0, Δ·255], Δ = 1/93.
    cfg = make_cfg(
        mapping={"scheme": "offset"},
        weights={"bits": 5},
        inputs={"bits": 4, "bit_serial": True, "slice_bits": 2},
        adc={"bits": 8, "range": "granular", "per_input_slice": True},
    )
    mapping = ref.conductances(np.ones((3, 2)), cfg)
    ((lo, hi),) = ref.adc_ranges(cfg, mapping, 3)
    assert (lo, hi) == pytest.approx((0.0, 255 / 93))


# --------------------------------------------------------------------------------------------
# Configuration errors
# --------------------------------------------------------------------------------------------


def test_unsupported_and_invalid():
    W, x = np.ones((2, 2)), np.ones((1, 2))
    cfg = make_cfg()
    cfg["device"]["read_noise"] = {"model": "state_independent", "sigma": 0.1}
    with pytest.raises(NotImplementedError):
        ref.ref_matmul(x, W, cfg)
    with pytest.raises(NotImplementedError):
        ref.ref_matmul(x, W, make_cfg(parasitics={"topology": "input_source"}))
    with pytest.raises(ValueError):
        ref.ref_matmul(x, W, make_cfg(mapping={"slices": 2}))  # slicing unquantized weights
    with pytest.raises(ValueError):
        ref.ref_matmul(x, W, make_cfg(inputs={"bit_serial": True}))  # bit-serial, ideal DAC
    with pytest.raises(ValueError):
        ref.ref_matmul(x, W, make_cfg(adc={"bits": 8, "range": "granular"}))
    # An ideal ADC ignores its range, even one that could not be built.
    np.testing.assert_allclose(
        ref.ref_matmul(x, W, make_cfg(adc={"bits": 0, "range": "granular"})), x @ W
    )
