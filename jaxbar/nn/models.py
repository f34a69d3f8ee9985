"""Model definitions: the ResNet-v1 CIFAR family and ResNet50 (v1 / v1.5).

Every convolution and dense layer is a :class:`~jaxbar.nn.layers.Conv` /
:class:`~jaxbar.nn.layers.Dense` with a unique dotted name and computes through the contraction
given to ``model(x, contraction)``. Models return logits (the Keras files end with a softmax,
which is left out here since it does not change the top-1 class).

Layer names:

- CIFAR ResNet: ``stem.conv``, ``stem.bn``, ``stage{1,2,3}.block{j}.{conv1,bn1,conv2,bn2}``,
  ``stage{2,3}.block0.shortcut`` (1x1 stride-2 projection with bias, no batch norm),
  ``head.dense``.
- ResNet50: ``stem.conv``, ``stem.bn``, ``stage{1..4}.block{j}.{conv1,bn1,conv2,bn2,conv3,bn3}``,
  ``stage{s}.block0.{shortcut,shortcut_bn}``, ``head.dense``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbar.nn.contraction import DIGITAL, Contraction, Recorder
from jaxbar.nn.layers import KERAS_BN_EPSILON, BatchNorm, Conv, Dense, Identity, avg_pool, max_pool

Array = jax.Array

#: Keras applications' ResNet batch-normalization epsilon.
KERAS_APPLICATIONS_BN_EPSILON = 1.001e-5


def _rngs(rngs: nnx.Rngs | None) -> nnx.Rngs:
    return nnx.Rngs(0) if rngs is None else rngs


# ----------------------------------------------------------------------------- CIFAR ResNet-v1


class BasicBlock(nnx.Module):
    """ResNet-v1 basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

    Args:
        in_features: input channels.
        features: output channels.
        strides: stride of the first 3x3 convolution and of the projection.
        prefix: dotted name prefix, e.g. ``"stage2.block0"``.
        bn_epsilon: batch-normalization epsilon.
        rngs: random streams for initialization.
    """

    def __init__(self, in_features: int, features: int, strides: int, *, prefix: str,
                 bn_epsilon: float = KERAS_BN_EPSILON, rngs: nnx.Rngs):
        self.conv1 = Conv(in_features, features, 3, strides=strides, name=f"{prefix}.conv1",
                          rngs=rngs)
        self.bn1 = BatchNorm(features, name=f"{prefix}.bn1", epsilon=bn_epsilon)
        self.conv2 = Conv(features, features, 3, name=f"{prefix}.conv2", rngs=rngs)
        self.bn2 = BatchNorm(features, name=f"{prefix}.bn2", epsilon=bn_epsilon)
        if strides != 1 or in_features != features:
            self.shortcut = Conv(in_features, features, 1, strides=strides,
                                 name=f"{prefix}.shortcut", rngs=rngs)
        else:
            self.shortcut = None

    def __call__(self, x: Array, contraction: Contraction = DIGITAL, train: bool = False) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x, contraction), train))
        y = self.bn2(self.conv2(y, contraction), train)
        s = x if self.shortcut is None else self.shortcut(x, contraction)
        return jax.nn.relu(s + y)

    def conv_bn_pairs(self) -> list[tuple[Conv, nnx.Module, str]]:
        return [(self.conv1, self, "bn1"), (self.conv2, self, "bn2")]


class ResNetV1Cifar(nnx.Module):
    """ResNet-v1 for CIFAR (He et al. 2016; the Keras CIFAR-10 example), depth ``6n + 2``.

    Stem conv3x3(16)-BN-ReLU; three stages of ``n`` basic blocks with 16, 32, 64 filters (the
    first block of stages 2 and 3 has stride 2 and a 1x1 projection shortcut with bias); 8x8
    average pooling; dense. All convolutions have a bias, batch norm uses epsilon 1e-3.

    Args:
        depth: 14, 20, 32, 56, ... (``6n + 2``).
        num_classes: outputs of the dense layer.
        width: filters of the first stage (16 in the Keras example).
        input_shape: ``(H, W, C)`` the model is meant for (used to list layers).
        rngs: random streams for initialization (``nnx.Rngs(0)`` if omitted).
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
        self.stem_conv = Conv(input_shape[-1], width, 3, name="stem.conv", rngs=rngs)
        self.stem_bn = BatchNorm(width, name="stem.bn")
        blocks = []
        cin = width
        for stage in range(3):
            features = width * 2**stage
            for j in range(n):
                strides = 2 if (stage > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, features, strides,
                                         prefix=f"stage{stage + 1}.block{j}", rngs=rngs))
                cin = features
        self.blocks = nnx.List(blocks)
        self.head = Dense(cin, num_classes, name="head.dense", rngs=rngs)

    @property
    def model_name(self) -> str:
        return f"resnet{self.depth}v1_cifar"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable (see :func:`build_model`)."""
        return {"architecture": "ResNetV1Cifar", "depth": self.depth,
                "num_classes": self.num_classes, "width": self.width,
                "input_shape": list(self.input_shape)}

    def __call__(self, x: Array, contraction: Contraction = DIGITAL, *, train: bool = False
                 ) -> Array:
        """Forward pass.

        Args:
            x: preprocessed images, NHWC float.
            contraction: computes every convolution and dense layer.
            train: batch statistics (and running-average updates) instead of running ones.

        Returns:
            Logits ``(N, num_classes)``.
        """
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x, contraction), train))
        for block in self.blocks:
            x = block(x, contraction, train)
        x = avg_pool(x, 8)
        x = x.reshape(x.shape[0], -1)
        return self.head(x, contraction)

    def conv_bn_pairs(self) -> list[tuple[Conv, nnx.Module, str]]:
        """Each convolution followed by a batch norm: ``(conv, owner, bn attribute name)``."""
        pairs = [(self.stem_conv, self, "stem_bn")]
        for block in self.blocks:
            pairs += block.conv_bn_pairs()
        return pairs


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
    """Bottleneck block of ``keras.applications.ResNet50``: 1x1, 3x3, 1x1 (x4) convolutions.

    Args:
        in_features: input channels.
        features: bottleneck channels (output has ``4 * features``).
        strides: block stride; on the first 1x1 (v1) or on the 3x3 (v1.5).
        v1_5: where the stride goes.
        projection: whether the shortcut is a 1x1 convolution + batch norm.
        prefix: dotted name prefix.
        bn_epsilon: batch-normalization epsilon.
        rngs: random streams for initialization.
    """

    def __init__(self, in_features: int, features: int, strides: int, *, v1_5: bool,
                 projection: bool, prefix: str,
                 bn_epsilon: float = KERAS_APPLICATIONS_BN_EPSILON, rngs: nnx.Rngs):
        s1, s2 = (1, strides) if v1_5 else (strides, 1)
        out = 4 * features
        eps = bn_epsilon
        if projection:
            self.shortcut = Conv(in_features, out, 1, strides=strides, padding="valid",
                                 name=f"{prefix}.shortcut", rngs=rngs)
            self.shortcut_bn = BatchNorm(out, name=f"{prefix}.shortcut_bn", epsilon=eps)
        else:
            self.shortcut = None
            self.shortcut_bn = None
        self.conv1 = Conv(in_features, features, 1, strides=s1, padding="valid",
                          name=f"{prefix}.conv1", rngs=rngs)
        self.bn1 = BatchNorm(features, name=f"{prefix}.bn1", epsilon=eps)
        self.conv2 = Conv(features, features, 3, strides=s2, padding="same",
                          name=f"{prefix}.conv2", rngs=rngs)
        self.bn2 = BatchNorm(features, name=f"{prefix}.bn2", epsilon=eps)
        self.conv3 = Conv(features, out, 1, padding="valid", name=f"{prefix}.conv3", rngs=rngs)
        self.bn3 = BatchNorm(out, name=f"{prefix}.bn3", epsilon=eps)

    def __call__(self, x: Array, contraction: Contraction = DIGITAL, train: bool = False) -> Array:
        if self.shortcut is None:
            s = x
        else:
            s = self.shortcut_bn(self.shortcut(x, contraction), train)
        y = jax.nn.relu(self.bn1(self.conv1(x, contraction), train))
        y = jax.nn.relu(self.bn2(self.conv2(y, contraction), train))
        y = self.bn3(self.conv3(y, contraction), train)
        return jax.nn.relu(s + y)

    def conv_bn_pairs(self) -> list[tuple[Conv, nnx.Module, str]]:
        pairs = [] if self.shortcut is None else [(self.shortcut, self, "shortcut_bn")]
        return pairs + [(self.conv1, self, "bn1"), (self.conv2, self, "bn2"),
                        (self.conv3, self, "bn3")]


class ResNet50(nnx.Module):
    """ResNet50 with the layer structure of ``keras.applications.ResNet50``.

    ``conv1_pad`` + 7x7/2 convolution with bias (here one convolution with explicit 3-pixel
    padding), BN, ReLU, ``pool1`` (1-pixel zero padding + 3x3/2 max pool), stages of 3, 4, 6, 3
    bottleneck blocks, global average pool, dense. Every convolution has a bias; batch norm uses
    epsilon 1.001e-5. Keras applications is v1 (stride on the first 1x1 of a block); v1.5 puts it
    on the 3x3 convolution.

    Args:
        v1_5: stride on the 3x3 convolution (True) or on the first 1x1 (False, Keras).
        num_classes: outputs of the dense layer.
        width: channels of the stem (64); stage ``s`` has bottleneck width ``width * 2**s``.
        input_shape: ``(H, W, C)`` the model is meant for (used to list layers).
        rngs: random streams for initialization (``nnx.Rngs(0)`` if omitted).
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
        self.bn_folded = False
        self.stem_conv = Conv(input_shape[-1], width, 7, strides=2, padding=((3, 3), (3, 3)),
                              name="stem.conv", rngs=rngs)
        self.stem_bn = BatchNorm(width, name="stem.bn", epsilon=bn_epsilon)
        blocks = []
        cin = width
        for stage, nblocks in enumerate(self.STAGE_BLOCKS):
            features = width * 2**stage
            for j in range(nblocks):
                strides = 2 if (stage > 0 and j == 0) else 1
                blocks.append(Bottleneck(cin, features, strides, v1_5=v1_5, projection=j == 0,
                                         prefix=f"stage{stage + 1}.block{j}",
                                         bn_epsilon=bn_epsilon, rngs=rngs))
                cin = 4 * features
        self.blocks = nnx.List(blocks)
        self.head = Dense(cin, num_classes, name="head.dense", rngs=rngs)

    @property
    def model_name(self) -> str:
        return "resnet50v1_5" if self.v1_5 else "resnet50v1"

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serializable (see :func:`build_model`)."""
        return {"architecture": "ResNet50", "v1_5": self.v1_5, "num_classes": self.num_classes,
                "width": self.width, "input_shape": list(self.input_shape),
                "bn_epsilon": self.stem_bn.epsilon if isinstance(self.stem_bn, BatchNorm)
                else KERAS_APPLICATIONS_BN_EPSILON}

    def __call__(self, x: Array, contraction: Contraction = DIGITAL, *, train: bool = False
                 ) -> Array:
        """Forward pass.

        Args:
            x: preprocessed images, NHWC float (see ``jaxbar.data.preprocess``).
            contraction: computes every convolution and dense layer.
            train: batch statistics (and running-average updates) instead of running ones.

        Returns:
            Logits ``(N, num_classes)``.
        """
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x, contraction), train))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = max_pool(x, 3, 2)
        for block in self.blocks:
            x = block(x, contraction, train)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x, contraction)

    def conv_bn_pairs(self) -> list[tuple[Conv, nnx.Module, str]]:
        """Each convolution followed by a batch norm: ``(conv, owner, bn attribute name)``."""
        pairs = [(self.stem_conv, self, "stem_bn")]
        for block in self.blocks:
            pairs += block.conv_bn_pairs()
        return pairs


# ----------------------------------------------------------------------------- utilities


def build_model(config: dict[str, Any], rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Builds a model from ``model.config()``.

    Args:
        config: a dict with ``"architecture"`` and the constructor arguments.
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


def trace_layers(model: nnx.Module, input_shape: tuple[int, ...] | None = None) -> Recorder:
    """Runs the model abstractly (no FLOPs) and records every contraction call in order.

    Args:
        model: a jaxbar model (concrete, or abstract from ``nnx.eval_shape``).
        input_shape: ``(N, H, W, C)``; default ``(1, *model.input_shape)``.

    Returns:
        A :class:`~jaxbar.nn.contraction.Recorder` whose ``calls`` list the layers.
    """
    if input_shape is None:
        input_shape = (1, *model.input_shape)
    rec = Recorder()
    graphdef, state = nnx.split(model)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, rec)

    jax.eval_shape(run, state, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return rec


def layer_names(model: nnx.Module) -> list[str]:
    """Names of the convolution and dense layers in forward (call) order."""
    return [c.name for c in trace_layers(model).calls]


def layer_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Kernel shape of each convolution (HWIO) and dense (K, N) layer, in forward order."""
    return {c.name: c.kernel_shape for c in trace_layers(model).calls}


def named_layers(model: nnx.Module) -> dict[str, Conv | Dense]:
    """The :class:`Conv` / :class:`Dense` modules keyed by name, in forward order."""
    found = {m.name: m for _, m in nnx.iter_modules(model) if isinstance(m, Conv | Dense)}
    return {name: found[name] for name in layer_names(model)}


def named_batchnorms(model: nnx.Module) -> dict[str, BatchNorm]:
    """The (unfolded) :class:`BatchNorm` modules keyed by name."""
    return {m.name: m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)}


def count_params(model: nnx.Module, include_batch_stats: bool = True) -> int:
    """Number of scalars in the parameters (and batch statistics) of a model."""
    filt = nnx.Any(nnx.Param, nnx.BatchStat) if include_batch_stats else nnx.Param
    leaves = jax.tree.leaves(nnx.state(model, filt))
    return int(sum(leaf.size for leaf in leaves))


__all__ = [
    "BasicBlock", "Bottleneck", "Identity", "ResNet50", "ResNetV1Cifar", "build_model",
    "count_params", "layer_names", "layer_shapes", "named_batchnorms", "named_layers",
    "resnet14", "resnet20", "resnet32", "resnet56", "trace_layers",
]
