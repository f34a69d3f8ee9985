"""Input pipelines: image folders (PIL + NumPy, cached), preprocessing, optional tfds."""

from jaxbar.data.image_folder import default_cache_dir, list_image_folder, load_image_folder
from jaxbar.data.preprocess import (
    cifar_resnet_preprocess,
    imagenet_preprocess,
    load_cifar_mean,
)

__all__ = [
    "cifar_resnet_preprocess",
    "default_cache_dir",
    "imagenet_preprocess",
    "list_image_folder",
    "load_cifar_mean",
    "load_image_folder",
]
