"""Flax NNX networks on crossbars: analog layers, calibration, the ResNets, weights, folding.

`jaxbar.analogize` is the entry point; `jaxbar.nn.analogize` is the module that holds it.
"""

from jaxbar.nn.analogize import analog_layers, program_model
from jaxbar.nn.calibrate import Calibration, apply_calibration, calibrate_model
from jaxbar.nn.folding import conv_bn_pairs, fold_batchnorm
from jaxbar.nn.keras_import import WeightsError, load_keras_resnet50, load_keras_resnet_cifar
from jaxbar.nn.models import (
    Identity,
    ResNet50,
    ResNetV1Cifar,
    build_model,
    count_params,
    layer_names,
    layer_shapes,
    named_layers,
    resnet14,
    resnet20,
    resnet32,
    resnet56,
)
from jaxbar.nn.params_io import ParamsError, load_params, read_params_metadata, save_params

__all__ = [
    "Calibration",
    "Identity",
    "ParamsError",
    "ResNet50",
    "ResNetV1Cifar",
    "WeightsError",
    "analog_layers",
    "apply_calibration",
    "build_model",
    "calibrate_model",
    "conv_bn_pairs",
    "count_params",
    "fold_batchnorm",
    "layer_names",
    "layer_shapes",
    "load_keras_resnet50",
    "load_keras_resnet_cifar",
    "load_params",
    "named_layers",
    "program_model",
    "read_params_metadata",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet56",
    "save_params",
]
