"""The 2-D convolution every crossbar convolution runs on (NHWC images, HWIO kernels).

The result is `lax.conv_general_dilated`'s. On a CPU the convolution is laid out so that
XLA runs it on its own multi-threaded kernel: XLA:CPU hands a float convolution with more
than 16 channels to YNNPACK, and a YNNPACK convolution that XLA does not fuse with its
neighbours runs on one core (on a 2-core machine 8–9 ms against 5–6 ms for a 16×16×32 or
8×8×64 convolution of 256 images). The analog layers put DAC and ADC operations between
their convolutions, so XLA leaves most of them alone there. XLA keeps a convolution whose
output has more rows (or columns) than its input on its own kernel; `conv2d` pads rows at the
bottom until the output has one row more than the input (`extra_padding`: one for SAME
padding), or columns at the right where rows would cost too much (1-D convolutions), and
drops what it adds. Each output pixel's sum is the one the plain convolution computes on XLA's
kernel. Gradients are the plain convolution's (XLA may run those on YNNPACK).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["conv2d", "extra_padding"]

# XLA:CPU's rule: YNNPACK takes a float32/float64 2-D convolution with more than this many
# input or output channels whose output is no larger than its input.
_YNNPACK_MIN_CHANNELS = 16
# Pay at most a quarter more work to stay on XLA's multi-threaded kernel.
_MAX_EXTRA_FRACTION = 0.25

Padding = tuple[tuple[int, int], tuple[int, int]]


def extra_padding(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], dtype,
                  strides: tuple[int, int], padding: Padding,
                  dilation: tuple[int, int] = (1, 1),
                  backend: str | None = None) -> tuple[int, int]:
    """Rows and columns `conv2d` adds below or right of the image; at most one is nonzero.

    Rows when they cost at most a quarter more work, else columns (a 1-D convolution is a
    2-D one over a single row), else none.

    Args:
      x_shape: the NHWC input shape.
      kernel_shape: the HWIO kernel shape.
      dtype: the input dtype.
      strides: window strides.
      padding: ((top, bottom), (left, right)).
      dilation: kernel dilation.
      backend: the platform compiled for; the default backend when None.

    Returns:
      (extra rows, extra columns).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or jnp.dtype(dtype) not in (jnp.float32, jnp.float64):
        return 0, 0
    if max(x_shape[-1], kernel_shape[-1]) <= _YNNPACK_MIN_CHANNELS:
        return 0, 0
    extra = [0, 0]
    for axis in (0, 1):
        size = x_shape[1 + axis]
        span = (kernel_shape[axis] - 1) * dilation[axis] + 1
        out = (size + sum(padding[axis]) - span) // strides[axis] + 1
        if out > size:  # XLA keeps it already
            return 0, 0
        if strides[axis] == 1 and size + 1 - out <= _MAX_EXTRA_FRACTION * out:
            extra[axis] = size + 1 - out
    return (extra[0], 0) if extra[0] else (0, extra[1])


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding, *,
           dilation: tuple[int, int] = (1, 1), feature_group_count: int = 1,
           precision=None) -> jax.Array:
    """`lax.conv_general_dilated` over NHWC images and an HWIO kernel, explicit padding.

    Args:
      x: (N, H, W, C_in) images.
      kernel: (kh, kw, C_in / groups, C_out).
      strides: window strides.
      padding: ((top, bottom), (left, right)).
      dilation: kernel dilation.
      feature_group_count: as `lax.conv_general_dilated`.
      precision: as `lax.conv_general_dilated`.

    Returns:
      (N, H', W', C_out), the convolution.
    """
    strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    extra = extra_padding(x.shape, kernel.shape, x.dtype, strides, padding, dilation)
    if extra == (0, 0):
        return _plain(x, kernel, strides, padding, dilation, feature_group_count, precision)
    return _padded(x, kernel, strides, padding, dilation, feature_group_count, precision, extra)


def _plain(x, kernel, strides, padding, dilation, groups, precision):
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, rhs_dilation=dilation, feature_group_count=groups,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


# The gradients are the plain convolution's: with JAX's transposes of the padded one, a
# ResNet20 training step on XLA:CPU takes 4× as long.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _padded(x, kernel, strides, padding, dilation, groups, precision, extra):
    (top, bottom), (left, right) = padding
    rows, cols = extra
    y = _plain(x, kernel, strides, ((top, bottom + rows), (left, right + cols)), dilation,
               groups, precision)
    return y[:, :y.shape[1] - rows, :y.shape[2] - cols]


def _padded_fwd(x, kernel, strides, padding, dilation, groups, precision, extra):
    return _padded(x, kernel, strides, padding, dilation, groups, precision, extra), (x, kernel)


def _padded_bwd(strides, padding, dilation, groups, precision, extra, residuals, g):
    del extra
    x, kernel = residuals

    def conv(x, k):
        return _plain(x, k, strides, padding, dilation, groups, precision)

    # Transposes of the two linear maps, without recomputing the forward convolution.
    (dx,) = jax.linear_transpose(lambda x: conv(x, kernel), x)(g)
    (dk,) = jax.linear_transpose(lambda k: conv(x, k), kernel)(g)
    return dx, dk


_padded.defvjp(_padded_fwd, _padded_bwd)
