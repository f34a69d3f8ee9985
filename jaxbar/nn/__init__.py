"""Flax NNX networks whose convolutions and dense layers compute through a contraction."""

from jaxbar.nn.contraction import DIGITAL, Contraction, Digital, Recorder, explicit_padding
from jaxbar.nn.folding import fold_batchnorm
from jaxbar.nn.keras_import import WeightsError, load_keras_resnet50, load_keras_resnet_cifar
from jaxbar.nn.layers import BatchNorm, Conv, Dense, Identity
from jaxbar.nn.models import (
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
    "DIGITAL",
    "BatchNorm",
    "Contraction",
    "Conv",
    "Dense",
    "Digital",
    "Identity",
    "ParamsError",
    "Recorder",
    "ResNet50",
    "ResNetV1Cifar",
    "WeightsError",
    "build_model",
    "count_params",
    "explicit_padding",
    "fold_batchnorm",
    "layer_names",
    "layer_shapes",
    "load_keras_resnet50",
    "load_keras_resnet_cifar",
    "load_params",
    "named_layers",
    "read_params_metadata",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet56",
    "save_params",
]
