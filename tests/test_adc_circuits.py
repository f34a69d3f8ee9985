"""ADC circuit models (PHYSICS §4.1) against closed forms and independent NumPy Monte Carlo."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.config import ADCConfig, ConfigError, CrossbarConfig
from jaxbar.core import adc_circuits, converters, mvm

B = 6  # converter bits of the transfer-curve tests: 64 codes, range [0, 63] with step 1
L = 2**B
VREF = 2.0 ** (B - 1)  # the reference voltage in code units


def _adc(**kw) -> ADCConfig:
    """A validated ADC config on [0, 2^B − 1] (step 1: inputs are in code units)."""
    return CrossbarConfig(adc=ADCConfig(bits=B, range=(0.0, float(L - 1)), **kw)).adc


def _errors(adc: ADCConfig, columns: int, seed: int = 0) -> adc_circuits.ADCErrors:
    return adc_circuits.draw_errors(adc, (1, 1, 1), columns, 1, 0, jax.random.key(seed))


def _codes(adc: ADCConfig, w: np.ndarray, errors) -> np.ndarray:
    """Codes for converter inputs `w` (..., M), in code units (code c covers [c, c + 1))."""
    y = jnp.asarray(w - 0.5, jnp.float32)[..., None, None, None, :]
    return np.asarray(_convert(y, adc, errors))[..., 0, 0, 0, :]


@jax.jit(static_argnums=1)
def _convert(y, adc, errors):
    return adc_circuits.convert(y, 0.0, float(L - 1), L, adc, errors)


# ---- ideal components are today's quantizer --------------------------------------------------

IDEAL_CASES = {
    "offset, unit column": {"mapping.scheme": "offset", "mapping.offset_subtraction":
                            "unit_column", "adc.range": (0.0, 24.0)},
    "4 slices, digital subtraction": {"mapping.slices": 4, "mapping.subtract": "digital",
                                      "adc.range": "max"},
    "bit-serial, ADC per input bit": {"inputs.bit_serial": True, "adc.per_input_slice": True,
                                      "adc.range": (-2.0, 2.0)},
}


@pytest.mark.parametrize("case", list(IDEAL_CASES))
def test_ideal_models_equal_the_quantizer_bit_for_bit(case):
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(40, 20)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(30, 40)), jnp.float32)
    base = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-6.0, 6.0), "inputs.range": (-3.0, 3.0), "array.rows": 16,
        "array.cols": 8, **IDEAL_CASES[case]})
    f = jax.jit(lambda cfg: mvm.analog_matmul(x, W, cfg), static_argnums=0)
    ref = f(base)
    for model in ("ramp", "sar", "pipeline", "cyclic"):
        assert jnp.array_equal(f(base.replace(**{"adc.model": model})), ref), model


@pytest.mark.parametrize("model", ["ramp", "sar", "pipeline", "cyclic"])
def test_circuit_path_with_zero_errors_rounds_half_to_even(model):
    # The circuit arithmetic itself (not the quantizer shortcut), including exact ties.
    adc = _adc(model=model)
    errors = adc_circuits.draw_errors(adc, (1, 1, 1), 3, 1, 0, None)
    w = np.concatenate([np.arange(0.5, L, 0.25), np.random.default_rng(0).uniform(0, L, 400)])
    w = np.clip(w, 0.5, L - 0.5)[:, None].repeat(3, axis=1)
    ref = np.asarray(converters.quantize_uniform(jnp.asarray(w - 0.5, jnp.float32), 0.0,
                                                 float(L - 1), L))
    assert np.array_equal(_codes(adc, w, errors), ref)


# ---- finite gain: the deterministic gain error -------------------------------------------------

def test_finite_gain_moves_cdac_levels_as_the_feedback_factor_says():
    # A sign-magnitude CDAC with magnitude m (units of the LSB cap) on a feedback cap of
    # 2^(B-1) units has feedback factor β = 2^(B-1)/(2^(B-1) + m): its level settles at
    # m/(1 + 1/(A β)) instead of m.
    A = 10 ** (30 / 20)
    for model in ("sar", "ramp"):
        adc = _adc(model=model, gain_db=30.0)
        errors = _errors(adc, 1)
        s = np.arange(1, L) - VREF
        beta = VREF / (VREF + np.abs(s))
        level = VREF + s / (1 + 1 / (A * beta))
        below = _codes(adc, (level - 1e-3)[:, None], errors)[:, 0]
        above = _codes(adc, (level + 1e-3)[:, None], errors)[:, 0]
        np.testing.assert_array_equal(above - below, 1)
        np.testing.assert_array_equal(above, np.arange(1, L))


def test_finite_gain_of_a_unipolar_ramp():
    # The unipolar ramp's reference cap (2^B units) is its feedback cap.
    A = 10 ** (25 / 20)
    adc = _adc(model="ramp", gain_db=25.0, symmetric_cdac=False)
    errors = _errors(adc, 1)
    c = np.arange(1, L)
    level = c / (1 + (L + c) / (A * L))
    assert np.array_equal(_codes(adc, (level + 1e-3)[:, None], errors)[:, 0], c)
    assert np.array_equal(_codes(adc, (level - 1e-3)[:, None], errors)[:, 0], c - 1)


def _pipeline_reference(w, bits, c1, c2, cpar, A, off, cyclic=False):
    """One conversion, scalar by scalar: stage n scales the residue by the charge ratio."""
    vref = 2.0 ** (bits - 1)
    r, code = w - vref, 0
    for n in range(bits - 1):
        k = 0 if cyclic else n
        oh, ol = (off[0], off[1]) if cyclic else (off[2 * n], off[2 * n + 1])
        d = 1 if r > vref / 4 + oh else (-1 if r < -vref / 4 + ol else 0)
        code += (d + 1) * 2 ** (bits - 2 - n)
        beta = c1[k] / (c1[k] + c2[k] + cpar[k])
        r = (r + c2[k] / c1[k] * (r - d * vref)) / (1 + 1 / (A * beta))
    return code + int(r > off[-1])


@pytest.mark.parametrize("model", ["pipeline", "cyclic"])
def test_finite_gain_pipeline_matches_the_stage_equations(model):
    A = 10 ** (35 / 20)
    adc = _adc(model=model, gain_db=35.0)
    w = np.linspace(0.5, L - 0.5, 997) + 1e-4  # off the exact ties (the reference rounds down)
    got = _codes(adc, w[:, None], _errors(adc, 1))[:, 0]
    ones = np.ones(B - 1)
    ref = [_pipeline_reference(v, B, ones, ones, 0 * ones, A, np.zeros(2 * B - 1),
                               cyclic=model == "cyclic") for v in w]
    np.testing.assert_array_equal(got, np.clip(ref, 0, L - 1))
    # Each stage's residue gain 2/(1 + 2/A) < 2: the codes fall behind towards the ends.
    assert got[-1] < L - 1 and got[0] > 0


# ---- mismatch statistics -----------------------------------------------------------------------

def test_cdac_level_spread_matches_first_order_analysis():
    # T(c) − c ≈ σ·(Σ_n bit_n(m) 2^(n/2) ε_n − m 2^((B−1)/2)/2^(B−1) ε_ref) for small σ.
    sigma, draws = 0.002, 20000
    adc = _adc(model="sar", sigma_capacitor=sigma)
    eps = jax.random.normal(jax.random.key(3), (draws, B + 1))
    err = np.asarray(adc_circuits.cdac_levels(adc, eps, sigma)) - np.arange(1, L)
    m = np.abs(np.arange(1, L) - VREF).astype(int)
    bits = (m[:, None] >> np.arange(B - 1)) & 1
    var = sigma**2 * (bits @ 2.0 ** np.arange(B - 1) + m**2 / VREF)
    np.testing.assert_allclose(err.std(axis=0), np.sqrt(var), rtol=0.04, atol=1e-6)


def _sar_reference(w, levels):
    code = 0
    for i in reversed(range(B)):
        if w > levels[code + 2**i - 1]:
            code += 2**i
    return code


def test_sar_capacitor_mismatch_rms_matches_numpy_monte_carlo():
    sigma, cols = 0.05, 1500
    adc = _adc(model="sar", sigma_capacitor=sigma)
    w = np.linspace(0.5, L - 0.5, 129) + 1e-4
    err = _codes(adc, np.repeat(w[:, None], cols, 1), _errors(adc, cols)) - np.floor(w)[:, None]
    rms = np.sqrt(np.mean(err**2))
    # Independent draws: binary caps 2^n + σ 2^(n/2) ε, reference and feedback 2^(B−1).
    rng = np.random.default_rng(7)
    ref = []
    for _ in range(300):
        e = rng.normal(size=B + 1)
        caps = 2.0 ** np.arange(B - 1) + sigma * 2.0 ** (np.arange(B - 1) / 2) * e[:B - 1]
        c_ref = VREF + sigma * np.sqrt(VREF) * e[B - 1]
        s = np.arange(1, L) - VREF
        mag = np.array([sum(caps[n] for n in range(B - 1) if (abs(int(v)) >> n) & 1)
                        for v in s])
        levels = VREF + np.sign(s) * VREF * mag / c_ref
        ref += [_sar_reference(v, levels) - np.floor(v) for v in w]
    rms_ref = np.sqrt(np.mean(np.square(ref)))
    assert rms > 0.1
    np.testing.assert_allclose(rms, rms_ref, rtol=0.08)


@pytest.mark.parametrize("split", [False, True])
def test_sar_search_equals_a_binary_search_over_its_level_table(split):
    # Large mismatch: non-monotone levels and missing codes. The SAR keeps a trial code when
    # the input lies above that code's level (NumPy bisection over `cdac_levels`).
    adc = _adc(model="sar", sigma_capacitor=0.3, sigma_comparator=0.01, gain_db=30.0,
               split_cdac=split)
    errors = _errors(adc, 24, seed=5)
    eps = jax.random.normal(jax.random.key(0), (24, B + 1))
    levels = np.asarray(adc_circuits.cdac_levels(adc, eps, 0.3))
    errors = dataclasses.replace(errors, cdac=adc_circuits.cdac(adc, eps[None, None, None], 0.3))
    offset = np.asarray(errors.offsets)[0, 0, 0, :, 0]
    w = np.random.default_rng(3).uniform(0.5, L - 0.5, (150, 24))
    got = _codes(adc, w, errors)
    ref = np.array([[_sar_reference(v, levels[j] - offset[j]) for j, v in enumerate(row)]
                    for row in w])
    np.testing.assert_array_equal(got, np.clip(ref, 0, L - 1))
    assert (np.diff(levels, axis=1) < 0).any()  # non-monotone: the search skips codes


@pytest.mark.parametrize("model", ["ramp", "sar"])
def test_comparator_offsets_shift_the_whole_transfer_curve(model):
    # An offset o moves every level by −o: along an integer-long ramp of inputs the mean code
    # error is exactly o, so its spread over converters is σ_cmp·V_ref.
    sigma, cols = 0.02, 2000
    adc = _adc(model=model, sigma_comparator=sigma)
    w = np.arange(8.0, L - 8.0, 1 / 8) + 1e-3
    err = _codes(adc, np.repeat(w[:, None], cols, 1), _errors(adc, cols)) - np.floor(w)[:, None]
    shift = err.mean(axis=0)
    np.testing.assert_allclose(shift.std(), sigma * VREF, rtol=0.05)
    assert abs(shift.mean()) < 4 * sigma * VREF / np.sqrt(cols)


@pytest.mark.parametrize("model", ["pipeline", "cyclic"])
def test_pipeline_capacitor_mismatch_rms_matches_numpy_monte_carlo(model):
    s1, s2, sp, cols = 0.03, 0.02, 0.02, 1000
    adc = _adc(model=model, sigma_c1=s1, sigma_c2=s2, sigma_cpar=sp)
    w = np.linspace(0.5, L - 0.5, 129) + 1e-4
    err = _codes(adc, np.repeat(w[:, None], cols, 1), _errors(adc, cols)) - np.floor(w)[:, None]
    rms = np.sqrt(np.mean(err**2))
    rng = np.random.default_rng(11)
    stages = B - 1 if model == "pipeline" else 1
    ref = []
    for _ in range(250):
        c1 = 1 + s1 * rng.normal(size=stages)
        c2 = 1 + s2 * rng.normal(size=stages)
        cpar = sp * rng.normal(size=stages)
        ref += [min(_pipeline_reference(v, B, c1, c2, cpar, np.inf, np.zeros(2 * B - 1),
                                        cyclic=model == "cyclic"), L - 1) - np.floor(v)
                for v in w]
    rms_ref = np.sqrt(np.mean(np.square(ref)))
    assert rms > 0.1
    np.testing.assert_allclose(rms, rms_ref, rtol=0.08)


def test_pipeline_comparator_offsets_within_redundancy_are_harmless():
    # 1.5-bit stages tolerate comparator offsets below V_ref/4; only the last one counts.
    adc = _adc(model="pipeline", sigma_comparator=0.01)  # 0.01·V_ref << V_ref/4
    errors = _errors(adc, 200)
    w = np.linspace(0.5, L - 0.5, 301)
    err = _codes(adc, np.repeat(w[:, None], 200, 1), errors) - np.floor(w)[:, None]
    last = np.asarray(errors.offsets)[0, 0, 0, :, -1]
    bound = np.ceil(np.abs(last)).max()  # the last comparator's offset, in LSB
    assert np.abs(err).max() <= bound


# ---- instances and keys ------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["sar", "pipeline", "cyclic"])
def test_columns_of_a_group_share_their_converter(model):
    sig = {"sigma_comparator": 0.05, **({"sigma_capacitor": 0.05} if model == "sar" else
                                        {"sigma_c1": 0.05})}
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-6.0, 6.0), "adc.model": model, "adc.group_size": 3, "array.cols": 8,
        **{f"adc.{k}": v for k, v in sig.items()}})
    W = jnp.asarray(np.random.default_rng(0).normal(size=(24, 16)), jnp.float32)
    errors = mvm.program(W, cfg, jax.random.key(0)).adc
    leaf = np.asarray(errors.cdac.weight if model == "sar" else errors.offsets)[0, 0, 0]
    ids = adc_circuits.column_instances(8, 2, 0, 3)
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5])
    for a in range(16):
        for b in range(16):
            assert np.array_equal(leaf[a], leaf[b]) == (ids[a] == ids[b])


def test_ramp_shares_one_cdac_per_array_and_a_comparator_per_column():
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-6.0, 6.0), "adc.model": "ramp", "adc.sigma_capacitor": 0.05,
        "adc.sigma_comparator": 0.01, "array.cols": 8})
    W = jnp.asarray(np.random.default_rng(0).normal(size=(24, 16)), jnp.float32)
    t = np.asarray(mvm.program(W, cfg, jax.random.key(0)).adc.thresholds)[0, 0, 0]
    d = t - t[:1]  # the same ramp minus per-column offsets: constant along the codes
    np.testing.assert_allclose(d[:8], d[:8, :1].repeat(L * 4 - 1, 1), atol=1e-4)
    assert np.ptp(d[:8, 0]) > 0
    assert not np.allclose(t[8] - t[8, 0], t[0] - t[0, 0])  # the second array's own ramp


def test_same_key_same_result_and_keys_differ():
    rng = np.random.default_rng(2)
    W = jnp.asarray(rng.normal(size=(32, 12)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(20, 32)), jnp.float32)
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-6.0, 6.0), "inputs.range": (-3.0, 3.0), "adc.model": "sar",
        "adc.sigma_capacitor": 0.05, "adc.sigma_comparator": 0.01})
    f = jax.jit(lambda k: mvm.analog_matmul(x, W, cfg, k))
    a, b, c = f(jax.random.key(1)), f(jax.random.key(1)), f(jax.random.key(2))
    assert jnp.array_equal(a, b) and not jnp.array_equal(a, c)
    with pytest.raises(ConfigError, match="adc.model = 'sar' draws component errors"):
        mvm.program(W, cfg)


def test_swept_sigma_compiles_once_and_bit_serial_inputs_reuse_the_converters():
    rng = np.random.default_rng(4)
    W = jnp.asarray(rng.normal(size=(32, 12)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(20, 32)), jnp.float32)
    base = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-1.0, 1.0), "inputs.range": (-3.0, 3.0), "adc.model": "sar",
        "inputs.bit_serial": True, "adc.per_input_slice": True, "adc.sigma_comparator": 0.0})
    f = jax.jit(lambda cfg, k: mvm.analog_matmul(x, W, cfg, k))
    ideal = f(base, jax.random.key(0))
    np.testing.assert_allclose(ideal, mvm.analog_matmul(x, W, base.replace(
        **{"adc.model": "quantizer"})), atol=1e-5)
    noisy = f(base.replace(**{"adc.sigma_comparator": 0.05}), jax.random.key(0))
    assert f._cache_size() == 1
    assert not jnp.allclose(noisy, ideal)


def test_stochastic_rounding_is_unbiased_and_needs_a_key():
    adc = _adc(stochastic_rounding=True)
    y = jnp.full((20000,), 10.3)
    q = np.asarray(adc_circuits.convert(y, 0.0, float(L - 1), L, adc, None, jax.random.key(0)))
    assert set(np.unique(q)) == {10.0, 11.0}
    assert abs(q.mean() - 10.3) < 4 * np.sqrt(0.21 / len(q))
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-6.0, 6.0), "adc.stochastic_rounding": True})
    with pytest.raises(ValueError, match="stochastic_rounding"):
        mvm.rounding_key(cfg, None)
    g = jax.grad(lambda v: jnp.sum(adc_circuits.convert(v, 0.0, 63.0, 64, adc, None,
                                                        jax.random.key(1))))(y[:3])
    np.testing.assert_array_equal(g, 1.0)


def test_analog_models_program_adc_errors_per_trial():
    from flax import nnx

    import jaxbar

    cfg = CrossbarConfig.paper_baseline().replace(**{
        "adc.range": (-6.0, 6.0), "inputs.range": (-3.0, 3.0), "adc.model": "pipeline",
        "adc.sigma_c1": 0.05})
    model = jaxbar.analogize(nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0))), cfg)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)), jnp.float32)
    with pytest.raises(ConfigError, match="program_model needs a key"):
        jaxbar.program_model(model, None)
    forward = nnx.jit(lambda m, v: m(v))
    jaxbar.program_model(model, jax.random.key(5))
    a = forward(model, x)
    jaxbar.program_model(model, jax.random.key(5))
    assert jnp.array_equal(a, forward(model, x))
    jaxbar.program_model(model, jax.random.key(6))
    assert not jnp.array_equal(a, forward(model, x))


BAD = [
    ({"model": "flash"}, "adc.model"),
    ({"model": "sar", "bits": 0, "range": None}, "adc.bits"),
    ({"model": "sar", "sigma_c1": 0.1}, "adc.sigma_c1"),
    ({"model": "pipeline", "sigma_capacitor": 0.1}, "adc.sigma_capacitor"),
    ({"model": "ramp", "sigma_comparator": -0.1}, "adc.sigma_comparator"),
    ({"model": "sar", "gain_db": 0.0}, "adc.gain_db"),
    ({"gain_db": 40.0}, "adc.gain_db"),
    ({"model": "pipeline", "split_cdac": True}, "adc.split_cdac"),
    ({"model": "sar", "symmetric_cdac": False}, "adc.symmetric_cdac"),
    ({"model": "ramp", "group_size": 4}, "adc.group_size"),
    ({"model": "sar", "group_size": 0}, "adc.group_size"),
    ({"model": "sar", "stochastic_rounding": True}, "adc.stochastic_rounding"),
    ({"stochastic_rounding": True, "bits": 0, "range": None}, "adc.stochastic_rounding"),
]


@pytest.mark.parametrize(("fields", "path"), BAD)
def test_bad_adc_settings_are_config_errors(fields, path):
    d = {"bits": 8, "range": [-1.0, 1.0], **fields}
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        CrossbarConfig.from_dict({"adc": d})


def test_defaults_serialize_as_before_and_circuit_settings_round_trip():
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "adc.model": "sar", "adc.split_cdac": True, "adc.gain_db": 60, "adc.group_size": 8})
    assert CrossbarConfig.from_yaml(cfg.to_yaml()) == cfg
    assert isinstance(cfg.adc.gain_db, float)
    assert dataclasses.replace(cfg.adc, model="quantizer", split_cdac=False, gain_db=None,
                               group_size=1) == CrossbarConfig.paper_baseline().adc
