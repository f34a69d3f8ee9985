"""`core.conv2d`: the plain convolution's result, kept on XLA:CPU's multi-threaded kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.core.conv2d import conv2d, extra_padding

DIMS = ("NHWC", "HWIO", "NHWC")


def _plain(x, k, strides, padding, dilation=(1, 1), groups=1):
    return jax.lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation,
                                        feature_group_count=groups, dimension_numbers=DIMS,
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("shape, kernel, strides, padding, dilation, expected", [
    ((16, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 0)),  # SAME: one row more than input
    ((16, 8), (3, 3), (1, 1), ((0, 0), (0, 0)), (1, 1), (3, 0)),  # VALID: 14 rows out, needs 17
    ((16, 8), (3, 3), (1, 1), ((2, 2), (1, 1)), (2, 1), (1, 0)),  # dilated SAME
    ((16, 8), (3, 3), (1, 1), ((2, 2), (0, 0)), (1, 1), (0, 0)),  # 18 > 16 rows out already
    ((16, 8), (3, 3), (1, 1), ((1, 1), (2, 2)), (1, 1), (0, 0)),  # 10 > 8 columns out already
    ((16, 8), (3, 3), (2, 1), ((1, 1), (1, 1)), (1, 1), (0, 1)),  # strided rows: a column
    ((16, 8), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), (0, 0)),  # both strided: twice the work
    ((2, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (0, 1)),   # a row is half the work of 2
    ((1, 64), (1, 3), (1, 1), ((0, 0), (1, 1)), (1, 1), (0, 1)),  # a 1-D convolution
    ((1, 2), (1, 3), (1, 1), ((0, 0), (1, 1)), (1, 1), (0, 0)),   # too short for either
    ((4, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 0)),   # a quarter more is the limit
])
def test_extra_padding(shape, kernel, strides, padding, dilation, expected):
    got = extra_padding((8, *shape, 32), (*kernel, 32, 32), jnp.float32, strides, padding,
                        dilation, backend="cpu")
    assert got == expected


def test_extra_padding_only_where_xla_cpu_would_use_ynnpack():
    same = ((1, 1), (1, 1))
    assert extra_padding((8, 16, 16, 16), (3, 3, 16, 16), jnp.float32, (1, 1), same,
                         backend="cpu") == (0, 0)
    assert extra_padding((8, 16, 16, 16), (3, 3, 16, 17), jnp.float32, (1, 1), same,
                         backend="cpu") == (1, 0)
    assert extra_padding((8, 16, 16, 32), (3, 3, 32, 32), jnp.bfloat16, (1, 1), same,
                         backend="cpu") == (0, 0)
    assert extra_padding((8, 16, 16, 32), (3, 3, 32, 32), jnp.float32, (1, 1), same,
                         backend="gpu") == (0, 0)


@pytest.mark.parametrize("strides, padding, dilation, groups", [
    ((1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((1, 1), ((0, 0), (0, 0)), (1, 1), 1),
    ((1, 1), ((2, 1), (0, 2)), (2, 1), 1),
    ((1, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 1), ((1, 1), (1, 1)), (1, 1), 1),
    ((2, 2), ((1, 1), (1, 1)), (1, 1), 1),
    ((1, 1), ((1, 1), (1, 1)), (1, 1), 4),
])
def test_conv2d_is_the_plain_convolution(strides, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 9, 7, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 32 // groups, 24)), jnp.float32)
    got = jax.jit(lambda x, k: conv2d(x, k, strides, padding, dilation=dilation,
                                      feature_group_count=groups))(x, k)
    want = _plain(x, k, strides, padding, dilation, groups)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv2d_gradients_are_the_plain_convolutions():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 20)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 20, 20)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def loss(f):
        return jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)

    got = loss(lambda x, k: conv2d(x, k, (1, 1), pad))
    want = loss(lambda x, k: _plain(x, k, (1, 1), pad))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_conv2d_over_a_trial_axis_of_kernels():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 20)), jnp.float32)
    ks = jnp.asarray(rng.standard_normal((3, 3, 3, 20, 20)), jnp.float32)
    pad = ((1, 1), (1, 1))

    def loss(f):
        return jax.vmap(jax.grad(lambda k: jnp.sum(jnp.sin(f(x, k)))))(ks)

    got = jax.jit(lambda: (jax.vmap(lambda k: conv2d(x, k, (1, 1), pad))(ks),
                           loss(lambda x, k: conv2d(x, k, (1, 1), pad))))()
    want = (jax.vmap(lambda k: _plain(x, k, (1, 1), pad))(ks),
            loss(lambda x, k: _plain(x, k, (1, 1), pad)))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def _convolutions(jaxpr):
    """(input shapes, output shape, padding) of every convolution in a jaxpr, nested ones too."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append((tuple(v.aval.shape for v in eqn.invars), eqn.outvars[0].aval.shape,
                          tuple(eqn.params["padding"])))
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                found += _convolutions(inner)
    return found


def test_conv2d_backward_pass_is_the_plain_convolutions():
    """Only the forward convolution is padded; the gradient convolutions are the plain ones."""
    if jax.default_backend() != "cpu":
        pytest.skip("conv2d pads on a CPU only")
    x = jnp.ones((2, 8, 8, 20), jnp.float32)
    k = jnp.ones((3, 3, 20, 20), jnp.float32)
    pad = ((1, 1), (1, 1))

    def grad_convolutions(f):
        g = jax.grad(lambda x, k: jnp.sum(f(x, k) ** 2), argnums=(0, 1))
        return _convolutions(jax.make_jaxpr(g)(x, k).jaxpr)

    ours = grad_convolutions(lambda x, k: conv2d(x, k, (1, 1), pad))
    plain = grad_convolutions(lambda x, k: _plain(x, k, (1, 1), pad))
    rows = extra_padding(x.shape, k.shape, x.dtype, (1, 1), pad, backend="cpu")[0]
    assert rows == 1
    assert len(ours) == len(plain) == 3
    forward = [c for c in ours if c[2] == ((1, 1 + rows), (1, 1))]
    assert len(forward) == 1 and forward[0][1] == (2, 9, 8, 20)
    assert sorted(c for c in ours if c not in forward) == sorted(plain[1:])


@pytest.mark.parametrize("image, window, pad", [
    ((16, 16), (3, 3), ((1, 1), (1, 1))),
    ((1, 64), (1, 3), ((0, 0), (1, 1))),  # a 1-D convolution
])
def test_conv2d_stays_off_ynnpack_where_xla_cpu_gives_it_the_plain_convolution(image, window, pad):
    if jax.default_backend() != "cpu":
        pytest.skip("XLA:CPU's placement")
    x = jnp.ones((4, *image, 32), jnp.float32)
    k = jnp.ones((*window, 32, 32), jnp.float32)
    plain = jax.jit(lambda x, k: _plain(x, k, (1, 1), pad)).lower(x, k).compile().as_text()
    if "__ynn_fusion" not in plain:
        pytest.skip("this XLA:CPU runs the plain convolution on its own kernel")
    ours = jax.jit(lambda x, k: conv2d(x, k, (1, 1), pad)).lower(x, k).compile().as_text()
    assert "__ynn_fusion" not in ours
