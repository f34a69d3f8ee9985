"""Import of Keras HDF5 (`.h5`) ResNet weights with h5py only (no TensorFlow).

A Keras 2 model file holds the layer graph as JSON in the `model_config` attribute and the
weights in `model_weights/<layer>/...` (each layer group lists its datasets in the
`weight_names` attribute). A weights-only file (`model.save_weights`) has the layer groups at
the root and a `layer_names` attribute instead.

The CIFAR ResNet mapping is derived from the graph in `model_config` (residual `Add` nodes
traced back to their convolutions), so it does not depend on Keras' automatic layer numbering.
ResNet50 uses the fixed layer names of `keras.applications.ResNet50`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import nnx

from jaxbar.nn.models import ResNet50, ResNetV1Cifar, named_batchnorms, named_layers
from jaxbar.nn.params_io import check_finite


class WeightsError(ValueError):
    """A weights file cannot be read or does not fit the model."""


# ----------------------------------------------------------------------------- HDF5 access


def _h5py():
    import h5py

    return h5py


def open_h5(path: str | os.PathLike):
    """Opens an HDF5 file for reading, with clear errors.

    Args:
      path: file path.

    Returns:
      An open `h5py.File` (use it as a context manager).

    Raises:
      WeightsError: missing file, not an HDF5 file, or unreadable (corrupt).
    """
    h5py = _h5py()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"weights file not found: {path}")
    if os.path.isdir(path):
        raise WeightsError(f"weights path is a directory, not an HDF5 file: {path}")
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    if not is_h5:
        raise WeightsError(f"not an HDF5 file (corrupt, or another format such as .keras zip): "
                           f"{path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"corrupt or unreadable HDF5 file {path}: {e}") from e


def _attr_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.ndarray) and v.shape == ():
        return _attr_str(v.item())
    return str(v)


def read_model_config(f) -> dict[str, Any]:
    """Parses the `model_config` JSON of an open Keras file.

    Raises:
      WeightsError: the attribute is absent or not valid JSON.
    """
    if "model_config" not in f.attrs:
        raise WeightsError(f"{f.filename}: no 'model_config' attribute (not a full Keras model "
                           "file; a weights-only file needs the layer graph from elsewhere)")
    try:
        return json.loads(_attr_str(f.attrs["model_config"]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{f.filename}: 'model_config' is not valid JSON: {e}") from e


def weights_root(f):
    """The group holding one subgroup per layer.

    It is `model_weights`, or the root of a weights-only file.

    Raises:
      WeightsError: neither layout is present.
    """
    if "model_weights" in f:
        return f["model_weights"]
    if "layer_names" in f.attrs:
        return f
    raise WeightsError(f"{f.filename}: no 'model_weights' group (and no weights-only "
                       "'layer_names' attribute): not a Keras weights file")


def read_layer_weights(root, layer: str, *, context: str = "") -> dict[str, np.ndarray]:
    """Reads the datasets of one Keras layer, keyed by short name.

    The names are `kernel`, `bias`, `gamma`, `beta`, `moving_mean` and
    `moving_variance`.

    Args:
      root: see `weights_root`.
      layer: Keras layer name.
      context: extra text for error messages (e.g. the jaxbar layer name).

    Raises:
      WeightsError: the layer is not in the file, or a listed dataset is missing.
    """
    where = f" ({context})" if context else ""
    if layer not in root:
        raise WeightsError(f"{root.file.filename}: layer {layer!r}{where} not found in the "
                           "weights")
    g = root[layer]
    names = [_attr_str(n) for n in g.attrs.get("weight_names", [])]
    out: dict[str, np.ndarray] = {}
    if not names:  # fall back to walking the group
        def visit(name, obj):
            if hasattr(obj, "shape"):
                names.append(name)
        g.visititems(visit)
    for n in names:
        if n not in g:
            raise WeightsError(f"{root.file.filename}: weight {n!r} of layer {layer!r}{where} "
                               "is listed but missing")
        short = n.rsplit("/", 1)[-1].split(":", 1)[0]
        out[short] = np.asarray(g[n][()])
    return out


# ----------------------------------------------------------------------------- Keras graph


def _inbound_names(layer: dict[str, Any]) -> list[str]:
    """Names of the layers feeding a layer (Keras 2 and Keras 3 config formats)."""
    names: list[str] = []

    def from_keras3(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                names.append(obj["config"]["keras_history"][0])
            else:
                for v in obj.values():
                    from_keras3(v)
        elif isinstance(obj, list):
            for v in obj:
                from_keras3(v)

    for node in layer.get("inbound_nodes", []):
        if isinstance(node, dict):
            from_keras3(node.get("args", []))
        else:
            for item in node:
                names.append(item[0])
    return names


@dataclass
class KerasGraph:
    """The layer graph of a Keras functional model.

    Attributes:
      layers: layer name -> `{"class_name", "config", "inbound"}` in topological order.
      consumers: layer name -> names of layers that take its output.
    """

    layers: dict[str, dict[str, Any]]
    consumers: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, model_config: dict[str, Any]) -> KerasGraph:
        """The graph of a Keras functional model config."""
        cfg = model_config.get("config", {})
        raw = cfg.get("layers")
        if not isinstance(raw, list):
            raise WeightsError("model_config has no layer list (not a functional model)")
        nodes = {}
        for layer in raw:
            nodes[layer.get("name") or layer["config"]["name"]] = {
                "class_name": layer["class_name"], "config": layer.get("config", {}),
                "inbound": _inbound_names(layer)}
        # topological order (Kahn), stable with respect to the file's order
        order: list[str] = []
        done: set[str] = set()
        pending = list(nodes)
        while pending:
            progressed = False
            rest = []
            for n in pending:
                if all(i in done for i in nodes[n]["inbound"]):
                    order.append(n)
                    done.add(n)
                    progressed = True
                else:
                    rest.append(n)
            if not progressed:
                raise WeightsError(f"model_config graph has unknown inputs or a cycle at {rest}")
            pending = rest
        layers = {n: nodes[n] for n in order}
        consumers: dict[str, list[str]] = {n: [] for n in layers}
        for n, node in layers.items():
            for i in node["inbound"]:
                consumers[i].append(n)
        return cls(layers, consumers)

    def kind(self, name: str) -> str:
        """The Keras class name of a layer."""
        return self.layers[name]["class_name"]

    def cfg(self, name: str) -> dict[str, Any]:
        """The Keras config of a layer."""
        return self.layers[name]["config"]

    def single_input(self, name: str) -> str:
        """The one layer feeding `name` (a `WeightsError` otherwise)."""
        ins = self.layers[name]["inbound"]
        if len(ins) != 1:
            raise WeightsError(f"layer {name!r} has {len(ins)} inputs, expected 1")
        return ins[0]

    def of_kind(self, kind: str | Iterable[str]) -> list[str]:
        """The layers of a Keras class (or classes), in config order."""
        kinds = {kind} if isinstance(kind, str) else set(kind)
        return [n for n in self.layers if self.kind(n) in kinds]

    def expect(self, name: str, kind: str | tuple[str, ...], what: str) -> str:
        """`name`, checked to be of `kind` (a `WeightsError` naming `what` otherwise)."""
        kinds = (kind,) if isinstance(kind, str) else kind
        if self.kind(name) not in kinds:
            raise WeightsError(f"unexpected topology: {what} is {name!r} of type "
                               f"{self.kind(name)}, expected {'/'.join(kinds)}")
        return name

    def is_relu(self, name: str) -> bool:
        """Whether a layer applies a ReLU."""
        k = self.kind(name)
        return (k == "Activation" and self.cfg(name).get("activation") == "relu") or k == "ReLU"


#: A mapping entry: (jaxbar layer name, Keras layer name).
LayerMap = dict[str, str]

_SKIP = ("Activation", "ReLU", "Dropout")


def cifar_layer_map(model_config: dict[str, Any]) -> tuple[LayerMap, dict[str, Any]]:
    """Maps the layers of a Keras ResNet-v1 CIFAR model to jaxbar names via its graph.

    Each residual `Add` is traced back: the input that is a batch norm ends the residual branch
    (`bn2 <- conv2 <- relu <- bn1 <- conv1 <- block input`); the other input is the block input
    itself or a projection convolution of it. Blocks must chain; the stem is the convolution on
    the model input and the head the single `Dense` layer.

    Args:
      model_config: the parsed `model_config`.

    Returns:
      `(mapping, info)`: jaxbar name -> Keras layer name for every convolution, dense and
      batch-norm layer, and `info` with `depth`, `num_classes`, `width`,
      `input_shape`, `bn_epsilon`, `pool_size` and per-layer `strides`/`padding`.

    Raises:
      WeightsError: the graph is not a ResNet-v1 CIFAR network.
    """
    g = KerasGraph.from_config(model_config)
    inputs = g.of_kind("InputLayer")
    if len(inputs) != 1:
        raise WeightsError(f"expected one InputLayer, found {len(inputs)}")
    inp = inputs[0]
    in_cfg = g.cfg(inp)
    in_shape = in_cfg.get("batch_input_shape") or in_cfg.get("batch_shape")
    m: LayerMap = {}
    eps: set[float] = set()

    def bn_after(conv: str, what: str) -> str:
        bns = [c for c in g.consumers[conv] if g.kind(c) == "BatchNormalization"]
        if len(bns) != 1:
            raise WeightsError(f"unexpected topology: {what} {conv!r} is not followed by one "
                               "BatchNormalization")
        eps.add(float(g.cfg(bns[0]).get("epsilon", 1e-3)))
        return bns[0]

    def relu_after(name: str, what: str) -> str:
        acts = [c for c in g.consumers[name] if g.is_relu(c)]
        if len(acts) != 1:
            raise WeightsError(f"unexpected topology: {what} {name!r} is not followed by a ReLU")
        return acts[0]

    stems = [c for c in g.consumers[inp] if g.kind(c) == "Conv2D"]
    if len(stems) != 1:
        raise WeightsError("unexpected topology: expected one Conv2D on the model input")
    m["stem.conv"] = stems[0]
    m["stem.bn"] = bn_after(stems[0], "stem convolution")
    x = relu_after(m["stem.bn"], "stem batch norm")

    adds = g.of_kind("Add")
    if not adds:
        raise WeightsError("unexpected topology: no residual Add layers")
    nblocks = len(adds)
    if nblocks % 3:
        raise WeightsError(f"{nblocks} residual blocks is not 3 stages of n blocks")
    n = nblocks // 3
    for b, add in enumerate(adds):
        stage, j = b // n + 1, b % n
        prefix = f"stage{stage}.block{j}"
        ins = g.layers[add]["inbound"]
        if len(ins) != 2:
            raise WeightsError(f"residual {add!r} has {len(ins)} inputs, expected 2")
        bn_ins = [i for i in ins if g.kind(i) == "BatchNormalization"]
        if len(bn_ins) == 2:  # identity shortcut can't be a BN here; pick the one after a conv
            bn_ins = [i for i in bn_ins if g.kind(g.single_input(i)) == "Conv2D"][:1]
        if len(bn_ins) != 1:
            raise WeightsError(f"unexpected topology: residual {add!r} has no batch-norm branch")
        bn2 = bn_ins[0]
        short = ins[1] if ins[0] == bn2 else ins[0]
        conv2 = g.expect(g.single_input(bn2), "Conv2D", f"{prefix} conv2")
        act1 = g.single_input(conv2)
        if not g.is_relu(act1):
            raise WeightsError(f"unexpected topology: {prefix} conv2 input {act1!r} is not ReLU")
        bn1 = g.expect(g.single_input(act1), "BatchNormalization", f"{prefix} bn1")
        conv1 = g.expect(g.single_input(bn1), "Conv2D", f"{prefix} conv1")
        block_in = g.single_input(conv1)
        if block_in != x:
            raise WeightsError(f"unexpected topology: {prefix} ({conv1!r}) does not follow the "
                               f"previous block output {x!r}")
        eps.update(float(g.cfg(bn).get("epsilon", 1e-3)) for bn in (bn1, bn2))
        m[f"{prefix}.conv1"], m[f"{prefix}.bn1"] = conv1, bn1
        m[f"{prefix}.conv2"], m[f"{prefix}.bn2"] = conv2, bn2
        if short != x:
            g.expect(short, "Conv2D", f"{prefix} shortcut")
            if g.single_input(short) != x:
                raise WeightsError(f"unexpected topology: shortcut {short!r} of {prefix} does "
                                   "not take the block input")
            m[f"{prefix}.shortcut"] = short
        x = relu_after(add, f"{prefix} residual")

    pools = [c for c in g.consumers[x] if g.kind(c) in ("AveragePooling2D",
                                                          "GlobalAveragePooling2D")]
    if len(pools) != 1:
        raise WeightsError("unexpected topology: no average pooling after the last block")
    pool_cfg = g.cfg(pools[0])
    dense = g.of_kind("Dense")
    if len(dense) != 1:
        raise WeightsError(f"expected one Dense layer, found {len(dense)}")
    m["head.dense"] = dense[0]
    if len(eps) != 1:
        raise WeightsError(f"batch-norm epsilons differ between layers: {sorted(eps)}")
    layer_cfg = {ours: g.cfg(k) for ours, k in m.items() if g.kind(k) == "Conv2D"}
    info = {
        "depth": 6 * n + 2,
        "num_classes": int(g.cfg(dense[0])["units"]),
        "width": int(g.cfg(stems[0])["filters"]),
        "input_shape": tuple(in_shape[1:]) if in_shape else (32, 32, 3),
        "bn_epsilon": eps.pop(),
        "pool_size": tuple(pool_cfg.get("pool_size", ())),
        "strides": {k: tuple(c.get("strides", (1, 1))) for k, c in layer_cfg.items()},
        "padding": {k: c.get("padding", "valid") for k, c in layer_cfg.items()},
        "use_bias": {k: c.get("use_bias", True) for k, c in layer_cfg.items()},
    }
    return m, info


# ----------------------------------------------------------------------------- assignment


def _assign(var: nnx.Variable, value: np.ndarray, what: str) -> None:
    want = tuple(var[...].shape)
    if tuple(value.shape) != want:
        raise WeightsError(f"shape mismatch for {what}: file has {tuple(value.shape)}, model "
                           f"expects {want}")
    var[...] = np.asarray(value, dtype=np.float32)


def _load_into(model: nnx.Module, root, mapping: LayerMap) -> None:
    layers = named_layers(model)
    bns = named_batchnorms(model)
    missing = [k for k in list(layers) + list(bns) if k not in mapping]
    if missing:
        raise WeightsError(f"no Keras layer found for {missing}")
    for ours, keras in mapping.items():
        w = read_layer_weights(root, keras, context=ours)
        what = f"layer {keras!r} ({ours})"
        if ours in layers:
            layer = layers[ours]
            if "kernel" not in w:
                raise WeightsError(f"{what}: no kernel in the file (has {sorted(w)})")
            _assign(layer.kernel, w["kernel"], f"{what} kernel")
            if layer.bias is not None:
                if "bias" not in w:
                    raise WeightsError(f"{what}: no bias in the file")
                _assign(layer.bias, w["bias"], f"{what} bias")
            elif "bias" in w:
                raise WeightsError(f"{what}: the file has a bias the model lacks")
        elif ours in bns:
            bn = bns[ours]
            for key, var in (("gamma", bn.scale), ("beta", bn.bias),
                             ("moving_mean", bn.mean), ("moving_variance", bn.var)):
                if key in w:
                    _assign(var, w[key], f"{what} {key}")
                elif key in ("moving_mean", "moving_variance"):
                    raise WeightsError(f"{what}: no {key} in the file")
                # a BN without center/scale keeps beta = 0 / gamma = 1
        else:
            raise WeightsError(f"model has no layer {ours!r}")


# ----------------------------------------------------------------------------- public loaders


def load_keras_resnet_cifar(path: str | os.PathLike, depth: int | None = None
                            ) -> ResNetV1Cifar:
    """Loads a Keras ResNet-v1 CIFAR model file (`model_config` + `model_weights`).

    Args:
      path: the `.h5` file.
      depth: expected depth; inferred from the file if `None`.

    Returns:
      A `ResNetV1Cifar` holding the file's weights (batch norm unfolded).

    Raises:
      WeightsError: unreadable file, missing config/weights/layer, topology or shape mismatch.
      ParamsError: a layer's weights are not finite (NaN or inf).
    """
    with open_h5(path) as f:
        mapping, info = cifar_layer_map(read_model_config(f))
        root = weights_root(f)
        if depth is not None and int(depth) != info["depth"]:
            raise WeightsError(f"{path}: file holds a depth-{info['depth']} ResNet, "
                               f"depth {depth} was requested")
        model = ResNetV1Cifar(info["depth"], num_classes=info["num_classes"],
                              width=info["width"], input_shape=info["input_shape"])
        layers = named_layers(model)
        for name, strides in info["strides"].items():
            conv = layers[name]
            model_strides = (conv.strides,) * 2 if isinstance(conv.strides, int) else tuple(
                conv.strides)
            if tuple(strides) != model_strides:
                raise WeightsError(f"layer {mapping[name]!r} ({name}) has strides {strides}, "
                                   f"the model {model_strides}")
            pad = info["padding"][name]
            if str(pad).lower() != str(conv.padding).lower() and conv.kernel[...].shape[0] > 1:
                raise WeightsError(f"layer {mapping[name]!r} ({name}) has padding {pad!r}, "
                                   f"the model {conv.padding!r}")
            if bool(info["use_bias"][name]) != (conv.bias is not None):
                raise WeightsError(f"layer {mapping[name]!r} ({name}) use_bias="
                                   f"{info['use_bias'][name]}, the model differs")
        feat = model.input_shape[0] // 4
        if info["pool_size"] and tuple(info["pool_size"]) != (feat, feat):
            raise WeightsError(f"average pool {info['pool_size']} is not the global "
                               f"{feat}x{feat} pool of the model")
        for bn in named_batchnorms(model).values():
            bn.epsilon = info["bn_epsilon"]
        _load_into(model, root, mapping)
    check_finite(model, path)
    return model


def resnet50_keras_names(v1_5: bool = False) -> LayerMap:
    """Jaxbar name -> `keras.applications.ResNet50` layer name."""
    del v1_5  # same names for both variants
    m = {"stem.conv": "conv1_conv", "stem.bn": "conv1_bn"}
    for s, nblocks in enumerate(ResNet50.STAGE_BLOCKS):
        for j in range(nblocks):
            p, k = f"stage{s + 1}.block{j}", f"conv{s + 2}_block{j + 1}"
            if j == 0:
                m[f"{p}.shortcut"], m[f"{p}.shortcut_bn"] = f"{k}_0_conv", f"{k}_0_bn"
            for i in (1, 2, 3):
                m[f"{p}.conv{i}"], m[f"{p}.bn{i}"] = f"{k}_{i}_conv", f"{k}_{i}_bn"
    m["head.dense"] = "predictions"
    return m


def load_keras_resnet50(path: str | os.PathLike, v1_5: bool | None = None) -> ResNet50:
    """Loads ResNet50 weights saved by Keras (`keras.applications.ResNet50` layer names).

    Accepts a full model file (`model_config` + `model_weights`) or a weights-only file
    (`save_weights`; e.g. the published `resnet50_weights_tf_dim_ordering_tf_kernels.h5`).
    Width and number of classes are taken from the weight shapes.

    Args:
      path: the `.h5` file.
      v1_5: stride on the 3x3 (True) or first 1x1 (False) convolution. `None`: read it from
          `model_config` if present, else v1 (the `keras.applications` topology).

    Returns:
      A `ResNet50` holding the file's weights.

    Raises:
      WeightsError: unreadable file, missing weights/layer, topology or shape mismatch.
      ParamsError: a layer's weights are not finite (NaN or inf).
    """
    names = resnet50_keras_names()
    with open_h5(path) as f:
        root = weights_root(f)
        eps = None
        if "model_config" in f.attrs:
            g = KerasGraph.from_config(read_model_config(f))
            absent = [k for k in names.values() if k not in g.layers]
            if absent:
                raise WeightsError(f"{path}: model_config lacks ResNet50 layers {absent[:5]}"
                                   f"{' ...' if len(absent) > 5 else ''}")
            s1 = tuple(g.cfg("conv3_block1_1_conv").get("strides", (1, 1)))
            s2 = tuple(g.cfg("conv3_block1_2_conv").get("strides", (1, 1)))
            file_v1_5 = s2 == (2, 2)
            if (s1 == (2, 2)) == file_v1_5:
                raise WeightsError(f"{path}: cannot tell v1 from v1.5 (strides {s1}, {s2})")
            if v1_5 is not None and bool(v1_5) != file_v1_5:
                raise WeightsError(f"{path}: file is ResNet50 {'v1.5' if file_v1_5 else 'v1'}, "
                                   f"v1_5={v1_5} was requested")
            v1_5 = file_v1_5
            eps_set = {float(g.cfg(k).get("epsilon", 1e-3)) for k in names.values()
                       if g.kind(k) == "BatchNormalization"}
            if len(eps_set) != 1:
                raise WeightsError(f"{path}: batch-norm epsilons differ: {sorted(eps_set)}")
            eps = eps_set.pop()
        stem = read_layer_weights(root, "conv1_conv", context="stem.conv")
        head = read_layer_weights(root, "predictions", context="head.dense")
        if "kernel" not in stem or "kernel" not in head:
            raise WeightsError(f"{path}: conv1_conv/predictions have no kernel")
        width = int(stem["kernel"].shape[-1])
        num_classes = int(head["kernel"].shape[-1])
        kw = {} if eps is None else {"bn_epsilon": eps}
        model = ResNet50(bool(v1_5), num_classes=num_classes, width=width, **kw)
        _load_into(model, root, names)
    check_finite(model, path)
    return model


__all__ = [
    "KerasGraph", "WeightsError", "cifar_layer_map", "load_keras_resnet50",
    "load_keras_resnet_cifar", "open_h5", "read_layer_weights", "read_model_config",
    "resnet50_keras_names", "weights_root",
]
