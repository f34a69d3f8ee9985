"""A float64 NumPy forward pass of a Keras functional model, read straight from its HDF5 file.

Independent of jaxbar's Flax code: it interprets the ``model_config`` graph layer by layer and
reads each layer's weights with h5py. Supports the layers of the ResNet files (InputLayer,
Conv2D, BatchNormalization, Activation/ReLU, Add, ZeroPadding2D, Average/MaxPooling2D,
GlobalAveragePooling2D, Flatten, Dense).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np


def _s(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def read_keras(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Returns the parsed model_config and ``{layer: {short weight name: float64 array}}``."""
    with h5py.File(path, "r") as f:
        cfg = json.loads(_s(f.attrs["model_config"]))
        root = f["model_weights"] if "model_weights" in f else f
        weights: dict[str, dict[str, np.ndarray]] = {}
        for name in root:
            g = root[name]
            d = {}
            for wn in g.attrs.get("weight_names", []):
                wn = _s(wn)
                d[wn.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(g[wn][()], np.float64)
            weights[name] = d
    return cfg, weights


def tf_same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (smaller half before)."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def conv2d(x, w, b, strides, padding):
    """NHWC x, HWIO w, float64."""
    kh, kw = w.shape[:2]
    sh, sw = strides
    if padding == "same":
        ph = tf_same_pads(x.shape[1], kh, sh)
        pw = tf_same_pads(x.shape[2], kw, sw)
        x = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh = (x.shape[1] - kh) // sh + 1
    ow = (x.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], oh, ow, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
            y += patch @ w[i, j]
    return y if b is None else y + b


def _pool(x, size, strides, op):
    ph, pw = size
    sh, sw = strides
    oh = (x.shape[1] - ph) // sh + 1
    ow = (x.shape[2] - pw) // sw + 1
    stack = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
             for i in range(ph) for j in range(pw)]
    return op(np.stack(stack), axis=0)


def _act(x, name):
    if name in ("linear", None):
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    raise NotImplementedError(name)


def _inbound(layer) -> list[str]:
    return [item[0] for node in layer.get("inbound_nodes", []) for item in node]


def forward(path: str | Path, x: np.ndarray, *, logits: bool = True) -> np.ndarray:
    """Runs the Keras model in ``path`` on ``x`` (NHWC, already preprocessed) in float64.

    Args:
        path: Keras ``.h5`` model file.
        x: inputs.
        logits: drop the final layer's softmax.

    Returns:
        The model output, float64.
    """
    cfg, weights = read_keras(path)
    layers = cfg["config"]["layers"]
    out_name = cfg["config"]["output_layers"][0][0]
    t: dict[str, np.ndarray] = {}
    for layer in layers:
        kind, c, name = layer["class_name"], layer["config"], layer["name"]
        ins = [t[i] for i in _inbound(layer)]
        w = weights.get(name, {})
        if kind == "InputLayer":
            y = np.asarray(x, np.float64)
        elif kind == "Conv2D":
            assert tuple(c.get("dilation_rate", (1, 1))) == (1, 1)
            y = conv2d(ins[0], w["kernel"], w.get("bias"), c["strides"], c["padding"])
            y = _act(y, c.get("activation"))
        elif kind == "BatchNormalization":
            gamma = w.get("gamma", 1.0)
            beta = w.get("beta", 0.0)
            y = (ins[0] - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"])
            y = y * gamma + beta
        elif kind == "Activation":
            y = _act(ins[0], c["activation"])
        elif kind == "ReLU":
            y = np.maximum(ins[0], 0.0)
        elif kind == "Add":
            y = sum(ins)
        elif kind == "ZeroPadding2D":
            p = c["padding"]
            p = [[p, p], [p, p]] if isinstance(p, int) else p
            y = np.pad(ins[0], ((0, 0), tuple(p[0]), tuple(p[1]), (0, 0)))
        elif kind in ("AveragePooling2D", "MaxPooling2D"):
            assert c.get("padding", "valid") == "valid"
            op = np.mean if kind.startswith("Average") else np.max
            y = _pool(ins[0], c["pool_size"], c["strides"] or c["pool_size"], op)
        elif kind == "GlobalAveragePooling2D":
            y = ins[0].mean(axis=(1, 2))
        elif kind == "Flatten":
            y = ins[0].reshape(ins[0].shape[0], -1)
        elif kind == "Dense":
            y = ins[0] @ w["kernel"]
            if "bias" in w:
                y = y + w["bias"]
            if not (logits and name == out_name):
                y = _act(y, c.get("activation"))
        else:
            raise NotImplementedError(kind)
        t[name] = y
    return t[out_name]
