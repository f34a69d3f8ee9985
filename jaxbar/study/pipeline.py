"""Loading a model, its data and its analog configuration: what the CLI commands share."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from flax import nnx

from jaxbar.config import ConfigError
from jaxbar.data.image_folder import load_image_folder
from jaxbar.data.preprocess import (
    cifar_resnet_preprocess,
    imagenet_preprocess,
    load_cifar_mean,
    read_cifar_mean,
)
from jaxbar.nn.analogize import analog_layers, analogize
from jaxbar.nn.calibrate import Calibration, apply_calibration, calibrate_model
from jaxbar.nn.folding import fold_batchnorm
from jaxbar.nn.keras_import import load_keras_resnet50, load_keras_resnet_cifar
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.nn.params_io import load_params

__all__ = ["MODELS", "Task", "load_task", "prepare_model"]

CIFAR_MODELS = {"resnet14": 14, "resnet20": 20, "resnet32": 32, "resnet56": 56}
MODELS = (*CIFAR_MODELS, "resnet50")


@dataclasses.dataclass
class Task:
    """A model with its preprocessing and data location."""

    name: str
    model: nnx.Module
    weights: str | None
    data: str
    mean: np.ndarray | None
    skip_unreadable: bool = False

    def images(self, split: str, limit: int | None, cache_dir: str | None = None):
        """Preprocessed images and labels of a split (class-balanced `limit`)."""
        raw, labels, _ = load_image_folder(self.data, split, limit=limit, cache_dir=cache_dir,
                                           skip_unreadable=self.skip_unreadable)
        if self.name == "resnet50":
            return imagenet_preprocess(raw), labels
        return cifar_resnet_preprocess(raw, self.mean), labels


def load_task(model: str, weights: str | None, data: str, params: str | None = None,
              mean: str | None = None, skip_unreadable: bool = False) -> Task:
    """Loads a model from Keras HDF5 weights or a jaxbar parameter file.

    Args:
      model: one of `MODELS`.
      weights: Keras .h5 file (CIFAR ResNet-v1 or keras.applications ResNet50).
      data: image-folder root (`<data>/<split>/<class>/*.jpg`).
      params: a jaxbar parameter file (`save_params`), instead of `weights`.
      mean: the CIFAR training-set mean file, used whatever its name (default:
        `$JAXBAR_CIFAR_MEAN`, else `x_train_mean.npy` beside the weights or the params file).
      skip_unreadable: `Task.images` skips unreadable image files (with a warning) instead
        of failing on the first.
    """
    if model not in MODELS:
        raise ConfigError(f"--model {model!r} is not supported; choose from {', '.join(MODELS)}")
    if (weights is None) == (params is None):
        raise ConfigError("give exactly one of --weights (Keras .h5) or --params (jaxbar .npz)")
    if params is not None:
        net = load_params(params)
    elif model == "resnet50":
        net = load_keras_resnet50(weights)
    else:
        net = load_keras_resnet_cifar(weights, CIFAR_MODELS[model])
    m = None
    if model != "resnet50":
        given = mean or os.environ.get("JAXBAR_CIFAR_MEAN")
        m = read_cifar_mean(given) if given else load_cifar_mean(weights or params)
    return Task(model, net, weights or params, data, m, skip_unreadable)


def _needs_calibration(analog: nnx.Module) -> bool:
    return any(op.config.inputs.bits > 0 or op.config.adc.range == "calibrated"
               for _, op in analog_layers(analog).values())


def prepare_model(task: Task, net: NetworkConfig, calibration: str | Calibration | None,
                  cache_dir: str | None = None, model: nnx.Module | None = None):
    """The task's model on crossbars as `net` describes, calibrated when needed.

    Args:
      task: the model and its data.
      net: the network config.
      calibration: a calibration (or its file) to apply; None calibrates on the fly on
        `net.calibration.samples` images of `net.calibration.split` when a layer has
        quantized inputs or a calibrated ADC range.
      cache_dir: decoded-image cache.
      model: use this model instead of the task's.

    Returns:
      (model, calibration or None): the analog model (batch-norm folded when the config asks
      for it), or the digital one when `net.crossbar` is None.
    """
    model = model or task.model
    if net.fold_batchnorm:
        model = fold_batchnorm(model)
    if net.crossbar is None:
        return model, None
    analog = analogize(model, net)
    if isinstance(calibration, str | Path):
        calibration = Calibration.load(calibration)
    if calibration is not None:
        apply_calibration(analog, calibration)
    elif _needs_calibration(analog):
        s = net.calibration
        xc, _ = task.images(s.split, s.samples, cache_dir)
        calibration = calibrate_model(analog, xc)
    return analog, calibration
