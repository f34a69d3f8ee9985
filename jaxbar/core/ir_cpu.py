"""CPU kernel of the input-source transfer solve (numba): the IR-drop solver's fast path on CPUs.

:mod:`jaxbar.core.parasitics` finds the transfer matrix ``M`` of an input-source array (``I = v @
M.T``) from N adjoint circuits, one per bit line ``j`` (driven by -1 in its own cells). In XLA
every sweep streams (K, N, N)-sized fields through memory several times. This kernel solves 16
adjoint circuits at once in float32, one per SIMD lane, and fuses a whole Gauss-Seidel sweep into
a single pass over the rows:

* the bit-line back-substitution of the previous sweep gives row k's bit-line voltages,
* the row line is solved exactly given them (elimination from its open end, back-substitution
  from the driver),
* its cell currents enter the elimination of the next bit-line solve at row k.

Consecutive passes run in opposite directions over the rows, so the bit-line elimination
alternates between the open end (admittance form, as the XLA solver) and the integrator end
(impedance form: ``Z_k`` is the impedance below node k and the back-substitution uses ``Z_k /
Z_(k-1) <= 1``, so nothing is divided by a resistance). The passes start from the bit lines solved
with ideal row lines, read the driver currents after each pass as the XLA solver does (ideal
minus IR loss while the loss is small, else the row solve's own currents) and stop on the same
error estimate of the output currents: a cheap bound on their change (``min(|x|_2 |dM|_2,
|x|_inf |dM|_1)`` relative to each vector's largest current) gives the contraction rate, and near
convergence the exact change replaces it.

Gauss-Seidel passes are fast where the row-line coupling is weak (at r = 1e-4 on 1152 x 256 the
change shrinks 15-20 times per pass). When it shrinks by less than half per pass, stalls at float32
rounding above ``tol``, or the passes reach ``max_iters``, the kernel gives up and the caller falls
back to the over-relaxed XLA solver. Memory: one (K + 2) x N x 16 float32 field per worker thread
(18 MB for 1152 x 256). The kernel is used on the CPU backend for float32 input-source transfer
solves when numba is installed (``cpu_kernel=False`` turns it off).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["available", "transfer"]

# Sampled columns of the start transfer matrix that set each vector's current scale.
_SCALE_COLUMNS = 32
# Memory for the workers' elimination fields ((K + 2) * N * 16 float32 values each): a second
# worker is started only within this budget.
_WORKER_BYTES = 512 * 2**20
# One transfer solve at a time (each already uses every core).
_LOCK = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether the CPU kernel can run (numba installed)."""
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _kernels():
    import numba

    # Straight-line lane code is vectorized by LLVM's SLP pass, which numba leaves off by
    # default; it is read when a function is compiled (see _slp).
    with _slp(numba):
        from jaxbar.core import _ir_common, _ir_lanes
    return _ir_common, _ir_lanes


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded with the kernels (None without it)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot calls this BLAS: load it first

    return ThreadpoolController()


def _one_blas_thread():
    """BLAS on one thread while the kernel runs.

    The kernel's matrix products (the scale, the exact changes) run on its own worker threads.
    OpenBLAS threads spin-wait after each call, on the cores the workers need: that made a
    1152 x 256 transfer solve 2.3 times slower.
    """
    controller = _blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@contextlib.contextmanager
def _slp(numba):
    old = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1
    try:
        yield
    finally:
        numba.config.SLP_VECTORIZE = old


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _control_state(lanes):
    state = np.full((6, lanes), np.inf)
    state[4] = 0.0  # not yet in exact mode
    return state


def _worker(fn, lanes, args, starts, lock, results):
    """Solves blocks of driven columns taken from ``starts`` until none is left.

    The work arrays are allocated once per worker: fresh multi-megabyte arrays per block cost
    page faults comparable to a pass.
    """
    g = args[0]
    P, K, N = g.shape
    L = lanes
    f32 = np.float32
    work = (
        np.empty((K + 2) * N * L, f32),  # F: the bit-line elimination, rows -1 .. K (padding)
        np.empty((2, N * L), f32),  # bit-line voltages of the current and the previous row
        np.empty((2, P, N * L), f32),  # row-line elimination of the rows in flight
        np.empty(N * L, f32),  # drive: 1 at lane b's driven cell
        np.empty((P, K, L), f32),  # row-line boundary currents
        np.empty((P, K, L), f32),  # IR loss per row line
        np.empty((L, K), f32), np.empty((L, K), f32),  # transfer rows, previous and new
    )
    while True:
        with lock:
            j0 = next(starts, None)
        if j0 is None:
            return
        out = np.zeros((L, K), f32)
        err = np.full(L, np.inf)
        passes, status = fn(*args[:6], j0, *args[6:], *work, _control_state(L), out, err)
        results[j0] = passes, status, out, err


def _scale(x, g, w0, signs):
    """Each vector's largest output current, from sampled columns of the start transfer matrix.

    Sampling can only underestimate the largest current, which makes the relative error
    estimates conservative; the start ignores the row-line drop, which is small wherever the
    kernel converges fast.
    """
    N = g.shape[2]
    cols = np.unique(np.linspace(0, N - 1, min(N, _SCALE_COLUMNS)).round().astype(np.int64))
    m0 = np.einsum("p,pkc,kc->kc", signs, g[:, :, cols], 1.0 + w0[:, cols])
    s = np.max(np.abs(x @ m0.astype(x.dtype)), axis=1)
    missing = (s == 0) & np.any(x != 0, axis=1)
    if np.any(missing):  # no current in the sampled columns: use all of them
        m_all = np.einsum("p,pkn,kn->kn", signs, g, 1.0 + w0).astype(x.dtype)
        s[missing] = np.max(np.abs(x[missing] @ m_all), axis=1)
    return s


def _host_transfer(g, x, r_a, r_a_end, r_b, r_b_end, *, tol, max_iters):
    """numpy in, numpy out: (M (N, K), iterations, error, ok); float32."""
    import numba

    common, lanes = _kernels()
    with _LOCK, _slp(numba), _one_blas_thread():
        return _solve_blocks(common, lanes, g, x, r_a, r_a_end, r_b, r_b_end, tol, max_iters)


def _solve_blocks(common, lanes, g, x, r_a, r_a_end, r_b, r_b_end, tol, max_iters):
    g = np.asarray(g, np.float32)
    x = np.asarray(x, np.float32)
    P, K, N = g.shape
    signs = np.asarray([1.0, -1.0][:P])
    g64 = np.ascontiguousarray(g, np.float64)
    rho_a, r_a_n, coef, w0 = common.prepare(
        g64, float(r_a), float(r_a_end), float(r_b), float(r_b_end))
    s = _scale(x, g64, w0, signs)
    safe = np.where(s > 0, s, 1.0)
    xs = np.ascontiguousarray(np.where(s[:, None] > 0, x / safe[:, None], 0.0), np.float32)
    cx2 = float(np.max(np.linalg.norm(xs.astype(np.float64), axis=1), initial=0.0))
    cxi = float(np.max(np.abs(xs), initial=0.0))
    fn = getattr(lanes, f"block_p{P}")
    L = lanes.LANES
    args = [np.ascontiguousarray(a, np.float32) for a in (g, rho_a, r_a_n, coef, w0)]
    args += [xs, float(tol), cx2, cxi, int(max_iters)]
    starts = range(0, N, L)
    results = {}
    queue = iter(starts)
    # Each worker holds one block's elimination field; more workers only while they fit.
    field_bytes = (K + 2) * N * L * 4
    n_workers = max(1, min(_threads(), len(starts), _WORKER_BYTES // field_bytes))
    with ThreadPoolExecutor(n_workers) as pool:
        lock = threading.Lock()
        for f in [pool.submit(_worker, fn, L, args, queue, lock, results)
                  for _ in range(n_workers)]:
            f.result()
    results = [results[j0] for j0 in starts]
    M = np.concatenate([out for _, _, out, _ in results])[:N]
    err = np.concatenate([e for _, _, _, e in results])[:N]
    passes = max(p for p, _, _, _ in results)
    ok = all(st == 0 for _, st, _, _ in results)
    return M, np.int32(passes), np.float32(np.max(err)), np.bool_(ok)


def transfer(g_stack, x, res, tol, max_iters):
    """Transfer matrix of an input-source array by the CPU kernel (inside jit, via a callback).

    Args:
      g_stack: (P, K, N) conductances (P = 2: interleaved negative cells, driven by -v).
      x: (B, K) the input vectors the currents are converged on.
      res: (r_a, r_a_end, r_b, r_b_end) row segment, first row segment (with the driver), bit-line
        segment, last bit-line segment (with unused rows and the integrator).
      tol, max_iters: as the solver's.

    Returns:
      (M (N, K), iterations, error, ok): ``ok`` False when the kernel gave up (slow contraction
      or no convergence within max_iters): M is then not a solution.
    """
    P, K, N = g_stack.shape
    f32 = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((N, K), f32),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), f32),
        jax.ShapeDtypeStruct((), jnp.bool_),
    )
    host = functools.partial(_host_transfer, tol=tol, max_iters=max_iters)
    return jax.pure_callback(host, shapes, g_stack.astype(f32), x.astype(f32),
                             *(jnp.asarray(r, f32) for r in res), vmap_method="sequential")
