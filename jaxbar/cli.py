"""The `jaxbar` command: demo, evaluate, calibrate, sweep, plot, table, finetune."""

from __future__ import annotations

import argparse
import json
import sys
import time


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
    p.add_argument("--mean", help="CIFAR x_train_mean.npy (default: beside the weights)")
    p.add_argument("--data", required=True, help="image folder root: DATA/<split>/<class>/*")
    p.add_argument("--config", default="paper_baseline",
                   help="preset (digital, ideal, paper_baseline) or a JSON/YAML network config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a crossbar field, e.g. --set adc.bits=6 (YAML value)")
    p.add_argument("--cache-dir", help="decoded-image cache (default: $JAXBAR_CACHE)")


def _net_config(args):
    import yaml

    from jaxbar.nn.network_config import NetworkConfig

    net = NetworkConfig.load(args.config)
    for item in args.set:
        key, _, value = item.partition("=")
        net = net.replace(**{key: yaml.safe_load(value)})
    return net


def _calibrate(args: argparse.Namespace) -> int:
    from jaxbar.study.pipeline import load_task, prepare_configs

    task = load_task(args.model, args.weights, args.data, args.params, args.mean)
    net = _net_config(args)
    t0 = time.perf_counter()
    _, _, cal = prepare_configs(task, net, None, args.cache_dir)
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

    from jaxbar.study.engine import accuracy_stats, evaluate
    from jaxbar.study.pipeline import load_task, prepare_configs

    if args.distributed:  # multi-host: every process sees all hosts' devices; trials shard
        # None: auto-detected (SLURM, Open MPI, Kubernetes, Cloud TPU); must precede any JAX op.
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif (args.coordinator, args.num_processes, args.process_id) != (None, None, None):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
    t0 = time.perf_counter()
    task = load_task(args.model, args.weights, args.data, args.params, args.mean)
    net = _net_config(args)
    model, configs, cal = prepare_configs(task, net, args.calibration, args.cache_dir)
    images, labels = task.images(args.split, args.limit, args.cache_dir)
    keys = None
    if configs is not None:
        keys = jax.random.split(jax.random.key(args.seed), args.trials)
    res = evaluate(model, configs, images, labels, keys, batch_size=args.batch_size,
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
            "accuracy_ci95": [lo, hi], "accuracies": res.accuracies.tolist(),
            "n_images": res.n_images, "trials": len(res.accuracies), "seed": args.seed,
            "config": net.to_dict(),
            "layers": None if configs is None else {
                n: (None if c is None else c.to_dict()) for n, c in configs.items()},
            "seconds": time.perf_counter() - t0,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    from jaxbar.config import ConfigError

    parser = argparse.ArgumentParser(prog="jaxbar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a short Monte Carlo study: a small CNN on 8x8 digits "
                          "(scikit-learn's), programming error, differential vs offset")
    demo.add_argument("--trials", type=int, default=8)
    demo.add_argument("--out", default="jaxbar-demo.png", help="plot file (PNG or SVG)")
    demo.add_argument("--mvm", action="store_true",
                      help="instead: the analog-MVM error study on random 1152x256 matrices")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", help="also write the rows to this JSON file")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("evaluate", help="accuracy of a network on simulated crossbars")
    _add_model_args(ev)
    ev.add_argument("--split", default="test")
    ev.add_argument("--limit", type=int, help="class-balanced subset of N images")
    ev.add_argument("--calibration", help="calibration file (default: calibrate on the fly)")
    ev.add_argument("--trials", type=int, default=1)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=250)
    ev.add_argument("--strategy", default="auto", choices=("auto", "map", "vmap"))
    ev.add_argument("--json", help="write results to this JSON file")
    ev.add_argument("--distributed", action="store_true",
                    help="multi-host run: call jax.distributed.initialize() first; start one "
                         "process per host, all with the same arguments; trials (and images, "
                         "when trials are fewer than devices) shard over all their devices")
    ev.add_argument("--coordinator", metavar="HOST:PORT",
                    help="with --distributed: process 0's address (default: auto-detected on "
                         "SLURM, Open MPI, Kubernetes and Cloud TPU, or $JAX_COORDINATOR_ADDRESS)")
    ev.add_argument("--num-processes", type=int, help="with --distributed: processes in all")
    ev.add_argument("--process-id", type=int, help="with --distributed: this process's rank")
    ev.set_defaults(func=_evaluate)

    ca = sub.add_parser("calibrate", help="calibrate input and ADC ranges of every layer")
    _add_model_args(ca)
    ca.add_argument("--out", required=True, help="calibration JSON file to write")
    ca.set_defaults(func=_calibrate)

    from jaxbar.study.cli_sweep import add_parsers

    add_parsers(sub)  # sweep, plot, table

    from jaxbar.train.cli import add_finetune_parser

    add_finetune_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"jaxbar {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
