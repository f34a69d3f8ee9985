"""Accuracy-versus-setting plots of sweep results, with 95% confidence bands.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display needed).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxbar.study.results import format_value, lookup, override_keys

__all__ = ["plot_results"]

_MISSING = object()
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _label(key: str | None, v: Any) -> str:
    return format_value(v, key or "")


def plot_results(rows: Sequence[Mapping], x: str, hue: str | None = None,
                 style: str | None = None, out: str | os.PathLike | None = None, *,
                 logx: bool = False, title: str | None = None, ylim: tuple | None = None):
    """Plots mean accuracy (%) against a swept setting, one line per hue/style value.

    Each line is shaded between its points' 95% confidence bounds. Rows without the x
    setting (e.g. a digital reference point) are drawn as horizontal lines. Override keys
    other than x, hue and style that differ between rows split lines too (with a warning),
    so points are never averaged or connected across a hidden setting, unless they take
    one value per x value (swept together with x).

    Args:
      rows: results rows (`read_results`, `filter_rows`).
      x: the dotted key on the x axis.
      hue: a dotted key whose values get one colour each.
      style: a dotted key whose values get one line style (and marker) each.
      out: write the figure here (.png, .svg, .pdf); None only returns it.
      logx: a logarithmic x axis (symmetric-log when x includes 0).
      title: the figure title.
      ylim: y-axis limits in %.

    Returns:
      The matplotlib `Figure`.

    Raises:
      ValueError: no rows, or no row has the x setting.
    """
    from matplotlib.figure import Figure

    rows = list(rows)
    if not rows:
        raise ValueError("no results rows to plot (check the file and --filter)")
    used = {x, hue, style} - {None}
    have_x = [r for r in rows if lookup(r, x, _MISSING) is not _MISSING]
    refs = [r for r in rows if lookup(r, x, _MISSING) is _MISSING]
    if not have_x:
        raise ValueError(f"no row has a value for {x!r}; override keys in the file: "
                         f"{', '.join(override_keys(rows)) or 'none'}")
    def follows_x(k):  # one value per x value (e.g. r_col swept together with r_row)
        seen: dict[str, str] = {}
        return all(seen.setdefault(repr(lookup(r, x)), repr(lookup(r, k))) == repr(lookup(r, k))
                   for r in have_x)

    extra = [k for k in override_keys(have_x) if k not in used and
             len({repr(lookup(r, k)) for r in have_x}) > 1 and not follows_x(k)]
    if extra:
        warnings.warn(f"rows also differ in {', '.join(extra)}: drawn as separate lines "
                      "(use --hue/--style or --filter)", stacklevel=2)

    def key_of(r):
        return (repr(lookup(r, hue)) if hue else None, repr(lookup(r, style)) if style else None,
                tuple(repr(lookup(r, k)) for k in extra))

    lines: dict[tuple, list] = {}
    for r in have_x:
        lines.setdefault(key_of(r), []).append(r)
    xs_all = [lookup(r, x) for r in have_x]
    numeric = all(_is_number(v) for v in xs_all)
    categories: list[str] = []
    if not numeric:
        categories = list(dict.fromkeys(_label(x, v) for v in xs_all))
    hues = list(dict.fromkeys(k[0] for k in lines))
    styles = list(dict.fromkeys(k[1] for k in lines))
    extras = list(dict.fromkeys(k[2] for k in lines))
    colors = [f"C{i % 10}" for i in range(len(hues))]

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for key, group in lines.items():
        pts = {}
        for r in group:  # one row per x; a later duplicate wins (reruns)
            v = lookup(r, x)
            pts[v if numeric else _label(x, v)] = r
        order = sorted(pts) if numeric else [c for c in categories if c in pts]
        xv = order if numeric else [categories.index(c) for c in order]
        mean = [100 * pts[k]["mean"] for k in order]
        # Accuracy lives in [0, 100]: a t-interval from few trials can overshoot it.
        lo = [max(0.0, 100 * (pts[k].get("ci95") or [pts[k]["mean"]] * 2)[0]) for k in order]
        hi = [min(100.0, 100 * (pts[k].get("ci95") or [pts[k]["mean"]] * 2)[1])
              for k in order]
        g0 = group[0]
        parts = []
        if hue:
            parts.append(f"{_short(hue)}={_label(hue, lookup(g0, hue))}")
        if style:
            parts.append(f"{_short(style)}={_label(style, lookup(g0, style))}")
        parts += [f"{_short(k)}={_label(k, lookup(g0, k))}" for k in extra]
        color = colors[hues.index(key[0])]
        ls = _LINESTYLES[styles.index(key[1]) % len(_LINESTYLES)]
        marker = _MARKERS[(styles.index(key[1]) + extras.index(key[2])) % len(_MARKERS)]
        ax.plot(xv, mean, color=color, linestyle=ls, marker=marker, markersize=4,
                label=", ".join(parts) or None)
        ax.fill_between(xv, lo, hi, color=color, alpha=0.18, linewidth=0)
    for i, r in enumerate(refs):
        over = r.get("overrides") or {}
        name = ", ".join(f"{_short(k)}={_label(k, v)}" for k, v in over.items()) or "reference"
        m = 100 * r["mean"]
        lo, hi = (min(100.0, max(0.0, 100 * v)) for v in (r.get("ci95") or [r["mean"]] * 2))
        ax.axhline(m, color="0.3", linestyle=_LINESTYLES[(i + 1) % 4], linewidth=1,
                   label=name)
        if hi > lo:
            ax.axhspan(lo, hi, color="0.5", alpha=0.12, linewidth=0)
    if numeric and logx:
        pos = [v for v in xs_all if v > 0]
        if any(v <= 0 for v in xs_all) and pos:
            ax.set_xscale("symlog", linthresh=min(pos))
        elif pos:
            ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x)
    ax.set_ylabel("top-1 accuracy (%), mean and 95% CI")
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize="small", framealpha=0.85)
    n = {r.get("n_images") for r in rows} - {None}
    t = {r.get("trials") for r in have_x} - {None}
    sub = (f"{'/'.join(map(str, sorted(n)))} images, "
           f"{'/'.join(map(str, sorted(t)))} trials per point") if n and t else ""
    ax.set_title(title or rows[0].get("study") or "", fontsize="medium")
    if sub:
        fig.text(0.99, 0.005, sub, ha="right", va="bottom", fontsize="x-small", color="0.4")
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=150)
    return fig


def _short(key: str) -> str:
    """The last two parts of a dotted key (`programming_error.sigma`)."""
    return ".".join(key.split(".")[-2:])
