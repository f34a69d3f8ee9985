"""Model definitions: the ResNet-v1 CIFAR family and ResNet50 (v1 / v1.5), on stock Flax layers.

Every convolution is an `nnx.Conv`, every batch norm an `nnx.BatchNorm` and the classifier an
`nnx.Linear`; `jaxbar.analogize` puts them on crossbars like any other model. Models return
logits (the Keras files end with a softmax, which does not change the top-1 class).

Graph paths (the layer names of configs, calibration and parameter files):

- CIFAR ResNet: `stem.conv`, `stem.bn`, `stage{1,2,3}.block{j}.{conv1,bn1,conv2,bn2}`,
  `stage{2,3}.block0.shortcut` (1x1 stride-2 projection with bias, no batch norm),
  `head.dense`.
- ResNet50: `stem.conv`, `stem.bn`, `stage{1..4}.block{j}.{conv1,bn1,conv2,bn2,conv3,bn3}`,
  `stage{s}.block0.{shortcut,shortcut_bn}`, `head.dense`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxbar.nn.graph import WEIGHT_LAYERS, modules, trace

Array = jax.Array

#: Keras' default batch-normalization epsilon.
KERAS_BN_EPSILON = 1e-3
#: Keras applications' ResNet batch-normalization epsilon.
KERAS_APPLICATIONS_BN_EPSILON = 1.001e-5


def _normal(std_of: Any):
    """An initializer drawing `N(0, std_of(shape)^2)`.

    With a concrete key the values are drawn by NumPy from a seed taken from the key (no XLA
    compilation per shape, which costs about a second each on a small CPU); under a JAX
    transformation with `jax.random` (same distribution, other values).
    """

    def init(key, shape, dtype=jnp.float32):
        std = std_of(shape)
        if isinstance(key, jax.core.Tracer):
            return std * jax.random.normal(key, shape, dtype)
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return jnp.asarray(values * np.float32(std), dtype)

    return init


def _zeros(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(np.zeros(shape, np.float32), dtype)


#: He normal (convolutions) and Glorot normal (dense) initializers.
he_normal = _normal(lambda s: float(np.sqrt(2.0 / np.prod(s[:-1]))))
glorot_normal = _normal(lambda s: float(np.sqrt(2.0 / (s[0] + s[-1]))))


def conv(cin: int, cout: int, k: int, *, strides: int = 1, padding: Any = "SAME",
         use_bias: bool = True, rngs: nnx.Rngs) -> nnx.Conv:
    """A 2-D `nnx.Conv` as Keras builds it ("SAME" pads the extra row at the bottom/right)."""
    return nnx.Conv(cin, cout, (k, k), strides=strides, padding=padding, use_bias=use_bias,
                    kernel_init=he_normal, bias_init=_zeros, rngs=rngs)


def batch_norm(features: int, epsilon: float = KERAS_BN_EPSILON) -> nnx.BatchNorm:
    """An `nnx.BatchNorm` with Keras semantics (momentum 0.99, biased batch variance)."""
    return nnx.BatchNorm(features, epsilon=epsilon, momentum=0.99, use_fast_variance=False,
                         use_running_average=True, rngs=nnx.Rngs(0))


def dense(cin: int, cout: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, kernel_init=glorot_normal, bias_init=_zeros, rngs=rngs)


class Identity(nnx.Module):
    """A no-op that stands where a folded batch normalization was."""

    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        """Returns `x` (the folded batch norm's place)."""
        del use_running_average
        return x


def avg_pool(x: Array, pool: int) -> Array:
    """Keras `AveragePooling2D` with "valid" padding on NHWC inputs."""
    s = lax.reduce_window(x, 0.0, lax.add, (1, pool, pool, 1), (1, pool, pool, 1), "VALID")
    return s / (pool * pool)


def max_pool(x: Array, pool: int, strides: int) -> Array:
    """Keras `MaxPooling2D` with "valid" padding on NHWC inputs."""
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, pool, pool, 1), (1, strides, strides, 1),
                             "VALID")


def _rngs(rngs: nnx.Rngs | None) -> nnx.Rngs:
    return nnx.Rngs(0) if rngs is None else rngs


class Stem(nnx.Module):
    """The first convolution and its batch norm (`stem.conv`, `stem.bn`)."""

    def __init__(self, conv_layer: nnx.Conv, bn: nnx.BatchNorm):
        self.conv = conv_layer
        self.bn = bn

    def __call__(self, x: Array, train: bool = False) -> Array:
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


class Stage(nnx.Module):
    """A sequence of residual blocks named `block0`, `block1`, ..."""

    def __init__(self, blocks: Sequence[nnx.Module]):
        self.depth = len(blocks)
        for j, b in enumerate(blocks):
            setattr(self, f"block{j}", b)

    def __iter__(self):
        return (getattr(self, f"block{j}") for j in range(self.depth))

    def __call__(self, x: Array, train: bool = False) -> Array:
        for block in self:
            x = block(x, train)
        return x


class Head(nnx.Module):
    """The classifier (`head.dense`)."""

    def __init__(self, dense_layer: nnx.Linear):
        self.dense = dense_layer

    def __call__(self, x: Array) -> Array:
        return self.dense(x)


# ----------------------------------------------------------------------------- CIFAR ResNet-v1


class BasicBlock(nnx.Module):
    """ResNet-v1 basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

    Args:
      in_features: input channels.
      features: output channels.
      strides: stride of the first 3x3 convolution and of the projection.
      rngs: random streams for initialization.
    """

    def __init__(self, in_features: int, features: int, strides: int, *, rngs: nnx.Rngs):
        self.conv1 = conv(in_features, features, 3, strides=strides, rngs=rngs)
        self.bn1 = batch_norm(features)
        self.conv2 = conv(features, features, 3, rngs=rngs)
        self.bn2 = batch_norm(features)
        self.shortcut = (conv(in_features, features, 1, strides=strides, rngs=rngs)
                         if strides != 1 or in_features != features else None)

    def __call__(self, x: Array, train: bool = False) -> Array:
        """The block's output (batch statistics in the norms when `train`)."""
        ra = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ra))
        y = self.bn2(self.conv2(y), use_running_average=ra)
        s = x if self.shortcut is None else self.shortcut(x)
        return jax.nn.relu(s + y)


class ResNetV1Cifar(nnx.Module):
    """ResNet-v1 for CIFAR (He et al. 2016; the Keras CIFAR-10 example), depth `6n + 2`.

    Stem conv3x3(16)-BN-ReLU; three stages of `n` basic blocks with 16, 32, 64 filters (the
    first block of stages 2 and 3 has stride 2 and a 1x1 projection shortcut with bias); 8x8
    average pooling; dense. All convolutions have a bias, batch norm uses epsilon 1e-3.

    Args:
      depth: 14, 20, 32, 56, ... (`6n + 2`).
      num_classes: outputs of the dense layer.
      width: filters of the first stage (16 in the Keras example).
      input_shape: `(H, W, C)` the model is meant for (used to list layers).
      rngs: random streams for initialization (`nnx.Rngs(0)` if omitted).
    """

    def __init__(self, depth: int = 20, *, num_classes: int = 10, width: int = 16,
                 input_shape: tuple[int, int, int] = (32, 32, 3), rngs: nnx.Rngs | None = None):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet-v1 CIFAR depth must be 6n+2 with n >= 1, got {depth}")
        rngs = _rngs(rngs)
        self.depth = int(depth)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.bn_folded = False
        n = (depth - 2) // 6
        self.stem = Stem(conv(input_shape[-1], width, 3, rngs=rngs), batch_norm(width))
        cin = width
        for stage in range(3):
            features = width * 2**stage
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, features, 2 if (stage > 0 and j == 0) else 1,
                                         rngs=rngs))
                cin = features
            setattr(self, f"stage{stage + 1}", Stage(blocks))
        self.head = Head(dense(cin, num_classes, rngs=rngs))

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in forward order."""
        return (self.stage1, self.stage2, self.stage3)

    @property
    def model_name(self) -> str:
        """The model's name in parameter files."""
        return f"resnet{self.depth}v1_cifar"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable (see `build_model`)."""
        return {"architecture": "ResNetV1Cifar", "depth": self.depth,
                "num_classes": self.num_classes, "width": self.width,
                "input_shape": list(self.input_shape)}

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """Forward pass.

        Args:
          x: preprocessed images, NHWC float.
          train: batch statistics (and running-average updates) instead of running ones.

        Returns:
          Logits `(N, num_classes)`.
        """
        x = self.stem(x, train)
        for stage in self.stages:
            x = stage(x, train)
        x = avg_pool(x, 8)
        return self.head(x.reshape(x.shape[0], -1))


def resnet14(**kw) -> ResNetV1Cifar:
    """ResNet-14 v1 for CIFAR-10 (n = 2)."""
    return ResNetV1Cifar(14, **kw)


def resnet20(**kw) -> ResNetV1Cifar:
    """ResNet-20 v1 for CIFAR-10 (n = 3)."""
    return ResNetV1Cifar(20, **kw)


def resnet32(**kw) -> ResNetV1Cifar:
    """ResNet-32 v1 for CIFAR-10 (n = 5)."""
    return ResNetV1Cifar(32, **kw)


def resnet56(**kw) -> ResNetV1Cifar:
    """ResNet-56 v1 for CIFAR-10 (n = 9)."""
    return ResNetV1Cifar(56, **kw)


# ----------------------------------------------------------------------------- ResNet50


class Bottleneck(nnx.Module):
    """Bottleneck block of `keras.applications.ResNet50`: 1x1, 3x3, 1x1 (x4) convolutions.

    Args:
      in_features: input channels.
      features: bottleneck channels (output has `4 * features`).
      strides: block stride; on the first 1x1 (v1) or on the 3x3 (v1.5).
      v1_5: where the stride goes.
      projection: whether the shortcut is a 1x1 convolution + batch norm.
      bn_epsilon: batch-normalization epsilon.
      rngs: random streams for initialization.
    """

    def __init__(self, in_features: int, features: int, strides: int, *, v1_5: bool,
                 projection: bool, bn_epsilon: float = KERAS_APPLICATIONS_BN_EPSILON,
                 rngs: nnx.Rngs):
        s1, s2 = (1, strides) if v1_5 else (strides, 1)
        out = 4 * features
        eps = bn_epsilon
        if projection:
            self.shortcut = conv(in_features, out, 1, strides=strides, padding="VALID",
                                 rngs=rngs)
            self.shortcut_bn = batch_norm(out, eps)
        else:
            self.shortcut = None
            self.shortcut_bn = None
        self.conv1 = conv(in_features, features, 1, strides=s1, padding="VALID", rngs=rngs)
        self.bn1 = batch_norm(features, eps)
        self.conv2 = conv(features, features, 3, strides=s2, rngs=rngs)
        self.bn2 = batch_norm(features, eps)
        self.conv3 = conv(features, out, 1, padding="VALID", rngs=rngs)
        self.bn3 = batch_norm(out, eps)

    def __call__(self, x: Array, train: bool = False) -> Array:
        """The block's output (batch statistics in the norms when `train`)."""
        ra = not train
        s = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x),
                                                              use_running_average=ra)
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ra))
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ra))
        y = self.bn3(self.conv3(y), use_running_average=ra)
        return jax.nn.relu(s + y)


class ResNet50(nnx.Module):
    """ResNet50 with the layer structure of `keras.applications.ResNet50`.

    `conv1_pad` + 7x7/2 convolution with bias (here one convolution with explicit 3-pixel
    padding), BN, ReLU, `pool1` (1-pixel zero padding + 3x3/2 max pool), stages of 3, 4, 6, 3
    bottleneck blocks, global average pool, dense. Every convolution has a bias; batch norm uses
    epsilon 1.001e-5. Keras applications is v1 (stride on the first 1x1 of a block); v1.5 puts it
    on the 3x3 convolution.

    Args:
      v1_5: stride on the 3x3 convolution (True) or on the first 1x1 (False, Keras).
      num_classes: outputs of the dense layer.
      width: channels of the stem (64); stage `s` has bottleneck width `width * 2**s`.
      input_shape: `(H, W, C)` the model is meant for (used to list layers).
      bn_epsilon: batch-normalization epsilon.
      rngs: random streams for initialization (`nnx.Rngs(0)` if omitted).
    """

    STAGE_BLOCKS = (3, 4, 6, 3)

    def __init__(self, v1_5: bool = True, *, num_classes: int = 1000, width: int = 64,
                 input_shape: tuple[int, int, int] = (224, 224, 3),
                 bn_epsilon: float = KERAS_APPLICATIONS_BN_EPSILON,
                 rngs: nnx.Rngs | None = None):
        rngs = _rngs(rngs)
        self.v1_5 = bool(v1_5)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_folded = False
        self.stem = Stem(conv(input_shape[-1], width, 7, strides=2, padding=((3, 3), (3, 3)),
                              rngs=rngs), batch_norm(width, bn_epsilon))
        cin = width
        for stage, nblocks in enumerate(self.STAGE_BLOCKS):
            features = width * 2**stage
            blocks = []
            for j in range(nblocks):
                blocks.append(Bottleneck(cin, features, 2 if (stage > 0 and j == 0) else 1,
                                         v1_5=v1_5, projection=j == 0, bn_epsilon=bn_epsilon,
                                         rngs=rngs))
                cin = 4 * features
            setattr(self, f"stage{stage + 1}", Stage(blocks))
        self.head = Head(dense(cin, num_classes, rngs=rngs))

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages in forward order."""
        return (self.stage1, self.stage2, self.stage3, self.stage4)

    @property
    def model_name(self) -> str:
        """The model's name in parameter files."""
        return "resnet50v1_5" if self.v1_5 else "resnet50v1"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable (see `build_model`)."""
        return {"architecture": "ResNet50", "v1_5": self.v1_5, "num_classes": self.num_classes,
                "width": self.width, "input_shape": list(self.input_shape),
                "bn_epsilon": self.bn_epsilon}

    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """Forward pass.

        Args:
          x: preprocessed images, NHWC float (see `jaxbar.data.preprocess`).
          train: batch statistics (and running-average updates) instead of running ones.

        Returns:
          Logits `(N, num_classes)`.
        """
        x = self.stem(x, train)
        x = max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, 2)
        for stage in self.stages:
            x = stage(x, train)
        return self.head(jnp.mean(x, axis=(1, 2)))


# ----------------------------------------------------------------------------- utilities


def build_model(config: dict[str, Any], rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Builds a model from `model.config()`.

    Args:
      config: a dict with `"architecture"` and the constructor arguments.
      rngs: random streams for initialization.

    Returns:
      The (freshly initialized) model.
    """
    cfg = dict(config)
    arch = cfg.pop("architecture", None)
    if "input_shape" in cfg:
        cfg["input_shape"] = tuple(cfg["input_shape"])
    if arch == "ResNetV1Cifar":
        return ResNetV1Cifar(cfg.pop("depth"), rngs=rngs, **cfg)
    if arch == "ResNet50":
        return ResNet50(cfg.pop("v1_5"), rngs=rngs, **cfg)
    raise ValueError(f"unknown architecture {arch!r}")


def _example(model: nnx.Module, input_shape: tuple[int, ...] | None):
    if input_shape is None:
        if not hasattr(model, "input_shape"):
            raise ValueError(f"{type(model).__name__} has no input_shape: pass one")
        input_shape = (1, *model.input_shape)
    return jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)


def layer_names(model: nnx.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Paths of the weight layers (convolution, dense, ...) in forward (call) order."""
    return list(dict.fromkeys(c.path for c in trace(model, _example(model, input_shape)).calls))


def layer_shapes(model: nnx.Module, input_shape: tuple[int, ...] | None = None
                 ) -> dict[str, tuple[int, ...]]:
    """Kernel shape of each weight layer (HWIO for convolutions), in forward order."""
    return {c.path: c.kernel_shape for c in trace(model, _example(model, input_shape)).calls}


def named_layers(model: nnx.Module, input_shape: tuple[int, ...] | None = None
                 ) -> dict[str, nnx.Module]:
    """The weight layers keyed by path, in forward order."""
    found = {p: m for p, m in modules(model).items() if isinstance(m, WEIGHT_LAYERS)}
    return {name: found[name] for name in layer_names(model, input_shape)}


def named_batchnorms(model: nnx.Module) -> dict[str, nnx.BatchNorm]:
    """The (unfolded) batch norms keyed by path."""
    return {p: m for p, m in modules(model).items() if isinstance(m, nnx.BatchNorm)}


def count_params(model: nnx.Module, include_batch_stats: bool = True) -> int:
    """Number of scalars in the parameters (and batch statistics) of a model."""
    filt = nnx.Any(nnx.Param, nnx.BatchStat) if include_batch_stats else nnx.Param
    leaves = jax.tree.leaves(nnx.state(model, filt))
    return int(sum(leaf.size for leaf in leaves))


__all__ = [
    "BasicBlock", "Bottleneck", "Identity", "KERAS_APPLICATIONS_BN_EPSILON", "KERAS_BN_EPSILON",
    "ResNet50", "ResNetV1Cifar", "build_model", "count_params", "layer_names", "layer_shapes",
    "named_batchnorms", "named_layers", "resnet14", "resnet20", "resnet32", "resnet56",
]
