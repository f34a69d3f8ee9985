"""Training checkpoints: any pytree of arrays, written atomically as `.npz`.

A checkpoint stores the leaves of the training state in flattening order plus JSON metadata
(step, leaf shapes and dtypes, free-form entries). It is restored into a template of the same
structure (the state a fresh trainer builds), so optax and NNX states need no special
serialization and no pickle is involved. Files are written to a temporary name and renamed,
so an interruption never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["CheckpointError", "latest_checkpoint", "list_checkpoints", "restore_checkpoint",
           "save_checkpoint"]

_PATTERN = re.compile(r"^ckpt_(\d{9})\.npz$")
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the training state."""


def _path(directory: Path, step: int) -> Path:
    return directory / f"ckpt_{int(step):09d}.npz"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """The checkpoints in `directory` as `(step, path)`, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _PATTERN.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: str | os.PathLike, step: int, tree: Any,
                    meta: dict[str, Any] | None = None, keep: int | None = 2) -> Path:
    """Writes a checkpoint of `tree` at `step`.

    Args:
      directory: checkpoint folder (created if needed).
      step: the global step the state has completed.
      tree: a pytree of arrays (the training state).
      meta: JSON-serializable entries stored alongside.
      keep: how many most recent checkpoints to keep (None: all).

    Returns:
      The path written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    info = {"step": int(step), "leaves": [[list(a.shape), a.dtype.str] for a in leaves],
            "meta": dict(meta or {})}
    arrays = {f"leaf_{i:05d}": a for i, a in enumerate(leaves)}
    arrays[_META] = np.array(json.dumps(info))
    path = _path(d, step)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep is not None:
        for _, old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def restore_checkpoint(path: str | os.PathLike, template: Any) -> tuple[Any, int, dict]:
    """Reads a checkpoint into the structure of `template`.

    Args:
      path: a file written by `save_checkpoint`.
      template: a pytree of the same structure, shapes and dtypes (its values are ignored).

    Returns:
      `(tree, step, meta)`.

    Raises:
      CheckpointError: unreadable file, or a structure, shape or dtype mismatch.
    """
    leaves, treedef = jax.tree.flatten(template)
    try:
        with np.load(path, allow_pickle=False) as data:
            info = json.loads(str(data[_META]))
            stored = [data[f"leaf_{i:05d}"] for i in range(len(info["leaves"]))]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if len(stored) != len(leaves):
        raise CheckpointError(f"{path}: {len(stored)} arrays but the training state has "
                              f"{len(leaves)} (a different model, optimizer or options?)")
    for i, (a, t) in enumerate(zip(stored, leaves, strict=True)):
        t = np.asarray(t) if not hasattr(t, "dtype") else t
        if a.shape != tuple(t.shape) or a.dtype != np.dtype(t.dtype):
            raise CheckpointError(f"{path}: array {i} is {a.dtype}{list(a.shape)} but the "
                                  f"training state expects {np.dtype(t.dtype)}{list(t.shape)}")
    return jax.tree.unflatten(treedef, stored), int(info["step"]), info.get("meta", {})
