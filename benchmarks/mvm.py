"""Analog MVM cost relative to the digital product, measured in one run.

W: 1152×256, x: 1024×1152, float32. Prints the median time of each variant
after compilation divided by the median time of `x @ W`, timed in turn with it (one call of
each per round).

Usage: python benchmarks/mvm.py [--repeats 20]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_medians

import jaxbar
from jaxbar import CrossbarConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    K, N, B = 1152, 256, 1024
    W = jnp.asarray(rng.laplace(size=(K, N)).astype(np.float32) * 0.05)
    x = jnp.asarray(np.maximum(rng.normal(size=(B, K)), 0).astype(np.float32))
    key = jax.random.key(0)

    base = CrossbarConfig.paper_baseline().replace(
        **{"adc.range": (-64.0, 64.0), "inputs.range": (0.0, 4.0),
           "device.programming_error": {"model": "proportional", "sigma": 0.05}})
    configs = {
        "ideal": CrossbarConfig.ideal(),
        "paper_baseline + prog. error": base,
        "SAR ADC, 60 dB, σ 0.01": base.replace(**{
            "adc.model": "sar", "adc.gain_db": 60.0, "adc.sigma_capacitor": 0.01,
            "adc.sigma_comparator": 0.01}),
        "pipeline ADC, 60 dB, σ 0.01": base.replace(**{
            "adc.model": "pipeline", "adc.gain_db": 60.0, "adc.sigma_c1": 0.01,
            "adc.sigma_c2": 0.01, "adc.sigma_comparator": 0.01}),
        "4 weight slices": base.replace(**{"mapping.slices": 4}),
        "8-bit bit-serial, ADC per input bit": base.replace(
            **{"inputs.bit_serial": True, "adc.per_input_slice": True}),
    }

    digital = jax.jit(lambda x, W: x @ W)
    calls = {"x @ W": (digital, (x, W))}
    for name, cfg in configs.items():
        prog = jax.jit(lambda W, k, cfg=cfg: jaxbar.program(W, cfg, k))(W, key)
        mm = jax.jit(lambda x, p, cfg=cfg: jaxbar.matmul(x, p, cfg))
        calls[f"matmul: {name}"] = (mm, (x, prog))
    calls["program (one trial, prog. error)"] = (
        jax.jit(lambda W, k: jaxbar.program(W, base, k)), (W, key))
    t = interleaved_medians(calls, repeats=args.repeats)
    t_ref = t.pop("x @ W")
    print(f"backend: {jax.default_backend()}, devices: {jax.device_count()}")
    print(f"x @ W ({B}x{K} @ {K}x{N}, float32): {t_ref * 1e3:.2f} ms")
    print(f"{'variant':40s} {'ms':>8s} {'x (x@W)':>8s}")
    for name, ti in t.items():
        print(f"{name:40s} {ti * 1e3:8.2f} {ti / t_ref:8.2f}")

    keys = jax.random.split(key, args.trials)
    one = lambda x, W, k: jaxbar.analog_matmul(x, W, base, k)  # noqa: E731
    vm = jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
    lm = jax.jit(lambda x, W, ks: jax.lax.map(lambda k: one(x, W, k), ks))
    t = interleaved_medians({"x @ W": (digital, (x, W)), "vmap": (vm, (x, W, keys)),
                             "lax.map": (lm, (x, W, keys))}, repeats=max(3, args.repeats // 4))
    for name in ("vmap", "lax.map"):
        ti = t[name] / args.trials
        print(f"{f'per trial of {args.trials}, {name} (incl. program)':40s} "
              f"{ti * 1e3:8.2f} {ti / t['x @ W']:8.2f}")


if __name__ == "__main__":
    main()
