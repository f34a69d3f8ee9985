"""A Monte Carlo study of analog MVM error on random matrices.

The relative error `‖y - x@W‖ / ‖x@W‖` of one 1152×256 layer (Laplace weights,
ReLU inputs) versus programming error, for differential and offset mapping,
unsliced and 4-slice, with the paper's 8-bit converters (ranges calibrated on
separate inputs) and on/off ratio 100.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxbar.calibration import calibrate
from jaxbar.config import CrossbarConfig
from jaxbar.core import mvm

__all__ = ["mvm_error_study"]


def _relative_errors(cfg: CrossbarConfig, x, W, keys) -> np.ndarray:
    ref = x @ W

    def trial(key):
        y = mvm.analog_matmul(x, W, cfg, key)
        return jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)

    return np.asarray(jax.jit(lambda ks: jax.lax.map(trial, ks))(keys))


def mvm_error_study(trials: int = 8, sigmas=(0.0, 0.02, 0.05, 0.1), seed: int = 0,
                    K: int = 1152, N: int = 256, batch: int = 256) -> list[dict]:
    """Runs the study and returns one row per configuration.

    Args:
      trials: Monte Carlo trials (programming-error samples) per point.
      sigmas: programming error magnitudes.
      seed: seed of the data and of the trial keys.
      K: rows of the layer.
      N: columns of the layer.
      batch: input vectors per trial.

    Returns:
      Rows with keys mapping, slices, model, sigma, err_mean, err_std.
    """
    rng = np.random.default_rng(seed)
    W = jnp.asarray(rng.laplace(size=(K, N)).astype(np.float32))
    relu_normal = lambda: np.maximum(rng.normal(size=(batch, K)), 0).astype(np.float32)  # noqa: E731
    x_cal, x = relu_normal(), jnp.asarray(relu_normal())
    keys = jax.random.split(jax.random.key(seed), trials)
    grid = list(itertools.product(("differential", "offset"), (1, 4),
                                  ("independent", "proportional"), sigmas))
    rows = []
    for scheme, slices, model, sigma in tqdm(grid, desc="MVM error study", unit="config"):
        cfg = CrossbarConfig.paper_baseline().replace(**{
            "mapping.scheme": scheme, "mapping.slices": slices,
            "device.programming_error": {"model": model, "sigma": sigma}})
        cfg = calibrate(x_cal, W, cfg)  # input and per-slice ADC ranges, on other inputs
        err = _relative_errors(cfg, x, W, keys)
        rows.append(dict(mapping=scheme, slices=slices, model=model, sigma=sigma,
                         err_mean=float(err.mean()), err_std=float(err.std())))
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table: relative error (mean ± std over trials) per configuration."""
    sigmas = sorted({r["sigma"] for r in rows})
    head = f"{'mapping':13s} {'slices':>6s} {'error model':13s}" + "".join(
        f"{'σ=' + format(s, 'g'):>16s}" for s in sigmas)
    lines = [head, "-" * len(head)]
    keyf = lambda r: (r["mapping"], r["slices"], r["model"])  # noqa: E731
    for key, group in itertools.groupby(sorted(rows, key=keyf), key=keyf):
        by_sigma = {r["sigma"]: r for r in group}
        cells = "".join(f"{by_sigma[s]['err_mean']:9.4f}±{by_sigma[s]['err_std']:<6.4f}"
                        for s in sigmas)
        lines.append(f"{key[0]:13s} {key[1]:6d} {key[2]:13s}{cells}")
    return "\n".join(lines)
