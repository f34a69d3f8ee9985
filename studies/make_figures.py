"""Renders the paper-reproduction figures from the study results (studies/results/*.jsonl).

Usage: python studies/make_figures.py   (writes studies/figures/*.png)
"""

from __future__ import annotations

from pathlib import Path

from jaxbar.study.plot import plot_results
from jaxbar.study.results import filter_rows, read_results, summary_table

HERE = Path(__file__).parent
FIGURES = [
    # (results file, x, hue, style, filters, logx, output name, title)
    ("02_prog_error_independent", "device.programming_error.sigma", "mapping.scheme",
     "mapping.slices", [("device.on_off_ratio", None)], False, "02_independent_inf",
     "State-independent error, on/off = ∞"),
    ("02_prog_error_independent", "device.programming_error.sigma", "mapping.scheme",
     "mapping.slices", [("device.on_off_ratio", 100.0)], False, "02_independent_100",
     "State-independent error, on/off = 100"),
    ("03_prog_error_proportional", "device.programming_error.sigma", "mapping.scheme",
     "mapping.slices", [("device.on_off_ratio", None)], False, "03_proportional_inf",
     "State-proportional error, on/off = ∞"),
    ("03_prog_error_proportional", "device.programming_error.sigma", "mapping.scheme",
     "mapping.slices", [("device.on_off_ratio", 100.0)], False, "03_proportional_100",
     "State-proportional error, on/off = 100"),
    ("04_adc_bits", "adc.bits", "mapping.scheme", "array.rows", [], False, "04_adc_bits",
     "Calibrated ADC resolution"),
    ("05_parasitics", "parasitics.r_row", "mapping.scheme", None, [], True, "05_parasitics",
     "Parasitic resistance (r = Rp·Gmax), 1152-row arrays"),
    ("05b_parasitics_fitted_arrays", "parasitics.r_row", "mapping.scheme", None, [], True,
     "05b_parasitics_fitted_arrays", "Parasitic resistance, arrays fitted to each layer"),
    ("06_pcm_drift", "device.time", "mapping.scheme", "device.drift.compensation",
     [("adc.bits", 0), ("device.programming_error.model", "polynomial")], True,
     "06_pcm_drift", "PCM (IBM fit), ideal ADC: accuracy vs seconds after programming"),
    ("06_pcm_drift", "device.time", "mapping.scheme", "device.drift.compensation",
     [("adc.bits", 8)], True, "06_pcm_drift_adc8",
     "PCM (IBM fit), 8-bit ADC calibrated at t0"),
    ("06_pcm_drift", "device.time", "mapping.scheme", "device.drift.compensation",
     [("adc.bits", 0), ("device.programming_error.model", "none")], True,
     "06_pcm_drift_only", "PCM drift alone (no programming error, no 1/f noise)"),
]


#: Study 08: the swept error of each panel, per ADC architecture.
ADC_PANELS = (
    ("capacitor mismatch σ (unit cap; pipeline, cyclic: C1 = C2)",
     {"ramp": "adc.sigma_capacitor", "sar": "adc.sigma_capacitor",
      "pipeline": "adc.sigma_c1", "cyclic": "adc.sigma_c1"}),
    ("comparator offset σ (relative to V_ref)",
     {m: "adc.sigma_comparator" for m in ("ramp", "sar", "pipeline", "cyclic")}),
)


def adc_architectures_figure(path: Path, out: Path) -> None:
    """Study 08: accuracy vs each architecture's component errors, one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_results(path)
            if r["overrides"].get("mapping.scheme", "differential") == "differential"]
    ideal = [r for r in rows if not any(k.startswith("adc.") for k in r["overrides"])
             and r["overrides"].get("config") != "digital"]
    digital = [r for r in rows if r["overrides"].get("config") == "digital"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (label, keys) in zip(axes, ADC_PANELS, strict=True):
        for model, key in keys.items():
            pts = sorted((r["overrides"][key], r) for r in rows
                         if r["overrides"].get("adc.model") == model and key in r["overrides"])
            pts = [(0.0, r) for r in ideal[:1]] + pts
            if len(pts) < 2:
                continue
            x = [max(v, 1e-4) for v, _ in pts]
            y = [100 * r["mean"] for _, r in pts]
            lo = [100 * (r["mean"] - r["ci95"][0]) for _, r in pts]
            hi = [100 * (r["ci95"][1] - r["mean"]) for _, r in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=model)
        if digital:
            ax.axhline(100 * digital[0]["mean"], color="gray", ls=":", label="digital")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (σ = 0 drawn at 1e-4)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend()
    fig.suptitle("ADC architectures, 8-bit, differential, calibrated ranges (ResNet20)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


#: Study 07: one curve per mapping and ADC; input-source results of 05/05b for comparison.
GATED_CURVES = (
    ("differential, interleaved",
     {"mapping.scheme": "differential", "parasitics.interleaved": True}),
    ("differential, separate",
     {"mapping.scheme": "differential", "parasitics.interleaved": False}),
    ("offset", {"mapping.scheme": "offset"}),
)


def _curve(rows, match, x="parasitics.r_row"):
    pts = sorted((r["overrides"][x], r) for r in rows
                 if r["overrides"].get(x) and all(r["overrides"].get(k) == v
                                                  for k, v in match.items()))
    return [v for v, _ in pts], [100 * r["mean"] for _, r in pts]


def gated_parasitics_figure(path: Path, out: Path) -> None:
    """Study 07: accuracy vs r on gated-source, bit-serial arrays, beside input-source 05/05b."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(path)
    digital = [r for r in rows if r["overrides"].get("config") == "digital"]
    panels = ((None, "arrays fitted to each layer", "05b_parasitics_fitted_arrays"),
              (1152, "1152-row arrays", "05_parasitics"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for ax, (rows_n, label, input_source) in zip(axes, panels, strict=True):
        for i, (name, match) in enumerate(GATED_CURVES):
            for bits, ls in ((0, "-"), (8, "--")):
                xs, ys = _curve(rows, {**match, "array.rows": rows_n, "adc.bits": bits})
                if xs:
                    ax.plot(xs, ys, ls, marker="o", color=f"C{i}",
                            label=f"{name}, {'ideal' if bits == 0 else '8-bit'} ADC")
        for i, (name, match) in enumerate(GATED_CURVES[:2]):  # bit lines only (r_row = 0)
            xs, ys = _curve(rows, {**match, "array.rows": rows_n, "adc.bits": 0,
                                   "parasitics.r_row": 0.0}, x="parasitics.r_col")
            if xs:
                ax.plot(xs, ys, "-.", marker="x", color=f"C{i}", alpha=0.7,
                        label=f"{name}, bit lines only (r_row = 0)")
        ref = HERE / "results" / f"{input_source}.jsonl"
        if ref.exists():
            ref_rows = read_results(ref)
            for scheme, marker in (("differential", "s"), ("offset", "^")):
                xs, ys = _curve(ref_rows, {"mapping.scheme": scheme})
                if xs:
                    ax.plot(xs, ys, ":", marker=marker, color="gray", alpha=0.8,
                            label=f"input-source {scheme} (study {input_source[:3].strip('_')})")
        if digital:
            ax.axhline(100 * digital[0]["mean"], color="black", ls=":", lw=0.8, label="digital")
        ax.set_xscale("log")
        ax.set_xlabel("r = Rp·Gmax (row and bit lines)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend(fontsize=7)
    n = rows[0]["n_images"] if rows else 0
    fig.suptitle(f"Gated-source cells, 8-bit bit-serial inputs, ResNet20 ({n} test images)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    out_dir = HERE / "figures"
    out_dir.mkdir(exist_ok=True)
    for name, x, hue, style, filters, logx, out, title in FIGURES:
        path = HERE / "results" / f"{name}.jsonl"
        if not path.exists():
            print(f"skip {out}: {path} not found (run the study first)")
            continue
        rows = filter_rows(read_results(path), filters, keep_missing=True)
        plot_results(rows, x, hue=hue, style=style, out=out_dir / f"{out}.png", logx=logx,
                     title=title)
        print(f"wrote {out_dir / (out + '.png')}")
    path = HERE / "results" / "08_adc_architectures.jsonl"
    if path.exists():
        adc_architectures_figure(path, out_dir / "08_adc_architectures.png")
        print(f"wrote {out_dir / '08_adc_architectures.png'}")
    path = HERE / "results" / "07_parasitics_gated.jsonl"
    if path.exists():
        gated_parasitics_figure(path, out_dir / "07_parasitics_gated.png")
        print(f"wrote {out_dir / '07_parasitics_gated.png'}")
    for name in ("01_exactness",):
        path = HERE / "results" / f"{name}.jsonl"
        if path.exists():
            print(summary_table(read_results(path)))


if __name__ == "__main__":
    main()
