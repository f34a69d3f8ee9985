"""Device models: presets against their published formulas, look-up tables, drift and
drift compensation, non-Gaussian errors, and jit/vmap/grad through every model."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbar
from jaxbar import (
    ConfigError,
    CrossbarConfig,
    DeviceConfig,
    DriftConfig,
    NoiseConfig,
    measured_devices,
)
from jaxbar.core import devices

N_CELLS = 200_000
G_POINTS = np.array([0.05, 0.2, 0.5, 0.8, 1.0])


# ---- the published fits, written out independently of the code -------------------------------
def pcm_sigma(g):  # Nandakumar et al. 2019 / Joshi et al. 2020: µS polynomial in g, G_max 25 µS
    return (0.26348 + 1.9650 * g - 1.1731 * g ** 2) / 25.0


def sonos_sigma(g):  # Agrawal et al. IEDM 2022: A(1 - exp(-I/B)) nA, I_max 1600 nA
    i = 1600.0 * g
    return 19.88665 * (1 - np.exp(-i / 176.3115)) / 1600.0


def reram_sigma(g):  # Milo et al. IRPS 2021: max(-0.009107 G + 4.782321, 0) µS, G_max 225 µS
    G = 225.0 * g
    return np.maximum(-0.009107 * G + 4.782321, 0.0) / 225.0


def pcm_nu_stats(g):
    mu = np.clip(-0.0155 * np.log(g) + 0.0244, 0.049, 0.1)
    sd = np.clip(-0.0125 * np.log(g) - 0.0059, 0.008, 0.045)
    return mu, sd


def folded_normal_moments(mu, sd):
    """Mean and std of |X|, X ~ N(mu, sd²)."""
    phi = 0.5 * (1 + math.erf(-mu / (sd * math.sqrt(2))))
    mean = sd * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sd ** 2)) + mu * (1 - 2 * phi)
    return mean, math.sqrt(mu ** 2 + sd ** 2 - mean ** 2)


def _sample_programming(device, g, n=N_CELLS, seed=0):
    cells = jnp.full((n,), g, jnp.float32)
    return np.asarray(devices.program_cells(cells, jax.random.key(seed), device), np.float64)


@pytest.mark.parametrize("name,sigma", [("pcm", pcm_sigma), ("sonos", sonos_sigma),
                                        ("reram", reram_sigma)])
def test_preset_programming_error_matches_published_fit(name, sigma):
    device = DeviceConfig.from_preset(name)
    for g in G_POINTS:
        s = sigma(g)
        got = _sample_programming(device, g)
        # Mid-range cells are far from the clip at 0 for these fits (g >= 0.05, s <= 0.05).
        assert abs(got.mean() - g) < 5 * s / math.sqrt(N_CELLS) + 1e-6, (name, g)
        assert got.std() == pytest.approx(s, rel=0.01), (name, g)


def test_sonos_read_noise_matches_published_fit():
    noise = DeviceConfig.from_preset("sonos").read_noise
    for g in G_POINTS:
        want = 12.58037 * (1 - math.exp(-1600.0 * g / 215.36557)) / 1600.0
        assert float(devices.noise_std(jnp.float32(g), noise)) == pytest.approx(want, rel=1e-5)


def test_pcm_drift_exponents_follow_the_published_distribution():
    drift = DeviceConfig.from_preset("pcm").drift
    for g in (0.01, 0.1, 0.5, 1.0):
        nu = np.asarray(devices.drift_exponents(jnp.full((N_CELLS,), g), drift,
                                                jax.random.key(1)), np.float64)
        mean, std = folded_normal_moments(*pcm_nu_stats(g))
        assert nu.min() >= 0
        assert nu.mean() == pytest.approx(mean, abs=4 * std / math.sqrt(N_CELLS))
        assert nu.std() == pytest.approx(std, rel=0.01)


def test_drift_is_a_power_law_of_the_exponents():
    drift = DriftConfig(model="power_law", t0=20.0, nu_mean=(0.06,), nu_std=(0.02,))
    g0 = jnp.linspace(0.1, 1.0, 1000)
    key = jax.random.key(2)
    nu = devices.drift_exponents(g0, drift, jax.random.split(key)[0])
    for t in (0.0, 10.0, 3600.0, 3.15e7):
        g = devices.drift_conductances(g0, t, drift, key)
        want = np.asarray(g0) * ((t + 20.0) / 20.0) ** (-np.asarray(nu))
        np.testing.assert_allclose(np.asarray(g), want, rtol=2e-5)
    assert np.all(np.asarray(devices.drift_conductances(jnp.zeros(5), 1e6, drift, key)) == 0)


def test_pcm_accumulated_noise_matches_formula():
    base = DeviceConfig.from_preset("pcm").drift
    drift = DriftConfig(**{**base.__dict__, "nu_std": (0.0,), "nu_std_range": (0.0, 0.0)})
    t = 3600.0
    for g in (0.05, 0.3, 1.0):
        g0 = jnp.full((N_CELLS,), g)
        out = np.asarray(devices.drift_conductances(g0, t, drift, jax.random.key(3)), np.float64)
        nu = pcm_nu_stats(g)[0]
        g_drift = g * ((t + 20.0) / 20.0) ** (-nu)
        q = min(0.0088 / max(g ** 0.65, 1e-3), 0.2)
        rel = q * math.sqrt(math.log((t + 20.0 + 250e-9) / (2 * 250e-9)))
        assert out.mean() == pytest.approx(g_drift, rel=1e-3)
        assert (out / g_drift - 1).std() == pytest.approx(rel, rel=0.01)


# ---- look-up tables ----------------------------------------------------------------------------
TABLE = ((0.0, 0.01), (0.25, 0.02), (0.5, 0.05), (1.0, 0.03))


def test_table_interpolation_exact_at_points_and_linear_between():
    noise = NoiseConfig(model="table", table=TABLE)
    g = jnp.asarray([p[0] for p in TABLE])
    np.testing.assert_array_equal(np.asarray(devices.noise_std(g, noise)),
                                  np.asarray([p[1] for p in TABLE], np.float32))
    mid = float(devices.noise_std(jnp.float32(0.375), noise))
    assert mid == pytest.approx(0.5 * (0.02 + 0.05), rel=1e-6)
    assert float(devices.noise_std(jnp.float32(1.5), noise)) == pytest.approx(0.03)
    scaled = NoiseConfig(model="table", table=TABLE, scale=2.0)
    assert float(devices.noise_std(jnp.float32(0.5), scaled)) == pytest.approx(0.1)


def test_table_files_csv_and_npy(tmp_path):
    csv_file = tmp_path / "sigma.csv"
    csv_file.write_text("g,sigma\n" + "\n".join(f"{g},{s}" for g, s in reversed(TABLE)) + "\n")
    npy_file = tmp_path / "sigma.npy"
    np.save(npy_file, np.asarray(TABLE))
    assert measured_devices.load_table(csv_file) == TABLE  # sorted by g
    assert measured_devices.load_table(npy_file) == TABLE
    cfg = CrossbarConfig.from_dict({"device": {"programming_error": {
        "model": "table", "table": str(csv_file)}}})
    assert cfg.device.programming_error.table == TABLE
    assert CrossbarConfig.from_json(cfg.to_json()) == cfg  # the points travel inline


@pytest.mark.parametrize("content,match", [
    ("g,sigma\n0.1,0.01\n", "at least two rows"),
    ("g,sigma\n0.1,0.01\n0.1,0.02\n", "repeated"),
    ("g,sigma\n0.1,abc\n0.2,0.01\n", "cannot read"),
    ("0.1,0.01,5\n0.2,0.02,5\n", "two finite numbers"),
])
def test_corrupt_table_file_is_a_clear_error(tmp_path, content, match):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(ConfigError, match=r"device\.programming_error\.table") as e:
        CrossbarConfig.from_dict({"device": {"programming_error": {
            "model": "table", "table": str(f)}}})
    assert match in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        CrossbarConfig.from_dict({"device": {"programming_error": {
            "model": "table", "table": str(tmp_path / "missing.csv")}}})


# ---- non-Gaussian errors -----------------------------------------------------------------------
@pytest.mark.parametrize("dist,excess_kurtosis", [("normal", 0.0), ("laplace", 3.0),
                                                  ("uniform", -1.2)])
def test_error_distributions_have_unit_variance_and_their_shape(dist, excess_kurtosis):
    e = np.asarray(devices.unit_noise(jax.random.key(4), (N_CELLS,), jnp.float32, dist),
                   np.float64)
    assert abs(e.mean()) < 5 / math.sqrt(N_CELLS)
    assert e.var() == pytest.approx(1.0, rel=0.02)
    kurt = ((e - e.mean()) ** 4).mean() / e.var() ** 2 - 3
    assert kurt == pytest.approx(excess_kurtosis, abs=0.15)


# ---- drift compensation ------------------------------------------------------------------------
def _drifting_config(scheme, compensation, reference="programmed", time=3.15e7):
    cfg = CrossbarConfig().replace(**{"device.preset": "pcm", "mapping.scheme": scheme,
                                      "array.rows": 64, "array.cols": 16})
    return cfg.replace(**{"device.drift.compensation": compensation,
                          "device.drift.reference": reference, "device.time": time})


def _weights(K=150, N=40, seed=5):
    return 0.1 * jax.random.laplace(jax.random.key(seed), (K, N))


@pytest.mark.parametrize("scheme", ["differential", "offset"])
@pytest.mark.parametrize("mode", ["global", "per_column"])
def test_compensation_restores_its_reference_read_exactly(scheme, mode):
    cfg = _drifting_config(scheme, mode)
    W = _weights()
    key = jax.random.key(6)
    p0 = jaxbar.program(W, cfg, key)
    p1 = jaxbar.drift(p0, cfg.device.time, cfg, jax.random.key(7))
    assert p0.reference is not None and p1.gain is not None
    g0, g1 = np.asarray(p0.g, np.float64), np.asarray(p1.g, np.float64)
    if scheme == "differential":  # analog subtraction: the read sees g+ - g-
        g0, g1 = g0[:, :, :, :1] - g0[:, :, :, 1:], g1[:, :, :, :1] - g1[:, :, :, 1:]
    read0, read1 = np.abs(g0).sum(axis=1), np.abs(g1).sum(axis=1)  # one-hot reads: (pr, S, P, M)
    gain = np.asarray(p1.gain, np.float64)
    if mode == "global":
        np.testing.assert_allclose((read1 * gain).sum(axis=(-2, -1)), read0.sum(axis=(-2, -1)),
                                   rtol=1e-5)
    else:
        live = read1 > 0
        np.testing.assert_allclose((read1 * gain)[live], read0[live], rtol=1e-5)


@pytest.mark.parametrize("scheme", ["differential", "offset"])
def test_global_compensation_restores_the_mean_column_output(scheme):
    """Stated error: the gain restores the mean output to within the cell-to-cell spread of
    drift (a few percent at one year for the PCM fit); uncompensated outputs fall by ~half."""
    W = jnp.abs(_weights())  # positive weights and inputs: a mean output to compare
    x = jax.random.uniform(jax.random.key(8), (256, W.shape[0]))
    key = jax.random.key(9)
    y_t0 = jaxbar.analog_matmul(x, W, _drifting_config(scheme, "global", time=0.0), key)
    y_raw = jaxbar.analog_matmul(x, W, _drifting_config(scheme, "none"), key)
    y_comp = jaxbar.analog_matmul(x, W, _drifting_config(scheme, "global"), key)
    ratio_raw = float(jnp.mean(y_raw) / jnp.mean(y_t0))
    ratio_comp = float(jnp.mean(y_comp) / jnp.mean(y_t0))
    assert ratio_raw < 0.7
    assert ratio_comp == pytest.approx(1.0, abs=0.05)


def test_target_reference_uses_error_free_conductances():
    cfg = _drifting_config("differential", "global", reference="target")
    W = _weights()
    p0 = jaxbar.program(W, cfg, jax.random.key(10))
    ideal = jaxbar.program(W, cfg.replace(**{"device.programming_error.model": "none"}))
    np.testing.assert_allclose(np.asarray(p0.reference), np.asarray(ideal.reference
                                                                    if ideal.reference is not None
                                                                    else p0.reference),
                               rtol=1e-6)
    g = np.asarray(ideal.g)
    want = np.abs(g[:, :, :, :1] - g[:, :, :, 1:]).sum(axis=1)
    np.testing.assert_allclose(np.asarray(p0.reference), want, rtol=1e-6)


# ---- config, keys, transformations -------------------------------------------------------------
def test_presets_from_dicts_yaml_and_replace():
    cfg = CrossbarConfig.from_yaml("device: {preset: pcm, time: 3600}")
    assert cfg.device.preset == "pcm" and cfg.device.time == 3600.0
    assert cfg.device.drift == DeviceConfig.from_preset("pcm").drift
    assert CrossbarConfig.from_yaml(cfg.to_yaml()) == cfg
    swapped = cfg.replace(**{"device.preset": "reram"})
    assert swapped.device == DeviceConfig.from_preset("reram")
    assert CrossbarConfig.from_dict({"device": "sonos"}).device == DeviceConfig.from_preset("sonos")
    with pytest.raises(ConfigError, match=r"device\.preset.*'pcm'"):
        CrossbarConfig.from_dict({"device": {"preset": "flash"}})


@pytest.mark.parametrize("changes,path", [
    ({"device.time": -1.0}, "device.time"),
    ({"device.drift.model": "linear"}, "device.drift.model"),
    ({"device.drift.t0": 0.0}, "device.drift.t0"),
    ({"device.drift.nu_mean_range": [0.2, 0.1]}, "device.drift.nu_mean_range"),
    ({"device.drift.noise": [0.01, 0.5]}, "device.drift.noise"),
    ({"device.drift.compensation": "column"}, "device.drift.compensation"),
    ({"device.read_noise.distribution": "laplace"}, "device.read_noise.distribution"),
    ({"device.programming_error.distribution": "cauchy"},
     "device.programming_error.distribution"),
    ({"device.programming_error": {"model": "saturating", "coeffs": [0.1]}},
     "device.programming_error.coeffs"),
    ({"device.programming_error": {"model": "polynomial"}}, "device.programming_error.coeffs"),
    ({"device.programming_error": {"model": "table", "table": [[0.5, 0.1], [0.2, 0.1]]}},
     r"device.programming_error.table\[1\]"),
    ({"device.programming_error": {"model": "table", "table": [[0.1, -0.1], [0.2, 0.1]]}},
     r"device.programming_error.table\[0\]"),
    ({"device.programming_error": {"model": "polynomial", "coeffs": [0.1], "scale": -1}},
     "device.programming_error.scale"),
])
def test_device_validation_errors_name_the_field(changes, path):
    with pytest.raises(ConfigError, match=path):
        CrossbarConfig().replace(**changes)


def _measured_sigma(g):  # a user's own σ(g), defined once (configs compare it by identity)
    return 0.01 + 0.03 * g * (1.0 - 0.5 * g)


MODELS = {
    "custom": {"device.programming_error": NoiseConfig(model="custom", fn=_measured_sigma,
                                                       distribution="uniform")},
    "polynomial": {"device.programming_error": {"model": "polynomial",
                                                "coeffs": [0.01, 0.03, -0.02]}},
    "saturating": {"device.preset": "sonos"},
    "table": {"device.programming_error": {"model": "table", "table": [list(p) for p in TABLE],
                                           "distribution": "laplace"}},
    "reram": {"device.preset": "reram"},
    "pcm": {"device.preset": "pcm", "device.time": 86400.0},
    "pcm_per_column": {"device.preset": "pcm", "device.time": 86400.0,
                       "device.drift.compensation": "per_column"},
}


@pytest.mark.parametrize("model", list(MODELS))
def test_every_model_jits_vmaps_and_differentiates(model):
    cfg = CrossbarConfig().replace(**{"array.rows": 64}, **MODELS[model])
    W = _weights(K=100, N=12)
    x = jax.random.uniform(jax.random.key(11), (8, 100), minval=-1, maxval=1)
    keys = jax.random.split(jax.random.key(12), 4)

    def f(x, W, key):
        return jaxbar.analog_matmul(x, W, cfg, key)

    y = jax.jit(f)(x, W, keys[0])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(f)(x, W, keys[0])))
    assert not np.allclose(np.asarray(y), np.asarray(f(x, W, keys[1])))
    ys = jax.vmap(lambda k: f(x, W, k))(keys)
    np.testing.assert_allclose(np.asarray(ys[0]), np.asarray(y), rtol=1e-5, atol=1e-6)
    gW, gx = jax.grad(lambda W, x: jnp.sum(f(x, W, keys[0]) ** 2), argnums=(0, 1))(W, x)
    assert np.all(np.isfinite(np.asarray(gW))) and np.all(np.isfinite(np.asarray(gx)))
    assert np.any(np.asarray(gW) != 0)


def test_time_is_traced_so_a_time_sweep_compiles_once():
    cfg = CrossbarConfig().replace(**{"device.preset": "pcm"})
    W, x = _weights(K=60, N=8), jnp.ones((4, 60))

    @jax.jit
    def f(cfg):
        return jaxbar.analog_matmul(x, W, cfg, jax.random.key(13))

    outs = [f(cfg.replace(**{"device.time": t})) for t in (1.0, 3600.0, 3.15e7)]
    assert f._cache_size() == 1
    assert float(jnp.mean(jnp.abs(outs[0] - outs[2]))) > 0


def test_drift_key_reuse_gives_the_same_cells_at_every_time():
    cfg = CrossbarConfig().replace(**{"device.preset": "pcm", "device.drift.noise": []})
    p0 = jaxbar.program(_weights(), cfg, jax.random.key(14))
    k = jax.random.key(15)
    g1 = np.asarray(jaxbar.drift(p0, 100.0, cfg, k).g, np.float64)
    g2 = np.asarray(jaxbar.drift(p0, 1e6, cfg, k).g, np.float64)
    live = g1 > 1e-6
    # The same exponents: log(g2/g1) / log(t-ratio) is one ν per cell, consistent with g1.
    nu = -np.log(g2[live] / g1[live]) / math.log((1e6 + 20) / (100 + 20))
    g0 = np.asarray(p0.g, np.float64)[live]
    np.testing.assert_allclose(g1[live], g0 * (120 / 20) ** (-nu), rtol=1e-3)
