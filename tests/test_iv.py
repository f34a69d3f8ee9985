"""Nonlinear cell I-V (PHYSICS §2): closed forms, a NumPy reference, gradients, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.config import ConfigError, CrossbarConfig, IVConfig
from jaxbar.core import devices, mvm

RNG = np.random.default_rng(0)
W = RNG.laplace(size=(40, 12)).astype(np.float32)
X = RNG.uniform(-1, 1, size=(6, 40)).astype(np.float32)


def _iv(cfg, **iv):
    return cfg.replace(**{"device.iv": iv})


def _mm(x, cfg, w=W):
    return np.asarray(mvm.matmul(jnp.asarray(x), mvm.program(jnp.asarray(w), cfg), cfg))


def test_linear_default_is_the_identity():
    cfg = CrossbarConfig.ideal()
    assert cfg.device.iv == IVConfig() and cfg.device.iv.linear
    v = jnp.asarray(X)
    assert devices.read_current(v, cfg.device.iv) is v  # no operation at all
    assert CrossbarConfig.from_yaml(cfg.to_yaml()) == cfg


def test_ideal_sinh_is_f_of_x_times_w():
    """Ideal everything, x_max = 1: the layer computes f(x) @ W with f(v) = sinh(kv)/k."""
    k = 1.5
    y = _mm(X, _iv(CrossbarConfig.ideal(), model="sinh", k=k))
    ref = (np.sinh(k * X.astype(np.float64)) / k) @ W.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)


def test_small_k_is_linear():
    y = _mm(X, _iv(CrossbarConfig.ideal(), model="sinh", k=1e-3))
    np.testing.assert_allclose(y, X.astype(np.float64) @ W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table", [((0, 0), (1, 2.5)),
                                   ((0, 0), (0.25, 0.625), (1, 2.5), (2, 5))])
def test_a_table_on_a_line_is_linear(table):
    """i = 2.5·v: the result is 2.5 times the linear one, for either sign and beyond 1."""
    base = CrossbarConfig.paper_baseline().replace(**{"adc.bits": 0, "adc.range": None})
    x = np.concatenate([X, 1.5 * X[:1]])  # an ideal DAC passes |x| > 1: extrapolated
    for cfg in (base, CrossbarConfig.ideal()):
        lin = _mm(x if cfg.inputs.bits == 0 else X, cfg)
        tab = _mm(x if cfg.inputs.bits == 0 else X, _iv(cfg, model="table", table=table))
        np.testing.assert_allclose(tab, 2.5 * lin, rtol=1e-6, atol=1e-5)


def _odd_interp(v, table):
    t = np.asarray(table, dtype=np.float64)
    a = np.abs(v)
    slope = (t[-1, 1] - t[-2, 1]) / (t[-1, 0] - t[-2, 0])
    inside = np.interp(a, t[:, 0], t[:, 1])
    return np.sign(v) * np.where(a > t[-1, 0], t[-1, 1] + (a - t[-1, 0]) * slope, inside)


@pytest.mark.parametrize("iv", [dict(model="sinh", k=2.0),
                                dict(model="table",
                                     table=((0, 0), (0.2, 0.1), (0.5, 0.6), (1, 1.8)))])
def test_column_currents_against_numpy(iv):
    """Offset cells g ∈ [g_min, 1], inputs u: every column carries Σ_k g[k, n]·f(u_k)."""
    cfg = _iv(CrossbarConfig.ideal().replace(**{"mapping.scheme": "offset",
                                                 "device.on_off_ratio": 10.0}), **iv)
    prog = mvm.program(jnp.asarray(W), cfg)
    y, x_q = mvm.array_outputs(jnp.asarray(X), prog, cfg)
    g = np.asarray(prog.g, dtype=np.float64)[0, :, 0, 0, :]  # one tile, one slice
    if iv["model"] == "sinh":
        f = np.sinh(iv["k"] * X.astype(np.float64)) / iv["k"]
    else:
        f = _odd_interp(X.astype(np.float64), iv["table"])
    np.testing.assert_allclose(np.asarray(y)[0, :, 0, 0, 0, :], f @ g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_input_slice", [False, True])
def test_bit_serial_one_bit_slices_see_only_f_of_one(per_input_slice):
    """1-bit input slices drive ±1 or 0, so the nonlinearity is the gain f(1) = sinh(k)/k."""
    k = 0.8
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "inputs.bit_serial": True, "adc.bits": 0, "adc.range": None,
        "adc.per_input_slice": per_input_slice})
    lin = _mm(X, cfg)
    y = _mm(X, _iv(cfg, model="sinh", k=k))
    np.testing.assert_allclose(y, np.sinh(k) / k * lin, rtol=1e-5, atol=1e-5)


def test_bit_serial_two_bit_slices_against_numpy():
    """2-bit slices of unsigned 6-bit inputs: Σ_j w_j f(u_j) @ W with u_j = digit_j/3."""
    k = 1.2
    x = np.abs(X)
    cfg = _iv(CrossbarConfig.ideal().replace(**{
        "inputs.bits": 6, "inputs.range": (0.0, 1.0), "inputs.bit_serial": True,
        "inputs.slice_bits": 2}), model="sinh", k=k)
    n = np.round(np.clip(x.astype(np.float64), 0, 1) * 63)
    ref = 0
    for j in range(3):
        u = (n // 4**j % 4) / 3
        ref = ref + 3 / 63 * 4**j * (np.sinh(k * u) / k)
    np.testing.assert_allclose(_mm(x, cfg), ref @ W, rtol=1e-5, atol=1e-5)


def test_gradients():
    k = 1.3
    cfg = _iv(CrossbarConfig.ideal(), model="sinh", k=k)
    x, w = jnp.asarray(X), jnp.asarray(W)

    def loss(x, w):
        return jnp.sum(mvm.matmul(x, mvm.program(w, cfg), cfg))

    gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
    x64 = X.astype(np.float64)
    np.testing.assert_allclose(gx, np.cosh(k * x64) * W.sum(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, (np.sinh(k * x64) / k).sum(0)[:, None] * np.ones((1, 12)),
                               rtol=1e-4, atol=1e-4)
    tab = _iv(CrossbarConfig.ideal(), model="table", table=((0, 0), (0.5, 0.25), (1, 1)))
    g = jax.grad(lambda x: jnp.sum(mvm.matmul(x, mvm.program(w, tab), tab)))(x)
    slope = np.where(np.abs(x64) < 0.5, 0.5, 1.5)
    np.testing.assert_allclose(g, slope * W.sum(1), rtol=1e-4, atol=1e-4)


def test_k_is_traced_a_sweep_compiles_once():
    traces = []

    @jax.jit
    def f(cfg, w, x):
        traces.append(1)
        return mvm.matmul(x, mvm.program(w, cfg), cfg)

    base = _iv(CrossbarConfig.ideal(), model="sinh", k=1.0)
    y1 = f(base, W, X)
    y2 = f(base.replace(**{"device.iv.k": 2.0}), W, X)
    assert len(traces) == 1
    np.testing.assert_allclose(y2, (np.sinh(2 * X.astype(np.float64)) / 2) @ W, rtol=2e-5,
                               atol=2e-5)
    assert not np.allclose(y1, y2)


@pytest.mark.parametrize("change, match", [
    ({"model": "cubic"}, "device.iv.model"),
    ({"model": "sinh", "k": 0.0}, "device.iv.k"),
    ({"model": "table", "table": [[0, 0]]}, "device.iv.table"),
    ({"model": "table", "table": [[0.1, 0], [1, 1]]}, r"device.iv.table\[0\]"),
    ({"model": "table", "table": [[0, 0], [0.5, 0.6], [1, 0.5]]}, r"device.iv.table\[2\]"),
    ({"model": "table", "table": [[0, 0], [0.5, 0.6], [0.5, 0.7]]}, r"device.iv.table\[2\]"),
    ({"model": "table", "table": [[0, 0], [1, 0]]}, "rises above 0"),
    ({"bogus": 1}, "device.iv.bogus"),
])
def test_config_errors(change, match):
    with pytest.raises(ConfigError, match=match):
        CrossbarConfig.from_dict({"device": {"iv": change}})


def test_not_with_parasitics():
    with pytest.raises(ConfigError, match="device.iv.model.*parasitics"):
        CrossbarConfig.from_dict({"device": {"iv": {"model": "sinh", "k": 1.0}},
                                  "parasitics": {"topology": "input_source", "r_row": 1e-5,
                                                 "r_col": 1e-5}})


def test_table_from_a_file(tmp_path):
    p = tmp_path / "iv.csv"
    p.write_text("v,i\n0,0\n0.5,0.4\n1,1.2\n")
    cfg = CrossbarConfig.from_yaml(f"device: {{iv: {{model: table, table: {p}}}}}")
    assert cfg.device.iv.table == ((0.0, 0.0), (0.5, 0.4), (1.0, 1.2))
