"""The `jaxbar` command: demo, evaluate, calibrate, cost, sweep, plot, table, finetune."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

from jaxbar.cli_options import (
    NON_NEGATIVE,
    POSITIVE,
    add_skip_unreadable,
    net_config,
    output_file,
)

__all__ = ["build_parser", "main"]


def _demo(args: argparse.Namespace) -> int:
    if args.mvm:
        from jaxbar.study.mvm_error import format_table, mvm_error_study

        rows = mvm_error_study(trials=args.trials, seed=args.seed)
        print("Relative error ‖y - x@W‖/‖x@W‖ of a 1152×256 analog layer (paper_baseline: "
              "8-bit weights, inputs and ADC (calibrated ranges), on/off ratio 100), "
              f"mean ± std over {args.trials} programming-error trials:")
        print(format_table(rows))
    else:
        from jaxbar.study.demo import run_demo

        rows = run_demo(trials=args.trials, seed=args.seed, out=args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from jaxbar.study.pipeline import MODELS

    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--weights", help="Keras .h5 weights")
    p.add_argument("--params", help="a jaxbar parameter file (.npz), instead of --weights")
    p.add_argument("--mean", help="CIFAR training-set mean .npy file, used whatever its name "
                                  "(default: x_train_mean.npy beside the weights)")
    p.add_argument("--data", required=True, help="image folder root: DATA/<split>/<class>/*")
    p.add_argument("--config", default="paper_baseline",
                   help="preset (digital, ideal, paper_baseline) or a JSON/YAML network config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a crossbar field or calibration setting, e.g. --set "
                        "adc.bits=6 (YAML value; all overrides are applied, then validated)")
    add_skip_unreadable(p)
    p.add_argument("--cache-dir", help="decoded-image cache (default: $JAXBAR_CACHE)")


def _calibrate(args: argparse.Namespace) -> int:
    from jaxbar.study.pipeline import load_task, prepare_model

    net = net_config(args)
    task = load_task(args.model, args.weights, args.data, args.params, args.mean,
                     args.skip_unreadable)
    t0 = time.perf_counter()
    _, cal = prepare_model(task, net, None, args.cache_dir)
    if cal is None:
        print("nothing to calibrate: the network is digital or uses no quantized inputs/ADC")
        return 0
    cal.meta.update(model=args.model, config=net.to_dict())
    cal.save(args.out)
    print(f"calibrated {len(cal.layers)} layers on {cal.meta['images']} images in "
          f"{time.perf_counter() - t0:.1f} s → {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import jax

    from jaxbar.nn.analogize import analog_layers
    from jaxbar.study.engine import accuracy_stats, evaluate
    from jaxbar.study.pipeline import load_task, prepare_model

    if args.distributed:  # multi-host: every process sees all hosts' devices; trials shard
        # None: auto-detected (SLURM, Open MPI, Kubernetes, Cloud TPU); must precede any JAX op.
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif (args.coordinator, args.num_processes, args.process_id) != (None, None, None):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
    t0 = time.perf_counter()
    net = net_config(args)
    task = load_task(args.model, args.weights, args.data, args.params, args.mean,
                     args.skip_unreadable)
    model, cal = prepare_model(task, net, args.calibration, args.cache_dir)
    images, labels = task.images(args.split, args.limit, args.cache_dir)
    layers = analog_layers(model)
    keys = jax.random.split(jax.random.key(args.seed), args.trials) if layers else None
    res = evaluate(model, images, labels, keys, batch_size=args.batch_size,
                   strategy=args.strategy)
    if jax.process_index() != 0:  # every process holds all results; process 0 reports them
        return 0
    st = accuracy_stats(res.accuracies)
    lo, hi = st["ci95"]
    print(f"{args.model} on {res.n_images} {args.split} images, config {args.config}: "
          f"top-1 {100 * st['mean']:.2f}% (95% CI {100 * lo:.2f}–{100 * hi:.2f}%, "
          f"{len(res.accuracies)} trial{'s' * (len(res.accuracies) > 1)})")
    if args.json:
        out = {
            "model": args.model, "weights": task.weights, "split": args.split,
            "accuracy_mean": st["mean"], "accuracy_std": st["std"],
            "accuracy_ci95": [lo, hi], "accuracy_ci95_method": st["ci95_method"],
            "accuracies": res.accuracies.tolist(),
            "n_images": res.n_images, "trials": len(res.accuracies), "seed": args.seed,
            "config": net.to_dict(),
            "layers": None if net.crossbar is None else {
                n: op.config.to_dict() for n, (_, op) in layers.items()},
            "seconds": time.perf_counter() - t0,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _shape(text: str) -> tuple[int, ...]:
    """An argparse type: a shape such as `1,32,32,3` (positive integers)."""
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as 1,32,32,3, got "
                                         f"{text!r}")
    return shape


def _cost(args: argparse.Namespace) -> int:
    import dataclasses

    from flax import nnx

    from jaxbar.config import ConfigError
    from jaxbar.nn.analogize import analog_layers, analogize
    from jaxbar.nn.calibrate import Calibration, apply_calibration
    from jaxbar.nn.cost import cost, format_cost
    from jaxbar.nn.models import ResNet50, ResNetV1Cifar
    from jaxbar.study.pipeline import CIFAR_MODELS

    net = net_config(args)
    if args.model == "resnet50":
        build = lambda: ResNet50(rngs=nnx.Rngs(0))  # noqa: E731
    else:
        build = lambda: ResNetV1Cifar(CIFAR_MODELS[args.model], rngs=nnx.Rngs(0))  # noqa: E731
    model = nnx.eval_shape(build)  # shapes only: nothing is initialized or run
    analog = analogize(model, dataclasses.replace(net, fold_batchnorm=False))
    if not analog_layers(analog):
        raise ConfigError(f"--config {args.config} keeps every layer digital: nothing to cost")
    if args.calibration:
        apply_calibration(analog, Calibration.load(args.calibration))
    report = cost(analog, None, args.input_shape, energy=args.energy)
    print(f"{args.model}, config {args.config}, one forward call on input "
          f"{'×'.join(map(str, report.input_shape))}:")
    print(format_cost(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(report.to_dict(), model=args.model, config=net.to_dict()), f,
                      indent=1)
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def input_error(e: BaseException) -> str | None:
    """The one-line message of an error caused by the user's input, or None for other errors.

    Input errors are `ValueError`s (`ConfigError`, bad files), `OSError`s (missing or
    unreadable files; the message names the file) and IR-drop `ConvergenceError`s, also when
    a jitted computation carries one.

    Args:
      e: the exception.

    Returns:
      The message, or None when `e` is a bug whose traceback should be shown.
    """
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e):
        return _one_line(f"{e.filename}: {e.strerror or e}")
    if isinstance(e, ValueError | OSError):
        return _one_line(str(e) or type(e).__name__)
    if isinstance(e, RuntimeError):
        from jaxbar.core.ir import convergence_error

        carried = convergence_error(e)
        if carried is not None:
            return _one_line(str(carried))
    return None


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("JAXBAR_DEBUG", "") not in (
        "", "0")


@contextlib.contextmanager
def _reporting(command: str, debug: bool):
    """Warnings as `jaxbar <command>: warning: ...` lines.

    Callback tracebacks are not logged unless debugging.
    """
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        def show(message, category, filename, lineno, file=None, line=None):
            where = f" ({category.__name__} at {filename}:{lineno})" if debug else ""
            print(f"jaxbar {command}: warning: {_one_line(message)}{where}", file=sys.stderr)

        warnings.showwarning = show
        if not debug:
            from jaxbar.core.ir import quiet_callback_logs

            stack.enter_context(quiet_callback_logs())
        yield


def build_parser() -> argparse.ArgumentParser:
    """The `jaxbar` argument parser with every command (each sets `func`)."""
    parser = argparse.ArgumentParser(prog="jaxbar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short Monte Carlo study: a small CNN on 8x8 digits "
                          "(scikit-learn's), programming error, differential vs offset")
    demo.add_argument("--trials", type=POSITIVE, default=8)
    demo.add_argument("--out", type=output_file(".png", ".svg"), default="jaxbar-demo.png",
                      help="plot file (PNG or SVG)")
    demo.add_argument("--mvm", action="store_true",
                      help="instead: the analog-MVM error study on random 1152x256 matrices")
    demo.add_argument("--seed", type=NON_NEGATIVE, default=0)
    demo.add_argument("--json", type=output_file(), help="also write the rows to this JSON file")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("evaluate", help="accuracy of a network on simulated crossbars")
    _add_model_args(ev)
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=POSITIVE, help="class-balanced subset of N images")
    ev.add_argument("--calibration", help="calibration file (default: calibrate on the fly)")
    ev.add_argument("--trials", type=POSITIVE, default=1, help="Monte Carlo trials (>= 1)")
    ev.add_argument("--seed", type=NON_NEGATIVE, default=0)
    ev.add_argument("--batch-size", type=POSITIVE, default=250, help="images per forward pass")
    ev.add_argument("--strategy", default="auto", choices=("auto", "map", "vmap"))
    ev.add_argument("--json", type=output_file(), help="write results to this JSON file")
    ev.add_argument("--distributed", action="store_true",
                    help="multi-host run: call jax.distributed.initialize() first; start one "
                         "process per host, all with the same arguments; trials (and images, "
                         "when trials are fewer than devices) shard over all their devices")
    ev.add_argument("--coordinator", metavar="HOST:PORT",
                    help="with --distributed: process 0's address (default: auto-detected on "
                         "SLURM, Open MPI, Kubernetes and Cloud TPU, or $JAX_COORDINATOR_ADDRESS)")
    ev.add_argument("--num-processes", type=POSITIVE,
                    help="with --distributed: processes in all")
    ev.add_argument("--process-id", type=NON_NEGATIVE,
                    help="with --distributed: this process's rank")
    ev.set_defaults(func=_evaluate)

    ca = sub.add_parser("calibrate", help="calibrate input and ADC ranges of every layer")
    _add_model_args(ca)
    ca.add_argument("--out", required=True, type=output_file(),
                    help="calibration JSON file to write")
    ca.set_defaults(func=_calibrate)

    co = sub.add_parser("cost", help="hardware cost of a network's mapping: arrays, cells, "
                        "array reads, DAC and ADC conversions, digital operations, energy")
    from jaxbar.study.pipeline import MODELS

    co.add_argument("--model", required=True, choices=MODELS)
    co.add_argument("--config", default="paper_baseline",
                    help="preset (ideal, paper_baseline) or a JSON/YAML network config")
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a crossbar field, e.g. --set mapping.slices=4 (YAML value)")
    co.add_argument("--calibration", help="calibration file whose input ranges (signed or "
                    "unsigned, which sets the input bits of bit-serial inputs) to use")
    co.add_argument("--input-shape", type=_shape, metavar="B,H,W,C",
                    help="input of one forward call (default: the model's, batch 1)")
    co.add_argument("--energy", metavar="YAML", help="energy per operation, e.g. "
                    "docs/energy_example.yaml: also report energy per forward call")
    co.add_argument("--json", type=output_file(), help="write the report to this JSON file")
    co.set_defaults(func=_cost)

    from jaxbar.study.cli_sweep import add_parsers

    add_parsers(sub)  # sweep, plot, table

    from jaxbar.train.cli import add_finetune_parser

    add_finetune_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true",
                       help="show the Python traceback of an error (also: JAXBAR_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a `jaxbar` command.

    Errors in the input (options, files, configs) print one line `jaxbar <command>: error:
    <message>` naming the input and return 2; `--debug` or `JAXBAR_DEBUG=1` shows the
    traceback instead.

    Args:
      argv: the arguments (default: `sys.argv[1:]`).

    Returns:
      The exit status: 0 on success, 2 on an input error (argparse's too), 130 when a sweep
      is interrupted.
    """
    args = build_parser().parse_args(argv)
    debug = _debug(args)
    with _reporting(args.command, debug):
        try:
            return args.func(args)
        except Exception as e:
            message = None if debug else input_error(e)
            if message is None:
                raise
            print(f"jaxbar {args.command}: error: {message}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
