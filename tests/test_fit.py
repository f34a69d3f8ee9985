"""`jaxbar.train.fit`: noise-injection training of any analogized model, against hand-made steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbar
from jaxbar.config import ConfigError
from jaxbar.nn.analogize import is_programmed
from jaxbar.train import batch_indices, clip_kernel, fit

NOISY = jaxbar.CrossbarConfig.ideal().replace(
    **{"device.programming_error": {"model": "proportional", "sigma": 0.1}})


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))[:, 0]


def _data(n=40):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] - 0.5 * x[:, 3]).astype(np.float32)


def loss_fn(m, batch):
    x, y = batch
    return jnp.mean((m(x) - y) ** 2)


def test_steps_equal_hand_made_noise_injection_steps():
    x, y = _data()
    opt = optax.sgd(0.1)
    analog = jaxbar.analogize(Net(nnx.Rngs(0)), NOISY)
    ref = jaxbar.analogize(Net(nnx.Rngs(0)), NOISY)
    res = fit(analog, loss_fn, opt, (x, y), steps=3, batch_size=8, seed=5, weight_clip=2.0,
              progress=False)
    # The same three steps by hand: live programming from fold_in(key(seed), step).
    params = nnx.state(ref, nnx.Param)
    opt_state = opt.init(params)
    for s in range(3):
        idx = batch_indices(5, s, len(x), 8)
        jaxbar.program_model(ref, jax.random.fold_in(jax.random.key(5), s), live=True)
        loss, grads = nnx.value_and_grad(loss_fn)(ref, (x[idx], y[idx]))
        np.testing.assert_allclose(res.losses[s], loss, rtol=1e-5)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for name in ("l1", "l2"):
            params[name]["kernel"][...] = clip_kernel(params[name]["kernel"][...], 2.0)
        nnx.update(ref, params)
    for name in ("l1", "l2"):
        np.testing.assert_allclose(getattr(analog, name).kernel[...],
                                   getattr(ref, name).kernel[...], rtol=1e-5, atol=1e-6)
    assert not is_programmed(analog)


def test_training_lowers_the_analog_loss_and_resumes_exactly(tmp_path):
    x, y = _data(64)
    opt = optax.adam(0.02)
    a = jaxbar.analogize(Net(nnx.Rngs(1)), NOISY)
    res = fit(a, loss_fn, opt, (x, y), steps=40, batch_size=16, progress=False)
    assert res.losses[-5:].mean() < 0.5 * res.losses[:5].mean()
    # Interrupted at step 20 and resumed: the same parameters bit for bit.
    b = jaxbar.analogize(Net(nnx.Rngs(1)), NOISY)
    fit(b, loss_fn, opt, (x, y), steps=20, batch_size=16, checkpoint_dir=tmp_path,
        progress=False)
    c = jaxbar.analogize(Net(nnx.Rngs(1)), NOISY)
    r2 = fit(c, loss_fn, opt, (x, y), steps=40, batch_size=16, checkpoint_dir=tmp_path,
             progress=False)
    assert len(r2.losses) == 20 and r2.steps == 40
    np.testing.assert_array_equal(r2.losses, res.losses[20:])
    np.testing.assert_array_equal(c.l1.kernel[...], a.l1.kernel[...])


def test_bad_options_are_named():
    x, y = _data()
    m = Net(nnx.Rngs(0))
    with pytest.raises(ConfigError, match="weight_clip"):
        fit(m, loss_fn, optax.sgd(0.1), (x, y), steps=1, weight_clip=-1)
    with pytest.raises(ConfigError, match="batch_size"):
        fit(m, loss_fn, optax.sgd(0.1), (x, y), steps=1, batch_size=1000)


def test_learned_ranges_train_with_the_weights():
    from jaxbar.nn.analogize import attach_learned_ranges, learned_ranges

    x, y = _data()
    cfg = jaxbar.CrossbarConfig.paper_baseline().replace(**{
        "device.programming_error": {"model": "proportional", "sigma": 0.05}})
    analog = jaxbar.analogize(Net(nnx.Rngs(0)), cfg)
    jaxbar.calibrate_model(analog, x)
    attach_learned_ranges(analog)
    before = learned_ranges(analog)
    fit(analog, loss_fn, optax.adam(0.05), (x, y), steps=5, batch_size=8, progress=False)
    after = learned_ranges(analog)
    assert set(after) == {"l1", "l2"}
    for path in after:
        (lo, hi), adc = after[path]
        assert lo < hi and all(a < b for a, b in adc)
        assert after[path] != before[path]  # the optimizer moved them
