"""ResNet20 analog forward cost relative to the digital jit forward, measured in one run.

Batch 256 of CIFAR-sized images. For each analog config: one trial = program every
layer (programming error drawn) + forward the batch; time per image vs the digital
forward of the same batch (median of repeats after compilation, the variants and the
digital forward timed in turn).

On a CPU every program is also compiled without XLA:CPU's YNNPACK library fusions (compiler
option `xla_cpu_experimental_ynn_fusion_type` empty; `XLA_FLAGS` sets the same for a whole
run) and timed in the same rounds; each ratio is against the digital forward compiled alike.
For each program the script also prints the CPU load while it ran (busy cores) and where its
convolutions went: XLA's own kernels, a YNNPACK subgraph of their own, or a YNNPACK subgraph
shared with other operations.

Usage: python benchmarks/network.py [--weights resnet20v1_cifar10.h5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import compile_settings, compiled_calls, interleaved_timings

from jaxbar.nn import load_keras_resnet_cifar, resnet20
from jaxbar.nn.analogize import analogize, program_model
from jaxbar.nn.calibrate import calibrate_model
from jaxbar.nn.network_config import NetworkConfig


def conv_placement(compiled) -> str:
    """Where a compiled program's convolutions run: XLA kernels or YNNPACK subgraphs."""
    text = compiled.as_text()
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) [^\n]*\{\n(.*?)\n\}", text,
                                                          re.M | re.S)}
    ynn = set(re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", text))
    alone = grouped = 0
    for name in ynn:
        body = bodies.get(name, "")
        n = body.count(" convolution(")
        ops = set(re.findall(r"= \S+ ([a-z\-]+)\(", body)) - {
            "parameter", "bitcast", "convolution", "constant", "broadcast"}
        if n == 1 and not ops:
            alone += 1
        else:
            grouped += n
    total = text.count(" convolution(")
    return f"{total - alone - grouped} XLA, {alone} YNNPACK alone, {grouped} YNNPACK shared"


def main() -> None:
    shared = Path(os.environ.get("JAXBAR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    default = shared / "models/cifar10-resnet-v1/resnet20v1_cifar10.h5"
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", default=str(default) if default.exists() else None)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    settings = compile_settings()

    model = load_keras_resnet_cifar(args.weights) if args.weights else resnet20(rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, 32, 32, 3)) * 0.25,
                    jnp.float32)
    graphdef, state = nnx.split(model)

    def digital(state, x):
        return nnx.merge(graphdef, state)(x)

    base = NetworkConfig.load("paper_baseline").replace(
        **{"device.programming_error": {"model": "proportional", "sigma": 0.05}})
    variants = {
        "paper_baseline + programming error": base,
        "4 weight slices": base.replace(**{"mapping.slices": 4}),
        "8-bit bit-serial inputs, ADC per input bit": base.replace(
            **{"inputs.bit_serial": True, "adc.per_input_slice": True}),
    }
    calib_x = np.asarray(x[:64])
    programs = {"digital": (digital, (state, x))}
    for name, net in variants.items():
        analog = analogize(model, net)
        calibrate_model(analog, calib_x)
        a_graphdef, a_state = nnx.split(analog)

        def trial(state, x, key, a_graphdef=a_graphdef):
            m = nnx.merge(a_graphdef, state, copy=True)
            program_model(m, key)  # once per trial, amortized over the batch
            return m(x)

        programs[name] = (trial, (a_state, x, jax.random.key(0)))
    calls = compiled_calls(programs, settings)
    # Timed in turn, one call of each per round: drifts of the machine's speed hit all alike.
    t = interleaved_timings(calls, repeats=args.repeats)
    print(f"backend {jax.default_backend()}; ResNet20 ({'pretrained' if args.weights else 'random'}"
          f" weights), batch {args.batch}")
    t_ref = t["XLA's default options", "digital"].median
    for setting in settings:
        t_dig = t[setting, "digital"].median
        print(f"\ncompiled with {setting}")
        print(f"{'program':46s} {'ms/image':>9s} {'x digital':>9s} {'x default digital':>17s} "
              f"{'CPU load':>8s}  convolutions")
        for name in programs:
            ti, load = t[setting, name]
            print(f"{name:46s} {ti / args.batch * 1e3:9.3f} {ti / t_dig:9.2f} {ti / t_ref:17.2f} "
                  f"{load:8.2f}  {conv_placement(calls[setting, name][0])}")


if __name__ == "__main__":
    main()
