"""One ResNet20 convolution per stage, compiled with XLA's defaults and without YNNPACK fusions.

XLA:CPU hands a convolution with more than 16 channels to YNNPACK; unless XLA grows a larger
YNNPACK subgraph around it, the convolution runs there alone. This script times one
convolution of each ResNet20 stage both ways (batch 256, float32, 3×3, stride 1), as
`lax.conv_general_dilated` and as `jaxbar.core.conv2d.conv2d` (what the crossbar layers run),
and prints the CPU load while it ran, the number of cores the convolution kept busy.

Usage: python benchmarks/xla_cpu_conv.py [--batch 256] [--repeats 30]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import compile_settings, compiled_calls, interleaved_timings

from jaxbar.core.conv2d import conv2d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    rng = np.random.default_rng(0)

    same = ((1, 1), (1, 1))
    functions = {
        "lax": lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), same, dimension_numbers=("NHWC", "HWIO", "NHWC")),
        "conv2d": lambda x, k: conv2d(x, k, (1, 1), same),
    }
    programs = {}
    for size, channels in [(32, 16), (16, 32), (8, 64)]:
        x = jnp.asarray(rng.random((args.batch, size, size, channels)), jnp.float32)
        k = jnp.asarray(rng.random((3, 3, channels, channels)), jnp.float32)
        for name, f in functions.items():
            programs[size, channels, name] = (f, (x, k))
    calls = {(size, channels, setting, name, "__ynn_fusion" in c.as_text()): (c, a)
             for (setting, (size, channels, name)), (c, a)
             in compiled_calls(programs, compile_settings()).items()}
    t = interleaved_timings(calls, repeats=args.repeats)
    outputs = {(size, channels, setting, name): np.asarray(c(*a))
               for (size, channels, setting, name, _), (c, a) in calls.items()}
    print(f"backend {jax.default_backend()}; batch {args.batch}, 3x3 convolutions, float32")
    print("(max |y - y_lax|: conv2d's largest difference from lax compiled alike)")
    print(f"{'input':>12s} {'compiled with':24s} {'function':8s} {'runs in':8s} {'ms':>7s} "
          f"{'CPU load':>8s} {'max |y - y_lax|':>15s}")
    for (size, channels, setting, name, ynn), (median, load) in t.items():
        where = "YNNPACK" if ynn else "XLA"
        y = outputs[size, channels, setting, name]
        diff = np.max(np.abs(y - outputs[size, channels, setting, "lax"]))
        print(f"{f'{size}x{size}x{channels}':>12s} {setting:24s} {name:8s} {where:8s} "
              f"{median * 1e3:7.2f} {load:8.2f} {diff:15.3g}")


if __name__ == "__main__":
    main()
