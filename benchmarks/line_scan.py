"""The XLA IR solver with its line eliminations as loops or as associative scans.

One 1152 x 256 array (float32, g uniform in [0, 1), r = r_row = r_col), solved by the XLA
solver's block Gauss-Seidel sweeps (`cpu_kernel=False`) with `lines="sequential"` (a loop
step per node: about K + N sequential steps per sweep) and `lines="parallel"` (associative
scans: about 2 log2 L steps per line family, more work):

* input-source: `solve_input_source` on B input vectors in [0, 1] (B < N: one solve per
  vector, the direct path);
* gated-source: `gated_source_nodes` on B bit vectors with half the rows on (the forward
  solve of `solve_gated_source` is the ladder elimination; these sweeps are the ones its
  gradient runs).

Each row: compile time, median wall time of `--repeats` solves after one warm-up, sweeps, the
form that ran (`SolveInfo.lines`), and the error of the currents (largest difference relative
to the largest current) against a float64 solve with the loops to `tol = 1e-10`. On a CPU
the scans cost more (more work, no parallel hardware to use the lower depth); they are meant
for accelerators, where `lines="auto"` picks them.

``--floor``: instead, the float32 rounding floor of each form: input-source solves of a
1152 x 32 array (4 vectors) run to `tol = 1e-12` (they stop when the changes stall), their
error against float64, at r = 1e-5 and 1e-3.

Run: ``python benchmarks/line_scan.py [--vectors B] [--r R] [--repeats N] [--floor]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.core import ir as par

K, N = 1152, 256
FORMS = ("sequential", "parallel")


def _time(fn, repeats):
    """(compile + first call s, median of `repeats` calls s, last result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times)), out


def _solvers(r, vectors):
    """Per topology, `make(lines, dtype, tol)` -> a call returning (currents, info)."""
    rng = np.random.default_rng(0)
    g = rng.uniform(0.0, 1.0, (K, N))
    v = rng.uniform(0.0, 1.0, (vectors, K))
    bits = (rng.uniform(size=(vectors, K)) < 0.5).astype(float)

    def input_source(lines, dtype, tol):
        solve = jax.jit(lambda g, v, r: par.solve_input_source(
            g, v, r, r, cpu_kernel=False, lines=lines, tol=tol))
        args = (jnp.asarray(g, dtype), jnp.asarray(v, dtype), jnp.asarray(r, dtype))
        return lambda: solve(*args)

    def gated_source(lines, dtype, tol):
        solve = jax.jit(lambda g, b, r: par.gated_source_nodes(g, b, r, r, lines=lines, tol=tol))
        args = (jnp.asarray(g, dtype), jnp.asarray(bits, dtype), jnp.asarray(r, dtype))

        def run():
            nodes = solve(*args)
            return nodes.currents, nodes.info

        return run

    return {"input_source": input_source, "gated_source": gated_source}


def _floor():
    rng = np.random.default_rng(0)
    g = rng.uniform(0.0, 1.0, (K, 32))
    v = rng.uniform(0.0, 1.0, (4, K))
    print(f"float32 floor: {K} x 32, 4 vectors, input-source, XLA solver, tol = 1e-12")
    print(f"{'r':>6} {'lines':<11} {'sweeps':>6} {'err vs f64':>10}")
    for r in (1e-5, 1e-3):
        ref, _ = par.solve_input_source(g, v, r, r, cpu_kernel=False, tol=1e-11,
                                        lines="sequential")
        ref = np.asarray(ref)
        for lines in FORMS:
            I, info = par.solve_input_source(
                g.astype(np.float32), v.astype(np.float32), np.float32(r), np.float32(r),
                cpu_kernel=False, tol=1e-12, max_iters=24, lines=lines)
            err = np.max(np.abs(np.asarray(I) - ref)) / np.max(np.abs(ref))
            print(f"{r:6.0e} {lines:<11} {int(info.iterations):6d} {err:10.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vectors", type=int, default=8, help="input vectors per solve")
    ap.add_argument("--r", type=float, default=1e-5, help="r_row = r_col (normalized)")
    ap.add_argument("--repeats", type=int, default=3, help="timed solves per form")
    ap.add_argument("--floor", action="store_true", help="the float32 floors instead")
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)  # the float64 reference; timed solves are float32
    if args.floor:
        _floor()
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {K} x {N}, "
          f"B = {args.vectors}, r = {args.r:g}, float32, XLA solver")
    print(f"{'topology':<13} {'lines':<11} {'compile s':>9} {'solve ms':>9} {'sweeps':>6} "
          f"{'ran':>4} {'err vs f64':>10}")
    for topology, make in _solvers(args.r, args.vectors).items():
        ref = np.asarray(make("sequential", jnp.float64, 1e-10)()[0])
        for lines in FORMS:
            first, median, (I, info) = _time(make(lines, jnp.float32, None), args.repeats)
            err = np.max(np.abs(np.asarray(I) - ref)) / np.max(np.abs(ref))
            print(f"{topology:<13} {lines:<11} {first - median:9.1f} {1e3 * median:9.1f} "
                  f"{int(info.iterations):6d} {int(info.lines):4d} {err:10.1e}")


if __name__ == "__main__":
    main()
