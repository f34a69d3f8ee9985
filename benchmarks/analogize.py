"""Analogized Flax models against their digital forward, measured in one run.

A small transformer encoder (nnx.MultiHeadAttention, 8 tokens of 64 features, 2 blocks) and a
small CNN, each at one batch: the digital jit forward of the stock model, then, per analog
config, one trial (`program_model` + forward, jitted) and the forward alone on programmed
conductances. Median of repeats after compilation, the programs of a model timed in turn (one
call of each per round). On a CPU every program is also compiled without XLA:CPU's YNNPACK
fusions, timed in the same rounds; each ratio is against the digital forward compiled alike.

Usage: python benchmarks/analogize.py [--batch 256] [--repeats 20]
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx
from timing import compile_settings, compiled_calls, interleaved_timings

import jaxbar


class EncoderBlock(nnx.Module):
    def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                           rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, tokens: int = 8, features: int = 8, d: int = 64,
                 heads: int = 4, depth: int = 2, classes: int = 10):
        self.embed = nnx.Linear(features, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (tokens, d)))
        self.blocks = nnx.List([EncoderBlock(d, heads, rngs) for _ in range(depth)])
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x) + self.pos[...]
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(axis=1))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.c2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 64, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.c1(x))
        x = jax.nn.relu(self.c2(x))
        return self.head(x.reshape(x.shape[0], -1))




def bench(name, model, x, configs, repeats):
    graphdef, state = nnx.split(model)
    programs = {"digital": (lambda s, x: nnx.merge(graphdef, s)(x), (state, x))}
    for label, cfg in configs.items():
        analog = jaxbar.analogize(model, cfg)
        jaxbar.calibrate_model(analog, x[:64])
        g, s = nnx.split(analog)

        def trial(s, x, key, g=g):
            m = nnx.merge(g, s, copy=True)
            jaxbar.program_model(m, key)
            return m(x)

        jaxbar.program_model(analog, jax.random.key(0))
        g2, s2 = nnx.split(analog)
        programs[label, "trial"] = (trial, (s, x, jax.random.key(0)))
        programs[label, "forward"] = (lambda s, x, g2=g2: nnx.merge(g2, s, copy=True)(x), (s2, x))
    settings = compile_settings()
    calls = compiled_calls(programs, settings)
    t = interleaved_timings(calls, repeats=repeats)
    print(f"\n{name}, batch {x.shape[0]}")
    for setting in settings:
        t_dig = t[setting, "digital"].median
        print(f"compiled with {setting}: digital forward {t_dig * 1e3:.3f} ms")
        print(f"  {'config':38s} {'trial x dig':>11s} {'forward x dig':>13s}")
        for label in configs:
            ratios = [t[setting, (label, part)].median / t_dig for part in ("trial", "forward")]
            print(f"  {label:38s} {ratios[0]:11.2f} {ratios[1]:13.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    base = jaxbar.CrossbarConfig.paper_baseline().replace(
        **{"device.programming_error": {"model": "proportional", "sigma": 0.05}})
    configs = {"paper_baseline + programming error": base,
               "ideal": jaxbar.CrossbarConfig.ideal()}
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    key = jax.random.key(1)
    bench("transformer (2 blocks, 8 tokens x 64)", Transformer(nnx.Rngs(0)),
          jax.random.normal(key, (args.batch, 8, 8)), configs, args.repeats)
    bench("CNN (2 conv + dense, 8x8 images)", CNN(nnx.Rngs(0)),
          jax.random.normal(key, (args.batch, 8, 8, 1)), configs, args.repeats)


if __name__ == "__main__":
    main()
