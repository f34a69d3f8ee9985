"""Monte Carlo cost: T trials of an analog ResNet20 vs T digital passes, measured in one run.

ResNet20 (pretrained if the shared weights are present), 1,000 CIFAR-sized images, 16
trials of `paper_baseline` with programming error (each trial programs every layer once
and runs all batches). Compared with 16 digital forward passes over the same images.
Both run through the same engine, after compilation, best of two interleaved runs; the
digital time is one pass times T.

Usage: python benchmarks/montecarlo.py [--trials 16] [--images 1000] [--strategy auto]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxbar.nn import load_keras_resnet_cifar, resnet20
from jaxbar.nn.analogize import analogize
from jaxbar.nn.calibrate import calibrate_model
from jaxbar.nn.network_config import NetworkConfig
from jaxbar.study.engine import evaluate


def main() -> None:
    shared = Path(os.environ.get("JAXBAR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    default = shared / "models/cifar10-resnet-v1/resnet20v1_cifar10.h5"
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=str(default) if default.exists() else None)
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--strategy", default="auto")
    args = p.parse_args()

    model = load_keras_resnet_cifar(args.weights) if args.weights else resnet20(rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(args.images, 32, 32, 3)) * 0.25).astype(np.float32)
    y = rng.integers(0, 10, args.images).astype(np.int32)
    net = NetworkConfig.load("paper_baseline").replace(
        **{"device.programming_error": {"model": "proportional", "sigma": 0.05}})
    analog = analogize(model, net)
    calibrate_model(analog, x[:200])
    keys = jax.random.split(jax.random.key(0), args.trials)
    kw = dict(batch_size=args.batch_size, progress=False, strategy=args.strategy)

    # The same engine runs both. Digital "trials" would be identical (XLA hoists them out of
    # the trial loop), so the digital cost is one real pass times T.
    def dig():
        return evaluate(model, x, y, None, **kw)

    def mc():
        return evaluate(analog, x, y, keys, **kw)

    dig(), mc()  # compile both
    t_dig, t_mc = [], []
    for _ in range(2):  # interleaved, best of two: the machine may be shared
        for fn, ts in ((dig, t_dig), (mc, t_mc)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    t_dig, t_mc = args.trials * min(t_dig), min(t_mc)
    print(f"backend {jax.default_backend()} ({jax.device_count()} device(s)), ResNet20, "
          f"{args.images} images, batch {args.batch_size}")
    print(f"{args.trials} digital passes:            {t_dig:8.2f} s")
    print(f"{args.trials} trials paper_baseline+error: {t_mc:8.2f} s   ({t_mc / t_dig:.2f}x)")


if __name__ == "__main__":
    main()
