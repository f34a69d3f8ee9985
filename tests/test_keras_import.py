"""Keras HDF5 import: synthetic files in the Keras layout, error cases, the real CIFAR files."""

from __future__ import annotations

import json
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.nn import models as M
from jaxbar.nn.keras_import import (
    WeightsError,
    load_keras_resnet50,
    load_keras_resnet_cifar,
)

from .conftest import cifar_weights_path
from .numpy_resnet import forward as np_forward

# ----------------------------------------------------------------------------- synthetic files


class KerasBuilder:
    """Builds a Keras 2 functional ``model_config`` and matching random weights."""

    def __init__(self, seed: int = 0, first_number: int = 1, step: int = 1):
        self.rng = np.random.default_rng(seed)
        self.layers: list[dict] = []
        self.weights: dict[str, list[tuple[str, np.ndarray]]] = {}
        self.channels: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.first, self.step = first_number, step

    def auto(self, prefix: str) -> str:
        n = self.counters.get(prefix, self.first)
        self.counters[prefix] = n + self.step
        return f"{prefix}_{n}"

    def layer(self, cls, name, config, inputs, channels, weights=()):
        nodes = [[[i, 0, 0, {}] for i in inputs]] if inputs else []
        self.layers.append({"class_name": cls, "config": {"name": name, **config},
                            "name": name, "inbound_nodes": nodes})
        self.weights[name] = list(weights)
        self.channels[name] = channels
        return name

    def input(self, shape, name="input_1"):
        return self.layer("InputLayer", name, {"batch_input_shape": [None, *shape],
                                               "dtype": "float32"}, [], shape[-1])

    def conv(self, x, filters, k, strides=1, padding="same", name=None):
        cin = self.channels[x]
        w = self.rng.normal(0, np.sqrt(2 / (k * k * cin)), (k, k, cin, filters))
        b = self.rng.normal(0, 0.05, filters)
        cfg = {"filters": filters, "kernel_size": [k, k], "strides": [strides, strides],
               "padding": padding, "use_bias": True, "activation": "linear",
               "data_format": "channels_last", "dilation_rate": [1, 1]}
        return self.layer("Conv2D", name or self.auto("conv2d"), cfg, [x], filters,
                          [("kernel", w.astype(np.float32)), ("bias", b.astype(np.float32))])

    def bn(self, x, eps=1e-3, name=None):
        n = self.channels[x]
        r = self.rng
        ws = [("gamma", r.uniform(0.5, 1.5, n)), ("beta", r.normal(0, 0.1, n)),
              ("moving_mean", r.normal(0, 0.1, n)), ("moving_variance", r.uniform(0.5, 1.5, n))]
        return self.layer("BatchNormalization", name or self.auto("batch_normalization"),
                          {"axis": [3], "epsilon": eps, "momentum": 0.99, "center": True,
                           "scale": True}, [x], n,
                          [(k, v.astype(np.float32)) for k, v in ws])

    def relu(self, x, name=None):
        return self.layer("Activation", name or self.auto("activation"),
                          {"activation": "relu"}, [x], self.channels[x])

    def add(self, a, b, name=None):
        return self.layer("Add", name or self.auto("add"), {}, [a, b], self.channels[a])

    def dense(self, x, units, name=None):
        k = self.channels[x]
        w = self.rng.normal(0, np.sqrt(1 / k), (k, units)).astype(np.float32)
        b = self.rng.normal(0, 0.05, units).astype(np.float32)
        return self.layer("Dense", name or self.auto("dense"),
                          {"units": units, "activation": "softmax", "use_bias": True}, [x],
                          units, [("kernel", w), ("bias", b)])

    def config(self, inp, out):
        return {"class_name": "Functional",
                "config": {"name": "model_1", "layers": self.layers,
                           "input_layers": [[inp, 0, 0]], "output_layers": [[out, 0, 0]]}}


def cifar_builder(depth=8, width=4, num_classes=10, seed=0, first_number=1, step=1,
                  shortcut_first=False):
    """The Keras CIFAR-10 example ResNet-v1 (conv-BN-ReLU stem, projection shortcuts)."""
    kb = KerasBuilder(seed, first_number, step)
    inp = kb.input((32, 32, 3))
    x = kb.relu(kb.bn(kb.conv(inp, width, 3)))
    n = (depth - 2) // 6
    for stage in range(3):
        for j in range(n):
            f = width * 2**stage
            s = 2 if stage > 0 and j == 0 else 1
            if s == 2 and shortcut_first:
                short = kb.conv(x, f, 1, s)
            y = kb.relu(kb.bn(kb.conv(x, f, 3, s)))
            y = kb.bn(kb.conv(y, f, 3))
            if s == 2 and not shortcut_first:
                short = kb.conv(x, f, 1, s)
            x = kb.relu(kb.add(short if s == 2 else x, y))
    x = kb.layer("AveragePooling2D", kb.auto("average_pooling2d"),
                 {"pool_size": [8, 8], "strides": [8, 8], "padding": "valid"}, [x],
                 kb.channels[x])
    x = kb.layer("Flatten", kb.auto("flatten"), {}, [x], kb.channels[x])
    out = kb.dense(x, num_classes)
    return kb, kb.config(inp, out)


def resnet50_builder(v1_5=False, width=4, num_classes=5, size=64, seed=0):
    """``keras.applications.ResNet50`` layer graph (optionally v1.5)."""
    kb = KerasBuilder(seed)
    eps = 1.001e-5
    inp = kb.input((size, size, 3))
    x = kb.layer("ZeroPadding2D", "conv1_pad", {"padding": [[3, 3], [3, 3]]}, [inp], 3)
    x = kb.conv(x, width, 7, 2, "valid", name="conv1_conv")
    x = kb.relu(kb.bn(x, eps, name="conv1_bn"), name="conv1_relu")
    x = kb.layer("ZeroPadding2D", "pool1_pad", {"padding": [[1, 1], [1, 1]]}, [x], width)
    x = kb.layer("MaxPooling2D", "pool1_pool", {"pool_size": [3, 3], "strides": [2, 2],
                                                "padding": "valid"}, [x], width)
    for s, nblocks in enumerate((3, 4, 6, 3)):
        f = width * 2**s
        for j in range(nblocks):
            p = f"conv{s + 2}_block{j + 1}"
            stride = 2 if s > 0 and j == 0 else 1
            s1, s2 = (1, stride) if v1_5 else (stride, 1)
            if j == 0:
                short = kb.bn(kb.conv(x, 4 * f, 1, stride, "valid", name=f"{p}_0_conv"), eps,
                              name=f"{p}_0_bn")
            else:
                short = x
            y = kb.conv(x, f, 1, s1, "valid", name=f"{p}_1_conv")
            y = kb.relu(kb.bn(y, eps, name=f"{p}_1_bn"), name=f"{p}_1_relu")
            y = kb.conv(y, f, 3, s2, "same", name=f"{p}_2_conv")
            y = kb.relu(kb.bn(y, eps, name=f"{p}_2_bn"), name=f"{p}_2_relu")
            y = kb.bn(kb.conv(y, 4 * f, 1, 1, "valid", name=f"{p}_3_conv"), eps,
                      name=f"{p}_3_bn")
            x = kb.relu(kb.add(short, y, name=f"{p}_add"), name=f"{p}_out")
    x = kb.layer("GlobalAveragePooling2D", "avg_pool", {}, [x], kb.channels[x])
    out = kb.dense(x, num_classes, name="predictions")
    return kb, kb.config(inp, out)


def write_keras_h5(path, kb: KerasBuilder, config, weights_only=False):
    """Writes the Keras 2 HDF5 layout (``save`` or ``save_weights``)."""
    names = [layer["name"] for layer in kb.layers]
    with h5py.File(path, "w") as f:
        if weights_only:
            root = f
        else:
            f.attrs["model_config"] = json.dumps(config)
            f.attrs["keras_version"] = "2.4.0"
            f.attrs["backend"] = "tensorflow"
            root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([n.encode() for n in names])
        root.attrs["backend"] = "tensorflow"
        for n in names:
            g = root.create_group(n)
            ws = kb.weights[n]
            g.attrs["weight_names"] = np.array([f"{n}/{k}:0".encode() for k, _ in ws]
                                               if ws else [], dtype="S" if ws else np.float64)
            for k, v in ws:
                g.create_dataset(f"{n}/{k}:0", data=v)
    return path


def _logits(model, x):
    return np.asarray(jax.jit(lambda v: model(v))(jnp.asarray(x, jnp.float32)))


@pytest.fixture(scope="module")
def cifar_file(tmp_path_factory):
    kb, cfg = cifar_builder(depth=8)
    return write_keras_h5(tmp_path_factory.mktemp("k") / "cifar.h5", kb, cfg)


# ----------------------------------------------------------------------------- CIFAR ResNet


def test_synthetic_cifar_matches_numpy(cifar_file):
    model = load_keras_resnet_cifar(cifar_file)
    assert isinstance(model, M.ResNetV1Cifar) and model.depth == 8 and model.width == 4
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3))
    np.testing.assert_allclose(_logits(model, x), np_forward(cifar_file, x), atol=1e-4, rtol=0)


def test_mapping_does_not_depend_on_numbering(tmp_path, cifar_file):
    kb, cfg = cifar_builder(depth=8, first_number=101, step=7)
    other = write_keras_h5(tmp_path / "renumbered.h5", kb, cfg)
    assert "conv2d_1" not in {layer["name"] for layer in kb.layers}
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3))
    a = _logits(load_keras_resnet_cifar(cifar_file), x)
    np.testing.assert_array_equal(_logits(load_keras_resnet_cifar(other), x), a)
    # shortcut convolution listed (and numbered) before the residual branch
    kb, cfg = cifar_builder(depth=14, first_number=5, step=3, shortcut_first=True, seed=3)
    moved = write_keras_h5(tmp_path / "moved.h5", kb, cfg)
    model = load_keras_resnet_cifar(moved)
    assert model.depth == 14
    np.testing.assert_allclose(_logits(model, x), np_forward(moved, x), atol=1e-4, rtol=0)


def test_missing_file_and_not_hdf5(tmp_path):
    assert issubclass(WeightsError, ValueError)
    with pytest.raises(WeightsError, match="not found"):
        load_keras_resnet_cifar(tmp_path / "nope.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="not an HDF5"):
        load_keras_resnet_cifar(junk)
    with pytest.raises(WeightsError, match="not an HDF5"):
        load_keras_resnet50(junk)


def test_truncated_hdf5(tmp_path, cifar_file):
    data = cifar_file.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="corrupt|unreadable|not an HDF5|not found"):
        load_keras_resnet_cifar(cut)


def test_missing_config_and_weights(tmp_path, cifar_file):
    kb, cfg = cifar_builder(depth=8)
    wonly = write_keras_h5(tmp_path / "w.h5", kb, cfg, weights_only=True)
    with pytest.raises(WeightsError, match="model_config"):
        load_keras_resnet_cifar(wonly)
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.attrs["model_config"] = json.dumps(cfg)
    with pytest.raises(WeightsError, match="model_weights"):
        load_keras_resnet_cifar(bare)
    bad = tmp_path / "badjson.h5"
    with h5py.File(bad, "w") as f:
        f.attrs["model_config"] = "{not json"
    with pytest.raises(WeightsError, match="JSON"):
        load_keras_resnet_cifar(bad)


def test_missing_layer_and_shape_mismatch(tmp_path, cifar_file):
    kb, cfg = cifar_builder(depth=8)
    stage2_conv1 = [lay["name"] for lay in kb.layers if lay["class_name"] == "Conv2D"][2]
    missing = tmp_path / "missing.h5"
    shutil.copy(cifar_file, missing)
    with h5py.File(missing, "a") as f:
        del f["model_weights"][stage2_conv1]
    with pytest.raises(WeightsError, match=f"{stage2_conv1}.*stage1.block0.conv2"):
        load_keras_resnet_cifar(missing)
    bad = tmp_path / "shape.h5"
    shutil.copy(cifar_file, bad)
    key = f"{stage2_conv1}/{stage2_conv1}/kernel:0"
    with h5py.File(bad, "a") as f:
        g = f["model_weights"]
        del g[key]
        g.create_dataset(key, data=np.zeros((3, 3, 4, 5), np.float32))
    with pytest.raises(WeightsError, match=r"conv2d_3.*\(3, 3, 4, 5\).*\(3, 3, 4, 4\)"):
        load_keras_resnet_cifar(bad)


def test_wrong_topology_and_depth(tmp_path, cifar_file):
    with pytest.raises(WeightsError, match="depth-8.*depth 20"):
        load_keras_resnet_cifar(cifar_file, depth=20)
    kb, cfg = cifar_builder(depth=8)
    layers = cfg["config"]["layers"]
    add = next(lay for lay in layers if lay["class_name"] == "Add")
    add["inbound_nodes"][0] = add["inbound_nodes"][0][:1] * 2  # no residual branch
    broken = write_keras_h5(tmp_path / "topo.h5", kb, cfg)
    with pytest.raises(WeightsError, match="topology"):
        load_keras_resnet_cifar(broken)


def test_real_file_depth_check():
    path = cifar_weights_path(20)
    with pytest.raises(WeightsError, match="depth-20"):
        load_keras_resnet_cifar(path, depth=56)
    assert load_keras_resnet_cifar(path, depth=20).depth == 20


# ----------------------------------------------------------------------------- ResNet50


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("r50")
    kb, cfg = resnet50_builder(v1_5=False)
    kb15, cfg15 = resnet50_builder(v1_5=True, seed=1)
    return {"v1": write_keras_h5(d / "v1.h5", kb, cfg),
            "v1_weights": write_keras_h5(d / "v1w.h5", kb, cfg, weights_only=True),
            "v1_5": write_keras_h5(d / "v15.h5", kb15, cfg15)}


def test_resnet50_import_matches_numpy(resnet50_files):
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3))
    for key, v1_5 in (("v1", False), ("v1_5", True)):
        path = resnet50_files[key]
        model = load_keras_resnet50(path)
        assert model.v1_5 is v1_5 and model.width == 4 and model.num_classes == 5
        assert model.stem.bn.epsilon == pytest.approx(1.001e-5)
        ref = np_forward(path, x)
        got = _logits(model, x)
        np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def test_resnet50_weights_only_and_variant_checks(resnet50_files, tmp_path):
    x = np.random.default_rng(4).normal(size=(1, 64, 64, 3))
    full = load_keras_resnet50(resnet50_files["v1"])
    wonly = load_keras_resnet50(resnet50_files["v1_weights"])  # v1 by default
    assert wonly.v1_5 is False
    np.testing.assert_array_equal(_logits(wonly, x), _logits(full, x))
    assert load_keras_resnet50(resnet50_files["v1_weights"], v1_5=True).v1_5 is True
    with pytest.raises(WeightsError, match="v1_5=True"):
        load_keras_resnet50(resnet50_files["v1"], v1_5=True)
    missing = tmp_path / "m.h5"
    shutil.copy(resnet50_files["v1_weights"], missing)
    with h5py.File(missing, "a") as f:
        del f["conv4_block3_2_conv"]
    with pytest.raises(WeightsError, match="conv4_block3_2_conv.*stage3.block2.conv2"):
        load_keras_resnet50(missing)
    empty = tmp_path / "e.h5"
    with h5py.File(empty, "w") as f:
        f.create_group("something")
    with pytest.raises(WeightsError, match="model_weights"):
        load_keras_resnet50(empty)
