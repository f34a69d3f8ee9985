"""Hardware-aware fine-tuning of ResNet20 on CIFAR-10 under programming error (issue 6).

The analog config is the paper baseline (differential mapping, 8-bit weights, inputs and ADC
with calibrated ranges, 1152×256 arrays, on/off ratio 100) with state-independent programming
error σ. The script

1. checks on 1,000 test images which σ costs the pretrained model at least 10 points;
2. fine-tunes the pretrained model with the analog network in the forward pass (a new
   programming-error sample every step, weights clipped to ±3 std after each step) and, as
   controls, with the same schedule digitally: with the same options (weight clipping on) and
   without weight clipping;
3. evaluates pretrained / analog-fine-tuned / digitally-fine-tuned models digitally and on the
   analog config (Monte Carlo trials on the 10,000 test images; each model calibrated on its own
   activations of the same 500 training images, as ``jaxbar evaluate`` does; the same trial keys
   for every model, so differences are paired);
4. writes ``results.json`` and ``curves.png`` next to this file.

Training runs are resumable (``--work-dir``); rerunning the script continues where it stopped.

    python studies/finetune/experiment.py --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbar.data.image_folder import load_image_folder
from jaxbar.nn.analogize import analog_layers, analogize, digital_model, update_configs
from jaxbar.nn.calibrate import calibrate_model
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.study.engine import accuracy_stats, evaluate
from jaxbar.study.pipeline import load_task
from jaxbar.train import Trainer, TrainOptions, read_log
from jaxbar.train.optim import make_optimizer, make_schedule
from jaxbar.train.plot import plot_curves

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARED = ROOT.parent / "shared"


def _stats(acc) -> dict:
    s = accuracy_stats(acc)
    return {"mean": s["mean"], "ci95": list(s["ci95"]), "std": s["std"],
            "accuracies": [float(a) for a in np.asarray(acc)]}


def _fmt(s: dict) -> str:
    lo, hi = s["ci95"]
    if len(s["accuracies"]) == 1:
        return f"{100 * s['mean']:.2f}"
    return f"{100 * s['mean']:.2f} ± {100 * (hi - lo) / 2:.2f}"


def _train_seconds(log_path: Path, batch_size: int) -> float:
    """Training wall time from a run's log, across resumed invocations."""
    records = [r for r in read_log(log_path) if "loss" in r]
    if records and "seconds" in records[-1]:
        return float(records[-1]["seconds"])
    total, prev = 0.0, 0  # older logs: from the throughput of each interval
    for r in records:
        total += (r["step"] - prev) * batch_size / r["images_per_s"]
        prev = r["step"]
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(SHARED / "models/cifar10-resnet-v1/"
                                                     "resnet20v1_cifar10.h5"))
    p.add_argument("--data", default=str(SHARED / "data/cifar10-jpeg"))
    p.add_argument("--sigma", type=float, default=0.04)
    p.add_argument("--check-sigmas", default="0.02,0.03,0.04,0.05")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--weight-clip", type=float, default=3.0)
    p.add_argument("--batch-stats", default="frozen", choices=("frozen", "update"))
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--eval-limit", type=int, help="test images (default: all 10,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "finetune"))
    p.add_argument("--out", default=str(HERE))
    args = p.parse_args()

    t_start = time.perf_counter()
    times: dict[str, float] = {}
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task("resnet20", args.weights, args.data)
    pretrained = task.model
    net = NetworkConfig.load("paper_baseline").replace(**{
        "device.programming_error": {"model": "independent", "sigma": args.sigma}})
    x_cal, _ = task.images("train", net.calibration.samples)
    x_test, y_test = task.images("test", args.eval_limit)
    keys = jax.random.split(jax.random.key(2024), args.trials)

    def on_crossbars(model):
        """The model on the analog config, calibrated on its own activations."""
        analog = analogize(digital_model(model) if analog_layers(model) else model, net)
        calibrate_model(analog, x_cal)
        return analog

    # 1. Which σ costs at least 10 points (1,000 test images, 3 trials)?
    t = time.perf_counter()
    x_chk, y_chk = task.images("test", 1000)
    base = on_crossbars(pretrained)
    check = {"digital": evaluate(pretrained, x_chk, y_chk, progress=False).mean}
    for s in (float(v) for v in args.check_sigmas.split(",")):
        point = nnx.clone(base)
        update_configs(point, **{"device.programming_error.sigma": s})
        r = evaluate(point, x_chk, y_chk, keys[:3], progress=False)
        check[f"sigma={s}"] = r.mean
        print(f"σ = {s}: {100 * r.mean:.1f}% (digital {100 * check['digital']:.1f}%)", flush=True)
    times["sigma_check"] = time.perf_counter() - t

    # 2. Fine-tune: analog (noise injection) and the digital control, same schedule.
    raw, labels, _ = load_image_folder(args.data, "train")
    mean = jnp.asarray(task.mean, jnp.float32)

    def preprocess(x):
        return (x.astype(jnp.float32) - mean) / 255.0

    steps = int(round(args.epochs * (len(raw) // args.batch_size)))
    schedule = make_schedule("cosine", args.lr, steps)
    options = TrainOptions(batch_size=args.batch_size, seed=args.seed,
                           batch_stats=args.batch_stats, weight_clip=args.weight_clip)
    plain = dataclasses.replace(options, weight_clip=None)
    trained = {}
    # The analog run; the control with the same schedule and options but no analog effects;
    # and the control without weight clipping (plain digital fine-tuning).
    runs = (("analog", base, options), ("digital_clip", pretrained, options),
            ("digital", pretrained, plain))
    for name, start, opts in runs:
        t = time.perf_counter()
        tr = Trainer(start, make_optimizer("adam", schedule), options=opts,
                     schedule=schedule, preprocess=preprocess)
        state = tr.fit(raw, labels, epochs=args.epochs, run_dir=work / name, log_every=10,
                       checkpoint_every=100)
        trained[name] = tr.model(state)
        times[f"train_{name}"] = _train_seconds(work / name / "log.jsonl", args.batch_size)
        print(f"fine-tuned ({name}) in {times[f'train_{name}']:.0f} s (this invocation "
              f"{time.perf_counter() - t:.0f} s)", flush=True)

    # 3. Evaluate every model digitally and on the analog config (own calibration).
    results = {}
    models = {"pretrained": pretrained, "finetuned_analog": trained["analog"],
              "control_digital_clip": trained["digital_clip"],
              "control_digital": trained["digital"]}
    for name, model in models.items():
        t = time.perf_counter()
        digital = digital_model(model) if analog_layers(model) else model
        dig = evaluate(digital, x_test, y_test, progress=False)
        ana = evaluate(on_crossbars(model), x_test, y_test, keys, progress=False)
        results[name] = {"digital": _stats(dig.accuracies), "analog": _stats(ana.accuracies)}
        times[f"eval_{name}"] = time.perf_counter() - t
        print(f"{name}: digital {_fmt(results[name]['digital'])}%, analog "
              f"{_fmt(results[name]['analog'])}% ({times[f'eval_{name}']:.0f} s)", flush=True)
    pre = np.asarray(results["pretrained"]["analog"]["accuracies"])
    gain = {n: _stats(np.asarray(results[n]["analog"]["accuracies"]) - pre)
            for n in models if n != "pretrained"}
    times["total"] = time.perf_counter() - t_start

    summary = {
        "model": "resnet20 (Keras CIFAR-10 ResNet-v1, pretrained)",
        "analog_config": net.to_dict(),
        "sigma_check_1000_images_3_trials": check,
        "training": {"epochs": args.epochs, "steps": steps, "train_images": int(len(raw)),
                     "batch_size": args.batch_size, "optimizer": "adam",
                     "schedule": f"cosine from {args.lr} to 0 over {steps} steps",
                     "options": options.to_dict(),
                     "controls": "control_digital_clip: same schedule and options, digital "
                                 "(weight clipping on every layer, no noise); control_digital: "
                                 "same schedule, digital, no weight clipping",
                     "augmentation": "random crop (4-pixel zero padding) + horizontal flip",
                     "noise": "a new programming-error trial per step from the evaluation "
                              "configs (calibrated on the pretrained model)"},
        "evaluation": {"test_images": int(len(y_test)), "trials": args.trials,
                       "calibration": "each model calibrated on its own activations of the "
                                      f"same {len(x_cal)} training images",
                       "trial_keys": "identical for every model (paired differences)"},
        "results": results,
        "analog_gain_over_pretrained": gain,
        "criteria": {
            "pretrained_analog_loss_points": 100 * (results["pretrained"]["digital"]["mean"]
                                                    - results["pretrained"]["analog"]["mean"]),
            "finetuned_analog_gain_points": 100 * gain["finetuned_analog"]["mean"],
            "control_gain_points": 100 * gain["control_digital_clip"]["mean"],
            "plain_control_gain_points": 100 * gain["control_digital"]["mean"],
        },
        "wall_seconds": times,
        "machine": f"{jax.device_count()} {jax.default_backend()} device(s), shared 2-core CPU",
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    logs = {}
    for label, run, model in (("analog fine-tuning (training under noise)", "analog",
                               "finetuned_analog"),
                              ("digital control, same options", "digital_clip",
                               "control_digital_clip"),
                              ("digital control, no clipping", "digital", "control_digital")):
        # The final evaluation on the analog config as a dot at the last step.
        logs[label] = read_log(work / run / "log.jsonl") + [
            {"step": steps, "eval_accuracy": results[model]["analog"]["mean"]}]
    plot_curves(logs, out / "curves.png",
                title=f"ResNet20 fine-tuning, paper baseline + programming error σ={args.sigma}")
    print("\n| model | digital top-1 (%) | analog top-1 (%) | analog gain (points) |\n"
          "|---|---|---|---|")
    for n, r in results.items():
        g = "—" if n == "pretrained" else _fmt(gain[n])
        print(f"| {n} | {_fmt(r['digital'])} | {_fmt(r['analog'])} | {g} |")
    print(f"total {times['total'] / 60:.1f} min → {out / 'results.json'}")


if __name__ == "__main__":
    main()
