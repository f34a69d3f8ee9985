"""Networks on simulated crossbars: analogized ResNets, overrides, calibration, evaluation, CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbar import ConfigError, CrossbarConfig
from jaxbar.cli import main as cli
from jaxbar.nn import load_keras_resnet_cifar, save_params
from jaxbar.nn.analogize import analog_layers, analogize, program_model
from jaxbar.nn.calibrate import Calibration, apply_calibration, calibrate_model
from jaxbar.nn.models import ResNetV1Cifar, layer_names, named_layers
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.study.engine import accuracy_stats, evaluate

from .conftest import cifar_weights_path, host_devices_env


def forward(model, x, net, key=None):
    """One analog forward pass of `model` under `net` (a trial from `key`), compiled."""
    graphdef, state = nnx.split(analogize(model, net))

    @jax.jit
    def run(state, x, key):
        analog = nnx.merge(graphdef, state)
        program_model(analog, key)
        return analog(x)

    return run(state, jnp.asarray(x), key)


@pytest.fixture(scope="module")
def tiny():
    """A random ResNet-v1 of depth 8, width 4, and a few random images."""
    model = ResNetV1Cifar(8, width=4, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    return model, x


MAPPINGS = {
    "differential": {},
    "offset": {"mapping": {"scheme": "offset"}},
    "sliced": {"weights": {"bits": 8}, "mapping": {"slices": 4}},
    "partitioned_digital": {"array": {"rows": 20, "cols": 3},
                            "mapping": {"subtract": "digital"}},
}


@pytest.mark.parametrize("name", MAPPINGS)
def test_effects_off_reproduces_digital_logits(tiny, name):
    model, x = tiny
    net = NetworkConfig(crossbar=CrossbarConfig.from_dict(MAPPINGS[name]))
    digital = model(jnp.asarray(x))
    analog = forward(model, x, net)
    if name == "sliced":  # 8-bit weights: compare with the quantized digital network
        ref = _quantized_digital(model, x, 8)
    else:
        ref = digital
    np.testing.assert_allclose(analog, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def _quantized_digital(model, x, bits):
    """The digital network with every kernel quantized symmetrically to `bits` bits."""
    L = 2 ** (bits - 1) - 1
    q = nnx.clone(model)
    for layer in named_layers(q).values():
        k = layer.kernel[...]
        m = jnp.max(jnp.abs(k))
        layer.kernel[...] = jnp.round(k / m * L) / L * m
    return q(jnp.asarray(x))


def test_layer_overrides_and_errors(tiny):
    model, x = tiny
    names = layer_names(model)
    net = NetworkConfig.from_dict({
        "crossbar": {"device": {"programming_error": {"model": "independent", "sigma": 0.2}}},
        "layers": {"head.*": "digital", "stem.conv": {"device": {"programming_error": {
            "sigma": 0.0}}}}})
    layers = analog_layers(analogize(model, net))
    assert "head.dense" not in layers and names[1] in layers
    assert layers["stem.conv"][1].config.device.programming_error.sigma == 0.0
    assert layers[names[1]][1].config.device.programming_error.sigma == 0.2
    with pytest.raises(ConfigError, match=r"layers\['stem.\*'\]|layer"):
        NetworkConfig.from_dict({"layers": {"stem.*": {"adc": {"bits": -1}}}})


def test_trial_is_a_key(tiny):
    model, x = tiny
    net = NetworkConfig(crossbar=CrossbarConfig.from_dict(
        {"device": {"programming_error": {"model": "proportional", "sigma": 0.1}}}))
    a = forward(model, x, net, jax.random.key(1))
    b = forward(model, x, net, jax.random.key(1))
    c = forward(model, x, net, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_calibration_signs_ranges_and_file(tiny, tmp_path):
    model, x = tiny
    net = NetworkConfig.load("paper_baseline")
    cal = calibrate_model(analogize(model, net), x, batch_size=3)
    names = layer_names(model)
    assert set(cal.layers) == set(names)
    stem = cal.layers["stem.conv"]
    assert stem.input_range[0] < 0  # the first layer sees signed inputs
    relu_fed = cal.layers[names[1]]  # the first block's conv1 follows a ReLU
    assert relu_fed.input_range[0] == 0.0
    for c in cal.layers.values():
        assert len(c.adc_range) == 1 and c.adc_range[0][0] < c.adc_range[0][1]
    # The input range is the 99.99th percentile of |x| of the first layer's inputs.
    assert stem.input_range[1] == pytest.approx(np.percentile(np.abs(x), 99.99), rel=1e-6)
    cal.save(tmp_path / "cal.json")
    again = Calibration.load(tmp_path / "cal.json")
    assert again.layers == cal.layers
    analog = analogize(model, net)
    with pytest.raises(ConfigError, match="needs a calibrated ADC range"):
        program_model(analog, None)
    apply_calibration(analog, again)
    assert analog_layers(analog)["stem.conv"][1].config.adc.range == tuple(stem.adc_range[0])
    program_model(analog, None)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read calibration"):
        Calibration.load(tmp_path / "bad.json")


def test_evaluate_engine_strategies_agree(tiny):
    model, x = tiny
    labels = np.asarray(jnp.argmax(model(jnp.asarray(x)), -1))  # digital predictions
    net = NetworkConfig(crossbar=CrossbarConfig.from_dict(
        {"device": {"programming_error": {"model": "independent", "sigma": 0.05}}}))
    analog = analogize(model, net)
    keys = jax.random.split(jax.random.key(0), 3)
    r_map = evaluate(analog, x, labels, keys, batch_size=4, strategy="map", progress=False)
    r_vmap = evaluate(analog, x, labels, keys, batch_size=4, strategy="vmap", trial_chunk=2,
                      progress=False)
    np.testing.assert_array_equal(r_map.accuracies, r_vmap.accuracies)
    # Each trial's accuracy equals direct forward passes with that trial's programming.
    for k, acc in zip(keys, r_map.accuracies, strict=True):
        program_model(analog, k)
        hits = 0
        for i in range(2):
            logits = analog(jnp.asarray(x[4 * i:4 * i + 4]))
            hits += int((jnp.argmax(logits, -1) == labels[4 * i:4 * i + 4]).sum())
        assert acc == pytest.approx(hits / 6)
    assert evaluate(model, x, labels, progress=False).accuracies.tolist() == [1.0]


def test_accuracy_stats_t_interval():
    s = accuracy_stats([0.8, 0.82, 0.78, 0.81])
    # t(0.975, 3) = 3.182446; std = 0.017078
    assert s["mean"] == pytest.approx(0.8025)
    half = 3.182446 * np.std([0.8, 0.82, 0.78, 0.81], ddof=1) / 2
    assert s["ci95"] == pytest.approx((0.8025 - half, 0.8025 + half), rel=1e-5)


def test_real_resnet14_ideal_and_baseline(cifar_test_batch):
    x, labels = cifar_test_batch
    model = load_keras_resnet_cifar(cifar_weights_path(14))
    digital = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
    ideal = forward(model, x, "ideal")
    np.testing.assert_allclose(ideal, digital, rtol=1e-4, atol=1e-4 * float(
        jnp.abs(digital).max()))
    analog = analogize(model, "paper_baseline")
    calibrate_model(analog, x)
    program_model(analog, None)
    base = nnx.jit(lambda m, x: m(x))(analog, jnp.asarray(x))
    # 8-bit everything: predictions mostly unchanged, logits close but not identical.
    agree = np.mean(np.argmax(base, -1) == np.argmax(digital, -1))
    assert agree >= 0.9 and not np.allclose(base, digital, atol=1e-3)


def test_cli_evaluate_and_calibrate(tmp_path, cifar_data_dir):
    weights = str(cifar_weights_path(14))
    cal = tmp_path / "cal.json"
    cfg = tmp_path / "net.yaml"
    cfg.write_text("crossbar:\n  weights: {bits: 8}\n  inputs: {bits: 8}\n"
                   "  adc: {bits: 8, range: calibrated}\ncalibration: {samples: 20}\n")
    common = ["--model", "resnet14", "--weights", weights, "--data", str(cifar_data_dir),
              "--config", str(cfg), "--cache-dir", str(tmp_path / "cache")]
    assert cli(["calibrate", *common, "--out", str(cal)]) == 0
    out = tmp_path / "ev.json"
    assert cli(["evaluate", *common, "--calibration", str(cal), "--limit", "20", "--trials",
                "2", "--set", "device.programming_error={model: independent, sigma: 0.02}",
                "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("accuracy_mean", "accuracy_ci95", "accuracies", "n_images", "config",
                "seconds"):
        assert key in res
    assert res["n_images"] == 20 and len(res["accuracies"]) == 2
    assert res["config"]["crossbar"]["device"]["programming_error"]["sigma"] == 0.02
    lo, hi = res["accuracy_ci95"]
    assert lo <= res["accuracy_mean"] <= hi
    # Parameter files are accepted in place of Keras weights.
    params = tmp_path / "p.npz"
    save_params(params, load_keras_resnet_cifar(weights))
    mean = cifar_weights_path(14).with_name("x_train_mean.npy")
    assert cli(["evaluate", "--model", "resnet14", "--params", str(params), "--mean",
                str(mean), "--data", str(cifar_data_dir), "--config", "digital", "--limit", "20",
                "--cache-dir", str(tmp_path / "cache")]) == 0
    assert cli(["evaluate", *common[:4], "--data", "/nonexistent", "--config", "digital"]) == 2


def test_sigma_sweep_compiles_once(tiny):
    from jaxbar.study import engine, montecarlo

    model, x = tiny
    labels = np.zeros(len(x), np.int32)
    keys = jax.random.split(jax.random.key(0), 2)
    analogs = [analogize(model, NetworkConfig(crossbar=CrossbarConfig.from_dict(
        {"device": {"programming_error": {"model": "independent", "sigma": sigma}}})))
        for sigma in (0.0, 0.05, 0.3)]
    run = montecarlo.trial_runner(nnx.split(analogs[0])[0], engine.hit_counter(1),
                                  engine.default_strategy(), True, False)
    before = run._cache_size()
    accs = []
    for analog in analogs:
        r = evaluate(analog, x, labels, keys, batch_size=6, progress=False)
        accs.append(r.accuracies)
    assert run._cache_size() == before + 1  # one compilation for the whole sigma sweep
    assert not np.array_equal(accs[0], accs[2]) or accs[0].tolist() != [1.0, 1.0]


SHARDED_SCRIPT = """
import jax, numpy as np
from flax import nnx
from jaxbar import CrossbarConfig
from jaxbar.nn.analogize import analogize
from jaxbar.nn.models import ResNetV1Cifar
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.study.engine import evaluate
model = ResNetV1Cifar(8, width=4, rngs=nnx.Rngs(0))
x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
labels = np.asarray(model(x).argmax(-1))
net = NetworkConfig(crossbar=CrossbarConfig.from_dict(
    {"device": {"programming_error": {"model": "independent", "sigma": 0.05}}}))
keys = jax.random.split(jax.random.key(0), 6)
r = evaluate(analogize(model, net), x, labels, keys, batch_size=3, progress=False,
             shard={shard})
print(jax.device_count(), list(map(float, r.accuracies)))
"""


@pytest.mark.parametrize("strategy", ["map"])
def test_sharded_trials_match_single_device(strategy):
    import subprocess
    import sys

    env = host_devices_env(4)
    outs = []
    for shard in (True, False):
        p = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.replace("{shard}", str(shard))],
                           env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(p.stdout.strip().splitlines()[-1])
    assert outs[0].startswith("4 ")
    sharded, single = (json.loads(o.split(" ", 1)[1]) for o in outs)
    assert sharded == single
