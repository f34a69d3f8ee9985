"""The `jaxbar` command."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from jaxbar.study.mvm_error import format_table, mvm_error_study

    rows = mvm_error_study(trials=args.trials, seed=args.seed)
    print("Relative error ‖y - x@W‖/‖x@W‖ of a 1152×256 analog layer (paper_baseline: 8-bit "
          "weights, inputs and ADC (calibrated ranges), on/off ratio 100), "
          f"mean ± std over {args.trials} programming-error trials:")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxbar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short analog-MVM Monte Carlo study on random matrices")
    demo.add_argument("--trials", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the rows to this JSON file")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
