"""The `jaxbar finetune` subcommand: hardware-aware fine-tuning of a CIFAR ResNet.

Register it with `add_finetune_parser(subparsers)` from the main `jaxbar` parser.

A run directory holds `run.json` (the arguments), `log.jsonl`, `checkpoints/`, and at the
end `params.npz` (accepted by `jaxbar evaluate --params`), `x_train_mean.npy` (so
evaluation finds the preprocessing mean), `calibration.json` (the ranges trained with),
`ranges.json` (learned ranges, with `--learn-ranges`), `curves.png` and `summary.json`.
Running the same command again resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

__all__ = ["add_finetune_parser", "finetune"]

# Arguments that change the trajectory: a resumed run must have the same ones.
_TRAJECTORY = ("model", "weights", "params", "config", "set", "calibration", "epochs", "lr",
               "optimizer", "momentum", "weight_decay", "schedule", "warmup_steps",
               "batch_size", "seed", "batch_stats", "weight_clip", "learn_ranges", "range_lr",
               "ir_drop", "augment", "train_limit", "label_smoothing", "grad_clip")


def _weight_clip(text: str):
    if text in ("none", "None", ""):
        return None
    if text == "mapped":
        return "mapped"
    try:
        k = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected 'none', 'mapped' or a number of standard deviations, got {text!r}") from e
    if not k > 0:
        raise argparse.ArgumentTypeError(f"the number of standard deviations must be > 0: {k}")
    return k


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `finetune` on the `jaxbar` command's subparsers.

    Args:
      subparsers: the object `ArgumentParser.add_subparsers()` returned.

    Returns:
      The `finetune` parser (its handler is set as `func`).
    """
    from jaxbar.study.pipeline import CIFAR_MODELS
    from jaxbar.train.optim import OPTIMIZERS, SCHEDULES

    p = subparsers.add_parser(
        "finetune", help="hardware-aware fine-tuning under simulated crossbar noise",
        description="Fine-tunes a CIFAR ResNet with the analog network (fresh programming error "
                    "and read noise every step, straight-through quantizers) in the forward "
                    "pass; resumes from the last checkpoint in --out.")
    from jaxbar.cli_options import NON_NEGATIVE, POSITIVE, add_skip_unreadable, float_in

    p.add_argument("--model", required=True, choices=tuple(CIFAR_MODELS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="Keras .h5 weights to start from")
    src.add_argument("--params", help="a jaxbar parameter file (.npz) to start from")
    p.add_argument("--mean", help="CIFAR training-set mean .npy file, used whatever its name "
                                  "(default: x_train_mean.npy beside the weights)")
    p.add_argument("--data", required=True, help="image folder root: DATA/{train,test}/<class>/*")
    p.add_argument("--config", default="paper_baseline",
                   help="network config: preset (digital, ideal, paper_baseline) or JSON/YAML; "
                        "'digital' trains without analog effects (the control)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a crossbar field, e.g. --set adc.bits=6 (YAML value)")
    p.add_argument("--calibration", help="calibration file (default: calibrate the starting "
                                         "model on the fly)")
    p.add_argument("--epochs", type=float_in(0, lo_open=True), required=True,
                   help="passes over the training data (fractional: a random subset)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--lr", type=float_in(0, lo_open=True), default=1e-3, help="peak learning rate")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--momentum", type=float_in(0, 1, hi_open=True), default=0.9,
                   help="SGD momentum (Nesterov)")
    p.add_argument("--weight-decay", type=float_in(0), default=0.0)
    p.add_argument("--grad-clip", type=float_in(0, lo_open=True),
                   help="clip the global gradient norm")
    p.add_argument("--schedule", default="cosine", choices=SCHEDULES)
    p.add_argument("--warmup-steps", type=NON_NEGATIVE, default=0)
    p.add_argument("--batch-size", type=POSITIVE, default=128)
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--batch-stats", default="frozen", choices=("frozen", "update"),
                   help="batch norm: use and keep the running averages (as evaluation does), "
                        "or normalize with batch statistics and update the averages")
    p.add_argument("--weight-clip", type=_weight_clip, default=None, metavar="none|mapped|K",
                   help="clip analog kernels after each step to the mapped range or to ±K·std")
    p.add_argument("--learn-ranges", action="store_true",
                   help="learn the input and ADC ranges of every analog layer")
    p.add_argument("--range-lr", type=float_in(0, lo_open=True), default=1e-3,
                   help="Adam rate of the ranges")
    p.add_argument("--no-ir-drop", dest="ir_drop", action="store_false",
                   help="train without the config's parasitics (evaluate with them)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no random crop / horizontal flip")
    p.add_argument("--label-smoothing", type=float_in(0, 1, hi_open=True), default=0.0)
    p.add_argument("--train-limit", type=POSITIVE,
                   help="use a class-balanced subset of N training images")
    p.add_argument("--log-every", type=POSITIVE, default=20, help="steps per log record")
    p.add_argument("--checkpoint-every", type=POSITIVE, default=200, help="steps per checkpoint")
    p.add_argument("--stop-at", type=NON_NEGATIVE,
                   help="stop after this global step (resume later)")
    p.add_argument("--restart", action="store_true",
                   help="discard the checkpoints and log in --out and start afresh")
    p.add_argument("--eval-limit", type=NON_NEGATIVE, default=0,
                   help="after each epoch, evaluate on N test images (0: no evaluation)")
    p.add_argument("--eval-trials", type=POSITIVE, default=1, help="Monte Carlo trials of it")
    add_skip_unreadable(p)
    p.add_argument("--cache-dir", help="decoded-image cache (default: $JAXBAR_CACHE)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=finetune)
    return p


def _check_run_dir(out: Path, args, restart: bool) -> None:
    run_file = out / "run.json"
    current = {k: getattr(args, k) for k in _TRAJECTORY}
    if restart:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("log.jsonl", "calibration.json", "summary.json"):
            (out / name).unlink(missing_ok=True)
    elif run_file.exists() and (out / "checkpoints").is_dir():
        before = json.loads(run_file.read_text()).get("args", {})
        diff = {k: (before.get(k), v) for k, v in json.loads(json.dumps(current)).items()
                if before.get(k) != v}
        if diff:
            raise ValueError(f"{out} holds a run with other settings {diff} (old, new): "
                             "resume with the same arguments, or pass --restart")
    out.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"args": current}, indent=1))


def finetune(args: argparse.Namespace) -> int:
    """Runs `jaxbar finetune` (see the module docstring). Returns the exit status."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jaxbar.data.image_folder import load_image_folder
    from jaxbar.nn.params_io import save_params
    from jaxbar.study.engine import evaluate
    from jaxbar.study.pipeline import load_task, prepare_model
    from jaxbar.train.loop import Trainer, TrainOptions, read_log
    from jaxbar.train.optim import make_optimizer, make_schedule
    from jaxbar.train.plot import plot_curves

    t0 = time.perf_counter()
    out = Path(args.out)
    from jaxbar.cli_options import net_config  # the same --config/--set as evaluate

    net = net_config(args)
    _check_run_dir(out, args, args.restart)
    task = load_task(args.model, args.weights, args.data, args.params, args.mean,
                     args.skip_unreadable)
    calibration = args.calibration
    if calibration is None and (out / "calibration.json").exists() and \
            (out / "checkpoints").is_dir():
        calibration = str(out / "calibration.json")  # resuming: the ranges trained with
    model, cal = prepare_model(task, net, calibration, args.cache_dir)
    if cal is not None and calibration is None:
        cal.meta.update(model=args.model, config=net.to_dict())
        cal.save(out / "calibration.json")
    raw, labels, _ = load_image_folder(args.data, "train", limit=args.train_limit,
                                       cache_dir=args.cache_dir,
                                       skip_unreadable=args.skip_unreadable)
    mean = jnp.asarray(task.mean, jnp.float32)

    def preprocess(x):  # cifar_resnet_preprocess, inside the step (after augmentation)
        return (x.astype(jnp.float32) - mean) / 255.0

    options = TrainOptions(batch_size=args.batch_size, seed=args.seed,
                           batch_stats=args.batch_stats, weight_clip=args.weight_clip,
                           learn_ranges=args.learn_ranges, ir_drop=args.ir_drop,
                           augment=args.augment, label_smoothing=args.label_smoothing)
    total = max(1, int(round(args.epochs * (len(raw) // args.batch_size))))
    schedule = make_schedule(args.schedule, args.lr, total, args.warmup_steps)
    optimizer = make_optimizer(args.optimizer, schedule, momentum=args.momentum,
                               weight_decay=args.weight_decay, grad_clip=args.grad_clip)
    trainer = Trainer(model, optimizer, options=options, schedule=schedule,
                      range_optimizer=optax.adam(args.range_lr), preprocess=preprocess)
    on_epoch_end = None
    if args.eval_limit:
        x_ev, y_ev = task.images("test", args.eval_limit, args.cache_dir)
        keys = jax.random.split(jax.random.key(args.seed + 1), args.eval_trials)

        def on_epoch_end(state, epoch):
            res = evaluate(trainer.model(state), x_ev, y_ev, keys, progress=False)
            return {"eval_accuracy": res.mean, "eval_images": int(len(y_ev)),
                    "eval_trials": len(res.accuracies)}

    state = trainer.fit(raw, labels, epochs=args.epochs, run_dir=out, resume=True,
                        stop_at=args.stop_at, log_every=args.log_every,
                        checkpoint_every=args.checkpoint_every, on_epoch_end=on_epoch_end,
                        progress=args.progress)
    step = int(state.step)
    records = read_log(out / "log.jsonl")
    plot_curves({args.config if trainer.analog else "digital": records},
                out / "curves.png", title=f"{args.model} finetune ({args.config})")
    summary = {"step": step, "total_steps": total, "finished": step >= total,
               "seconds_this_invocation": time.perf_counter() - t0,
               "last": records[-1] if records else None}
    if step < total:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"stopped at step {step} of {total}; run the same command to resume")
        return 0
    extra = {"finetune": {"args": json.loads((out / "run.json").read_text())["args"],
                          "steps": step, "config": net.to_dict()}}
    save_params(out / "params.npz", trainer.model(state), extra=extra)
    if task.mean is not None:
        np.save(out / "x_train_mean.npy", np.asarray(task.mean, np.float32))
    learned = trainer.calibration(state, {"model": args.model, "config": net.to_dict()})
    if learned is not None:
        learned.save(out / "ranges.json")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    hint = "".join(f" --set '{item}'" for item in args.set)
    if learned is not None:
        hint += f" --calibration {out / 'ranges.json'}"
    print(f"fine-tuned {args.model} for {step} steps → {out / 'params.npz'}\n"
          f"evaluate: jaxbar evaluate --model {args.model} --params {out / 'params.npz'} "
          f"--data {args.data} --config {args.config}{hint}")
    return 0
