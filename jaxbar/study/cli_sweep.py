"""The `jaxbar sweep`, `jaxbar plot` and `jaxbar table` commands.

`add_parsers(subparsers)` registers them on the `jaxbar` command's subparsers. Heavy
imports (JAX, matplotlib) happen inside the commands, so registering them is cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parsers"]


def _sweep(args: argparse.Namespace) -> int:
    import dataclasses

    from jaxbar.study.results import parse_filters
    from jaxbar.study.sweep import load_study, run_sweep

    study = load_study(args.study)
    changes = {k: getattr(args, k) for k in ("trials", "limit", "seed")
               if getattr(args, k) is not None}
    if changes:  # part of the study's identity: these points get new ids
        study = dataclasses.replace(study, **changes)
    out = args.out or str(Path("results") / f"{Path(args.study).stem}.jsonl")
    try:
        s = run_sweep(study, out, dry_run=args.dry_run, progress=not args.quiet,
                      cache_dir=args.cache_dir, strategy=args.strategy,
                      only=parse_filters(args.only, "--only"),
                      skip_unreadable=args.skip_unreadable)
    except KeyboardInterrupt:
        print(f"\njaxbar sweep: interrupted; completed points are in {out}, run the same "
              "command again to resume", file=sys.stderr)
        return 130
    if not args.dry_run and s.done:
        print(f"{s.done} points in {s.seconds:.0f} s ({s.skipped} were already done) → {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from jaxbar.study.plot import plot_results
    from jaxbar.study.results import filter_rows, parse_filters, read_results

    # Reference rows (digital) lack the crossbar keys filtered on: keep them in the plot.
    rows = filter_rows(read_results(args.results), parse_filters(args.filter),
                       keep_missing=True)
    out = args.out or str(Path(args.results).with_suffix(".png"))
    if args.ylim and not args.ylim[0] < args.ylim[1]:
        raise ValueError(f"--ylim {args.ylim[0]:g} {args.ylim[1]:g}: LO must be below HI")
    plot_results(rows, args.x, args.hue, args.style, out, logx=args.logx, title=args.title,
                 ylim=tuple(args.ylim) if args.ylim else None)
    print(f"{len(rows)} rows → {out}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from jaxbar.study.results import filter_rows, parse_filters, read_results, summary_table

    rows = filter_rows(read_results(args.results), parse_filters(args.filter))
    print(summary_table(rows, args.columns, args.format, args.sort))
    return 0


def add_parsers(subparsers) -> None:
    """Registers `sweep`, `plot` and `table` on an argparse subparsers object.

    Args:
      subparsers: the result of `ArgumentParser.add_subparsers()`; each command sets
        `func` to a function `args -> exit status`.
    """
    from jaxbar.cli_options import (
        NON_NEGATIVE,
        POSITIVE,
        add_skip_unreadable,
        float_in,
        output_file,
    )

    sw = subparsers.add_parser(
        "sweep", help="run (or resume) a study: accuracy at every point of a parameter grid",
        description="Runs the points of a study YAML, appending one JSON row per point to "
                    "RESULTS; points already there are skipped, so rerunning resumes.")
    sw.add_argument("study", help="the study YAML file")
    sw.add_argument("--out", help="results JSON-lines file (default: results/<study>.jsonl)")
    sw.add_argument("--dry-run", action="store_true",
                    help="list the points and whether each is done; evaluate nothing")
    sw.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                    help="run only the points with this setting (repeatable)")
    sw.add_argument("--trials", type=POSITIVE,
                    help="override the study's trials (new point ids)")
    sw.add_argument("--limit", type=POSITIVE,
                    help="override the study's image count (new ids)")
    sw.add_argument("--seed", type=NON_NEGATIVE,
                    help="override the study's seed (new point ids)")
    sw.add_argument("--strategy", choices=("auto", "map", "vmap"),
                    help="trial strategy (default: the study's, else by backend)")
    sw.add_argument("--cache-dir", help="decoded-image cache (default: $JAXBAR_CACHE)")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    add_skip_unreadable(sw)
    sw.set_defaults(func=_sweep)

    pl = subparsers.add_parser(
        "plot", help="plot accuracy (mean and 95%% CI) against a swept setting")
    pl.add_argument("results", help="a results JSON-lines file")
    pl.add_argument("--x", required=True, help="dotted key on the x axis")
    pl.add_argument("--hue", help="dotted key: one colour per value")
    pl.add_argument("--style", help="dotted key: one line style per value")
    pl.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only rows with this setting, and rows without the key such as a "
                         "digital reference (repeatable; YAML value)")
    pl.add_argument("--out", type=output_file(".png", ".svg"),
                    help="figure file, .png or .svg (default: RESULTS with .png)")
    pl.add_argument("--logx", action="store_true", help="logarithmic x axis")
    pl.add_argument("--title", help="figure title (default: the study name)")
    pl.add_argument("--ylim", type=float_in(), nargs=2, metavar=("LO", "HI"), help="y limits, %%")
    pl.set_defaults(func=_plot)

    tb = subparsers.add_parser("table", help="print a summary table of sweep results")
    tb.add_argument("results", help="a results JSON-lines file")
    tb.add_argument("--columns", nargs="+", metavar="KEY",
                    help="dotted keys to show (default: the override keys)")
    tb.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                    help="keep only rows with this setting (repeatable; YAML value)")
    tb.add_argument("--sort", nargs="+", default=[], metavar="KEY", help="sort by these keys")
    tb.add_argument("--format", default="plain", choices=("plain", "markdown", "csv"))
    tb.set_defaults(func=_table)
