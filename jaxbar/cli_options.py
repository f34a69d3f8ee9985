"""Options the `jaxbar` subcommands share: checked argparse types and common arguments."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["NON_NEGATIVE", "POSITIVE", "add_skip_unreadable", "float_in", "int_at_least",
           "net_config", "output_file"]


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound).

    Args:
      lo: the smallest value allowed.
      hi: the largest value allowed.

    Returns:
      A function text -> int raising `argparse.ArgumentTypeError` with the allowed range.
    """
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {v}")
        return v

    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in an interval.

    Args:
      lo: the lower end (None: unbounded).
      hi: the upper end (None: unbounded).
      lo_open: exclude `lo` itself.
      hi_open: exclude `hi` itself.

    Returns:
      A function text -> float raising `argparse.ArgumentTypeError` with the allowed range.
    """
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    allowed = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and (v >= hi if hi_open else v > hi)):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text}")
        return v

    return parse


def output_file(*suffixes: str) -> Callable[[str], str]:
    """An argparse type: a file to write, whose folder exists (and suffix is one of these).

    Args:
      suffixes: the allowed suffixes, e.g. ".png", ".svg" (none: any).

    Returns:
      A function text -> text raising `argparse.ArgumentTypeError` naming the file.
    """

    def parse(text: str) -> str:
        p = Path(text)
        if suffixes and p.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(f"{text}: expected a {' or '.join(suffixes)} file")
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file name")
        if not p.resolve().parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: the folder {p.parent} does not exist")
        return text

    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)


def add_skip_unreadable(p: argparse.ArgumentParser) -> None:
    """Adds `--skip-unreadable` (leave out image files that cannot be decoded)."""
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out image files that cannot be decoded (their count is "
                        "printed) instead of stopping at the first")


def net_config(args: argparse.Namespace):
    """The `NetworkConfig` of `--config` with every `--set KEY=VALUE` applied, then validated."""
    from jaxbar.config import parse_override
    from jaxbar.nn.network_config import NetworkConfig

    net = NetworkConfig.load(args.config)
    changes = dict(parse_override(item, "--set") for item in args.set)
    return net.replace(**changes) if changes else net
