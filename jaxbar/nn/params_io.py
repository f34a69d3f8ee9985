"""Portable parameter files: `.npz` keyed by layer path plus JSON metadata.

Keys are `"<layer name>/<variable>"`: `stage1.block0.conv1/kernel`, `.../bias`,
`stage1.block0.bn1/{scale,bias,mean,var}`. The entry `__metadata__` holds a JSON string with
the model name and configuration, whether batch norm is folded, the jaxbar version and the
JSON-serializable part of `extra`; array values of `extra` are stored as `__extra__/<key>`.
Files load with `numpy.load` alone (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxbar.nn.graph import modules
from jaxbar.version import __version__

FORMAT = "jaxbar.params"
FORMAT_VERSION = 1
_META = "__metadata__"
_EXTRA = "__extra__/"


class ParamsError(ValueError):
    """A parameter file cannot be read or does not fit the model."""


def named_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Every parameter and batch statistic of a model keyed `"<layer path>/<variable>"`.

    Raises:
      ParamsError: a variable is reachable twice (shared between layers).
    """
    out: dict[str, nnx.Variable] = {}
    seen: set[int] = set()
    for path, m in [("", model), *modules(model).items()]:
        for attr, v in sorted(vars(m).items()):
            if not isinstance(v, nnx.Param | nnx.BatchStat):
                continue
            if id(v) in seen:
                raise ParamsError(f"variable {path}/{attr} is shared with another layer")
            seen.add(id(v))
            out[f"{path}/{attr}" if path else attr] = v
    return out


def check_finite(model: nnx.Module, source: str | os.PathLike | None = None) -> None:
    """Checks that every parameter and batch statistic of a model is finite.

    Args:
      model: a jaxbar model.
      source: the file the values came from, named in the error.

    Raises:
      ParamsError: naming the first layer variable that holds NaN or inf, and the file.
    """
    for key, var in named_variables(model).items():
        value = np.asarray(var[...])
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            nan = int(np.count_nonzero(np.isnan(value)))
            where = f"{source}: " if source is not None else ""
            layer, _, what = key.rpartition("/")
            raise ParamsError(f"{where}layer {layer!r} has non-finite {what} values ({nan} NaN, "
                              f"{bad - nan} inf of {value.size}); weights must be finite")


def _model_meta(model: nnx.Module) -> dict[str, Any]:
    cfg = model.config() if hasattr(model, "config") else {}
    return {
        "model_name": getattr(model, "model_name", type(model).__name__),
        "architecture": cfg.get("architecture", type(model).__name__),
        "depth": getattr(model, "depth", None),
        "config": cfg,
        "bn_folded": bool(getattr(model, "bn_folded", False)),
    }


def save_params(path: str | os.PathLike, model: nnx.Module, extra: dict | None = None) -> Path:
    """Saves a model's parameters and batch statistics.

    Args:
      path: destination (`.npz` is appended by NumPy if missing).
      model: a jaxbar model.
      extra: additional entries: arrays are stored as arrays, anything else must be
          JSON-serializable (e.g. calibration settings, training step).

    Returns:
      The path written.
    """
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    arrays = {k: np.asarray(v[...]) for k, v in named_variables(model).items()}
    json_extra: dict[str, Any] = {}
    for k, v in (extra or {}).items():
        if isinstance(v, np.ndarray | jax.Array):
            arrays[_EXTRA + str(k)] = np.asarray(v)
        else:
            json_extra[str(k)] = v
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **_model_meta(model),
            "jaxbar_version": __version__, "extra": json_extra}
    try:
        arrays[_META] = np.array(json.dumps(meta))
    except TypeError as e:
        raise ParamsError(f"extra is not JSON-serializable: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"parameter file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for bad files
        raise ParamsError(f"not a readable .npz parameter file: {path}: {e}") from e
    if not hasattr(data, "files") or _META not in data.files:
        raise ParamsError(f"{path}: no {_META} entry (not a jaxbar parameter file)")
    try:
        meta = json.loads(str(data[_META]))
    except json.JSONDecodeError as e:
        raise ParamsError(f"{path}: corrupt metadata: {e}") from e
    if meta.get("format") != FORMAT:
        raise ParamsError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return data, meta


def read_params_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a parameter file, with `extra` arrays restored.

    Returns:
      A dict with `model_name`, `config`, `bn_folded`, `jaxbar_version`, `extra`, ...
    """
    data, meta = _open(path)
    with data:
        extra = dict(meta.get("extra", {}))
        for k in data.files:
            if k.startswith(_EXTRA):
                extra[k[len(_EXTRA):]] = data[k]
    meta["extra"] = extra
    return meta


def load_params(path: str | os.PathLike, model_template: nnx.Module | None = None
                ) -> nnx.Module:
    """Loads a parameter file into a copy of `model_template`.

    Args:
      path: a file written by `save_params`.
      model_template: a model of the same architecture (its values are ignored and it is not
          modified). `None`: build it from the file's metadata.

    Returns:
      The model holding the saved values.

    Raises:
      ParamsError: unreadable file, or architecture, folding, key or shape mismatch.
    """
    from jaxbar.nn.folding import fold_batchnorm
    from jaxbar.nn.models import build_model

    data, meta = _open(path)
    with data:
        if model_template is None:
            try:
                model = build_model(meta["config"])
            except (KeyError, TypeError, ValueError) as e:
                raise ParamsError(f"{path}: cannot build the model from metadata: {e}") from e
            if meta.get("bn_folded"):
                model = fold_batchnorm(model)
        else:
            mine = _model_meta(model_template)
            for key in ("model_name", "architecture", "depth", "bn_folded"):
                if meta.get(key) != mine[key]:
                    raise ParamsError(f"{path}: {key} is {meta.get(key)!r} in the file but "
                                      f"{mine[key]!r} in the template")
            model = nnx.clone(model_template)
        variables = named_variables(model)
        stored = {k for k in data.files if k != _META and not k.startswith(_EXTRA)}
        missing = sorted(set(variables) - stored)
        unexpected = sorted(stored - set(variables))
        if missing or unexpected:
            raise ParamsError(f"{path}: parameters do not match the model: missing {missing[:5]}"
                              f", unexpected {unexpected[:5]}")
        for k, var in variables.items():
            value = data[k]
            if value.shape != var[...].shape:
                raise ParamsError(f"{path}: shape mismatch for {k}: file {value.shape}, model "
                                  f"{tuple(var[...].shape)}")
            var[...] = value.astype(np.float32)
    check_finite(model, path)
    return model


__all__ = ["ParamsError", "check_finite", "load_params", "named_variables", "read_params_metadata",
           "save_params"]
