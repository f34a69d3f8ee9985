"""The analog matrix core against closed forms and the independent NumPy reference."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxbar
from jaxbar import ConfigError, CrossbarConfig
from jaxbar.core import converters, mapping

from . import reference as ref

MAPPINGS = {
    "diff_analog": {"scheme": "differential", "subtract": "analog"},
    "diff_digital": {"scheme": "differential", "subtract": "digital"},
    "offset_digital": {"scheme": "offset", "offset_subtraction": "digital"},
    "offset_unit": {"scheme": "offset", "offset_subtraction": "unit_column"},
}


def make(d):
    return CrossbarConfig.from_dict(d)


def data(K=29, N=11, B=6, seed=0, signed=True):
    rng = np.random.default_rng(seed)
    W = rng.laplace(size=(K, N)) * 0.3
    x = rng.normal(size=(B, K)) if signed else rng.uniform(0, 1.2, size=(B, K))
    return x, W


# --- effects off: every mapping returns x @ W -------------------------------------------------
@pytest.mark.parametrize("scheme", MAPPINGS)
@pytest.mark.parametrize("array", [(None, None), (10, 4), (7, 16)])
@pytest.mark.parametrize("on_off", [None, 10.0])
def test_effects_off_is_exact_float32(scheme, array, on_off):
    x, W = data()
    cfg = make({"mapping": MAPPINGS[scheme], "array": {"rows": array[0], "cols": array[1]},
                "device": {"on_off_ratio": on_off}})
    y = jaxbar.analog_matmul(jnp.float32(x), jnp.float32(W), cfg)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, x @ W, rtol=2e-5, atol=2e-5 * np.abs(x @ W).max())


@pytest.mark.parametrize("scheme", MAPPINGS)
@pytest.mark.parametrize("slices", [1, 2, 3, 4])
@pytest.mark.parametrize("array", [(None, None), (8, 5)])
def test_quantized_weights_all_slicings_equal_Wq(scheme, slices, array):
    x, W = data(seed=slices)
    bits = 8
    cfg = make({"mapping": {**MAPPINGS[scheme], "slices": slices}, "weights": {"bits": bits},
                "array": {"rows": array[0], "cols": array[1]}})
    w_max = np.abs(W).max()
    L = 2 ** (bits - 1) - 1
    Wq = np.round(W / w_max * L) / L * w_max
    with jax.enable_x64(True):
        y = jaxbar.analog_matmul(jnp.asarray(x), jnp.asarray(W), cfg)
        assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, x @ Wq, rtol=1e-10, atol=1e-10)


# --- against the NumPy reference, many configurations ------------------------------------------
INPUTS = {
    "ideal_signed": {"bits": 0, "range": [-2.0, 2.0]},
    "unsigned6": {"bits": 6, "range": [0.0, 1.1]},
    "signed5_serial1": {"bits": 5, "range": [-1.5, 1.5], "bit_serial": True, "slice_bits": 1},
    "unsigned7_serial2": {"bits": 7, "range": [0.0, 1.0], "bit_serial": True, "slice_bits": 2},
}


def adc_for(kind, slices, rows):
    if kind == "ideal":
        return {"bits": 0}
    if kind == "explicit":
        return {"bits": 7, "range": [-0.37 * rows, 0.41 * rows]}
    if kind == "per_slice":
        return {"bits": 6, "range": [[-0.3 * rows * (i + 1), 0.35 * rows] for i in range(slices)]}
    if kind == "max":
        return {"bits": 8, "range": "max"}
    return {"bits": 12, "range": "granular"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(list(MAPPINGS)),
    wbits=st.sampled_from([0, 4, 8]),
    slices=st.sampled_from([1, 2, 3]),
    inputs=st.sampled_from(list(INPUTS)),
    adc=st.sampled_from(["ideal", "explicit", "per_slice", "max", "granular"]),
    per_input_slice=st.booleans(),
    array=st.sampled_from([(None, None), (13, 7), (9, 32)]),
    on_off=st.sampled_from([None, 20.0]),
    cell_bits=st.sampled_from([None, 5]),
    percentile=st.sampled_from([100.0, 99.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_numpy_reference(scheme, wbits, slices, inputs, adc, per_input_slice, array,
                                 on_off, cell_bits, percentile, seed):
    if wbits == 0:
        slices = 1
    if wbits == 4 and slices == 3:
        slices = 2
    if adc == "granular" and (wbits == 0 or INPUTS[inputs]["bits"] == 0):
        adc = "max"
    K, N = 29, 11
    rows = min(K, array[0] or K)
    d = {"mapping": {**MAPPINGS[scheme], "slices": slices},
         "weights": {"bits": wbits, "clip_percentile": percentile},
         "inputs": INPUTS[inputs],
         "adc": {**adc_for(adc, slices, rows), "per_input_slice": per_input_slice},
         "array": {"rows": array[0], "cols": array[1]},
         "device": {"on_off_ratio": on_off, "cell_bits": cell_bits}}
    cfg = make(d)
    x, W = data(K, N, seed=seed, signed=INPUTS[inputs]["range"][0] < 0)
    x = x * INPUTS[inputs]["range"][1]
    expected = ref.ref_matmul(x, W, cfg.to_dict())
    with jax.enable_x64(True):
        y = np.asarray(jaxbar.analog_matmul(jnp.asarray(x), jnp.asarray(W), cfg))
    scale = np.abs(expected).max() + 1e-12
    # A value exactly at a rounding tie may land on either neighbour (PHYSICS §4); with
    # quantized weights and inputs ties are structural (e.g. "max" ranges on 10-row arrays:
    # 8-bit steps of 20/254 against weight steps of 1/127). Also accept the reference with
    # every tie rounded up, or every tie rounded down. Ties of one output in several ADC
    # conversions may also round differently: combined with positive weights (input and weight
    # slices, partitions, analog subtraction), the result lies between those two references.
    # Negative weights (digital subtraction) can leave that envelope: a few entries (≤ 5%).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ref, "quantize_uniform", functools.partial(_quantize_ties, up=True))
        up = ref.ref_matmul(x, W, cfg.to_dict())
        mp.setattr(ref, "quantize_uniform", functools.partial(_quantize_ties, up=False))
        down = ref.ref_matmul(x, W, cfg.to_dict())
    atol = 1e-9 * scale
    bad = (y < np.minimum(up, down) - atol) | (y > np.maximum(up, down) + atol)
    for e in (expected, up, down):
        bad &= ~np.isclose(y, e, rtol=1e-9, atol=atol)
    assert bad.sum() <= max(1, 0.05 * bad.size), (d, y[bad], expected[bad])


def _quantize_ties(y, lo, hi, levels, up):
    """The reference quantizer with exact ties (to float rounding) all sent up or down."""
    delta = (float(hi) - float(lo)) / (int(levels) - 1)
    v = (np.clip(np.asarray(y, np.float64), lo, hi) - lo) / delta
    index = np.floor(v + 0.5 + 1e-9) if up else np.ceil(v - 0.5 - 1e-9)
    return lo + index * delta


# --- quantizers ------------------------------------------------------------------------------
def test_quantizer_levels_and_half_even_ties():
    # 3-bit unsigned on [0, 7]: Δ = 1, index = y; ties at k + 0.5 go to the even level.
    y = jnp.array([-1.0, 0.49, 0.5, 1.5, 2.5, 3.5, 6.5, 7.2, 100.0])
    q = converters.quantize_uniform(y, 0.0, 7.0, converters.adc_levels(0.0, 7.0, 3))
    np.testing.assert_array_equal(q, [0, 0, 0, 2, 2, 4, 6, 7, 7])
    # Symmetric [-3, 3] at 3 bits: 7 levels, Δ = 1, the index y + 3 is rounded half to even:
    # ±0.5 → index 3.5 / 2.5 → 4 / 2 → ±1; 2.5 → 5.5 → 6 → 3; -2.5 → 0.5 → 0 → -3.
    assert converters.adc_levels(-3.0, 3.0, 3) == 7
    q = converters.quantize_uniform(jnp.array([-0.5, 0.5, 2.5, -2.5]), -3.0, 3.0, 7)
    np.testing.assert_array_equal(q, [-1, 1, 3, -3])


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_unsigned_dac_levels(bits):
    inp = jaxbar.InputsConfig(bits=bits, range=(0.0, 1.0))
    x = jnp.linspace(-0.5, 1.5, 4001)
    q = np.asarray(converters.dac(x, inp))
    levels = np.unique(q)
    np.testing.assert_allclose(levels, np.arange(2**bits) / (2**bits - 1), atol=1e-7)
    assert q.min() == 0 and q.max() == 1


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_signed_dac_is_sign_magnitude(bits):
    inp = jaxbar.InputsConfig(bits=bits, range=(-1.0, 1.0))
    q = np.unique(np.asarray(converters.dac(jnp.linspace(-2, 2, 8001), inp)))
    L = 2 ** (bits - 1) - 1
    np.testing.assert_allclose(q, np.arange(-L, L + 1) / L, atol=1e-7)
    assert 0.0 in q


def test_ideal_dac_neither_clips_nor_quantizes():
    cfg = make({"inputs": {"bits": 0, "range": [0, 1]}})
    x, W = data(signed=True)  # negative inputs beyond an unsigned range pass through
    np.testing.assert_allclose(jaxbar.analog_matmul(x * 3, W, cfg), (x * 3) @ W, rtol=1e-4,
                               atol=1e-4)


# --- bit-serial inputs -------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("slice_bits", [1, 2, 3])
@pytest.mark.parametrize("per_input_slice", [True, False])
def test_bit_serial_equals_unsliced_with_ideal_adc(signed, slice_bits, per_input_slice):
    x, W = data(signed=signed)
    rng = [-1.0, 1.0] if signed else [0.0, 1.0]
    base = {"inputs": {"bits": 7, "range": rng}, "adc": {"per_input_slice": per_input_slice}}
    serial = {"inputs": {"bits": 7, "range": rng, "bit_serial": True, "slice_bits": slice_bits},
              "adc": {"per_input_slice": per_input_slice}}
    with jax.enable_x64(True):
        y0 = jaxbar.analog_matmul(x, W, make(base))
        y1 = jaxbar.analog_matmul(x, W, make(serial))
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12)


def test_input_slices_digits():
    inp = jaxbar.InputsConfig(bits=5, range=(-1.0, 1.0), bit_serial=True, slice_bits=2)
    # m = 4 magnitude bits, J = 2 slices of 2 bits; x_q = -11/15 → digits 3, 2 (11 = 0b1011).
    u = converters.input_slices(jnp.array([-11 / 15, 6 / 15]), inp)
    np.testing.assert_allclose(u[:, 0], [-3 / 3, -2 / 3], atol=1e-7)
    np.testing.assert_allclose(u[:, 1], [2 / 3, 1 / 3], atol=1e-7)
    assert converters.input_slice_weights(inp) == (3 / 15, 12 / 15)


def test_per_input_slice_adc_differs_from_analog_accumulation():
    # A 1-bit unsigned ADC on [0, 1] per input slice cannot represent 0.5 steps; with analog
    # accumulation the same ADC sees the accumulated value instead.
    x = np.array([[1.0, 1.0]])
    W = np.array([[0.5], [0.5]])
    d = {"inputs": {"bits": 2, "range": [0, 1], "bit_serial": True},
         "adc": {"bits": 3, "range": [0, 2]}}
    y_acc = jaxbar.analog_matmul(x, W, make(d))
    d["adc"]["per_input_slice"] = True
    y_per = jaxbar.analog_matmul(x, W, make(d))
    # Each input bit drives 1·(0.5+0.5)/0.5 = ... array output g = 1 per cell → 2 per MVM.
    # Accumulated: (1/3)·(2 + 2·2) = 2 → on the [0, 2] grid (step 2/7) rounds to 2.
    np.testing.assert_allclose(y_acc, [[1.0]], rtol=1e-6)
    # Per slice: each MVM gives 2 → exact too; shift-and-add (1/3)(2 + 4) = 2 → y = 1.
    np.testing.assert_allclose(y_per, [[1.0]], rtol=1e-6)
    d["adc"]["range"] = [0, 1.5]  # now each MVM clips at 1.5 but the accumulated 2 also clips
    y_per = jaxbar.analog_matmul(x, W, make(d))
    d["adc"]["per_input_slice"] = False
    y_acc = jaxbar.analog_matmul(x, W, make(d))
    np.testing.assert_allclose(y_per, [[0.75]], rtol=1e-6)
    np.testing.assert_allclose(y_acc, [[0.75]], rtol=1e-6)


# --- ADC: per-slice ranges, offset and unit column, on/off ratio --------------------------------
def test_per_slice_adc_clips_only_its_slice():
    # 8-bit differential weights, 2 slices of 4 bits; one weight 100 = 6·16 + 4: slice 0 carries
    # 4/15 and slice 1 carries 6/15 (the magnitude 100 in base 16).
    W = np.array([[100 / 127], [1.0]])  # w_max = 1, so W_int = 100 for the first weight
    x = np.array([[1.0, 0.0]])
    d = {"weights": {"bits": 8}, "mapping": {"slices": 2}, "adc": {"bits": 10,
         "range": [[-1, 1], [-0.2, 0.2]]}}
    y = jaxbar.analog_matmul(x, W, make(d))
    # slice 1 clips to 0.2 → recombined (15)(4/15 + 16·0.2) = 4 + 48 = 52 → y = 52/127.
    step0 = 2 / (2**10 - 2)
    s0 = np.round((4 / 15 + 1) / step0) * step0 - 1
    np.testing.assert_allclose(y, [[(15 * s0 + 15 * 16 * 0.2) / 127]], rtol=1e-5)
    d["adc"]["range"] = [[-0.2, 0.2], [-1, 1]]
    y = jaxbar.analog_matmul(x, W, make(d))
    s1 = np.round((6 / 15 + 1) / step0) * step0 - 1
    np.testing.assert_allclose(y, [[(15 * 0.2 + 15 * 16 * s1) / 127]], rtol=1e-5)


def test_offset_mapping_adc_must_cover_offset():
    # Offset mapping: zero weight sits mid-range, the column current of x = 1 on 4 rows of zero
    # weights is 4·0.5 = 2; an ADC on [-1, 1] clips it to 1 → y = (1 - 2)/(0.5) = -2 ≠ 0.
    W = np.zeros((4, 1))
    W[0, 0] = 1.0
    W[0, 0] = 0.0  # all zero except the scale (w_max defaults to 1)
    x = np.ones((1, 4))
    cfg = make({"mapping": {"scheme": "offset"}, "adc": {"bits": 12, "range": [-1, 1]}})
    np.testing.assert_allclose(jaxbar.analog_matmul(x, W, cfg), [[-2.0]], atol=1e-6)
    cfg = make({"mapping": {"scheme": "offset"}, "adc": {"bits": 12, "range": [0, 4.095]}})
    np.testing.assert_allclose(jaxbar.analog_matmul(x, W, cfg), [[0.0]], atol=1e-6)
    # A unit column saturates the same way and cancels: (1 - 1)/0.5 = 0.
    cfg = make({"mapping": {"scheme": "offset", "offset_subtraction": "unit_column"},
                "adc": {"bits": 12, "range": [-1, 1]}})
    np.testing.assert_allclose(jaxbar.analog_matmul(x, W, cfg), [[0.0]], atol=1e-6)


def test_unit_column_errors_hit_every_output():
    x, W = data(K=16, N=5)
    cfg = make({"mapping": {"scheme": "offset", "offset_subtraction": "unit_column"},
                "device": {"programming_error": {"model": "independent", "sigma": 0.02}}})
    p = jaxbar.program(W, cfg, jax.random.key(3))
    # Column 5 is the unit column; perturb it by +δ on every row → every output shifts by
    # -δ·Σx·w_max/(g_range·1/2).
    delta = 0.01
    p2 = jaxbar.Programmed(g=p.g.at[..., 5].add(delta), w_max=p.w_max, shape=p.shape)
    shift = jaxbar.matmul(x, p2, cfg) - jaxbar.matmul(x, p, cfg)
    expected = -delta * x.sum(1, keepdims=True) * float(p.w_max) / 0.5
    np.testing.assert_allclose(shift, np.broadcast_to(expected, shift.shape), rtol=1e-3,
                               atol=1e-5)


def test_on_off_ratio_conductances():
    W = np.array([[1.0, -0.5, 0.0]])
    cfg = make({"device": {"on_off_ratio": 10}})
    g = jaxbar.program(W, cfg).g[0, 0, 0]  # (P, M)
    np.testing.assert_allclose(g[0], [1.0, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(g[1], [0.1, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-6)
    cfg = make({"device": {"on_off_ratio": 10}, "mapping": {"scheme": "offset"}})
    g = jaxbar.program(W, cfg).g[0, 0, 0, 0]
    np.testing.assert_allclose(g, [1.0, 0.1 + 0.9 * 0.25, 0.1 + 0.9 * 0.5], rtol=1e-6)


def test_max_range_and_granular_lossless():
    x, W = data(K=20, N=6, signed=False)
    d = {"weights": {"bits": 5}, "inputs": {"bits": 4, "range": [0, 1.2]},
         "adc": {"bits": 4 + 5 + 5, "range": "granular"}}
    w_max = np.abs(W).max()
    Wq = np.round(W / w_max * 15) / 15 * w_max
    xq = np.round(np.clip(x / 1.2, 0, 1) * 15) / 15 * 1.2
    for scheme in MAPPINGS:
        cfg = make({**d, "mapping": MAPPINGS[scheme]})
        with jax.enable_x64(True):
            y = jaxbar.analog_matmul(x, W, cfg)
        np.testing.assert_allclose(y, xq @ Wq, rtol=1e-9, atol=1e-9, err_msg=scheme)
    cfg = make({**d, "adc": {"bits": 6, "range": "granular"}})
    assert not np.allclose(jaxbar.analog_matmul(x, W, cfg), xq @ Wq, atol=1e-3)
    lo, hi = converters.adc_ranges(make({**d, "adc": {"bits": 8, "range": "max"},
                                         "array": {"rows": 7}}), rows=7)[0]
    assert (lo, hi) == (-7.0, 7.0)


def test_calibrated_range_unfilled_is_an_error():
    cfg = CrossbarConfig.paper_baseline()
    with pytest.raises(ConfigError, match="calibrated"):
        jaxbar.analog_matmul(np.ones((1, 4)), np.ones((4, 2)), cfg)


# --- partitions ----------------------------------------------------------------------------------
def test_partition_sizes():
    assert jaxbar.partition_sizes(1152, 512) == (384, 384, 384)
    assert jaxbar.partition_sizes(100, 48) == (33, 33, 34)
    assert jaxbar.partition_sizes(4608, 1152) == (1152,) * 4
    assert jaxbar.partition_sizes(10, None) == (10,)
    for n, m in itertools.product(range(1, 60), range(1, 20)):
        sizes = jaxbar.partition_sizes(n, m)
        assert sum(sizes) == n and max(sizes) <= m and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-n // m) and list(sizes) == sorted(sizes)


def test_partitions_have_their_own_adc():
    # 2 row partitions of 2 rows; ADC range [-1, 1] per array: each partial sum 2 clips to 1.
    x, W = np.ones((1, 4)), np.ones((4, 1))
    cfg = make({"array": {"rows": 2}, "adc": {"bits": 10, "range": [-1, 1]}})
    np.testing.assert_allclose(jaxbar.analog_matmul(x, W, cfg), [[2.0]], rtol=1e-6)
    cfg = make({"adc": {"bits": 10, "range": [-1, 1]}})
    np.testing.assert_allclose(jaxbar.analog_matmul(x, W, cfg), [[1.0]], rtol=1e-6)


def test_layout_shapes():
    lay = mapping.layout(1152, 100, make({"array": {"rows": 512, "cols": 48}}))
    assert lay.row_sizes == (384,) * 3 and lay.col_sizes == (33, 33, 34)
    p = jaxbar.program(np.ones((1152, 100)), make({"array": {"rows": 512, "cols": 48}}))
    assert p.g.shape == (3, 384, 1, 2, 3 * 34)
    assert int((p.g[:, :, 0, 0] > 0).sum()) == 1152 * 100  # padding cells hold nothing


# --- transforms, determinism, dtypes, gradients -----------------------------------------
NOISY = make({"weights": {"bits": 8}, "inputs": {"bits": 8, "range": [-3, 3]},
              "adc": {"bits": 8, "range": [-12, 12]}, "array": {"rows": 16, "cols": 8},
              "device": {"on_off_ratio": 50,
                         "programming_error": {"model": "proportional", "sigma": 0.05},
                         "read_noise": {"model": "independent", "sigma": 0.01}}})


def test_determinism_and_key_dependence():
    x, W = data()
    a = jaxbar.analog_matmul(x, W, NOISY, jax.random.key(1))
    b = jaxbar.analog_matmul(x, W, NOISY, jax.random.key(1))
    c = jaxbar.analog_matmul(x, W, NOISY, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_jit_vmap_laxmap_agree():
    x, W = data()
    keys = jax.random.split(jax.random.key(0), 4)

    def one(k):
        return jaxbar.analog_matmul(x, W, NOISY, k)

    eager = np.stack([one(k) for k in keys])
    np.testing.assert_allclose(jax.jit(jax.vmap(one))(keys), eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(lambda ks: jax.lax.map(one, ks))(keys), eager,
                               rtol=1e-5, atol=1e-5)


def test_matmul_does_not_retrace_per_batch():
    x, W = data()
    p = jaxbar.program(W, NOISY, jax.random.key(0))
    f = jax.jit(jaxbar.matmul, static_argnums=2)
    for i in range(3):
        f(jnp.asarray(x + i, jnp.float32), p, NOISY, jax.random.key(i))
    assert f._cache_size() == 1


def test_batch_shapes_and_errors():
    _, W = data()
    p = jaxbar.program(W, CrossbarConfig())
    assert jaxbar.matmul(np.ones((2, 3, 29)), p, CrossbarConfig()).shape == (2, 3, 11)
    assert jaxbar.matmul(np.ones(29), p, CrossbarConfig()).shape == (11,)
    with pytest.raises(ValueError, match="29 rows"):
        jaxbar.matmul(np.ones((2, 5)), p, CrossbarConfig())
    with pytest.raises(ValueError, match="PRNG key"):
        jaxbar.program(W, NOISY)


def test_float64_path_stays_float64():
    x, W = data()
    with jax.enable_x64(True):
        y = jaxbar.analog_matmul(jnp.asarray(x), jnp.asarray(W), NOISY, jax.random.key(0))
        assert y.dtype == jnp.float64


def test_gradients_straight_through_and_finite():
    x, W = data(K=12, N=5)
    cfg = NOISY.replace(**{"mapping.slices": 2, "inputs.bit_serial": True,
                           "adc.per_input_slice": True, "adc.range": (-40.0, 40.0)})
    key = jax.random.key(0)

    def loss(x, W):
        return jnp.sum(jaxbar.analog_matmul(x, W, cfg, key) ** 2)

    gx, gW = jax.grad(loss, argnums=(0, 1))(jnp.float32(x), jnp.float32(W))
    assert np.isfinite(gx).all() and np.isfinite(gW).all()
    assert np.abs(gx).sum() > 0 and np.abs(gW).sum() > 0

    # With ideal converters and unquantized weights the product is linear: exact gradients.
    ideal = CrossbarConfig.from_dict({"device": {"on_off_ratio": 10},
                                      "mapping": {"scheme": "offset"}})
    v = np.random.default_rng(1).normal(size=(6, 5))
    with jax.enable_x64(True):
        gx = jax.grad(lambda x: jnp.sum(jaxbar.analog_matmul(x, W, ideal) * v))(x[:, :12])
    np.testing.assert_allclose(gx, v @ W.T, rtol=1e-9)

    # Straight-through: d/dx of the quantized product equals d/dx of x @ W_q inside the range.
    q = make({"weights": {"bits": 6}, "inputs": {"bits": 6, "range": [-4, 4],
              "bit_serial": True, "slice_bits": 2}, "adc": {"bits": 0}})
    with jax.enable_x64(True):
        gx = jax.grad(lambda x: jnp.sum(jaxbar.analog_matmul(x, W, q) * v))(x[:, :12])
    w_max = np.abs(W).max()
    Wq = np.round(W / w_max * 31) / 31 * w_max
    np.testing.assert_allclose(gx, v @ Wq.T, rtol=1e-9)


def test_gradient_matches_finite_differences_through_noise():
    # The reparameterized programming error is smooth in W for a fixed key (no rounding, no
    # clipping at this small sigma): compare with central differences.
    x, W = data(K=8, N=3)
    cfg = make({"device": {"programming_error": {"model": "proportional", "sigma": 0.02},
                           "on_off_ratio": 5}})
    key = jax.random.key(7)
    with jax.enable_x64(True):
        def f(W):
            return jnp.sum(jnp.sin(jaxbar.analog_matmul(x, W, cfg, key)))
        g = jax.grad(f)(jnp.asarray(W))
        eps = 1e-6
        for idx in [(0, 0), (3, 1), (7, 2)]:
            # w_max is a max over |W|: perturb entries that are not the maximum.
            if np.abs(W[idx]) == np.abs(W).max():
                continue
            d = np.zeros_like(W)
            d[idx] = eps
            fd = (f(jnp.asarray(W + d)) - f(jnp.asarray(W - d))) / (2 * eps)
            np.testing.assert_allclose(g[idx], fd, rtol=1e-5, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 40), N=st.integers(1, 20), B=st.integers(1, 4),
       rows=st.sampled_from([None, 1, 3, 16]), cols=st.sampled_from([None, 1, 5]),
       wbits=st.sampled_from([0, 2, 3, 8]), scheme=st.sampled_from(list(MAPPINGS)))
def test_shapes_and_bit_widths(K, N, B, rows, cols, wbits, scheme):
    rng = np.random.default_rng(K * 100 + N)
    x, W = rng.normal(size=(B, K)), rng.normal(size=(K, N))
    cfg = make({"array": {"rows": rows, "cols": cols}, "weights": {"bits": wbits},
                "mapping": MAPPINGS[scheme]})
    with jax.enable_x64(True):
        y = np.asarray(jaxbar.analog_matmul(x, W, cfg))
    assert y.shape == (B, N)
    np.testing.assert_allclose(y, ref.ref_matmul(x, W, cfg.to_dict()), rtol=1e-9, atol=1e-9)
