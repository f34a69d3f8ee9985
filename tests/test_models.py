"""Models: digital forward against a float64 NumPy reference, topology, folding, params I/O."""

from __future__ import annotations

import json
import time

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxbar.nn import models as M
from jaxbar.nn.analogize import analog_layers, analogize
from jaxbar.nn.folding import conv_bn_pairs, fold_batchnorm
from jaxbar.nn.graph import trace
from jaxbar.nn.keras_import import cifar_layer_map, load_keras_resnet_cifar
from jaxbar.nn.models import Identity
from jaxbar.nn.params_io import ParamsError, load_params, read_params_metadata, save_params

from .conftest import cifar_weights_path, require_shared
from .numpy_resnet import conv2d as np_conv2d
from .numpy_resnet import forward as np_forward

_MODELS: dict[int, M.ResNetV1Cifar] = {}


def cifar_model(depth: int) -> M.ResNetV1Cifar:
    if depth not in _MODELS:
        _MODELS[depth] = load_keras_resnet_cifar(cifar_weights_path(depth))
    return _MODELS[depth]


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("shape,k,s,pad", [((2, 8, 8, 3), 3, 2, "SAME"), ((1, 9, 7, 2), 3, 2,
                                           "SAME"), ((1, 8, 8, 4), 1, 2, "VALID"),
                                           ((1, 33, 33, 1), 3, 2, "SAME")])
def test_keras_conv_matches_numpy(shape, k, s, pad):
    """`models.conv` pads as TensorFlow does (the extra row and column at the bottom/right)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape)
    w = rng.normal(size=(k, k, shape[-1], 5))
    layer = M.conv(shape[-1], 5, k, strides=s, padding=pad, use_bias=False, rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(w, jnp.float32)
    got = layer(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np_conv2d(x, w, None, (s, s), pad.lower()),
                               atol=1e-4)


def test_analogize_reaches_every_layer():
    model = M.resnet14()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    analog = analogize(model, {"crossbar": {}, "layers": {"head.dense": {
        "weights": {"bits": 2}}}})
    assert list(analog_layers(analog)) == sorted(M.layer_names(model)) or set(
        analog_layers(analog)) == set(M.layer_names(model))
    # Only the head is coarse: the logits change, the features do not (compiled, not op by op).
    logits = nnx.jit(lambda m, x: m(x))
    features = nnx.jit(lambda m, x: m.stage3(m.stage2(m.stage1(m.stem(x)))))
    assert not np.allclose(np.asarray(logits(analog, x)), np.asarray(logits(model, x)),
                           atol=1e-3)
    np.testing.assert_allclose(features(analog, x), features(model, x), atol=1e-4)


# ----------------------------------------------------------------------------- topology


def test_cifar_layer_names_and_shapes():
    model = M.resnet20()
    names = M.layer_names(model)
    assert len(names) == 22 and len(set(names)) == 22
    assert names[:4] == ["stem.conv", "stage1.block0.conv1", "stage1.block0.conv2",
                         "stage1.block1.conv1"]
    assert names[7:10] == ["stage2.block0.conv1", "stage2.block0.conv2",
                           "stage2.block0.shortcut"]
    assert names[-1] == "head.dense"
    shapes = M.layer_shapes(model)
    assert list(shapes) == names
    assert shapes["stem.conv"] == (3, 3, 3, 16)
    assert shapes["stage3.block0.shortcut"] == (1, 1, 32, 64)
    assert shapes["head.dense"] == (64, 10)
    assert list(M.named_layers(model)) == names
    with pytest.raises(ValueError, match="6n\\+2"):
        M.ResNetV1Cifar(21)


@pytest.mark.parametrize("depth", [14, 20, 32, 56])
def test_cifar_topology_matches_file(depth):
    path = cifar_weights_path(depth)
    model = cifar_model(depth)
    with h5py.File(path, "r") as f:
        sizes = []
        f["model_weights"].visititems(lambda n, o: sizes.append(o.size) if hasattr(o, "shape")
                                      else None)
        cfg = json.loads(f.attrs["model_config"])
        shapes = {}
        f["model_weights"].visititems(
            lambda n, o: shapes.__setitem__(n.split("/")[0], o.shape)
            if n.endswith("kernel:0") else None)
    assert M.count_params(model) == sum(sizes)
    # forward order = the Keras config order of the Conv2D / Dense layers
    mapping, info = cifar_layer_map(cfg)
    inv = {k: ours for ours, k in mapping.items()}
    keras_order = [inv[layer["name"]] for layer in cfg["config"]["layers"]
                   if layer["class_name"] in ("Conv2D", "Dense")]
    assert M.layer_names(model) == keras_order
    assert info["depth"] == depth
    for ours, shape in M.layer_shapes(model).items():
        assert shape == shapes[mapping[ours]]


def test_resnet50_structure():
    abstract = nnx.eval_shape(lambda: M.ResNet50(v1_5=False))
    assert M.count_params(abstract) == 25_636_712  # keras.applications.ResNet50 total
    for v1_5, (s1, s2) in ((False, ((2, 2), (1, 1))), (True, ((1, 1), (2, 2)))):
        model = nnx.eval_shape(lambda v=v1_5: M.ResNet50(v, width=4, num_classes=5))
        example = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
        calls = {c.path: c for c in trace(model, example).calls}
        assert len(calls) == 54
        layers = M.named_layers(model)
        assert (layers["stage2.block0.conv1"].strides,) * 2 == s1
        assert (layers["stage2.block0.conv2"].strides,) * 2 == s2
        assert calls["stem.conv"].output_shape == (1, 112, 112, 4)
        assert calls["stage4.block2.conv3"].output_shape == (1, 7, 7, 128)
        assert calls["head.dense"].kernel_shape == (128, 5)
        names = list(calls)
        assert names[1:3] == ["stage1.block0.shortcut", "stage1.block0.conv1"]


# ----------------------------------------------------------------------------- accuracy vs NumPy


@pytest.mark.parametrize("depth", [14, 20])
def test_digital_logits_match_numpy_reference(depth, cifar_test_batch):
    x, labels = cifar_test_batch
    x = x[::2]  # one image per class
    model = cifar_model(depth)
    got = np.asarray(jax.jit(lambda v: model(v))(jnp.asarray(x)))
    ref = np_forward(cifar_weights_path(depth), x.astype(np.float64))
    assert got.shape == (10, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    assert (got.argmax(1) == ref.argmax(1)).all()


# ----------------------------------------------------------------------------- folding


def test_fold_batchnorm_keeps_logits(cifar_test_batch):
    x = jnp.asarray(cifar_test_batch[0][:8])
    model = cifar_model(20)
    folded = fold_batchnorm(model)
    assert folded.bn_folded and not model.bn_folded
    assert len(conv_bn_pairs(model)) == 19 and not conv_bn_pairs(folded)
    assert not any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(folded))
    assert isinstance(folded.stage1.block0.bn1, Identity)
    assert isinstance(model.stage1.block0.bn1, nnx.BatchNorm)  # the input is untouched
    a, b = np.asarray(model(x)), np.asarray(folded(x))
    np.testing.assert_allclose(b, a, atol=2e-4 * max(1.0, np.abs(a).max()), rtol=0)
    # the formula, on the stem
    bn = model.stem.bn
    s = bn.scale[...] / jnp.sqrt(bn.var[...] + bn.epsilon)
    np.testing.assert_allclose(folded.stem.conv.kernel[...], model.stem.conv.kernel[...] * s,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(folded.stem.conv.bias[...],
                               s * (model.stem.conv.bias[...] - bn.mean[...]) + bn.bias[...],
                               rtol=1e-5, atol=1e-6)
    assert M.layer_names(folded) == M.layer_names(model)


def test_fold_batchnorm_resnet50_random_stats():
    model = M.ResNet50(True, width=4, num_classes=3)
    rng = np.random.default_rng(0)
    for bn in M.named_batchnorms(model).values():
        n = bn.scale[...].shape[0]
        bn.scale[...] = rng.uniform(0.5, 1.5, n)
        bn.bias[...] = rng.normal(0, 0.1, n)
        bn.mean[...] = rng.normal(0, 0.1, n)
        bn.var[...] = rng.uniform(0.5, 1.5, n)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    folded = fold_batchnorm(model)
    a = np.asarray(jax.jit(lambda v: model(v))(x))
    b = np.asarray(jax.jit(lambda v: folded(v))(x))
    np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, np.abs(a).max()), rtol=0)


def test_fold_batchnorm_conv_without_bias():
    model = M.resnet14(rngs=nnx.Rngs(5))
    model.stem.conv = M.conv(3, 16, 3, use_bias=False, rngs=nnx.Rngs(6))
    model.stem.bn.mean[...] = jnp.linspace(-0.5, 0.5, 16)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    folded = fold_batchnorm(model)
    assert folded.stem.conv.bias is not None and model.stem.conv.bias is None
    np.testing.assert_allclose(np.asarray(jax.jit(lambda v: folded(v))(x)),
                               np.asarray(jax.jit(lambda v: model(v))(x)), atol=1e-4)


def test_train_mode_updates_batch_stats():
    model = M.resnet14()
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3)) + 3.0
    before = np.asarray(model.stem.bn.mean[...])
    y = nnx.jit(lambda m, v: m(v, train=True))(model, x)
    assert y.shape == (4, 10)
    assert not np.allclose(np.asarray(model.stem.bn.mean[...]), before)


# ----------------------------------------------------------------------------- params I/O


def test_params_roundtrip(tmp_path):
    model = M.resnet14(rngs=nnx.Rngs(3))
    model.stage1.block0.bn1.mean[...] = jnp.full((16,), 0.25)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    path = save_params(tmp_path / "p", model, extra={"step": 7, "ranges": np.arange(3.0)})
    assert path.suffix == ".npz"
    raw = np.load(path)
    assert "stage1.block0.conv1/kernel" in raw.files and "stage1.block0.bn1/mean" in raw.files
    meta = read_params_metadata(path)
    assert meta["model_name"] == "resnet14v1_cifar" and meta["depth"] == 14
    assert meta["jaxbar_version"] and meta["extra"]["step"] == 7
    np.testing.assert_array_equal(meta["extra"]["ranges"], np.arange(3.0))
    template = M.resnet14(rngs=nnx.Rngs(9))
    loaded = load_params(path, template)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert not np.array_equal(np.asarray(template(x)), np.asarray(model(x)))  # not mutated
    rebuilt = load_params(path)
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(model(x)))
    # folded models round-trip too, and do not load into unfolded templates
    fpath = save_params(tmp_path / "f.npz", fold_batchnorm(model))
    np.testing.assert_allclose(np.asarray(load_params(fpath)(x)), np.asarray(model(x)),
                               atol=1e-4)
    with pytest.raises(ParamsError, match="bn_folded"):
        load_params(fpath, template)


def test_params_errors(tmp_path):
    path = save_params(tmp_path / "p.npz", M.resnet14())
    with pytest.raises(ParamsError, match="resnet14v1_cifar"):
        load_params(path, M.resnet20())
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.npz", M.resnet14())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ParamsError):
        load_params(bad, M.resnet14())
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(ParamsError, match="metadata"):
        load_params(other, M.resnet14())
    wide = save_params(tmp_path / "wide.npz", M.ResNetV1Cifar(14, width=8))
    with pytest.raises(ParamsError, match="shape mismatch"):
        load_params(wide, M.resnet14())
    with pytest.raises(ParamsError, match="JSON"):
        save_params(tmp_path / "x.npz", M.resnet14(), extra={"f": object()})


# ----------------------------------------------------------------------------- full accuracy


@pytest.mark.slow
@pytest.mark.parametrize("depth,expected", [(20, 80.47), (56, 80.89)])
def test_full_cifar10_accuracy(depth, expected, cifar_data_dir, cifar_mean, tmp_path_factory):
    from jaxbar.data.image_folder import load_image_folder
    from jaxbar.data.preprocess import cifar_resnet_preprocess

    require_shared("models", "cifar10-resnet-v1")
    t0 = time.perf_counter()
    images, labels, _ = load_image_folder(cifar_data_dir, "test",
                                          cache_dir=tmp_path_factory.mktemp("cache"))
    t1 = time.perf_counter()
    model = load_keras_resnet_cifar(cifar_weights_path(depth))
    fwd = nnx.jit(lambda m, v: jnp.argmax(m(v), -1))
    batch = 500
    preds = []
    for i in range(0, len(images), batch):
        x = cifar_resnet_preprocess(images[i:i + batch], cifar_mean)
        preds.append(np.asarray(fwd(model, jnp.asarray(x))))
    correct = int((np.concatenate(preds) == labels).sum())
    t2 = time.perf_counter()
    print(f"\nResNet{depth}: {correct}/{len(labels)} = {100 * correct / len(labels):.2f}% "
          f"(decode {t1 - t0:.1f} s, forward {t2 - t1:.1f} s)")
    assert len(labels) == 10_000
    assert correct == round(expected * 100)
