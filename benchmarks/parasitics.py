"""Benchmark of the IR-drop solver (jaxbar.core.parasitics) on a realistic differential array.

A 1152 x 256 differential array (two non-interleaved arrays, input-source topology) holds
Laplace-distributed weights mapped one-sided, ``g+- = max(+-w, 0) / max|w|`` (infinite on/off
ratio); inputs are unsigned, uniform in [0, 1]. For each batch size and ``r = r_row = r_col`` the
table reports, in float32:

* ``solve ms`` / ``ideal ms`` / ``x ideal``: median wall time (after compilation and a one-second
  warm-up) of the two IR solves and their difference, of the ideal product ``v @ g+ - v @ g-``
  measured in the same run, and their ratio;
* ``sweeps``: solver sweeps used (the larger of the two arrays), ``path``: direct (one solve per
  input vector) or a transfer path (one adjoint solve per column, then a matrix product: used
  when there are at least as many vectors as columns), computed by the numba CPU kernel
  (``kernel``; ``kernel>xla`` when it gave up and the XLA solver took over) or by the XLA solver
  (``xla``, ``cpu_kernel=False``);
* ``est err``: the solver's own error estimate; ``err vs f64``: the actual relative error of the
  differential output currents (per vector, max over columns, normalized by the vector's largest
  output; worst vector) against a float64 solve converged to 1e-12;
* ``IR loss``: the same measure between the exact and the ideal currents (how large the effect is);
* ``XLA MB``: memory of the compiled float32 differential solve as planned by XLA (temporaries +
  arguments + outputs, from ``compiled.memory_analysis()``): the solve's peak working set;
* ``stream``: (printed once) one read-and-write pass over a float32 field of B x K x N values (the
  node voltages of one array for B vectors) in the same run: the memory-traffic floor of any
  solver that touches every node once per pass;
* ``RSS MB``: increase of the process's peak resident memory during the timed solves (sampled
  every 2 ms from /proc/self/statm); XLA's CPU allocator keeps and reuses memory, so after the
  first configuration this only shows growth beyond what earlier ones already held. The
  process-wide peak (``ru_maxrss``, including the float64 references) is printed at the end.

Run: ``python benchmarks/parasitics.py [--quick] [--plot PNG]`` (``--quick``: 64 vectors, r in
{1e-5, 1e-3}; ``--plot``: also draw the time ratios and errors against r).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import resource
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)  # for the float64 reference; the timed runs are float32

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_parasitics():
    try:
        from jaxbar.core import parasitics

        return parasitics
    except Exception:  # package __init__ not ready: load the module standalone
        path = ROOT / "jaxbar" / "core" / "parasitics.py"
        spec = importlib.util.spec_from_file_location("_jaxbar_core_parasitics", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


par = _load_parasitics()
K, N = 1152, 256
# Millisecond references are timed often: their median moved by up to 1.6x between runs at 10.
_REFERENCE_REPEATS = 40


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Context manager sampling the resident set size in a background thread."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta_mb(self):
        return (self.peak - self.base) / 2**20


def _median_time(fn, repeats, warmup_s=1.0):
    """Median seconds of ``repeats`` calls after compiling and warming up for ``warmup_s``.

    The first calls after compilation ran up to 1.5 times slower (allocator and thread pools
    settling), so the warm-up runs for a while rather than once.
    """
    jax.block_until_ready(fn())  # compile
    t0 = time.perf_counter()
    while True:
        jax.block_until_ready(fn())
        if time.perf_counter() - t0 >= warmup_s:
            break
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _stream_pass(B, passes=4, repeats=3):
    """Seconds of one elementwise read-and-write pass over (K, N, B) float32 (in-place loop)."""
    step = jax.jit(lambda f: jax.lax.fori_loop(0, passes, lambda i, y: y * 0.5 + 1.0, f),
                   donate_argnums=0)
    field = jax.block_until_ready(step(step(jnp.ones((K, N, B), jnp.float32))))  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        field = jax.block_until_ready(step(field))
        times.append((time.perf_counter() - t0) / passes)
    return float(np.median(times))


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.max(np.abs(x - ref), -1) / np.max(np.abs(ref), -1)))


def _differential(g_pos, g_neg, tol, cpu_kernel=True):
    @jax.jit
    def solve(v, r):
        kw = dict(tol=tol, cpu_kernel=cpu_kernel)
        i_pos, info_pos = par.solve_input_source(g_pos, v, r, r, **kw)
        i_neg, info_neg = par.solve_input_source(g_neg, v, r, r, **kw)
        return i_pos - i_neg, info_pos, info_neg

    return solve


class _KernelOutcome:
    """Records whether the CPU kernel's runs succeeded (False: it fell back to XLA)."""

    def __init__(self):
        from jaxbar.core import ir_cpu

        self.ok = []
        real = ir_cpu._host_transfer

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            self.ok.append(bool(out[3]))
            return out

        ir_cpu._host_transfer = wrapped


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 vectors, r in {1e-5, 1e-3}")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="write a figure of the ratios and errors against r")
    args = parser.parse_args()
    batches = (64,) if args.quick else (64, 1024)
    rs = (1e-5, 1e-3) if args.quick else (1e-6, 1e-5, 1e-4, 1e-3)
    repeats = args.repeats or (2 if args.quick else 3)

    rng = np.random.default_rng(0)
    w = rng.laplace(size=(K, N))
    w = w / np.abs(w).max()
    g_pos64, g_neg64 = np.maximum(w, 0.0), np.maximum(-w, 0.0)
    g_pos, g_neg = jnp.asarray(g_pos64, jnp.float32), jnp.asarray(g_neg64, jnp.float32)
    solvers = {True: _differential(g_pos, g_neg, 1e-6),
               False: _differential(g_pos, g_neg, 1e-6, cpu_kernel=False)}
    outcome = _KernelOutcome()
    solve64 = _differential(jnp.asarray(g_pos64), jnp.asarray(g_neg64), 1e-12)
    ideal = jax.jit(lambda v: v @ g_pos - v @ g_neg)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"array {K}x{N} differential (2 arrays), float32, tol 1e-6, {repeats} timed repeats")
    header = (f"{'B':>5} {'r':>7} {'path':>10} {'solve ms':>9} {'ideal ms':>9} {'x ideal':>8} "
              f"{'sweeps':>6} {'est err':>8} {'err vs f64':>10} {'IR loss':>8} {'XLA MB':>7} "
              f"{'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    rows = []
    for B in batches:
        v64 = rng.uniform(0.0, 1.0, (B, K))
        v = jnp.asarray(v64, jnp.float32)
        t_ideal = _median_time(lambda v=v: ideal(v), _REFERENCE_REPEATS)
        exact_ideal = v64 @ (g_pos64 - g_neg64)
        t_stream = _stream_pass(B)
        print(f"  B={B}: one streaming read+write pass over {B}x{K}x{N} float32 values: "
              f"{1e3 * t_stream:.1f} ms = {t_stream / t_ideal:.1f}x ideal ({1e3 * t_ideal:.3f} ms)")
        for r, kernel in [(r, k) for k in ((True, False) if B >= N else (True,)) for r in rs]:
            solve32 = solvers[kernel]
            r32 = jnp.float32(r)
            outcome.ok.clear()
            with _PeakRSS() as mem:
                t_solve = _median_time(lambda v=v, r32=r32, f=solve32: f(v, r32), repeats)
            path = "direct" if B < N else "xla" if not kernel else (
                "kernel" if all(outcome.ok) else "kernel>xla")
            stats = solve32.lower(v, r32).compile().memory_analysis()
            xla_mb = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                      + stats.output_size_in_bytes) / 2**20
            out, info_p, info_n = solve32(v, r32)
            ref, ref_p, ref_n = solve64(jnp.asarray(v64), r)
            assert bool(ref_p.converged) and bool(ref_n.converged), "reference did not converge"
            sweeps = max(int(info_p.iterations), int(info_n.iterations))
            est = max(float(info_p.error), float(info_n.error))
            ok = bool(info_p.converged) and bool(info_n.converged)
            row = dict(
                B=B, r=r, path=path, solve_ms=1e3 * t_solve, ideal_ms=1e3 * t_ideal,
                ratio=t_solve / t_ideal, sweeps=sweeps, est=est, converged=ok,
                err=_rel_err(out, ref), loss=_rel_err(exact_ideal, ref), xla_mb=xla_mb,
                rss_mb=mem.delta_mb,
            )
            rows.append(row)
            flag = "" if ok else "  (NOT CONVERGED)"
            print(f"{B:>5} {r:>7.0e} {path:>10} {row['solve_ms']:>9.1f} {row['ideal_ms']:>9.3f} "
                  f"{row['ratio']:>8.0f} {sweeps:>6} {est:>8.1e} {row['err']:>10.1e} "
                  f"{row['loss']:>8.3f} {xla_mb:>7.0f} {row['rss_mb']:>7.0f}{flag}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"process peak RSS (ru_maxrss, all of the above incl. float64 references): {peak:.0f} MB")
    layer_rows = layer_path(w, rs, repeats, rng)
    if args.plot:
        plot(rows, layer_rows, args.plot)
        print(f"figure: {args.plot}")
    return rows, layer_rows


def layer_path(w, rs, repeats, rng, B=1024, batches=(1, 10, 100)):
    """The same array through `jaxbar.program` + `jaxbar.matmul` (parasitics.precompute).

    The config's default tolerance applies (`parasitics.default_tol`: 1e-5 in float32).

    An input-source array is linear in its inputs, so `program` solves its transfer matrix
    once per trial (N adjoint solves) and every MVM after that is an ideal product with it.
    Reported against `jaxbar.matmul` without parasitics (same mapping, same run): the cost
    of `program`, of one MVM of B vectors, and per B vectors when one programmed crossbar
    serves 1, 10 or 100 batches of B (a Monte Carlo trial serves all its images).
    """
    import jaxbar
    from jaxbar import CrossbarConfig

    W = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(rng.uniform(0.0, 1.0, (B, K)), jnp.float32)
    plain = CrossbarConfig()
    p0 = jaxbar.program(W, plain)
    ideal = jax.jit(lambda x, p: jaxbar.matmul(x, p, plain))
    t_ideal = _median_time(lambda: ideal(x, p0), _REFERENCE_REPEATS)
    print(f"\nlayer path: jaxbar.program (transfer matrix, once per trial) + jaxbar.matmul, "
          f"{B} vectors; x = time / ideal jaxbar.matmul ({1e3 * t_ideal:.2f} ms)")
    cols = "".join(f" {f'per {B}, {n} batch':>16}" for n in batches)
    print(f"{'r':>7} {'program ms':>11} {'x ideal':>8} {'matmul x':>9}{cols}")
    rows = []
    for r in rs:
        cfg = plain.replace(**{"parasitics.topology": "input_source", "parasitics.r_row": r,
                               "parasitics.r_col": r})
        prog = jax.jit(lambda W, cfg=cfg: jaxbar.program(W, cfg))
        mm = jax.jit(lambda x, p, cfg=cfg: jaxbar.matmul(x, p, cfg))
        t_prog = _median_time(lambda prog=prog: prog(W), repeats)
        p = prog(W)
        t_mm = _median_time(lambda mm=mm, p=p: mm(x, p), _REFERENCE_REPEATS)
        per = {n: (t_prog / n + t_mm) / t_ideal for n in batches}
        rows.append(dict(r=r, program=t_prog / t_ideal, matmul=t_mm / t_ideal, per=per))
        print(f"{r:>7.0e} {1e3 * t_prog:>11.1f} {t_prog / t_ideal:>8.0f} {t_mm / t_ideal:>9.2f}"
              + "".join(f" {per[n]:>16.1f}" for n in batches), flush=True)
    return rows


def plot(rows, layer_rows, path, target=30.0):
    """Time / ideal product and float32 error against r (one figure, two panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [(64, "direct", "o"), (1024, "kernel", "s"), (1024, "xla", "D")]
    for B, kind, marker in series:
        sel = [row for row in rows
               if row["B"] == B and row["path"].split(">")[0] == kind]
        if sel:
            label = f"{B} vectors, one-off solve ({kind})"
            ax.loglog([row["r"] for row in sel], [row["ratio"] for row in sel], marker=marker,
                      label=label)
            ax_err.loglog([row["r"] for row in sel], [row["err"] for row in sel], marker=marker,
                          label=f"{B} vectors ({kind}): error vs float64")
    lr = [row["r"] for row in layer_rows]
    if layer_rows:
        ax.loglog(lr, [row["program"] for row in layer_rows], "k--", marker="^",
                  label="layer: program (transfer matrix, once per trial)")
        for n in sorted(layer_rows[0]["per"]):
            if n > 1:
                ax.loglog(lr, [row["per"][n] for row in layer_rows], marker="v",
                          label=f"layer: per 1024 vectors, {n} batches per trial")
    ax.axhline(target, color="grey", lw=1, ls=":")
    ax.text(lr[0] if lr else rows[0]["r"], target * 1.1, f"{target:.0f}x target", color="grey")
    ax.set_xlabel("normalized segment resistance r = Rp Gmax")
    ax.set_ylabel("time / ideal product")
    ax.set_title("1152x256 differential array, float32")
    ax.legend(fontsize=7)
    ax_err.loglog([row["r"] for row in rows if row["B"] == rows[0]["B"]],
                  [row["loss"] for row in rows if row["B"] == rows[0]["B"]], "k:", marker="x",
                  label="IR loss (exact vs ideal currents)")
    ax_err.set_xlabel("normalized segment resistance r = Rp Gmax")
    ax_err.set_ylabel("relative error of the output currents")
    ax_err.set_title("accuracy (tol 1e-6) and size of the effect")
    ax_err.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
