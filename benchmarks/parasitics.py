"""Benchmark of the IR-drop solver (jaxbar.core.ir) on a realistic differential array.

A 1152 x 256 differential array (input-source topology) holds Laplace-distributed weights mapped
one-sided, ``g+- = max(+-w, 0) / max|w|`` (infinite on/off ratio); inputs are unsigned, uniform in
[0, 1]. Both layouts of PHYSICS.md section 6 are timed: ``separate`` (two arrays, the currents
subtracted after the solves) and ``interleaved`` (the + and - cells of a weight on one node of
the same bit line, fed by row lines driven with +v and -v: one circuit, analog subtraction). For
each layout, batch size and ``r = r_row = r_col`` the table reports, in float32, with the
solver's default tolerance (``ir.default_tol``: 1e-5 in float32; ``--tol`` sets another):

* ``solve ms`` / ``ideal ms`` / ``x ideal``: median wall time (after compilation and a one-second
  warm-up) of the IR solve(s) giving the differential currents, of the ideal product
  ``v @ g+ - v @ g-`` measured in the same run, and their ratio;
* ``sweeps``: solver sweeps used (the larger of two arrays), ``path``: direct (one solve per
  input vector) or a transfer path (one adjoint solve per column, then a matrix product: used
  when there are at least as many vectors as columns), computed by the numba CPU kernel
  (``kernel``; ``kernel>xla`` when it gave up and the XLA solver took over) or by the XLA solver
  (``xla``, ``cpu_kernel=False``);
* ``est err``: the solver's own error estimate; ``err vs f64``: the actual relative error of the
  differential output currents (per vector, max over columns, normalized by the vector's largest
  output; worst vector) against a float64 solve of the same layout converged to 1e-12;
* ``IR loss``: the same measure between the exact and the ideal currents (how large the effect is);
* ``XLA MB``: memory of the compiled float32 solve as planned by XLA (temporaries + arguments +
  outputs, from ``compiled.memory_analysis()``): the solve's peak working set;
* ``stream``: (printed once) one read-and-write pass over a float32 field of B x K x N values (the
  node voltages of one array for B vectors) in the same run: the memory-traffic floor of any
  solver that touches every node once per pass;
* ``RSS MB``: increase of the process's peak resident memory during the timed solves (sampled
  every 2 ms from /proc/self/statm); XLA's CPU allocator keeps and reuses memory, so after the
  first configuration this only shows growth beyond what earlier ones already held. The
  process-wide peak (``ru_maxrss``, including the float64 references) is printed at the end.

Run: ``python benchmarks/parasitics.py [--quick] [--tol TOL] [--plot PNG]`` (``--quick``: 64
vectors, r in {1e-5, 1e-3}; ``--plot``: also draw the time ratios and errors against r).
"""

from __future__ import annotations

import argparse
import os
import resource
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbar.core import ir as par

jax.config.update("jax_enable_x64", True)  # for the float64 reference; the timed runs are float32

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


LAYOUTS = ("separate", "interleaved")


def _differential(g_pos, g_neg, tol, layout, cpu_kernel=True):
    """Jitted ``(v, r) -> (differential currents, infos)`` for one layout."""

    @jax.jit
    def solve(v, r):
        kw = dict(tol=tol, cpu_kernel=cpu_kernel)
        if layout == "interleaved":
            i_diff, info = par.solve_input_source(g_pos, v, r, r, g_neg=g_neg, **kw)
            return i_diff, (info,)
        i_pos, info_pos = par.solve_input_source(g_pos, v, r, r, **kw)
        i_neg, info_neg = par.solve_input_source(g_neg, v, r, r, **kw)
        return i_pos - i_neg, (info_pos, info_neg)

    return solve


def _path_name(paths: set[int]) -> str:
    """How the arrays' currents were computed, from their `SolveInfo.path` codes."""
    if paths == {par.PATH_DIRECT}:
        return "direct"
    if paths == {par.PATH_TRANSFER}:
        return "xla"
    return "kernel>xla" if par.PATH_KERNEL_THEN_XLA in paths else "kernel"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 vectors, r in {1e-5, 1e-3}")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    parser.add_argument("--tol", type=float, default=None,
                        help="solver tolerance (default: ir.default_tol, 1e-5 in float32)")
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="write a figure of the ratios and errors against r")
    args = parser.parse_args()
    batches = (64,) if args.quick else (64, 1024)
    rs = (1e-5, 1e-3) if args.quick else (1e-6, 1e-5, 1e-4, 1e-3)
    repeats = args.repeats or (2 if args.quick else 3)
    tol = args.tol
    tol_text = f"{par.default_tol(jnp.float32):g} (default)" if tol is None else f"{tol:g}"

    rng = np.random.default_rng(0)
    w = rng.laplace(size=(K, N))
    w = w / np.abs(w).max()
    g_pos64, g_neg64 = np.maximum(w, 0.0), np.maximum(-w, 0.0)
    g_pos, g_neg = jnp.asarray(g_pos64, jnp.float32), jnp.asarray(g_neg64, jnp.float32)
    solvers = {(layout, kernel): _differential(g_pos, g_neg, tol, layout, cpu_kernel=kernel)
               for layout in LAYOUTS for kernel in (True, False)}
    references = {layout: _differential(jnp.asarray(g_pos64), jnp.asarray(g_neg64), 1e-12, layout)
                  for layout in LAYOUTS}
    ideal = jax.jit(lambda v: v @ g_pos - v @ g_neg)

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"array {K}x{N} differential, float32, tol {tol_text}, {repeats} timed repeats")
    header = (f"{'layout':>11} {'B':>5} {'r':>7} {'path':>10} {'solve ms':>9} {'ideal ms':>9} "
              f"{'x ideal':>8} {'sweeps':>6} {'est err':>8} {'err vs f64':>10} {'IR loss':>8} "
              f"{'XLA MB':>7} {'RSS MB':>7}")
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
        kernels = (True, False) if B >= N else (True,)
        for layout, kernel, r in [(lay, k, r) for k in kernels for lay in LAYOUTS for r in rs]:
            solve32 = solvers[layout, kernel]
            r32 = jnp.float32(r)
            with _PeakRSS() as mem:
                t_solve = _median_time(lambda v=v, r32=r32, f=solve32: f(v, r32), repeats)
            stats = solve32.lower(v, r32).compile().memory_analysis()
            xla_mb = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                      + stats.output_size_in_bytes) / 2**20
            out, infos = solve32(v, r32)
            path = _path_name({int(i.path) for i in infos})
            ref, ref_infos = references[layout](jnp.asarray(v64), r)
            assert all(bool(i.converged) for i in ref_infos), "reference did not converge"
            sweeps = max(int(i.iterations) for i in infos)
            est = max(float(i.error) for i in infos)
            ok = all(bool(i.converged) for i in infos)
            row = dict(
                layout=layout, B=B, r=r, path=path, solve_ms=1e3 * t_solve,
                ideal_ms=1e3 * t_ideal, ratio=t_solve / t_ideal, sweeps=sweeps, est=est,
                converged=ok, err=_rel_err(out, ref), loss=_rel_err(exact_ideal, ref),
                xla_mb=xla_mb, rss_mb=mem.delta_mb,
            )
            rows.append(row)
            flag = "" if ok else "  (NOT CONVERGED)"
            print(f"{layout:>11} {B:>5} {r:>7.0e} {path:>10} {row['solve_ms']:>9.1f} "
                  f"{row['ideal_ms']:>9.3f} {row['ratio']:>8.1f} {sweeps:>6} {est:>8.1e} "
                  f"{row['err']:>10.1e} {row['loss']:>8.3f} {xla_mb:>7.0f} "
                  f"{row['rss_mb']:>7.0f}{flag}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"process peak RSS (ru_maxrss, all of the above incl. float64 references): {peak:.0f} MB")
    if not args.quick:
        finite_on_off(w, tol, repeats, rng)
    layer_rows = layer_path(w, rs, repeats, rng)
    if args.plot:
        plot(rows, layer_rows, args.plot, tol_text)
        print(f"figure: {args.plot}")
    return rows, layer_rows


def finite_on_off(w, tol, repeats, rng, on_off=100.0, r=1e-5, B=1024):
    """The same weights on devices with a finite on/off ratio, ``g+- = g_min + (1 - g_min)
    max(+-w, 0)``: no cell is off, so the kernel works on every cell of both arrays (with an
    infinite ratio, the table's, each array of a separate pair has half its cells off).
    """
    g_min = 1.0 / on_off
    g64 = [g_min + (1.0 - g_min) * np.maximum(s * w, 0.0) for s in (1.0, -1.0)]
    g32 = [jnp.asarray(g, jnp.float32) for g in g64]
    v64 = rng.uniform(0.0, 1.0, (B, K))
    v = jnp.asarray(v64, jnp.float32)
    ideal = jax.jit(lambda v: v @ g32[0] - v @ g32[1])
    t_ideal = _median_time(lambda: ideal(v), _REFERENCE_REPEATS)
    print(f"\nfinite on/off ratio {on_off:g} (every cell conducts), r = {r:g}, {B} vectors, "
          f"kernel; ideal {1e3 * t_ideal:.3f} ms")
    for layout in LAYOUTS:
        solve = _differential(*g32, tol, layout)
        r32 = jnp.float32(r)
        t = _median_time(lambda solve=solve, r32=r32: solve(v, r32), repeats)
        out, infos = solve(v, r32)
        ref, _ = _differential(*(jnp.asarray(g) for g in g64), 1e-12, layout)(jnp.asarray(v64), r)
        sweeps = max(int(i.iterations) for i in infos)
        print(f"{layout:>11} {1e3 * t:>9.1f} ms {t / t_ideal:>8.1f}x ideal {sweeps:>3} sweeps "
              f"err vs f64 {_rel_err(out, ref):.1e}", flush=True)


def layer_path(w, rs, repeats, rng, B=1024, batches=(1, 10, 100)):
    """The same array through `jaxbar.program` + `jaxbar.matmul` (parasitics.precompute).

    The config's default tolerance applies (`jaxbar.core.ir.default_tol`: 1e-5 in float32).

    An input-source array is linear in its inputs, so `program` solves its transfer matrix
    once per trial (N adjoint solves) and every MVM after that is an ideal product with it.
    Reported against `jaxbar.matmul` without parasitics (same mapping, same run), for both
    layouts: the cost of `program`, of one MVM of B vectors, and per B vectors when one
    programmed crossbar serves 1, 10 or 100 batches of B (a Monte Carlo trial serves all its
    images).
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
    print(f"{'layout':>11} {'r':>7} {'program ms':>11} {'x ideal':>8} {'matmul x':>9}{cols}")
    rows = []
    for layout, r in [(layout, r) for layout in LAYOUTS for r in rs]:
        cfg = plain.replace(**{"parasitics.topology": "input_source", "parasitics.r_row": r,
                               "parasitics.r_col": r,
                               "parasitics.interleaved": layout == "interleaved"})
        prog = jax.jit(lambda W, cfg=cfg: jaxbar.program(W, cfg))
        mm = jax.jit(lambda x, p, cfg=cfg: jaxbar.matmul(x, p, cfg))
        try:
            t_prog = _median_time(lambda prog=prog: prog(W), repeats)
        except jax.errors.JaxRuntimeError as e:  # the solve reported non-convergence
            reason = str(e).split("ConvergenceError: ")[-1].split("\n")[0]
            print(f"{layout:>11} {r:>7.0e} program failed: {reason}", flush=True)
            continue
        p = prog(W)
        t_mm = _median_time(lambda mm=mm, p=p: mm(x, p), _REFERENCE_REPEATS)
        per = {n: (t_prog / n + t_mm) / t_ideal for n in batches}
        rows.append(dict(layout=layout, r=r, program=t_prog / t_ideal, matmul=t_mm / t_ideal,
                         per=per))
        print(f"{layout:>11} {r:>7.0e} {1e3 * t_prog:>11.1f} {t_prog / t_ideal:>8.0f} "
              f"{t_mm / t_ideal:>9.2f}" + "".join(f" {per[n]:>16.1f}" for n in batches),
              flush=True)
    return rows


def plot(rows, layer_rows, path, tol_text, target=30.0):
    """Time / ideal product (one-off solves; layers) and float32 error against r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_layer, ax_err) = plt.subplots(1, 3, figsize=(16, 4.4))
    styles = {"separate": "-", "interleaved": "--"}
    series = [(64, "direct", "o", "C0"), (1024, "kernel", "s", "C1"), (1024, "xla", "D", "C2")]
    for layout in LAYOUTS:
        ls = styles[layout]
        for B, kind, marker, color in series:
            sel = [row for row in rows if row["B"] == B and row["layout"] == layout
                   and row["path"].split(">")[0] == kind]
            if sel:
                rr = [row["r"] for row in sel]
                ax.loglog(rr, [row["ratio"] for row in sel], ls=ls, marker=marker, color=color,
                          label=f"{layout}, {B} vectors ({kind})")
                ax_err.loglog(rr, [row["err"] for row in sel], ls=ls, marker=marker,
                              color=color, label=f"{layout}, {B} vectors ({kind})")
        loss = [row for row in rows if row["layout"] == layout and row["B"] == rows[0]["B"]]
        ax_err.loglog([row["r"] for row in loss], [row["loss"] for row in loss], ls=ls,
                      marker="x", color="k", label=f"{layout}: IR loss (exact vs ideal)")
        sel = [row for row in layer_rows if row["layout"] == layout]
        if sel:
            lr = [row["r"] for row in sel]
            ax_layer.loglog(lr, [row["program"] for row in sel], ls=ls, marker="^", color="k",
                            label=f"{layout}: program (once per trial)")
            for n, color in zip(sorted(sel[0]["per"])[1:], ("C3", "C4"), strict=False):
                ax_layer.loglog(lr, [row["per"][n] for row in sel], ls=ls, marker="v",
                                color=color, label=f"{layout}: per 1024 vectors, {n} batches")
    for a, title in ((ax, "one-off solves (1152x256 differential, float32)"),
                     (ax_layer, "layers: program + matmul, 1024 vectors per batch")):
        a.axhline(target, color="grey", lw=1, ls=":")
        a.text(rows[0]["r"], target * 1.1, f"{target:.0f}x target", color="grey")
        a.set_xlabel("normalized segment resistance r = Rp Gmax")
        a.set_ylabel("time / ideal product")
        a.set_title(title, fontsize=10)
        a.legend(fontsize=6)
    ax_err.set_xlabel("normalized segment resistance r = Rp Gmax")
    ax_err.set_ylabel("relative error of the output currents")
    ax_err.set_title(f"error vs float64 (tol {tol_text}) and size of the effect", fontsize=10)
    ax_err.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
