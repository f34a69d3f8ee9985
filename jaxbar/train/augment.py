"""Training data: a deterministic epoch order and CIFAR augmentation in JAX.

The order of the training images is a pure function of `(seed, epoch)` and the augmentation
of a batch a pure function of a PRNG key derived from `(seed, step)`, so a run resumed from a
checkpoint at step `s` sees exactly the batches an uninterrupted run sees after step `s`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["batch_indices", "epoch_permutation", "random_crop_flip"]


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of `n` training examples in one epoch.

    Args:
      seed: the run's seed.
      epoch: epoch number (0-based).
      n: number of training examples.

    Returns:
      A permutation of `range(n)` (int64), identical for identical arguments.
    """
    return np.random.default_rng([int(seed), int(epoch), 0x5EED]).permutation(n)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The example indices of global step `step` (the last partial batch is dropped).

    Args:
      seed: the run's seed.
      step: global step (0-based); epoch `step // steps_per_epoch`.
      n: number of training examples.
      batch_size: examples per step (<= n).

    Returns:
      `batch_size` indices into the training set.
    """
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
    epoch, i = divmod(int(step), steps_per_epoch)
    return epoch_permutation(seed, epoch, n)[i * batch_size:(i + 1) * batch_size]


def random_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4, flip: bool = True,
                     fill: float = 0.0) -> jax.Array:
    """Random crops of the `pad`-padded images and random horizontal flips (NHWC).

    The standard CIFAR augmentation (He et al. 2016): each image is zero-padded by `pad`
    pixels on every side, a window of the original size is cut at a uniformly random offset,
    and the result is mirrored left-right with probability 1/2.

    Args:
      key: PRNG key of this batch.
      images: `(N, H, W, C)` images (any dtype; apply before or after preprocessing).
      pad: padding in pixels (0: no crop).
      flip: also flip horizontally at random.
      fill: value of the padding pixels.

    Returns:
      Augmented images, same shape and dtype.
    """
    n, h, w, _ = images.shape
    k_off, k_flip = jax.random.split(key)
    out = images
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                         constant_values=jnp.asarray(fill, images.dtype))
        off = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)

        def crop(img, o):
            return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))

        out = jax.vmap(crop)(padded, off)
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (n,))
        out = jnp.where(mirror[:, None, None, None], out[:, :, ::-1], out)
    return out
