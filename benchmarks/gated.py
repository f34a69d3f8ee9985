"""ResNet20 with gated-source, bit-serial parasitic arrays against the same network without them.

The paper's parasitic configuration: gated-source cells, 8-bit bit-serial inputs (one solve per
input bit), ideal ADC per input bit, differential pairs (interleaved on one bit line unless
``--separate``). Every array MVM of every input bit is an exact circuit solve. Both configs run
in one process on the same images; the ratio is the cost of the parasitics.

Usage: python benchmarks/gated.py [--images 8] [--r 1e-5 1e-4] [--rows fitted 1152]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import median_time

from jaxbar.nn import load_keras_resnet_cifar, resnet20
from jaxbar.nn.analogize import analogize, program_model
from jaxbar.nn.calibrate import calibrate_model
from jaxbar.nn.network_config import NetworkConfig


def main() -> None:
    shared = Path(os.environ.get("JAXBAR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    default = shared / "models/cifar10-resnet-v1/resnet20v1_cifar10.h5"
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=str(default) if default.exists() else None)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--r", type=float, nargs="+", default=[1e-5])
    p.add_argument("--rows", nargs="+", default=["fitted"], help="'fitted' or a row count")
    p.add_argument("--separate", action="store_true", help="non-interleaved pairs")
    args = p.parse_args()

    model = load_keras_resnet_cifar(args.weights) if args.weights else resnet20(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.images, 32, 32, 3)) * 0.25,
                    jnp.float32)
    print(f"backend {jax.default_backend()}; ResNet20 ({'pretrained' if args.weights else 'random'}"
          f" weights), {args.images} images, gated-source, 8-bit bit-serial inputs, ideal ADC"
          f" per input bit, {'separate' if args.separate else 'interleaved'} differential pairs")

    def timed(net):
        analog = analogize(model, net)
        calibrate_model(analog, np.asarray(x))
        a_graphdef, a_state = nnx.split(analog)

        @jax.jit
        def trial(state, x, key):
            m = nnx.merge(a_graphdef, state, copy=True)
            program_model(m, key)
            return m(x)

        return median_time(trial, a_state, x, jax.random.key(0), repeats=args.repeats)

    print(f"{'arrays':>8s} {'r':>8s} {'ms/image':>10s} {'ideal ms/image':>15s} {'ratio':>7s}")
    for rows in args.rows:
        base = NetworkConfig.load("paper_baseline").replace(**{
            "inputs.bit_serial": True, "adc.per_input_slice": True, "adc.bits": 0,
            "adc.range": None, "array.rows": None if rows == "fitted" else int(rows)})
        t_ideal = timed(base)
        for r in args.r:
            net = base.replace(**{
                "parasitics.topology": "gated_source", "parasitics.r_row": r,
                "parasitics.r_col": r, "parasitics.interleaved": not args.separate})
            t = timed(net)
            print(f"{rows:>8s} {r:8.0e} {t / args.images * 1e3:10.2f} "
                  f"{t_ideal / args.images * 1e3:15.3f} {t / t_ideal:7.1f}", flush=True)


if __name__ == "__main__":
    main()
