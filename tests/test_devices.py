"""Statistics of programming error and read noise against closed forms (PHYSICS §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import jaxbar
from jaxbar import CrossbarConfig

TRIALS = 4000
W = np.array([[1.0, 0.3, 0.0, -0.6]])  # w_max = 1: one row, four weights


def effective_weights(cfg, trials=TRIALS, seed=0):
    """Effective weights of many programmed trials: x = e_1 with ideal converters."""
    keys = jax.random.split(jax.random.key(seed), trials)
    x = jnp.ones((1, 1))

    @jax.jit
    @jax.vmap
    def one(k):
        return jaxbar.matmul(x, jaxbar.program(W, cfg, k), cfg)[0]

    return np.asarray(one(keys), dtype=np.float64)


def clipped_moments(g, s, lo, hi):
    """Mean and variance of clip(g + s·ε, lo, hi) by numerical integration (scipy)."""
    if s == 0:
        v = float(np.clip(g, lo, hi))
        return v, 0.0
    d = stats.norm(loc=g, scale=s)
    m1 = d.expect(lambda t: np.clip(t, lo, hi), lb=g - 12 * s, ub=g + 12 * s)
    m2 = d.expect(lambda t: np.clip(t, lo, hi) ** 2, lb=g - 12 * s, ub=g + 12 * s)
    return m1, m2 - m1**2


def check(samples, mean, std):
    se_mean = max(std, 1e-9) / np.sqrt(len(samples))
    assert abs(samples.mean() - mean) < 5 * se_mean + 1e-7, (samples.mean(), mean)
    if std > 0:
        assert abs(samples.std() / std - 1) < 0.08, (samples.std(), std)
    else:
        assert samples.std() < 1e-7


@pytest.mark.parametrize("model, sigma", [("independent", 0.1), ("proportional", 0.2)])
@pytest.mark.parametrize("clip, on_off", [("zero", None), ("zero", 20.0), ("range", 20.0)])
def test_differential_programming_error_statistics(model, sigma, clip, on_off):
    cfg = CrossbarConfig.from_dict({"device": {"on_off_ratio": on_off, "clip": clip,
                                               "programming_error": {"model": model,
                                                                     "sigma": sigma}}})
    g_min = 0.0 if on_off is None else 1 / on_off
    g_range = 1 - g_min
    lo, hi = (0.0, np.inf) if clip == "zero" else (g_min, 1.0)
    w_eff = effective_weights(cfg)
    for j, w in enumerate(W[0]):
        mean, var = 0.0, 0.0
        for sign in (1, -1):
            g = g_min + g_range * max(sign * w, 0.0)
            s = sigma if model == "independent" else sigma * g
            m, v = clipped_moments(g, s, lo, hi)
            mean += sign * m
            var += v
        # Effective weight = (g+' - g-')·w_max/g_range. Clipping at zero rectifies the cells at
        # g_min ≈ 0, so both cells gain a positive bias that cancels only on average.
        check(w_eff[:, j], mean / g_range, np.sqrt(var) / g_range)


@pytest.mark.parametrize("model, sigma", [("independent", 0.05), ("proportional", 0.1)])
def test_offset_programming_error_statistics(model, sigma):
    cfg = CrossbarConfig.from_dict({"mapping": {"scheme": "offset"}, "device": {
        "on_off_ratio": 10.0, "programming_error": {"model": model, "sigma": sigma}}})
    g_min, g_range = 0.1, 0.9
    w_eff = effective_weights(cfg)
    for j, w in enumerate(W[0]):
        g = g_min + g_range * (w + 1) / 2
        s = sigma if model == "independent" else sigma * g
        m, v = clipped_moments(g, s, 0.0, np.inf)
        g_zero = g_min + g_range / 2  # subtracted digitally, error free
        check(w_eff[:, j], (m - g_zero) / (g_range / 2), np.sqrt(v) / (g_range / 2))


def test_offset_proportional_error_hits_zero_weights_differential_does_not():
    # PHYSICS §2 'proportionality': a zero weight is at g = 0 (differential, infinite on/off)
    # but mid-range (offset), where a state-proportional error is large.
    d = {"device": {"programming_error": {"model": "proportional", "sigma": 0.1}}}
    diff = effective_weights(CrossbarConfig.from_dict(d), trials=500)
    off = effective_weights(CrossbarConfig.from_dict({**d, "mapping": {"scheme": "offset"}}),
                            trials=500)
    assert diff[:, 2].std() == 0.0
    assert off[:, 2].std() > 0.05


def test_custom_sigma_function():
    def sigma_of_g(g):
        return 0.02 + 0.1 * g

    cfg = CrossbarConfig().replace(**{"device.programming_error": {
        "model": "custom", "sigma": 0.0, "fn": sigma_of_g}})
    w_eff = effective_weights(cfg)
    # Weight 1.0: g+ = 1 (σ = 0.12, no clipping to speak of), g- = 0 (σ = 0.02, rectified).
    m_p, v_p = clipped_moments(1.0, 0.12, 0.0, np.inf)
    m_n, v_n = clipped_moments(0.0, 0.02, 0.0, np.inf)
    check(w_eff[:, 0], m_p - m_n, np.sqrt(v_p + v_n))


def test_cell_quantization_before_programming_error():
    cfg = CrossbarConfig.from_dict({"device": {"cell_bits": 2}})
    # 0.3 → level round(0.3·3) = 1 → g = 1/3; effective weight 1/3.
    w = effective_weights(cfg, trials=2)
    np.testing.assert_allclose(w[0], [1.0, 1 / 3, 0.0, -2 / 3], atol=1e-6)


def test_programming_error_is_static_per_key():
    cfg = CrossbarConfig.from_dict({"device": {"programming_error": {"model": "independent",
                                                                      "sigma": 0.1}}})
    p1 = jaxbar.program(W, cfg, jax.random.key(5))
    p2 = jaxbar.program(W, cfg, jax.random.key(5))
    np.testing.assert_array_equal(p1.g, p2.g)
    x = np.random.default_rng(0).normal(size=(3, 1))
    np.testing.assert_array_equal(jaxbar.matmul(x, p1, cfg), jaxbar.matmul(x, p1, cfg))


def read_noise_cfg(model, sigma, **extra):
    d = {"device": {"read_noise": {"model": model, "sigma": sigma}}}
    for k, v in extra.items():
        d.setdefault(k, {}).update(v)
    return CrossbarConfig.from_dict(d)


@pytest.mark.parametrize("model", ["independent", "proportional"])
@pytest.mark.parametrize("subtract", ["analog", "digital"])
def test_read_noise_statistics_and_freshness(model, subtract):
    rng = np.random.default_rng(0)
    Wm = rng.uniform(-1, 1, size=(12, 3))
    Wm[0, 0] = 1.0
    x = rng.normal(size=(1, 12))
    sigma = 0.05
    cfg = read_noise_cfg(model, sigma, mapping={"subtract": subtract})
    p = jaxbar.program(Wm, cfg)
    keys = jax.random.split(jax.random.key(1), TRIALS)
    ys = np.asarray(jax.jit(jax.vmap(lambda k: jaxbar.matmul(x, p, cfg, k)[0]))(keys))
    # Per-cell noise s(g)·ε on both cells of every pair, fresh per MVM:
    # var(y_n) = Σ_k x_k² (s(g+_kn)² + s(g-_kn)²).
    gp, gn = np.maximum(Wm, 0), np.maximum(-Wm, 0)
    if model == "independent":
        var = (x**2) @ np.full_like(Wm, 2 * sigma**2)
    else:
        var = (x**2) @ (sigma**2 * (gp**2 + gn**2))
    for n in range(3):
        check(ys[:, n], float((x @ Wm)[0, n]), float(np.sqrt(var[0, n])))
    # Fresh per call, fixed per key.
    assert not np.allclose(ys[0], ys[1])
    np.testing.assert_allclose(jaxbar.matmul(x, p, cfg, keys[0])[0], ys[0], rtol=1e-6)


def test_read_noise_per_input_slice_mvm():
    # Bit-serial: every input slice is its own read, with its own noise. For x_q = 1 with
    # 2 one-bit slices both digits are 1; y = (1/3)(y0 + 2·y1) → var = (1/9)(1 + 4)·var_1.
    cfg = read_noise_cfg("independent", 0.1, inputs={"bits": 2, "range": [0, 1],
                                                     "bit_serial": True})
    p = jaxbar.program(np.array([[1.0]]), cfg)
    keys = jax.random.split(jax.random.key(2), TRIALS)
    ys = np.asarray(jax.vmap(lambda k: jaxbar.matmul(np.ones((1, 1)), p, cfg, k))(keys))
    check(ys.ravel(), 1.0, np.sqrt(5 / 9 * 2 * 0.1**2))


def test_read_noise_requires_key():
    cfg = read_noise_cfg("independent", 0.1)
    p = jaxbar.program(W, cfg)
    with pytest.raises(ValueError, match="PRNG key"):
        jaxbar.matmul(np.ones((1, 1)), p, cfg)
