"""Analog convolution: im2col semantics against an explicit NumPy im2col + the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbar
from jaxbar import CrossbarConfig

from . import reference as ref


def im2col(x, kh, kw, stride, pad):
    """NHWC patches with rows in (kh, kw, c_in) order, by explicit loops."""
    (pt, pb), (pl, pr) = pad
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    n, h, w, c = x.shape
    ho, wo = (h - kh) // stride[0] + 1, (w - kw) // stride[1] + 1
    out = np.zeros((n, ho, wo, kh * kw * c))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw, :]
            out[:, i, j] = patch.reshape(n, -1)
    return out


CONFIGS = {
    "ideal": {},
    "paper_like": {"weights": {"bits": 8}, "inputs": {"bits": 8, "range": [-2, 2]},
                   "adc": {"bits": 8, "range": [-6.3, 7.1]}, "device": {"on_off_ratio": 100}},
    "partitioned_offset": {"weights": {"bits": 6}, "mapping": {"scheme": "offset"},
                           "array": {"rows": 10, "cols": 3},
                           "adc": {"bits": 7, "range": [0.5, 9.3]}},
    "unit_column_sliced": {"weights": {"bits": 8}, "mapping": {"scheme": "offset", "slices": 2,
                           "offset_subtraction": "unit_column"}, "array": {"rows": 16},
                           "adc": {"bits": 9, "range": "max"}},
    "bit_serial_digital": {"weights": {"bits": 8}, "mapping": {"subtract": "digital"},
                           "inputs": {"bits": 5, "range": [-2, 2], "bit_serial": True},
                           "adc": {"bits": 6, "range": [0, 3.3], "per_input_slice": True},
                           "array": {"rows": 7}},
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("stride, pad", [((1, 1), ((1, 1), (1, 1))), ((2, 2), ((0, 1), (0, 1)))])
def test_conv_equals_patch_matmul_reference(name, stride, pad):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3))
    kernel = rng.laplace(size=(3, 3, 3, 5)) * 0.2
    cfg = CrossbarConfig.from_dict(CONFIGS[name])
    K = 27
    expected = ref.ref_matmul(im2col(x, 3, 3, stride, pad).reshape(-1, K),
                              kernel.reshape(K, 5), cfg.to_dict())
    with jax.enable_x64(True):
        p = jaxbar.program(jnp.asarray(kernel.reshape(K, 5)), cfg)
        y = jaxbar.core.conv(jnp.asarray(x), p, cfg, kernel.shape, stride, pad)
    assert y.shape[:3] == (2,) + im2col(x, 3, 3, stride, pad).shape[1:3]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5), expected, rtol=1e-9, atol=1e-9)


def test_conv_patches_path_equals_conv_path():
    # The explicit-patch path (used for per-MVM effects such as parasitics) agrees with lax.conv.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 4)), jnp.float32)
    cfg = CrossbarConfig()
    lay = jaxbar.core.mapping.layout(2 * 3 * 4, 2, cfg)
    op = jaxbar.core.conv_op(lay, (2, 3, 4, 2), (1, 2), ((1, 0), (1, 1)))
    patches = op.patches(x)
    ref_patches = im2col(np.asarray(x), 2, 3, (1, 2), ((1, 0), (1, 1)))
    np.testing.assert_allclose(patches, ref_patches, atol=1e-6)


def test_conv_read_noise_statistics():
    # One output pixel of a 1x1 conv is one MVM: its read-noise std matches the dense closed form.
    cfg = CrossbarConfig.from_dict({"device": {"read_noise": {"model": "independent",
                                                              "sigma": 0.05}}})
    x = np.ones((1, 1, 1, 4))
    W = np.full((4, 2), 0.5)
    p = jaxbar.program(W, cfg)
    keys = jax.random.split(jax.random.key(0), 3000)
    ys = jax.vmap(lambda k: jaxbar.core.conv(x, p, cfg, (1, 1, 4, 2), key=k))(keys)
    ys = np.asarray(ys).reshape(3000, 2)
    # var = Σ_k x_k²·2σ² in array units; output scale w_max/g_range = 0.5.
    np.testing.assert_allclose(ys.mean(0), [2.0, 2.0], atol=0.01)
    np.testing.assert_allclose(ys.std(0), 0.5 * np.sqrt(4 * 2 * 0.05**2), rtol=0.08)
