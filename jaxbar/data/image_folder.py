"""Image folders `root/<split>/<class>/*.{jpg,jpeg,png}` decoded once with PIL and cached."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$JAXBAR_CACHE` if set, else `~/.cache/jaxbar`."""
    env = os.environ.get("JAXBAR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jaxbar"


def list_image_folder(root: str | os.PathLike, split: str = "test", limit: int | None = None
                      ) -> tuple[list[list[Path]], list[str]]:
    """Lists the files `load_image_folder` would read.

    Returns:
      `(files per class, class names)`, classes sorted by name, files sorted by file name.
    """
    base = Path(root) / split
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base} (expected "
                                f"{Path(root)}/<split>/<class>/*.jpg)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class folders in {base}")
    per_class = [sorted((p for p in (base / c).iterdir()
                         if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                        key=lambda p: p.name)
                 for c in classes]
    total = sum(len(f) for f in per_class)
    if total == 0:
        raise FileNotFoundError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) under {base}")
    if limit is not None:
        limit = int(limit)
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        if limit > total:
            raise ValueError(f"limit {limit} exceeds the {total} images in {base}")
        q, r = divmod(limit, len(classes))
        quotas = [q + (1 if i < r else 0) for i in range(len(classes))]
        for c, files, n in zip(classes, per_class, quotas, strict=True):
            if len(files) < n:
                raise ValueError(f"class {c!r} in {base} has {len(files)} images, the "
                                 f"class-balanced limit {limit} needs {n}")
        per_class = [files[:n] for files, n in zip(per_class, quotas, strict=True)]
    return per_class, classes


def _cache_key(root: Path, split: str, limit: int | None, per_class: list[list[Path]],
               skip_unreadable: bool = False) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_FORMAT, str(root.resolve()), split, limit]).encode())
    if skip_unreadable:
        h.update(b"\x00skip-unreadable")
    for files in per_class:
        h.update(b"\x00class")
        for p in files:
            st = p.stat()
            h.update(f"{p.parent.name}/{p.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class ImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def _read_image(p: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {p}: {' '.join(str(e).split()) or type(e).__name__}"
                         " (pass --skip-unreadable to skip such files)") from e


def _decode(per_class: list[list[Path]], skip_unreadable: bool = False
            ) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    n = sum(len(f) for f in per_class)
    images: np.ndarray | None = None
    first: Path | None = None
    labels = np.empty((n,), np.int32)
    skipped: list[Path] = []
    i = 0
    for label, files in enumerate(per_class):
        for p in files:
            try:
                a = _read_image(p)
            except ImageError:
                if not skip_unreadable:
                    raise
                skipped.append(p)
                continue
            if images is None:
                images = np.empty((n, *a.shape), np.uint8)
                first = p
            elif a.shape != images.shape[1:]:
                raise ValueError(f"inconsistent image sizes: {p} is {a.shape[:2]}, {first} is "
                                 f"{images.shape[1:3]}")
            images[i] = a
            labels[i] = label
            i += 1
    if images is None:
        raise ImageError(f"none of the {n} images could be read (first: {skipped[0]})")
    return images[:i], labels[:i], skipped


def _warn_skipped(skipped: list[str], root: Path, split: str) -> None:
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image"
                      f"{'s' * (len(skipped) > 1)} in {root / split} (first: {skipped[0]})",
                      stacklevel=3)


def load_image_folder(
    root: str | os.PathLike,
    split: str = "test",
    limit: int | None = None,
    cache_dir: str | os.PathLike | bool | None = None,
    skip_unreadable: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Loads `root/<split>/<class>/*.{jpg,jpeg,png}` as arrays.

    Classes in sorted order are labels `0..C-1`. Images come class by class, in sorted file
    name order (shuffle if needed). Decoded images are cached as `.npy` files in `cache_dir`
    under a key of the folder path, split, limit and every file's name, size and modification
    time, so a changed folder is decoded again.

    Args:
      root: folder holding the split folders.
      split: `"train"`, `"test"`, ...
      limit: class-balanced subset of `limit` images: the first `limit // C` files of each
          class, plus one more for each of the first `limit % C` classes.
      cache_dir: where to cache; default `$JAXBAR_CACHE` or `~/.cache/jaxbar`. `False`
          disables caching.
      skip_unreadable: leave out image files that cannot be decoded (a warning counts them
          and names the first) instead of raising.

    Returns:
      `(images uint8 (N, H, W, 3), labels int32 (N,), class names)`.

    Raises:
      FileNotFoundError: missing folder, no class folders or no images.
      ImageError: an image file cannot be decoded (naming it), unless `skip_unreadable`.
      ValueError: bad `limit` or images of different sizes.
    """
    root = Path(root)
    per_class, classes = list_image_folder(root, split, limit)
    if cache_dir is False:
        images, labels, skipped = _decode(per_class, skip_unreadable)
        _warn_skipped([str(p) for p in skipped], root, split)
        return images, labels, classes
    if cache_dir is None or cache_dir is True:
        cache = default_cache_dir()
    else:
        cache = Path(cache_dir)
    key = _cache_key(root, split, limit, per_class, skip_unreadable)
    stem = cache / f"imagefolder-{split}-{key}"
    img_path = stem.with_name(stem.name + ".images.npy")
    lab_path = stem.with_name(stem.name + ".labels.npy")
    meta_path = stem.with_name(stem.name + ".json")
    if img_path.exists() and lab_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            images = np.load(img_path, allow_pickle=False)
            labels = np.load(lab_path, allow_pickle=False)
            if meta.get("classes") == classes and len(images) == len(labels):
                _warn_skipped(meta.get("skipped", []), root, split)
                return images, labels, classes
        except (OSError, ValueError):
            pass  # unreadable cache entry: decode again
    images, labels, skipped = _decode(per_class, skip_unreadable)
    _warn_skipped([str(p) for p in skipped], root, split)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tag = f".{os.getpid()}.tmp"
        for path, arr in ((img_path, images), (lab_path, labels)):
            with open(str(path) + tag, "wb") as fh:
                np.save(fh, arr)
            os.replace(str(path) + tag, path)
        meta = {"root": str(root.resolve()), "split": split, "limit": limit,
                "classes": classes, "n": int(len(labels)), "skipped": [str(p) for p in skipped]}
        Path(str(meta_path) + tag).write_text(json.dumps(meta))
        os.replace(str(meta_path) + tag, meta_path)
    except OSError:
        pass  # a read-only cache location only costs the decoding time
    return images, labels, classes


__all__ = ["ImageError", "default_cache_dir", "list_image_folder", "load_image_folder"]
