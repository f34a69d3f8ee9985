"""Input preprocessing for the supported models (NumPy / PIL)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CIFAR_MEAN_FILE = "x_train_mean.npy"

#: Per-channel means (B, G, R) subtracted by `keras.applications.resnet50.preprocess_input`
#: ("caffe" mode).
IMAGENET_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def read_cifar_mean(path: str | os.PathLike) -> np.ndarray:
    """Reads a CIFAR training-set mean file: exactly the file given, whatever its name.

    Args:
      path: a `.npy` file of float (H, W, 3) or (3,) values in 0..255 units, or a folder
          holding `x_train_mean.npy`.

    Returns:
      The mean as float32.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not a readable `.npy` array, has the wrong shape or holds
          non-finite values; the message names the file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CIFAR_MEAN_FILE
    if not p.is_file():
        raise FileNotFoundError(f"mean file not found: {p}")
    try:
        mean = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read the mean file {p} (expected a .npy array): {e}") from e
    if not (isinstance(mean, np.ndarray) and mean.dtype.kind in "fiu"
            and mean.ndim in (1, 3) and mean.shape[-1] == 3):
        what = getattr(mean, "shape", type(mean).__name__)
        raise ValueError(f"mean file {p} holds {what}, expected a numeric (H, W, 3) or (3,) "
                         "array")
    mean = mean.astype(np.float32)
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean file {p} holds non-finite values (NaN or inf)")
    return mean


def load_cifar_mean(weights_path: str | os.PathLike) -> np.ndarray:
    """Reads `x_train_mean.npy` (float32 (32, 32, 3), 0..255 units) beside a weights file.

    Args:
      weights_path: a weights file, or the folder holding it.

    Returns:
      The per-pixel training-set mean.

    Raises:
      FileNotFoundError: the mean file is absent.
      ValueError: the mean file is unreadable (see `read_cifar_mean`).
    """
    p = Path(weights_path)
    folder = p if p.is_dir() else p.parent
    mean_path = folder / CIFAR_MEAN_FILE
    if not mean_path.is_file():
        raise FileNotFoundError(f"{CIFAR_MEAN_FILE} not found in {folder}: the CIFAR ResNet "
                                "models need the training-set mean that they were trained with "
                                "(pass it with --mean)")
    return read_cifar_mean(mean_path)


def cifar_resnet_preprocess(images_uint8: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """`(x.astype(float32) - mean) / 255`, as the Keras CIFAR ResNet models expect.

    Args:
      images_uint8: `(N, H, W, 3)` uint8 RGB.
      mean: per-pixel `(H, W, 3)` (or per-channel) mean in 0..255 units.

    Returns:
      float32 `(N, H, W, 3)`.
    """
    x = np.asarray(images_uint8).astype(np.float32)
    return (x - np.asarray(mean, np.float32)) / np.float32(255.0)


def _resize_center_crop(image, resize: int, crop: int) -> np.ndarray:
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    s = resize / min(w, h)
    nw, nh = max(crop, int(round(w * s))), max(crop, int(round(h * s)))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    return np.asarray(im.crop((left, top, left + crop, top + crop)), np.uint8)


def imagenet_preprocess(
    images, *, resize: int = 256, crop: int = 224, already_cropped: bool = False
) -> np.ndarray:
    """ImageNet preprocessing for `keras.applications` ResNet50 weights.

    Resizes the shorter side to `resize` (bilinear), takes the central `crop x crop` square,
    then applies Keras' "caffe" preprocessing: RGB -> BGR and subtraction of the per-channel
    means `IMAGENET_CAFFE_MEAN_BGR` (no scaling to unit range).

    Args:
      images: one image (PIL image or `(H, W, 3)` uint8 RGB), a sequence of them, or a
          `(N, H, W, 3)` uint8 array.
      resize: shorter-side length after resizing.
      crop: output size.
      already_cropped: skip resizing and cropping (inputs already `crop x crop`).

    Returns:
      float32 `(N, crop, crop, 3)` in BGR channel order.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    elif not isinstance(images, np.ndarray | Sequence):
        images = [images]
    if already_cropped:
        x = np.stack([np.asarray(im, np.uint8) for im in images])
    else:
        x = np.stack([_resize_center_crop(im, resize, crop) for im in images])
    x = x[..., ::-1].astype(np.float32)
    return x - IMAGENET_CAFFE_MEAN_BGR


__all__ = ["IMAGENET_CAFFE_MEAN_BGR", "cifar_resnet_preprocess", "imagenet_preprocess",
           "load_cifar_mean", "read_cifar_mean"]
