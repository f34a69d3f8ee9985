"""Layers with parasitic resistance: tiles, unit columns, bit-serial gating and interleaving
against per-array dense circuit solves built independently from the weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbar
from jaxbar import ConfigError, CrossbarConfig

from .circuit_reference import reference_currents

R = 2e-2  # large enough that IR drop changes results visibly on these small arrays


def parts(n, m):
    sizes = jaxbar.partition_sizes(n, m)
    starts = np.cumsum((0,) + sizes[:-1])
    return [slice(int(a), int(a) + s) for a, s in zip(starts, sizes, strict=True)]


def layer(d):
    return CrossbarConfig.from_dict({"parasitics": {"topology": "input_source", "r_row": R,
                                                    "r_col": 1.5 * R, "tol": 1e-10}, **d})


@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("interleaved", [False, True])
def test_partitioned_differential_layer(interleaved, precompute):
    rng = np.random.default_rng(0)
    K, N, rows, cols = 7, 5, 4, 3
    W, x = rng.normal(size=(K, N)), rng.uniform(-1, 1, size=(3, K))
    cfg = layer({"array": {"rows": rows, "cols": cols}})
    cfg = cfg.replace(**{"parasitics.interleaved": interleaved,
                         "ir_solver.precompute": precompute})
    w_max = np.abs(W).max()
    gp, gn = np.maximum(W, 0) / w_max, np.maximum(-W, 0) / w_max
    expected = np.zeros((3, N))
    for rs in parts(K, rows):
        extra = rows - (rs.stop - rs.start)  # a short partition leaves unused rows below
        for cs in parts(N, cols):
            kw = dict(extra_rows=extra)
            if interleaved:
                y = reference_currents(gp[rs, cs], x[:, rs], R, 1.5 * R, g_neg=gn[rs, cs], **kw)
            else:
                y = (reference_currents(gp[rs, cs], x[:, rs], R, 1.5 * R, **kw)
                     - reference_currents(gn[rs, cs], x[:, rs], R, 1.5 * R, **kw))
            expected[:, cs] += y * w_max
    with jax.enable_x64(True):
        y = jaxbar.analog_matmul(jnp.asarray(x), jnp.asarray(W), cfg)
    np.testing.assert_allclose(y, expected, rtol=1e-7, atol=1e-9)
    assert not np.allclose(expected, x @ W, rtol=1e-3)  # the IR drop is really there


def test_offset_unit_column_gated_bit_serial():
    rng = np.random.default_rng(1)
    K, N = 5, 3
    W, x = rng.normal(size=(K, N)), rng.uniform(-1, 1, size=(2, K))
    cfg = CrossbarConfig.from_dict({
        "mapping": {"scheme": "offset", "offset_subtraction": "unit_column"},
        "inputs": {"bits": 4, "range": [-1, 1], "bit_serial": True},
        "array": {"rows": 6},
        "parasitics": {"topology": "gated_source", "r_row": R, "r_col": R, "tol": 1e-10}})
    w_max = np.abs(W).max()
    g = 0.5 * (W / w_max + 1)  # offset cells; zero weight at g = 1/2
    # Unit column first (nearest the drivers), then the weight columns; one array.
    g_arr = np.concatenate([np.full((K, 1), 0.5), g], axis=1)
    xq = np.round(x * 7) / 7
    n = np.round(np.abs(xq) * 7).astype(int)
    total = np.zeros((2, N + 1))
    for k in range(3):  # LSB first, sign-magnitude bits
        bits = np.sign(xq) * ((n >> k) & 1)
        total += 2**k / 7 * reference_currents(g_arr, bits, R, R, topology="gated_source",
                                               extra_rows=1)
    expected = (total[:, 1:] - total[:, :1]) * w_max / 0.5
    with jax.enable_x64(True):
        y = jaxbar.analog_matmul(jnp.asarray(x), jnp.asarray(W), cfg)
    np.testing.assert_allclose(y, expected, rtol=1e-7, atol=1e-9)


def test_small_r_recovers_ideal_and_conv_path():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, size=(1, 5, 5, 2))
    kernel = rng.normal(size=(3, 3, 2, 4))
    cfg = CrossbarConfig.from_dict({"parasitics": {"topology": "input_source", "r_row": 1e-9,
                                                   "r_col": 1e-9, "tol": 1e-10}})
    with jax.enable_x64(True):
        p = jaxbar.program(jnp.asarray(kernel.reshape(18, 4)), cfg)
        y = jaxbar.core.conv(jnp.asarray(x), p, cfg, kernel.shape, (1, 1), ((1, 1), (1, 1)))
        y0 = jaxbar.core.conv(jnp.asarray(x), p, CrossbarConfig(), kernel.shape, (1, 1),
                              ((1, 1), (1, 1)))
    np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)


def test_ir_drop_reduces_currents_and_offset_suffers_more():
    rng = np.random.default_rng(3)
    W = np.abs(rng.laplace(size=(64, 16)))
    W[0, 0] = -W.max()  # both signs, w_max from a positive weight
    x = rng.uniform(0, 1, size=(8, 64))
    ref = x @ W
    err = {}
    for scheme in ("differential", "offset"):
        cfg = CrossbarConfig.from_dict({"mapping": {"scheme": scheme}, "parasitics": {
            "topology": "input_source", "r_row": 1e-4, "r_col": 1e-4}})
        y = np.asarray(jaxbar.analog_matmul(x, W, cfg))
        err[scheme] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err["offset"] > 5 * err["differential"] > 0


def test_nonconvergence_is_reported():
    W = np.ones((32, 4))
    x = np.ones((2, 32))
    cfg = CrossbarConfig.from_dict({"parasitics": {"topology": "input_source", "r_row": 1.0,
                                                   "r_col": 1.0, "max_iters": 1}})
    with pytest.raises(Exception, match="converge"):
        jax.block_until_ready(jaxbar.analog_matmul(x, W, cfg))
    cfg = cfg.replace(**{"ir_solver.on_nonconvergence": "warn"})
    with pytest.warns(RuntimeWarning, match="converge"):
        jax.block_until_ready(jaxbar.analog_matmul(x, W, cfg))


@pytest.mark.parametrize("interleaved", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["separate", "interleaved"])
def test_read_noise_with_gated_parasitics(interleaved):
    """Every read sees its own noisy cells: at r = 0 the per-read current error of an analog
    pair is a Gaussian of variance 2 sigma^2 sum_k |b_k| (both cells of each active row)."""
    from jaxbar.core import mvm

    sigma, K, N, reads = 0.05, 6, 3, 600
    rng = np.random.default_rng(4)
    W = rng.normal(size=(K, N))
    x = np.tile(rng.uniform(0, 1, size=(1, K)), (reads, 1))
    base = {"inputs": {"bits": 4, "range": [0, 1], "bit_serial": True},
            "adc": {"per_input_slice": True},
            "parasitics": {"topology": "gated_source", "r_row": 0.0, "r_col": 0.0,
                           "interleaved": interleaved}}
    noisy = CrossbarConfig.from_dict({**base, "device": {"read_noise": {
        "model": "independent", "sigma": sigma}}})
    clean = CrossbarConfig.from_dict(base)
    p = jaxbar.program(jnp.asarray(W, jnp.float32), clean)
    y0, xq = mvm.array_outputs(jnp.asarray(x, jnp.float32), p, clean)
    y1, _ = mvm.array_outputs(jnp.asarray(x, jnp.float32), p, noisy, jax.random.key(3))
    y2, _ = mvm.array_outputs(jnp.asarray(x, jnp.float32), p, noisy, jax.random.key(3))
    np.testing.assert_array_equal(y1, y2)  # same key, same reads
    d = np.asarray(y1 - y0)[..., 0, 0, 0, :]  # (J slices, reads, N)
    n = np.round(np.asarray(xq[0]) * 15).astype(int)
    for j in range(d.shape[0]):
        active = int(np.sum((n >> j) & 1))
        var = np.var(d[j], axis=0)  # over reads: each read draws its own cells
        expected = 2 * sigma**2 * active
        if active == 0:
            np.testing.assert_array_equal(d[j], 0.0)
        else:  # 600 reads: the sample variance is within 20% (3.5 standard errors)
            np.testing.assert_allclose(var, expected, rtol=0.2)


def test_read_noise_with_parasitics_is_rejected():
    cfg = CrossbarConfig.from_dict({"parasitics": {"topology": "input_source", "r_col": 1e-5},
                                    "device": {"read_noise": {"model": "independent",
                                                              "sigma": 0.01}}})
    with pytest.raises(ConfigError, match="read_noise"):
        jaxbar.analog_matmul(np.ones((1, 4)), np.ones((4, 2)), cfg, jax.random.key(0))


@pytest.mark.parametrize("mapping", [
    {"scheme": "differential"},
    {"scheme": "differential", "subtract": "digital"},
    pytest.param({"scheme": "offset", "offset_subtraction": "unit_column"},
                 marks=pytest.mark.slow),
    pytest.param({"scheme": "offset", "slices": 2}, marks=pytest.mark.slow),
])
def test_precomputed_transfer_equals_per_mvm_solves_in_conv_layers(mapping):
    """Input-source arrays are linear: the transfer matrix found once in `program` gives the
    per-MVM circuit solves of every patch of a convolution (partitions, slices, unit column,
    bit-serial inputs)."""
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, size=(2, 6, 6, 3))
    kernel = rng.normal(size=(3, 3, 3, 5))
    d = {"array": {"rows": 12, "cols": 4}, "weights": {"bits": 6}, "mapping": mapping,
         "inputs": {"bits": 4, "range": [0, 1], "bit_serial": True}}
    conv_args = (kernel.shape, (1, 1), ((1, 1), (1, 1)))
    with jax.enable_x64(True):
        ys = []
        for precompute in (True, False):
            cfg = layer(d).replace(**{"ir_solver.precompute": precompute})
            p = jaxbar.program(jnp.asarray(kernel.reshape(27, 5)), cfg)
            assert (p.effective is not None) == precompute
            ys.append(np.asarray(jaxbar.core.conv(jnp.asarray(x), p, cfg, *conv_args)))
        ideal = layer(d).replace(**{"parasitics.topology": "none"})
        p0 = jaxbar.program(jnp.asarray(kernel.reshape(27, 5)), ideal)
        y0 = np.asarray(jaxbar.core.conv(jnp.asarray(x), p0, ideal, *conv_args))
    np.testing.assert_allclose(ys[0], ys[1], rtol=1e-8, atol=1e-10)
    assert not np.allclose(ys[0], y0, rtol=1e-3)  # the IR drop is really there


@pytest.mark.slow
def test_precomputed_transfer_has_gradients():
    rng = np.random.default_rng(5)
    W_np, x_np = rng.normal(size=(10, 4)), rng.uniform(0, 1, size=(3, 10))
    cfg = layer({})

    def loss(W):
        return jnp.sum(jaxbar.analog_matmul(jnp.asarray(x_np), W, cfg) ** 2)

    with jax.enable_x64(True):
        W = jnp.asarray(W_np)
        g = jax.grad(loss)(W)
        e = np.zeros((10, 4))
        e[3, 1] = 1e-6
        fd = (loss(W + e) - loss(W - e)) / 2e-6
    assert float(g[3, 1]) == pytest.approx(float(fd), rel=1e-4)


@pytest.mark.parametrize("K, N, tol", [(400, 48, 1e-4),
                                        pytest.param(800, 128, 1e-6, marks=pytest.mark.slow)])
def test_precomputed_transfer_converges_in_float32_with_strongly_attenuated_rows(K, N, tol):
    """At large r the rows far from the integrators reach them attenuated ~10^4 times. The
    transfer matrix must still converge in float32 (no spurious non-convergence error) and
    give the currents of real inputs to float32 accuracy. (800 x 128 at tol 1e-6: reading the
    driver currents as ideal minus IR loss there stalls at a rounding floor of ~2%.)"""
    rng = np.random.default_rng(6)
    W = rng.laplace(size=(K, N)).astype(np.float32)
    x = rng.uniform(0, 1, size=(16, K)).astype(np.float32)
    cfg = CrossbarConfig.from_dict({"mapping": {"scheme": "offset"}, "parasitics": {
        "topology": "input_source", "r_row": 1e-3, "r_col": 1e-3, "tol": tol}})
    p = jaxbar.program(jnp.asarray(W), cfg)  # on_nonconvergence: error
    t = np.asarray(p.effective[0, :, 0, 0], np.float64)  # (K, M): row k driven alone
    attenuation = np.abs(t).max(axis=1)
    assert attenuation.min() < 1e-3 * attenuation.max()  # the hard case is really there
    y = np.asarray(jaxbar.matmul(jnp.asarray(x), p, cfg), np.float64)
    with jax.enable_x64(True):
        c64 = cfg.replace(**{"ir_solver.tol": 1e-10, "ir_solver.precompute": False})
        y64 = np.asarray(jaxbar.analog_matmul(jnp.asarray(x, jnp.float64),
                                              jnp.asarray(W, jnp.float64), c64))
    assert np.abs(y - y64).max() <= 1e-4 * np.abs(y64).max()


def test_interleaved_transfer_converges_where_single_rows_cancel():
    """`program`'s transfer of an interleaved layer drives one row at a time (on a uniform
    drive). With zero-mean weights on a conductance baseline a row's differential output is a
    few percent of its cells' currents, below their float32 rounding relative to it: the probes
    converge relative to both polarities' currents, so the CPU kernel finishes (it used to give
    up and leave it to the slower XLA solver), and real inputs get float32-accurate currents."""
    from jaxbar.core import ir as par
    from jaxbar.core.ir import cpu_kernel as ir_cpu

    K, N, r = 576, 64, 3e-4
    rng = np.random.default_rng(8)
    W = rng.laplace(size=(K, N))
    W -= W.mean(axis=0)
    x = rng.uniform(0, 1, size=(16, K))
    cfg = CrossbarConfig.from_dict({"device": {"on_off_ratio": 10.0}, "parasitics": {
        "topology": "input_source", "r_row": r, "r_col": r, "interleaved": True}})
    p = jaxbar.program(jnp.asarray(W, jnp.float32), cfg)
    expected = par.PATH_KERNEL if ir_cpu.available() else par.PATH_TRANSFER
    np.testing.assert_array_equal(p.ir_info.path, expected)  # the kernel did not give up
    assert bool(np.all(p.ir_info.converged))
    y = np.asarray(jaxbar.matmul(jnp.asarray(x, jnp.float32), p, cfg), np.float64)
    with jax.enable_x64(True):
        c64 = cfg.replace(**{"ir_solver.tol": 1e-10, "ir_solver.precompute": False})
        y64 = np.asarray(jaxbar.analog_matmul(jnp.asarray(x), jnp.asarray(W), c64))
    assert np.max(np.abs(y - y64).max(axis=1) / np.abs(y64).max(axis=1)) <= 2e-5
