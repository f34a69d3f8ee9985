"""Hardware-aware fine-tuning: the step, gradients through quantizers, checkpoints, ranges, CLI."""

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbar import CrossbarConfig
from jaxbar.config import ConfigError
from jaxbar.core import mapping, mvm
from jaxbar.nn.analogize import (
    analog_layers,
    analogize,
    attach_learned_ranges,
    commit_learned_ranges,
    learned_ranges,
    program_model,
)
from jaxbar.nn.models import batch_norm, conv, dense
from jaxbar.nn.ranges import init_ranges, range_spec, range_values
from jaxbar.train import (
    CheckpointError,
    Trainer,
    TrainOptions,
    batch_indices,
    clip_kernel,
    random_crop_flip,
    read_log,
    restore_checkpoint,
    save_checkpoint,
)

from .conftest import require_shared


class TinyNet(nnx.Module):
    """conv3x3/2 - BN - ReLU - global average - dense: two analog layers, quick to compile."""

    def __init__(self, rngs: nnx.Rngs):
        self.input_shape = (8, 8, 3)
        self.conv = conv(3, 6, 3, strides=2, rngs=rngs)
        self.bn = batch_norm(6)
        self.dense = dense(6, 4, rngs=rngs)

    def __call__(self, x, *, train=False):
        h = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.dense(h.mean(axis=(1, 2)))


BASE = {"weights": {"bits": 8}, "inputs": {"bits": 8}, "adc": {"bits": 8, "range": [-1.0, 1.0]},
        "device": {"on_off_ratio": 100.0,
                   "programming_error": {"model": "independent", "sigma": 0.05}}}


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, 16 images of 4 classes, and the model on crossbars with fitting ranges (a
    sign-magnitude ADC on the convolution, an asymmetric one on the dense layer)."""
    model = TinyNet(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=16).astype(np.int32)
    analog = analogize(model, {"crossbar": BASE, "layers": {
        "conv": {"inputs": {"range": [-3.5, 3.5]}, "adc": {"range": [-4.0, 4.0]}},
        "dense": {"inputs": {"range": [0.0, 2.0]}, "adc": {"range": [-2.0, 3.0]}}}})
    return model, x, y, analog


@pytest.fixture(scope="module")
def trainer(tiny):
    return Trainer(tiny[3], optax.adam(3e-2),
                   options=TrainOptions(batch_size=8, augment=False, batch_stats="update"))


def _params(state):
    return [np.asarray(v) for v in jax.tree.leaves(state.params)]


def test_one_step_reduces_the_loss_and_compiles_once(tiny, trainer):
    _, x, y, _ = tiny
    s0 = trainer.init_state()
    s1, m0 = trainer.step(s0, x[:8], y[:8])
    # The same noise sample (step 0) with the updated parameters: a lower loss.
    _, m1 = trainer.step(dataclasses.replace(s1, step=s0.step), x[:8], y[:8])
    assert np.isfinite(float(m0["loss"])) and float(m1["loss"]) < float(m0["loss"])
    assert int(s1.step) == 1 and float(m0["grad_norm"]) > 0
    # Batch statistics are updated (batch_stats="update").
    assert not np.allclose(s1.batch_stats["bn"]["mean"][...], s0.batch_stats["bn"]["mean"][...])
    s2, _ = trainer.step(s1, x[8:], y[8:])
    assert trainer.traces == 1  # one compilation for every batch
    # A new trial per step: other programming errors give another loss for the same batch.
    _, a = trainer.step(s0, x[:8], y[:8])
    _, b = trainer.step(dataclasses.replace(s0, step=s0.step + 1), x[:8], y[:8])
    assert float(a["loss"]) == float(m0["loss"]) and float(b["loss"]) != float(a["loss"])


def test_frozen_batch_stats_and_weight_clipping(tiny):
    model, x, y, analog = tiny
    tr = Trainer(analog, optax.sgd(0.1),
                 options=TrainOptions(batch_size=8, augment=False, batch_stats="frozen",
                                      weight_clip=1.5))
    s0 = tr.init_state()
    s1, _ = tr.step(s0, x[:8], y[:8])
    for a, b in zip(jax.tree.leaves(s0.batch_stats), jax.tree.leaves(s1.batch_stats),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    m = tr.model(s1)
    for name in ("conv", "dense"):  # clipped at ±1.5·std of the updated kernel
        W = np.abs(np.asarray(getattr(m, name).kernel[...]))
        assert np.sum(W == W.max()) >= 2 and W.max() < 1.5 * np.abs(
            np.asarray(getattr(model, name).kernel[...])).max()
    W = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 4, 5)), jnp.float32)
    np.testing.assert_array_equal(clip_kernel(W, "mapped"), W)  # percentile 100: no-op
    w95 = clip_kernel(W, "mapped", 95.0)
    assert float(jnp.abs(w95).max()) < float(jnp.abs(W).max())
    with pytest.raises(ConfigError, match="weight_clip"):
        TrainOptions(weight_clip=-1)
    with pytest.raises(ConfigError, match="batch_stats"):
        TrainOptions(batch_stats="running")


def test_ir_drop_option_keeps_or_strips_parasitics(tiny):
    model, _, _, _ = tiny
    wired = analogize(model, {"crossbar": dict(BASE, parasitics={
        "topology": "input_source", "r_col": 1e-4})})
    keep = Trainer(wired, optax.sgd(0.1), options=TrainOptions(ir_drop=True))
    drop = Trainer(wired, optax.sgd(0.1), options=TrainOptions(ir_drop=False))

    def topology(m):
        return analog_layers(m)["conv"][1].config.parasitics.topology

    s = drop.init_state()
    assert topology(keep.training_model(keep.init_state())) == "input_source"
    assert topology(drop.training_model(s)) == "none"
    assert topology(drop.model(s)) == "input_source"  # evaluated with it
    assert topology(wired) == "input_source"


QUANTIZERS = {
    "weights": {"weights": {"bits": 4}},
    "weight_slices": {"weights": {"bits": 8}, "mapping": {"slices": 2}},
    "dac": {"inputs": {"bits": 4, "range": [-2.0, 2.0]}},
    "dac_bit_serial": {"inputs": {"bits": 5, "range": [-2.0, 2.0], "bit_serial": True}},
    "adc": {"adc": {"bits": 4, "range": [-40.0, 40.0]}},
    "offset_adc": {"mapping": {"scheme": "offset"}, "weights": {"bits": 6},
                   "adc": {"bits": 5, "range": [0.0, 60.0]}},
}


def _fn(cfg, x, W, c, key=None):
    return jnp.sum(c * mvm.analog_matmul(x, W, cfg, key))


_grad = jax.jit(jax.grad(_fn, argnums=(1, 2)), static_argnums=0)  # one compilation per config


@pytest.mark.parametrize("name", QUANTIZERS)
def test_gradients_flow_through_each_quantizer(name):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, size=(5, 12)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(12, 7)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    cfg = CrossbarConfig.from_dict(QUANTIZERS[name])
    gx, gW = _grad(cfg, x, W, c)
    for g in (gx, gW):
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # Straight through: with y = q_adc(x_q @ W_q), inside the ranges dL/dx = c·W_q^T and
    # dL/dW = x_q^T·c (but for the largest |W|, which sets w_max and so the weight grid).
    eye = jnp.eye(12, dtype=jnp.float32)
    W_q = mvm.analog_matmul(eye, W, cfg.replace(**{"inputs.bits": 0, "inputs.bit_serial": False,
                                                   "adc.bits": 0, "adc.range": None}))
    x_q = mvm.analog_matmul(x, eye, cfg.replace(**{"weights.bits": 0, "mapping.slices": 1,
                                                   "adc.bits": 0, "adc.range": None}))
    np.testing.assert_allclose(gx, c @ W_q.T, rtol=1e-4, atol=1e-4)
    # Leave out weights with a zero slice (their gradient is split between the two cells).
    keep = np.abs(W) < np.abs(W).max()
    if cfg.mapping.scheme == "differential":
        w, _ = mapping.clip_and_scale(W, cfg.weights.clip_percentile)
        keep &= np.all(np.asarray(mapping.slice_weights(w, cfg)) != 0, axis=0)
    assert keep.mean() > 0.5
    np.testing.assert_allclose(np.asarray(gW)[keep], np.asarray(x_q.T @ c)[keep], rtol=1e-4,
                               atol=1e-4)


def test_differential_zero_bin_weights_get_a_gradient():
    W = jnp.asarray([[0.001], [1.0]], jnp.float32)
    cfg = CrossbarConfig.from_dict({"weights": {"bits": 4}})
    _, g = _grad(cfg, jnp.ones((1, 2)), W, jnp.ones((1, 1)))
    assert float(g[0, 0]) == pytest.approx(1.0)


def test_gradients_match_finite_differences_where_smooth():
    """Programming error, read noise and the w_max scaling are smooth: compare with FD."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(-1, 1, size=(6, 16)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    cfg = CrossbarConfig.from_dict({"device": {
        "on_off_ratio": 10.0,  # g >= 0.1 with σ = 0.01: no clipping at zero
        "programming_error": {"model": "independent", "sigma": 0.01},
        "read_noise": {"model": "proportional", "sigma": 0.05}}})
    key = jax.random.key(3)
    f = jax.jit(lambda x, W: _fn(cfg, x, W, c, key))
    gx, gW = jax.grad(f, argnums=(0, 1))(x, W)
    for arg, g in ((0, gx), (1, gW)):
        for d in range(3):
            v = jnp.asarray(np.random.default_rng(10 + d).normal(size=g.shape), jnp.float32)
            eps = 1e-2
            args_p, args_m = [x, W], [x, W]
            args_p[arg] = args_p[arg] + eps * v
            args_m[arg] = args_m[arg] - eps * v
            fd = (float(f(*args_p)) - float(f(*args_m))) / (2 * eps)
            assert float(jnp.vdot(g, v)) == pytest.approx(fd, rel=2e-2, abs=2e-3)


@pytest.fixture(scope="module")
def range_trainer(tiny):
    """Learnable ranges with an aggressive plain-SGD rate on them."""
    return Trainer(tiny[3], optax.sgd(0.05), range_optimizer=optax.sgd(50.0),
                   options=TrainOptions(batch_size=8, augment=False, learn_ranges=True))


def test_gradients_reach_every_parameter_and_range(tiny, range_trainer):
    _, x, y, _ = tiny
    s0 = range_trainer.init_state()
    s1, m = range_trainer.step(s0, x[:8], y[:8])
    assert np.isfinite(float(m["grad_norm"]))
    # Plain SGD moves a leaf exactly where its gradient is non-zero.
    before = jax.tree_util.tree_leaves_with_path((s0.params, s0.ranges))
    after = jax.tree.leaves((s1.params, s1.ranges))
    assert len(before) == len(after) > 6
    for (path, a), b in zip(before, after, strict=True):
        assert np.all(np.isfinite(b))
        if "'conv'" in str(path) and "adc_center" in str(path):  # sign-magnitude: stays 0
            assert np.all(np.asarray(b) == 0)
        else:
            assert not np.array_equal(a, b), path


EQUIVALENCE = {
    "bit_serial_per_slice_adc": {"inputs": {"bits": 5, "range": [0.0, 2.0], "bit_serial": True,
                                            "slice_bits": 2},
                                 "adc": {"bits": 6, "range": [-3.0, 3.0],
                                         "per_input_slice": True}},
    "offset_sliced_partitioned": {"array": {"rows": 10, "cols": 3}, "weights": {"bits": 8},
                                  "mapping": {"scheme": "offset", "slices": 2},
                                  "inputs": {"bits": 6, "range": [0.0, 2.0]},
                                  "adc": {"bits": 7, "range": [[0.0, 9.0], [0.0, 12.0]]}},
    "digital_subtract_unsigned_adc": {"mapping": {"subtract": "digital"},
                                      "inputs": {"bits": 4, "range": [-2.0, 2.0]},
                                      "adc": {"bits": 6, "range": [0.0, 8.0]}},
}


class ConvDense(nnx.Module):
    def __init__(self, kernel, dense_kernel):
        self.c = conv(2, 4, 3, use_bias=False, rngs=nnx.Rngs(0))
        self.c.kernel[...] = kernel
        self.d = nnx.Linear(18, 4, use_bias=False, rngs=nnx.Rngs(0))
        self.d.kernel[...] = dense_kernel

    def __call__(self, x):
        return self.c(x), self.d(x.reshape(-1, 50)[:, :18])


@pytest.mark.parametrize("name", EQUIVALENCE)
def test_learned_ranges_path_equals_the_core(name):
    """Conv and dense layers with their ranges as parameters compute what the core computes."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(0, 2, size=(3, 5, 5, 2)), jnp.float32)
    model = ConvDense(jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                      jnp.asarray(rng.normal(size=(18, 4)), jnp.float32))
    core = analogize(model, CrossbarConfig.from_dict(EQUIVALENCE[name]))
    learned = nnx.clone(core)
    attach_learned_ranges(learned)
    assert analog_layers(learned)["c"][1].ranges is not None
    (rc, rd), (gc, gd) = jax.jit(lambda x: (core(x), learned(x)))(x)
    for ref, got in ((rc, gc), (rd, gd)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_learned_ranges_start_at_the_config_and_stay_valid(tiny, range_trainer):
    model, x, y, analog = tiny
    learned = nnx.clone(analog)
    attach_learned_ranges(learned)
    key = jax.random.key(5)
    program_model(analog, key, live=True)
    program_model(learned, key, live=True)
    # At their initial values the learnable ranges compute what the core computes.
    ref, got = jax.jit(lambda x: (analog(x), learned(x)))(jnp.asarray(x))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    # Aggressive range updates keep lo < hi; the result is a valid config and calibration.
    state = range_trainer.init_state()
    for i in range(4):
        j = 8 * (i % 2)
        state, m = range_trainer.step(state, x[j:j + 8], y[j:j + 8])
        assert np.isfinite(float(m["loss"]))
    trained = range_trainer.training_model(state)
    ranges = learned_ranges(trained)
    assert set(ranges) == {"conv", "dense"}
    moved = False
    for path, (inp, adc) in ranges.items():
        assert inp[0] < inp[1] and all(lo < hi for lo, hi in adc)
        moved |= not np.isclose(adc[0][1], analog_layers(analog)[path][1].config.adc.ranges[0][1])
    assert moved
    cfg = analog_layers(analog)["dense"][1].config
    spec = range_spec(cfg, 6, 4)
    assert init_ranges(cfg, 6, 4)["adc_center"].shape == (1,)
    extreme = {"input_log_max": jnp.asarray(-500.0), "adc_log_width": jnp.asarray([-500.0]),
               "adc_center": jnp.asarray([1e30])}
    m_in, lo, hi = range_values(extreme, dataclasses.replace(spec, symmetric=(False,)))
    assert float(m_in) > 0 and float(lo[0]) < float(hi[0])
    commit_learned_ranges(trained)  # constructing the configs validates them
    committed = {p: op.config for p, (_, op) in analog_layers(trained).items()}
    assert committed["conv"].inputs.range[0] < committed["conv"].inputs.range[1]
    cal = range_trainer.calibration(state)
    assert set(cal.layers) == {"conv", "dense"}
    assert cal.layers["conv"].input_range == committed["conv"].inputs.range
    assert cal.layers["dense"].adc_range[0] == committed["dense"].adc.range
    evaluated = analog_layers(range_trainer.model(state))
    assert evaluated["dense"][1].config.adc.range == committed["dense"].adc.range


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tiny, trainer, tmp_path):
    _, x, y, _ = tiny
    full = trainer.fit(x, y, epochs=2, run_dir=tmp_path / "a", progress=False, log_every=1)
    assert int(full.step) == 4
    part = trainer.fit(x, y, epochs=2, run_dir=tmp_path / "b", stop_at=1, progress=False,
                       log_every=1, checkpoint_every=1)
    assert int(part.step) == 1
    # A fresh trainer (a new process would build one) resumes from the checkpoint.
    again = Trainer(tiny[3], optax.adam(3e-2), options=trainer.options)
    resumed = again.fit(x, y, epochs=2, run_dir=tmp_path / "b", progress=False, log_every=1)
    assert int(resumed.step) == 4
    for a, b in zip(_params(full), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(resumed.opt_state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    log_a, log_b = read_log(tmp_path / "a" / "log.jsonl"), read_log(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    # Checkpoints must fit: another optimizer state does not restore.
    other = Trainer(tiny[3], optax.sgd(0.1), options=trainer.options)
    with pytest.raises(CheckpointError):
        other.restore(tmp_path / "b")


def test_checkpoint_files_roundtrip_and_prune(tmp_path):
    tree = {"a": jnp.arange(3.0), "b": (jnp.zeros((2, 2), jnp.int32), jnp.ones(()))}
    for s in range(4):
        save_checkpoint(tmp_path, s, tree, {"note": s}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000002.npz",
                                                          "ckpt_000000003.npz"]
    back, step, meta = restore_checkpoint(tmp_path / "ckpt_000000003.npz", tree)
    assert step == 3 and meta == {"note": 3}
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    with pytest.raises(CheckpointError, match="expects"):
        restore_checkpoint(tmp_path / "ckpt_000000003.npz", {"a": jnp.arange(4.0), "b": tree["b"]})


def test_data_order_and_augmentation_are_deterministic():
    a = batch_indices(7, 5, 100, 16)
    np.testing.assert_array_equal(a, batch_indices(7, 5, 100, 16))
    epoch0 = np.concatenate([batch_indices(7, s, 100, 16) for s in range(6)])
    assert len(set(epoch0.tolist())) == 96  # without replacement within an epoch
    assert not np.array_equal(batch_indices(7, 6, 100, 16), batch_indices(7, 0, 100, 16))
    imgs = jnp.asarray(np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3)), jnp.uint8)
    key = jax.random.key(0)
    out = random_crop_flip(key, imgs, pad=4)
    assert out.shape == imgs.shape and out.dtype == imgs.dtype
    np.testing.assert_array_equal(out, random_crop_flip(key, imgs, pad=4))
    flipped = random_crop_flip(key, imgs, pad=0)
    for o, i in zip(np.asarray(flipped), np.asarray(imgs), strict=True):
        assert np.array_equal(o, i) or np.array_equal(o, i[:, ::-1])
    padded = np.pad(np.asarray(imgs), ((0, 0), (4, 4), (4, 4), (0, 0)))
    for o, p in zip(np.asarray(random_crop_flip(key, imgs, pad=4, flip=False)), padded,
                    strict=True):
        assert any(np.array_equal(o, p[r:r + 8, c:c + 8]) for r in range(9) for c in range(9))


def test_cli_finetune_end_to_end(tmp_path):
    """A tiny ResNet on 40 CIFAR images: train, interrupt, resume, export, evaluate."""
    from jaxbar.cli import main as jaxbar_main
    from jaxbar.nn import save_params
    from jaxbar.nn.models import ResNetV1Cifar
    from jaxbar.train.cli import add_finetune_parser

    data = require_shared("data", "cifar10-jpeg")
    mean = require_shared("models", "cifar10-resnet-v1", "x_train_mean.npy")
    start = tmp_path / "start.npz"
    save_params(start, ResNetV1Cifar(8, width=4, rngs=nnx.Rngs(0)))
    cfg = tmp_path / "net.yaml"  # two analog layers keep the compilation short
    cfg.write_text("crossbar:\n  device:\n    on_off_ratio: 100\n    programming_error: "
                   "{model: independent, sigma: 0.05}\nlayers:\n  'stage*': digital\n")
    parser = argparse.ArgumentParser(prog="jaxbar")
    add_finetune_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "run"
    argv = ["finetune", "--model", "resnet20", "--params", str(start), "--mean", str(mean),
            "--data", str(data), "--config", str(cfg), "--epochs", "1", "--out", str(out),
            "--batch-size", "8", "--train-limit", "40", "--lr", "0.01", "--log-every", "1",
            "--checkpoint-every", "2", "--weight-clip", "3", "--cache-dir",
            str(tmp_path / "cache"), "--no-progress"]
    args = parser.parse_args([*argv, "--stop-at", "3"])
    assert args.func(args) == 0
    assert not (out / "params.npz").exists()
    args = parser.parse_args(argv)  # the same command resumes
    assert args.func(args) == 0
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr", "accuracy"} <= set(r) for r in log)
    assert (out / "curves.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["finished"]
    bad = parser.parse_args([*argv[:-1], "--lr", "0.5", "--no-progress"])
    with pytest.raises(ValueError, match="other settings"):
        bad.func(bad)
    assert jaxbar_main(["evaluate", "--model", "resnet20", "--params", str(out / "params.npz"),
                        "--data", str(data), "--config", str(cfg), "--limit", "10",
                        "--cache-dir", str(tmp_path / "cache")]) == 0
