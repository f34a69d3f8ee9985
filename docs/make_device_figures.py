"""Draws one figure per device preset for docs/devices.md.

Usage: python docs/make_device_figures.py   (writes docs/figures/device_*.png)

Each figure shows the preset's programming-error σ(g) (the model's formula, and the std
of 20,000 sampled cells per point as a check) and, where the preset has them, read noise
and drift: the median and 5–95% band of g(t)/g(t0) over sampled cells for a few target
conductances, without compensation.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxbar.config import DeviceConfig  # noqa: E402
from jaxbar.core import devices  # noqa: E402
from jaxbar.measured_devices import DEVICE_PRESETS  # noqa: E402

HERE = Path(__file__).parent
CELLS = 20_000


def _sigma_panel(ax, device, name):
    g = np.linspace(0.0, 1.0, 201)
    ax.plot(g, np.asarray(devices.noise_std(jnp.asarray(g), device.programming_error)),
            label="programming error σ(g)")
    pts = np.linspace(0.05, 1.0, 12)
    sampled = [np.std(np.asarray(devices.program_cells(
        jnp.full((CELLS,), p), jax.random.key(i), device))) for i, p in enumerate(pts)]
    ax.plot(pts, sampled, "o", ms=4, label=f"std of {CELLS:,} sampled cells")
    if device.read_noise.active:
        ax.plot(g, np.asarray(devices.noise_std(jnp.asarray(g), device.read_noise)), "--",
                label="read noise σ(g), per MVM")
    if device.on_off_ratio is not None:
        ax.axvline(1.0 / device.on_off_ratio, color="grey", lw=0.8, ls=":",
                   label=f"g_min (on/off {device.on_off_ratio:g})")
    ax.set_xlabel("target conductance g (g_max = 1)")
    ax.set_ylabel("standard deviation (units of g_max)")
    ax.set_title(f"{name}: conductance errors")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _drift_panel(ax, device, name):
    drift = device.drift
    times = np.logspace(0, np.log10(3.1536e7), 40)
    key = jax.random.key(0)
    for g in (0.1, 0.5, 1.0):
        g0 = jnp.full((CELLS,), g)
        ratio = np.stack([np.asarray(devices.drift_conductances(g0, t, drift, key)) / g
                          for t in times])
        lo, med, hi = np.percentile(ratio, [5, 50, 95], axis=1)
        line, = ax.plot(times, med, label=f"g0 = {g}")
        ax.fill_between(times, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("time after programming (s)")
    ax.set_ylabel("g(t) / g0 (median, 5–95% band)")
    ax.set_title(f"{name}: drift and accumulated 1/f noise")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    for t, label in ((3600, "1 h"), (86400, "1 d"), (3.1536e7, "1 y")):
        ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.text(t, 0.98, label, fontsize=7, ha="right", va="top",
                transform=ax.get_xaxis_transform())


def main() -> None:
    out = HERE / "figures"
    out.mkdir(exist_ok=True)
    for name in DEVICE_PRESETS:
        device = DeviceConfig.from_preset(name)
        panels = 2 if device.drift.active else 1
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
        _sigma_panel(axes[0, 0], device, name.upper())
        if device.drift.active:
            _drift_panel(axes[0, 1], device, name.upper())
        fig.tight_layout()
        path = out / f"device_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
