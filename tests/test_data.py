"""Data: image folders (labels, limits, cache), preprocessing, tfds fail-fast paths."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jaxbar.data import image_folder, preprocess
from jaxbar.data import tfds as jtfds
from jaxbar.data.image_folder import load_image_folder

CLASSES = ["bee", "ant", "cat"]  # sorted: ant 0, bee 1, cat 2


def _pixels(label: int, i: int, h=6, w=8) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 10 * label
    a[..., 1] = i
    a[..., 2] = np.arange(w, dtype=np.uint8)[None, :]
    return a


@pytest.fixture
def folder(tmp_path):
    """``root/test/<class>/NNN.png`` with 4 images per class (pixels encode label and index)."""
    root = tmp_path / "imgs"
    for name in CLASSES:
        d = root / "test" / name
        d.mkdir(parents=True)
        label = sorted(CLASSES).index(name)
        for i in range(4):
            Image.fromarray(_pixels(label, i)).save(d / f"{i:03d}.png")
        (d / "notes.txt").write_text("ignored")
    return root


def test_labels_and_order(folder, tmp_path):
    images, labels, classes = load_image_folder(folder, "test", cache_dir=tmp_path / "c")
    assert classes == ["ant", "bee", "cat"]
    assert images.shape == (12, 6, 8, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for k in range(12):
        np.testing.assert_array_equal(images[k], _pixels(labels[k], k % 4))


def test_class_balanced_limit(folder, tmp_path):
    images, labels, _ = load_image_folder(folder, "test", limit=6, cache_dir=tmp_path / "c")
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert images[:, 0, 0, 1].tolist() == [0, 1, 0, 1, 0, 1]  # first files by name
    _, labels, _ = load_image_folder(folder, "test", limit=7, cache_dir=tmp_path / "c")
    assert labels.tolist() == [0, 0, 0, 1, 1, 2, 2]  # remainder to the first classes
    for bad in (0, -1, 13):
        with pytest.raises(ValueError, match="limit"):
            load_image_folder(folder, "test", limit=bad, cache_dir=False)


def test_cache_hit_skips_decoding(folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_image_folder(folder, "test", limit=9, cache_dir=cache)
    assert any(p.name.endswith(".images.npy") for p in cache.iterdir())

    def fail(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(Image, "open", fail)
    second = load_image_folder(folder, "test", limit=9, cache_dir=cache)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]
    with pytest.raises(AssertionError, match="decoded again"):  # another limit: another key
        load_image_folder(folder, "test", limit=6, cache_dir=cache)


def test_cache_invalidation(folder, tmp_path):
    cache = tmp_path / "cache"
    images, _, _ = load_image_folder(folder, "test", cache_dir=cache)
    target = folder / "test" / "ant" / "001.png"
    new = _pixels(0, 1)
    new[...] = 77
    Image.fromarray(new).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    changed, _, _ = load_image_folder(folder, "test", cache_dir=cache)
    assert (changed[1] == 77).all() and not (images[1] == 77).all()
    Image.fromarray(_pixels(2, 9)).save(folder / "test" / "cat" / "009.png")
    grown, labels, _ = load_image_folder(folder, "test", cache_dir=cache)
    assert len(grown) == 13 and labels[-1] == 2


def test_default_cache_dir_from_env(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBAR_CACHE", str(tmp_path / "envcache"))
    assert image_folder.default_cache_dir() == tmp_path / "envcache"
    load_image_folder(folder, "test", limit=3)
    assert any((tmp_path / "envcache").iterdir())


def test_mixed_formats_converted_to_rgb(tmp_path):
    d = tmp_path / "r" / "train"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    Image.fromarray(np.full((5, 5), 128, np.uint8), "L").save(d / "a" / "0.jpg", quality=95)
    Image.fromarray(np.full((5, 5, 4), 200, np.uint8), "RGBA").save(d / "b" / "0.PNG")
    images, labels, classes = load_image_folder(tmp_path / "r", "train", cache_dir=False)
    assert images.shape == (2, 5, 5, 3) and classes == ["a", "b"]
    assert abs(int(images[0].mean()) - 128) <= 2 and (images[1] == 200).all()


def test_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "absent", cache_dir=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(folder, "train", cache_dir=False)
    (tmp_path / "e" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        load_image_folder(tmp_path / "e", cache_dir=False)
    (tmp_path / "e" / "test" / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path / "e", cache_dir=False)
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(folder / "test" / "cat" / "100.png")
    with pytest.raises(ValueError, match="inconsistent image sizes.*100.png"):
        load_image_folder(folder, "test", cache_dir=False)


def test_real_cifar_subset(cifar_data_dir, tmp_path):
    images, labels, classes = load_image_folder(cifar_data_dir, "test", limit=20,
                                                cache_dir=tmp_path)
    assert classes[0] == "airplane" and classes[9] == "truck" and len(classes) == 10
    assert images.shape == (20, 32, 32, 3)
    assert np.bincount(labels).tolist() == [2] * 10


# ----------------------------------------------------------------------------- preprocessing


def test_cifar_preprocess_and_mean(tmp_path):
    mean = np.random.default_rng(0).uniform(100, 140, (32, 32, 3)).astype(np.float32)
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    got = preprocess.cifar_resnet_preprocess(x, mean)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, (x.astype(np.float32) - mean) / 255, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="x_train_mean.npy"):
        preprocess.load_cifar_mean(tmp_path / "model.h5")
    np.save(tmp_path / "x_train_mean.npy", mean)
    np.testing.assert_array_equal(preprocess.load_cifar_mean(tmp_path / "model.h5"), mean)
    np.testing.assert_array_equal(preprocess.load_cifar_mean(tmp_path), mean)


def test_imagenet_preprocess():
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    out = preprocess.imagenet_preprocess(rgb)
    assert out.shape == (1, 224, 224, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 100, 100], [50 - 103.939, 100 - 116.779, 200 - 123.68],
                               atol=1e-3)
    # center crop of the resized image: a marker in the middle stays in the middle
    img = np.zeros((256, 512, 3), np.uint8)
    img[120:136, 248:264] = 255
    out = preprocess.imagenet_preprocess([img, Image.fromarray(img)])
    assert out.shape == (2, 224, 224, 3)
    bright = np.argwhere(out[0, ..., 0] > 0)
    assert abs(bright.mean(0) - 111.5).max() < 2
    np.testing.assert_array_equal(out[0], out[1])
    cropped = preprocess.imagenet_preprocess(np.zeros((2, 224, 224, 3), np.uint8),
                                             already_cropped=True)
    np.testing.assert_allclose(cropped[0, 0, 0], -preprocess.IMAGENET_CAFFE_MEAN_BGR)


# ----------------------------------------------------------------------------- tfds fail-fast


def test_tfds_missing_data_fails_fast(tmp_path):
    t = time.perf_counter()
    with pytest.raises(jtfds.TfdsDataError, match="tfds build cifar10"):
        jtfds.load_tfds_cifar10(data_dir=tmp_path)
    with pytest.raises(jtfds.TfdsDataError, match="ILSVRC2012_img_val.tar"):
        jtfds.load_tfds_imagenet2012(data_dir=tmp_path)
    assert time.perf_counter() - t < 1.0
    assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules


def test_tfds_not_installed(tmp_path, monkeypatch):
    for v in ("3.0.2", "3.0.10"):
        (tmp_path / "cifar10" / v).mkdir(parents=True)
        (tmp_path / "cifar10" / v / "dataset_info.json").write_text("{}")
    assert jtfds.find_prepared("cifar10", tmp_path).name == "3.0.10"
    assert jtfds.find_prepared("imagenet2012", tmp_path) is None
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(jtfds.TfdsUnavailableError, match="not installed"):
        jtfds.load_tfds_cifar10(data_dir=tmp_path)
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(jtfds.TfdsUnavailableError, match="not installed"):
        jtfds.load_tfds_imagenet2012(data_dir=tmp_path, manual_dir=manual)
