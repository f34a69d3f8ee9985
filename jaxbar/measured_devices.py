"""Measured devices: presets fitted to published device data, and tables of (g, σ) points.

Each preset is the `device` section of a config as a plain dict, whose numbers are the
published fits converted to jaxbar's normalized conductances (g = G / G_max) in plain sight.
Select one with `device: {preset: pcm}` in a config (other device keys override the preset's
values), `config.replace(**{"device.preset": "pcm"})` or `DeviceConfig.from_preset("pcm")`.
A "table" error model reads its points with `load_table`. This module imports nothing from
jaxbar: the config reads it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEVICE_PRESETS", "load_table", "pcm", "reram", "sonos"]


def pcm() -> dict[str, Any]:
    """Phase-change memory: IBM's statistical model of 1 million PCM devices.

    Provenance: Nandakumar et al., "Phase-change memory models for deep learning training
    and inference", ICECS 2019, and Joshi et al., "Accurate deep neural network inference
    using computational phase-change memory", Nature Communications 11, 2473 (2020)
    (Methods and Supplementary Note); the same fit as IBM aihwkit's `PCMLikeNoiseModel`.
    G_max = 25 µS, g = G/G_max, one-sided cells from 0 (no g_min).

    - Programming error (Gaussian): σ_prog(g) = 0.26348 + 1.9650·g − 1.1731·g² in µS,
      divided by 25 µS here.
    - Drift: g(t) = g0·((t + t0)/t0)^(−ν), t0 = 20 s, ν = |ν̄ + σ_ν·ε| with
      ν̄ = clip(−0.0155·ln g + 0.0244, 0.049, 0.1) and
      σ_ν = clip(−0.0125·ln g − 0.0059, 0.008, 0.045).
    - Accumulated 1/f read noise, static at inference time t:
      σ/|g(t)| = min(0.0088 / max(g^0.65, 1e-3), 0.2)·sqrt(ln((t + t0 + t_read)/(2·t_read))),
      t_read = 250 ns.
    - Global drift compensation (one digital gain per array) is on, as in IBM's chips;
      set `drift.compensation: none` to see raw drift.
    """
    g_max_us = 25.0
    return dict(
        on_off_ratio=None,
        programming_error=dict(
            model="polynomial",
            coeffs=tuple(c / g_max_us for c in (0.26348, 1.9650, -1.1731))),
        drift=dict(
            model="power_law", t0=20.0,
            nu_mean=(0.0244, -0.0155), nu_mean_range=(0.049, 0.1),
            nu_std=(-0.0059, -0.0125), nu_std_range=(0.008, 0.045),
            noise=(0.0088, 0.65, 0.2), t_read=250e-9,
            compensation="global", reference="programmed"),
        preset="pcm",
    )


def sonos() -> dict[str, Any]:
    """SONOS charge-trap memory, 40 nm, operated in subthreshold (Sandia).

    Provenance: Agrawal et al., "Subthreshold operation of SONOS analog memory to enable
    accurate low-power neural network inference", IEDM 2022, 21.7 (statistics of 128K
    cells; programming variability Fig. 10(a) at t = 0, read noise Fig. 11(b)), as fitted
    in CrossSim's SONOS device. I_max = 1600 nA stands for g = 1; on/off ratio 1e7.

    - Programming error (Gaussian), a saturating exponential that is nearly proportional
      to the state at low currents: σ_I = A·(1 − exp(−I/B)), A = 19.88665 nA,
      B = 176.3115 nA; here a = A/1600, b = B/1600.
    - Read noise, fresh per MVM: the same form with A = 12.58037 nA, B = 215.36557 nA.
    - The paper's drift (a state-dependent mean shift over days) is not a power law and
      is not included.
    """
    i_max_na = 1600.0
    return dict(
        on_off_ratio=1e7,
        programming_error=dict(
            model="saturating", coeffs=(19.88665 / i_max_na, 176.3115 / i_max_na)),
        read_noise=dict(
            model="saturating", coeffs=(12.58037 / i_max_na, 215.36557 / i_max_na)),
        preset="sonos",
    )


def reram() -> dict[str, Any]:
    """Multilevel ReRAM (HfO2) programmed with the IGVVA-100 algorithm.

    Provenance: Milo et al., "Optimized programming algorithms for multilevel RRAM in
    hardware neural networks", IRPS 2021, Fig. 4 (linear fit of σ vs G), as fitted in
    CrossSim's RRAM_Milo device. G from 50 to 225 µS (on/off ratio 4.5), g = G/225 µS.

    - Programming error (Gaussian), nearly state-independent:
      σ_G = max(−0.009107·G + 4.782321 µS, 0) with G in µS, i.e.
      σ(g) = max(4.782321/225 − 0.009107·g, 0).
    - No read-noise or drift fit is given.
    """
    g_max_us = 225.0
    return dict(
        on_off_ratio=225.0 / 50.0,
        programming_error=dict(
            model="polynomial", coeffs=(4.782321 / g_max_us, -0.009107)),
        preset="reram",
    )


DEVICE_PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "pcm": pcm,
    "sonos": sonos,
    "reram": reram,
}


def load_table(path: str | Path) -> tuple[tuple[float, float], ...]:
    """Reads measured (g, σ) points for a "table" error model.

    Args:
      path: a .npy file holding an (n, 2) array, or a .csv / .txt file with two numeric
        columns (g, σ) and an optional header line. Conductances are normalized (g_max = 1).

    Returns:
      The points as a tuple of (g, σ) pairs, sorted by g.

    Raises:
      ValueError: the file is missing, unreadable, or not two numeric columns with
        distinct g values.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such file: {p}")
    try:
        if p.suffix == ".npy":
            a = np.load(p, allow_pickle=False)
        else:
            with p.open(newline="") as f:
                rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
            if rows and not _numeric(rows[0]):
                rows = rows[1:]  # a header
            a = np.asarray([[float(c) for c in r] for r in rows], dtype=np.float64)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a (g, sigma) table from {p}: {e}") from e
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 2 or not np.all(np.isfinite(a)):
        raise ValueError(f"{p}: expected at least two rows of two finite numbers (g, sigma), "
                         f"got an array of shape {a.shape}")
    a = a[np.argsort(a[:, 0], kind="stable")]
    if np.any(np.diff(a[:, 0]) <= 0):
        raise ValueError(f"{p}: the g column has repeated values")
    return tuple((float(x), float(s)) for x, s in a)


def _numeric(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True
