"""Optional tensorflow-datasets loaders (`pip install 'jaxbar[tfds]'`).

`tensorflow_datasets` is imported only when a loader is called, and only after the prepared
data has been found on disk: offline, tfds can spend minutes trying to reach the network, so a
missing data set fails at once with a message saying what to download and where.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
IMAGENET_MANUAL_FILES = {"train": "ILSVRC2012_img_train.tar",
                         "validation": "ILSVRC2012_img_val.tar"}


class TfdsDataError(FileNotFoundError):
    """The prepared tensorflow-datasets data (or the manual download) is not on disk."""


class TfdsUnavailableError(ImportError):
    """tensorflow-datasets is not installed."""


def default_data_dir() -> Path:
    """`$TFDS_DATA_DIR` if set, else `~/tensorflow_datasets` (the tfds default)."""
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env) if env else Path.home() / "tensorflow_datasets"


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"\d+", p.parent.name))


def find_prepared(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The newest prepared version folder `<data_dir>/<name>[/<config>]/<version>`.

    Returns:
      The folder holding `dataset_info.json`, or `None`.
    """
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    root = base / name
    if not root.is_dir():
        return None
    found = list(root.glob("*/dataset_info.json")) + list(root.glob("*/*/dataset_info.json"))
    found = [p for p in found if re.fullmatch(r"\d+\.\d+\.\d+", p.parent.name)]
    if not found:
        return None
    return max(found, key=_version_key).parent


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise TfdsUnavailableError(
            "tensorflow_datasets is not installed; install it with "
            "`pip install 'jaxbar[tfds]'` (tensorflow-datasets and tensorflow-cpu), or use "
            "jaxbar.data.image_folder.load_image_folder on an image folder instead") from e
    return tfds


def _balanced(labels: np.ndarray, limit: int | None, num_classes: int) -> np.ndarray:
    """Indices of a class-balanced subset of `limit` examples, in data-set order.

    The first `limit // C` examples of each class, one more for the first `limit % C`
    classes.
    """
    if limit is None:
        return np.arange(len(labels))
    if not 0 < limit <= len(labels):
        raise ValueError(f"limit must be in 1..{len(labels)}, got {limit}")
    q, r = divmod(int(limit), num_classes)
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[: q + (1 if c < r else 0)]
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def load_tfds_cifar10(
    split: str = "test", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """CIFAR-10 from prepared tensorflow-datasets data.

    Args:
      split: `"train"` or `"test"` (any tfds split string).
      data_dir: the tfds data folder (default `default_data_dir`).
      limit: class-balanced subset (same rule as `load_image_folder`).

    Returns:
      `(images uint8 (N, 32, 32, 3), labels int32 (N,), class names)`.

    Raises:
      TfdsDataError: no prepared `cifar10` folder under `data_dir`.
      TfdsUnavailableError: tensorflow_datasets is not installed.
    """
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    builder_dir = find_prepared("cifar10", base)
    if builder_dir is None:
        raise TfdsDataError(
            f"prepared tfds 'cifar10' not found under {base} (expected "
            f"{base}/cifar10/<version>/dataset_info.json). On a machine with internet run "
            f"`tfds build cifar10 --data_dir {base}` (it downloads {CIFAR10_URL}, 163 MB) and "
            f"copy {base}/cifar10 here, or set TFDS_DATA_DIR / data_dir to where it is.")
    tfds = _import_tfds()
    builder = tfds.builder_from_directory(str(builder_dir))
    ds = builder.as_dataset(split=split, as_supervised=True, batch_size=-1)
    images, labels = tfds.as_numpy(ds)
    names = list(builder.info.features["label"].names)
    labels = np.asarray(labels, np.int32)
    keep = _balanced(labels, limit, len(names))
    return np.asarray(images, np.uint8)[keep], labels[keep], names


def load_tfds_imagenet2012(
    split: str = "validation",
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """ImageNet-2012 through tensorflow-datasets, preprocessed for Keras ResNet50.

    Uses prepared data (`<data_dir>/imagenet2012/<version>`) if present; otherwise prepares it
    from the manually downloaded archives in `manual_dir` (default
    `<data_dir>/downloads/manual`). Images go through
    `jaxbar.data.preprocess.imagenet_preprocess`.

    Args:
      split: `"validation"` or `"train"` (any tfds split string).
      data_dir: the tfds data folder (default `default_data_dir`).
      manual_dir: folder with `ILSVRC2012_img_val.tar` (and `..._train.tar`).
      limit: the first `limit` examples of the split.

    Returns:
      `(images float32 (N, 224, 224, 3) BGR mean-subtracted, labels int32 (N,), class names)`.

    Raises:
      TfdsDataError: neither prepared data nor the manual archives are present.
      TfdsUnavailableError: tensorflow_datasets is not installed.
    """
    from jaxbar.data.preprocess import imagenet_preprocess

    base = Path(data_dir) if data_dir is not None else default_data_dir()
    builder_dir = find_prepared("imagenet2012", base)
    manual = Path(manual_dir) if manual_dir is not None else base / "downloads" / "manual"
    if builder_dir is None:
        need = IMAGENET_MANUAL_FILES.get(split.split("[")[0], IMAGENET_MANUAL_FILES["validation"])
        if not (manual / need).is_file():
            raise TfdsDataError(
                f"prepared tfds 'imagenet2012' not found under {base} and {need} is not in "
                f"{manual}. ImageNet cannot be downloaded automatically: get "
                f"{' and '.join(IMAGENET_MANUAL_FILES.values())} from https://image-net.org "
                f"(registration required), put them in {manual}, or point data_dir at an "
                "already prepared tfds folder.")
    tfds = _import_tfds()
    if builder_dir is None:
        builder = tfds.builder("imagenet2012", data_dir=str(base))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    else:
        builder = tfds.builder_from_directory(str(builder_dir))
    if limit is not None and "[" not in split:
        split = f"{split}[:{int(limit)}]"
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    images, labels = [], []
    for image, label in tfds.as_numpy(ds):
        images.append(imagenet_preprocess(image)[0])
        labels.append(int(label))
    names = list(builder.info.features["label"].names)
    return np.stack(images), np.asarray(labels, np.int32), names


__all__ = ["TfdsDataError", "TfdsUnavailableError", "default_data_dir", "find_prepared",
           "load_tfds_cifar10", "load_tfds_imagenet2012"]
