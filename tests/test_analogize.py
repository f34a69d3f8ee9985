"""`jaxbar.analogize`: any Flax NNX model on crossbars (layers, keys, calibration, engine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbar
from jaxbar import CrossbarConfig
from jaxbar.config import ConfigError
from jaxbar.nn.analogize import analog_layers, layer_id

IDEAL = CrossbarConfig.ideal()
NOISY = IDEAL.replace(**{"device.programming_error": {"model": "proportional", "sigma": 0.1}})


def _x(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


class Wrap(nnx.Module):
    """A one-layer model, so the layer's path is `layer`."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


LAYERS = {
    "linear": (lambda r: nnx.Linear(12, 7, rngs=r), (5, 12)),
    "linear_3d_input": (lambda r: nnx.Linear(12, 7, rngs=r), (2, 3, 12)),
    "linear_general": (lambda r: nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=r),
                       (6, 3, 4)),
    "linear_general_first_axis": (lambda r: nnx.LinearGeneral(3, (2, 5), axis=1, rngs=r),
                                  (6, 3, 4)),
    "linear_general_batch": (lambda r: nnx.LinearGeneral(4, 5, axis=-1, batch_axis={0: 3},
                                                         rngs=r), (3, 6, 4)),
    "einsum": (lambda r: nnx.Einsum("bd,dh->bh", (10, 6), (6,), rngs=r), (4, 10)),
    "einsum_heads": (lambda r: nnx.Einsum("btd,ndh->btnh", (2, 8, 3), (2, 3), rngs=r),
                     (2, 5, 8)),
    "einsum_group": (lambda r: nnx.Einsum("bnd,ndh->bhn", (3, 4, 5), rngs=r), (2, 3, 4)),
    "einsum_ellipsis": (lambda r: nnx.Einsum("...d,dh->...h", (6, 3), rngs=r), (2, 3, 6)),
    "conv2d_same": (lambda r: nnx.Conv(3, 5, (3, 3), rngs=r), (2, 7, 7, 3)),
    "conv2d_strided_valid": (lambda r: nnx.Conv(3, 4, (3, 2), strides=(2, 1), padding="VALID",
                                                rngs=r), (2, 9, 8, 3)),
    "conv2d_explicit_dilated": (lambda r: nnx.Conv(2, 4, (3, 3), kernel_dilation=(2, 1),
                                                   padding=((1, 2), (0, 1)), rngs=r),
                                (1, 9, 6, 2)),
    "conv2d_grouped": (lambda r: nnx.Conv(6, 4, (3, 3), feature_group_count=2, rngs=r),
                       (2, 6, 6, 6)),
    "conv2d_depthwise": (lambda r: nnx.Conv(4, 8, (3, 3), feature_group_count=4, rngs=r),
                         (2, 5, 5, 4)),
    "conv1d": (lambda r: nnx.Conv(3, 5, 4, strides=2, rngs=r), (2, 11, 3)),
    "conv1d_causal_dilated": (lambda r: nnx.Conv(2, 3, 3, kernel_dilation=2, padding="CAUSAL",
                                                 rngs=r), (2, 10, 2)),
    "conv_masked": (lambda r: nnx.Conv(2, 3, (3, 3), mask=jnp.tril(jnp.ones((3, 3, 2, 3)), -1)
                                       .astype(jnp.float32), rngs=r), (1, 5, 5, 2)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_ideal_config_equals_digital(name):
    make, shape = LAYERS[name]
    model = Wrap(make(nnx.Rngs(0)))
    x = _x(shape)
    analog = jaxbar.analogize(model, "ideal")
    assert list(analog_layers(analog)) == ["layer"]
    call = nnx.jit(lambda m, x: m(x))
    want, got = call(model, x), call(analog, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.abs(want).max()), rtol=1e-5)


@pytest.mark.parametrize("name", ["conv2d_grouped", "einsum_group", "linear_general_batch"])
def test_groups_are_separate_matrices_with_their_own_draws(name):
    """Every group is its own matrix: errors are drawn per group (not one shared draw)."""
    make, shape = LAYERS[name]
    model = Wrap(make(nnx.Rngs(0)))
    model.layer.kernel[...] = jnp.ones_like(model.layer.kernel[...])
    analog = jaxbar.analogize(model, NOISY)
    jaxbar.program_model(analog, jax.random.key(3))
    _, op = analog_layers(analog)["layer"]
    g = np.asarray(op.conductances.get_value().g)
    assert g.shape[0] > 1
    assert not np.allclose(g[0], g[1])


def test_dense_layer_draws_as_program_at_time():
    """The layer at `path` uses `program_at_time(W, cfg, fold_in(split(key)[0], layer_id))`."""
    model = Wrap(nnx.Linear(20, 6, use_bias=False, rngs=nnx.Rngs(0)))
    cfg = CrossbarConfig.paper_baseline().replace(**{
        "device.programming_error": {"model": "proportional", "sigma": 0.05},
        "inputs.range": (-3.0, 3.0), "adc.range": (-20.0, 20.0)})
    x = _x((8, 20))
    analog = jaxbar.analogize(model, cfg)
    key = jax.random.key(7)
    jaxbar.program_model(analog, key)
    k_prog = jax.random.fold_in(jax.random.split(key)[0], layer_id("layer"))
    prog = jaxbar.program_at_time(model.layer.kernel[...], cfg, k_prog)
    np.testing.assert_array_equal(analog(x), jaxbar.matmul(x, prog, cfg))


def test_error_statistics_match_analog_matmul():
    model = Wrap(nnx.Linear(64, 16, use_bias=False, rngs=nnx.Rngs(0)))
    W = model.layer.kernel[...]
    x = _x((32, 64))
    analog = jaxbar.analogize(model, NOISY)
    keys = jax.random.split(jax.random.key(0), 64)
    ys = jaxbar.monte_carlo(analog, keys, lambda m, x: m(x), x, progress=False)
    ref = jax.vmap(lambda k: jaxbar.analog_matmul(x, W, NOISY, k))(
        jax.random.split(jax.random.key(1), 64))
    exact = np.asarray(x @ W)
    e1, e2 = np.std(ys - exact), np.std(np.asarray(ref) - exact)
    assert e1 > 0.01 * np.std(exact)
    assert abs(e1 / e2 - 1) < 0.1


def test_keys_decide_the_trial_and_the_model_is_unchanged():
    model = Wrap(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
    kernel = np.asarray(model.layer.kernel[...])
    x = _x((2, 6, 6, 3))
    digital = model(x)
    analog = jaxbar.analogize(model, NOISY)
    jaxbar.program_model(analog, jax.random.key(1))
    a = analog(x)
    jaxbar.program_model(analog, jax.random.key(1))
    np.testing.assert_array_equal(analog(x), a)
    jaxbar.program_model(analog, jax.random.key(2))
    assert not np.allclose(analog(x), a)
    assert model.layer.conv_general_dilated is jax.lax.conv_general_dilated
    np.testing.assert_array_equal(model.layer.kernel[...], kernel)
    np.testing.assert_array_equal(model(x), digital)


def test_read_noise_advances_per_call_and_repeats_per_key():
    model = Wrap(nnx.Linear(16, 4, rngs=nnx.Rngs(0)))
    cfg = IDEAL.replace(**{"device.read_noise": {"model": "independent", "sigma": 0.05}})
    analog = jaxbar.analogize(model, cfg)
    x = _x((3, 16))
    jaxbar.program_model(analog, jax.random.key(0))
    y1, y2 = analog(x), analog(x)
    assert not np.allclose(y1, y2)
    jaxbar.program_model(analog, jax.random.key(0))
    np.testing.assert_array_equal(analog(x), y1)
    # Under a scan the stream advances the same way as in a Python loop.
    jaxbar.program_model(analog, jax.random.key(0))
    ys = jax.jit(lambda m, xs: jaxbar.map_batches(m, lambda mm, b: mm(b), xs))(
        analog, jnp.stack([x, x]))
    np.testing.assert_allclose(ys[0], y1, atol=1e-6)
    np.testing.assert_allclose(ys[1], y2, atol=1e-6)


def test_unprogrammed_and_keyless_errors():
    model = Wrap(nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
    analog = jaxbar.analogize(model, NOISY)
    with pytest.raises(ConfigError, match="'layer' is not programmed.*program_model"):
        analog(_x((2, 8)))
    with pytest.raises(ConfigError, match="'layer' draws random errors"):
        jaxbar.program_model(analog, None)
    ideal = jaxbar.analogize(model, "ideal")
    jaxbar.program_model(ideal, None)  # nothing random: allowed
    np.testing.assert_allclose(ideal(_x((2, 8))), model(_x((2, 8))), atol=1e-5)
    calibrated = jaxbar.analogize(model, "paper_baseline")
    with pytest.raises(ConfigError, match="'layer' needs a calibrated ADC range"):
        jaxbar.program_model(calibrated, jax.random.key(0))


def test_non_finite_weights_name_the_layer():
    model = Wrap(nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
    model.layer.kernel[...] = model.layer.kernel[...].at[2, 1].set(jnp.nan)
    analog = jaxbar.analogize(model, "ideal")
    with pytest.raises(ConfigError, match="'layer'.*not all finite"):
        jaxbar.program_model(analog, None)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.dense = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.dense(self.norm(x))


class Deep(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(rngs), Block(rngs)])
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_patterns_match_graph_paths():
    model = Deep(nnx.Rngs(0))
    net = {"crossbar": IDEAL.to_dict(), "layers": {"head": "digital",
                                                   "blocks.1.*": {"adc": {"bits": 0}}}}
    analog = jaxbar.analogize(model, net)
    assert sorted(analog_layers(analog)) == ["blocks.0.dense", "blocks.1.dense"]
    assert analog.head.dot_general is jax.lax.dot_general
    with pytest.raises(ConfigError, match=r"'blocks\.2\.dense' matches no layer.*blocks\.0\.dense"):
        jaxbar.analogize(model, {"crossbar": IDEAL.to_dict(),
                                 "layers": {"blocks.2.dense": "digital"}})
    with pytest.raises(ConfigError, match=r"blocks\.0\.norm \(LayerNorm\)"):
        jaxbar.analogize(model, {"crossbar": IDEAL.to_dict(),
                                 "layers": {"blocks.0.norm": {"adc": {"bits": 0}}}})


def test_unmappable_layers_are_named():
    class E(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Einsum("ab,cd->abcd", (4, 3), rngs=rngs)

    with pytest.raises(ConfigError, match="'mix'.*contracts no kernel axis"):
        jaxbar.analogize(E(nnx.Rngs(0)), "ideal")

    class C3(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 2, (2, 2, 2), rngs=rngs)

    with pytest.raises(ConfigError, match="'conv'.*1-D and 2-D"):
        jaxbar.analogize(C3(nnx.Rngs(0)), "ideal")


def test_attention_and_lstm_keep_activation_products_digital():
    attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                  rngs=nnx.Rngs(0))
    x = _x((2, 5, 8))
    analog = jaxbar.analogize(attn, "ideal")
    assert sorted(analog_layers(analog)) == ["key", "out", "query", "value"]
    call = nnx.jit(lambda m, x: m(x))  # compiled: op by op, the scan over steps is slow
    np.testing.assert_allclose(call(analog, x), call(attn, x), atol=2e-5)
    rnn = nnx.RNN(nnx.LSTMCell(4, 6, rngs=nnx.Rngs(0)))
    xs = _x((3, 7, 4))
    analog = jaxbar.analogize(rnn, "ideal")
    assert len(analog_layers(analog)) >= 2
    np.testing.assert_allclose(call(analog, xs), call(rnn, xs), atol=2e-5)


def test_gradients_flow():
    model = Wrap(nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)))
    x = _x((2, 5, 5, 2))
    loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
    grad = nnx.jit(nnx.grad(loss))
    g_digital = grad(model)
    analog = jaxbar.analogize(model, "ideal")
    jaxbar.program_model(analog, None, live=True)
    g_ideal = grad(analog)
    np.testing.assert_allclose(g_ideal["layer"]["kernel"][...],
                               g_digital["layer"]["kernel"][...], rtol=1e-4, atol=1e-4)
    noisy = jaxbar.analogize(model, NOISY)
    jaxbar.program_model(noisy, jax.random.key(0), live=True)
    g = grad(noisy)["layer"]["kernel"][...]
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # Stored conductances: gradients reach the inputs.
    jaxbar.program_model(noisy, jax.random.key(0))
    gx = nnx.jit(lambda m, x: jax.grad(lambda x: jnp.sum(m(x) ** 2))(x))(noisy, x)
    assert np.all(np.isfinite(gx)) and np.abs(gx).max() > 0


def test_calibrate_model_against_direct_calibration():
    model = Deep(nnx.Rngs(0))
    x = _x((40, 8))
    analog = jaxbar.analogize(model, "paper_baseline")
    result = jaxbar.calibrate_model(analog, x, batch_size=16)
    # The head's inputs, computed digitally, set its ranges.
    h = model.blocks[1](model.blocks[0](x))
    cfg = CrossbarConfig.paper_baseline()
    want = jaxbar.calibration.calibrate(h, model.head.kernel[...], cfg)
    head = result.layers["head"]
    np.testing.assert_allclose(head.input_range, want.inputs.range, rtol=1e-5)
    np.testing.assert_allclose(head.adc_range[0], want.adc.range, rtol=1e-4)
    assert analog_layers(analog)["head"][1].config.inputs.range == head.input_range
    jaxbar.program_model(analog, None)
    rel = jnp.linalg.norm(analog(x) - model(x)) / jnp.linalg.norm(model(x))
    assert rel < 0.05


def test_calibrate_model_with_a_compiled_forward_and_after_jit():
    model = Deep(nnx.Rngs(0))
    x = _x((40, 8))
    eager = jaxbar.analogize(model, "paper_baseline")
    want = jaxbar.calibrate_model(eager, x, batch_size=16)
    compiled = jaxbar.analogize(model, "paper_baseline")
    # Several layers profiled in one compiled program: samples arrive by callbacks. The
    # compiled call hands the state back as arrays, the configs' numbers included.
    got = jaxbar.calibrate_model(compiled, x, batch_size=16,
                                 forward=nnx.jit(lambda m, b: m(b)))
    assert isinstance(analog_layers(compiled)["head"][1].config.device.on_off_ratio, float)
    assert set(got.layers) == set(want.layers) == {"blocks.0.dense", "blocks.1.dense", "head"}
    for path, w in want.layers.items():
        np.testing.assert_allclose(got.layers[path].input_range, w.input_range, rtol=1e-5)
        np.testing.assert_allclose(got.layers[path].adc_range, w.adc_range, rtol=1e-5)
    assert got.meta["images"] == 40


def test_monte_carlo_equals_a_loop_and_compiles_once():
    model = Deep(nnx.Rngs(0))
    x = _x((6, 8))
    analog = jaxbar.analogize(model, NOISY)
    traces = []

    def fn(m, x):
        traces.append(1)
        return {"y": m(x), "norm": jnp.linalg.norm(m(x))}

    keys = jax.random.split(jax.random.key(0), 5)
    out = jaxbar.monte_carlo(analog, keys, fn, x, chunk=2, progress=False)
    assert out["y"].shape == (5, 6, 2) and out["norm"].shape == (5,)
    assert len(traces) == 1
    for i in (0, 4):
        jaxbar.program_model(analog, keys[i])
        np.testing.assert_allclose(out["y"][i], analog(x), atol=1e-5)
    vm = jaxbar.monte_carlo(analog, keys, fn, x, strategy="vmap", progress=False)
    np.testing.assert_allclose(vm["y"], out["y"], atol=1e-5)


def test_stack_batches_feeds_map_batches_from_any_iterable():
    model = Wrap(nnx.Linear(8, 3, rngs=nnx.Rngs(0)))
    analog = jaxbar.analogize(model, NOISY)
    batches = (np.full((4, 8), i, np.float32) for i in range(3))  # a generator
    stacked = jaxbar.stack_batches(batches)
    assert stacked.shape == (3, 4, 8)
    out = jaxbar.monte_carlo(analog, jax.random.split(jax.random.key(0), 2),
                             lambda m, xs: jaxbar.map_batches(m, lambda mm, b: mm(b), xs),
                             stacked, progress=False)
    assert out.shape == (2, 3, 4, 3)
    jaxbar.program_model(analog, jax.random.split(jax.random.key(0), 2)[1])
    np.testing.assert_allclose(out[1, 2], analog(stacked[2]), atol=1e-5)
    with pytest.raises(ConfigError, match="batch 1 differs"):
        jaxbar.stack_batches([np.zeros((4, 8)), np.zeros((3, 8))])


def test_monte_carlo_over_batches_equals_a_python_loop():
    """`batches=` takes any iterable (a generator of (x, y) pairs); per trial every batch
    runs on one programming with the read-noise stream advancing, as in a Python loop."""
    cfg = NOISY.replace(**{"device.read_noise": {"model": "independent", "sigma": 0.05}})
    analog = jaxbar.analogize(Deep(nnx.Rngs(0)), cfg)
    xs, ys = np.asarray(_x((3, 5, 8))), np.asarray(_x((3, 5, 2), seed=2))

    def mse(m, batch, scale):
        x, y = batch
        return scale * jnp.mean((m(x) - y) ** 2)

    keys = jax.random.split(jax.random.key(3), 3)
    pairs = ((x, y) for x, y in zip(xs, ys, strict=True))  # a generator
    out = jaxbar.monte_carlo(analog, keys, mse, 2.0, batches=pairs, progress=False)
    assert out.shape == (3, 3)  # (trials, batches)
    for t, key in enumerate(keys):
        jaxbar.program_model(analog, key)
        loop = [float(mse(analog, (x, y), 2.0)) for x, y in zip(xs, ys, strict=True)]
        np.testing.assert_allclose(out[t], loop, rtol=1e-5)
    assert len({float(v) for v in out[:, 0]}) == 3  # trials differ
    assert out[0, 0] != out[0, 1] or not np.allclose(xs[0], xs[1])
    with pytest.raises(ConfigError, match="batch 1 differs"):
        jaxbar.monte_carlo(analog, keys, mse, 1.0, batches=[(xs[0], ys[0]), (xs[0][:2], ys[0])])


def test_evaluate_is_monte_carlo_with_a_hit_counter():
    """The CLI's accuracy equals a user's own top-1 count through `monte_carlo`."""
    from jaxbar.study.engine import evaluate

    model = Deep(nnx.Rngs(0))
    analog = jaxbar.analogize(model, NOISY.replace(**{"device.programming_error.sigma": 0.5}))
    x = np.asarray(_x((14, 8)))
    y = np.asarray(model(x).argmax(-1))
    keys = jax.random.split(jax.random.key(0), 4)
    res = evaluate(analog, x, y, keys, batch_size=7, progress=False)
    hits = jaxbar.monte_carlo(
        analog, keys, lambda m, b: jnp.sum(jnp.argmax(m(b[0]), -1) == b[1]),
        batches=zip(x.reshape(2, 7, 8), y.reshape(2, 7), strict=True),
        progress=False)
    np.testing.assert_array_equal(np.round(res.accuracies * 14), hits.sum(1))
    assert res.accuracies.min() < 1.0  # the errors change predictions
