"""CPU kernel of the input-source transfer solve (numba): the IR-drop solver's fast path on CPUs.

`jaxbar.core.ir.transfer` finds the transfer matrix `M` of an input-source array (`I = v @
M.T`) from N adjoint circuits, one per bit line `j` (driven by -1 in its own cells). In XLA
every sweep streams (K, N, N)-sized fields through memory several times. This kernel solves 16
adjoint circuits at once in float32, one per SIMD lane, and fuses a whole Gauss-Seidel sweep into
a single pass over the rows:

* the bit-line back-substitution of the previous sweep gives row k's bit-line voltages,
* the row line is solved exactly given them (elimination from its open end, back-substitution
  from the driver),
* its cell currents enter the elimination of the next bit-line solve at row k.

Consecutive passes run in opposite directions over the rows, so the bit-line elimination
alternates between the open end (admittance form, as the XLA solver) and the integrator end
(impedance form: `Z_k` is the impedance below node k and the back-substitution uses `Z_k /
Z_(k-1) <= 1`, so nothing is divided by a resistance). The passes start from the bit lines solved
with ideal row lines, read the driver currents after each pass and stop on the XLA solver's error
estimate of the output currents: a cheap bound on their change (`min(|x|_2 |dM|_2, |x|_inf
|dM|_1)` relative to each vector's largest current) gives the contraction rate, and near
convergence the exact change replaces it.

The kernel works on the bit-line nodes that have a conducting cell (`kernel_common.
prepare_compact`): a cell with g = 0 joins its row segments (and, alone at its node, its bit-line
segments) in series, so the line factors are those of the merged segments and the field holds 16
values per node. Half of each array of a one-sided differential pair is off with an infinite
on/off ratio; with a finite ratio every cell conducts. Rows are solved one at a time, their line
eliminations written as weighted sums and factors near 1 kept as their distance from 1 (float32
factors multiplied over a thousand rows would lose the IR drop's last digits). Each lane's drive
only enters the nodes in the block's own columns, so each row is swept in three runs. A pass that is
predicted to converge (from the measured contraction, or before pass 3 from an a-priori bound)
skips the bit-line elimination that only a further pass would read; if it does not converge it
is run again in full.

Gauss-Seidel passes are fast where the row-line coupling is weak (at r = 1e-4 on 1152 x 256 the
change shrinks 15-20 times per pass). When it shrinks by less than half per pass, stalls at float32
rounding above `tol`, or the passes reach `max_iters`, the kernel gives up and the caller falls
back to the over-relaxed XLA solver. Memory: per worker thread one field of 16 float32 values per
node (at most K x N x 16, 18 MB for 1152 x 256), and the line factors, kept between solves for the
largest array seen (`release_scratch` frees them): faulting in fresh fields on every call
costs about a pass. While a pass reads a row it prefetches the field of the row two steps ahead. The
setup (line factors, scale, scaled inputs) runs independent halves on two threads. The kernel is
used on the CPU backend for float32 input-source transfer solves when numba is installed
(`cpu_kernel=False` turns it off). docs/ir_solver.md describes the design.
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

from jaxbar.core.ir.constants import SOR_WAIT

__all__ = ["available", "release_scratch", "threads", "transfer"]

# Sampled columns of the start transfer matrix that set each vector's current scale.
_SCALE_COLUMNS = 32
# Memory for the workers' elimination fields ((K + 2) * N * 16 float32 values each): a second
# worker is started only within this budget.
_WORKER_BYTES = 512 * 2**20
# Cache-line size: the lane groups (16 float32) are aligned to it.
_ALIGN = 64
# Scratch buffers (see _scratch_views).
_SCRATCH: list[np.ndarray] = []
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
        from jaxbar.core.ir import kernel_common, kernel_lanes
    return kernel_common, kernel_lanes


@functools.cache
def _blas_controller():
    """Threadpoolctl's view of the BLAS libraries loaded with the kernels (None without it)."""
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


def threads() -> int:
    """The CPU cores this process may run on (the kernels' worker threads)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _control_state(lanes):
    """The kernel's control state (see `kernel_common.control`)."""
    state = np.full((10, lanes), np.inf)
    state[4] = 0.0  # not yet in exact mode
    state[6] = -1.0  # no rate yet
    state[7] = 1.0  # Gauss-Seidel until the control sets a relaxation factor
    state[8] = -SOR_WAIT  # pass of the factor's last update
    state[9] = 1.0  # the factor of the last pass
    return state


def _padded(n):
    return -(-n // (_ALIGN // 4)) * (_ALIGN // 4)


def _scratch_views(slot, shapes):
    """Views of scratch buffer `slot` with the given shapes, each starting on a cache line.

    The buffers are kept between solves (under _LOCK) and grown to the largest problem seen:
    fresh arrays, faulted in on every call, cost about as much as a pass. Slot 0 holds the
    compact pattern and the line factors (at most 26 float32 values per node), slot 1 + i
    worker i's work arrays.
    """
    total = sum(_padded(int(np.prod(s))) for s in shapes)
    while len(_SCRATCH) <= slot:
        _SCRATCH.append(np.empty(0, np.float32))
    if _SCRATCH[slot].size < total:
        _SCRATCH[slot] = _aligned_empty(total)
    views, at = [], 0
    for s in shapes:
        n = int(np.prod(s))
        views.append(_SCRATCH[slot][at:at + n].reshape(s))
        at += _padded(n)
    return tuple(views)


def release_scratch() -> None:
    """Frees the kernel's scratch buffers (an elimination field per worker thread)."""
    with _LOCK:
        _SCRATCH.clear()


def _worker(i, fn, L, K, head, tail, shapes, starts, lock, results):
    """Solves blocks of driven columns taken from `starts` until none is left (worker i).

    Calls `fn(*head, j0, *tail, *work, state, out, err)` with work arrays of the given
    shapes.
    """
    work = _scratch_views(1 + i, shapes)
    while True:
        with lock:
            j0 = next(starts, None)
        if j0 is None:
            return
        out = np.zeros((L, K), np.float32)
        err = np.full(L, np.inf)
        passes, status = fn(*head, j0, *tail, *work, _control_state(L), out, err)
        results[j0] = passes, status, out, err


def _work_shapes(P, nnz, K, N, L):
    return (
        (nnz * L,),  # F: the bit-line elimination at every node
        (N * L,), (N * L,),  # per column: the last node's bit-line voltage and elimination
        (P, N * L),  # row-line elimination of the current row
        (P, K, L),  # driver currents
        (L, K), (L, K),  # transfer rows, previous and new
        (nnz * L,), (P, nnz * L),  # relaxed bit-line and row-line voltages (SOR passes only)
    )


def _aligned_empty(shape, align=_ALIGN):
    """An uninitialized float32 array whose data starts on a cache line.

    The kernel's lane groups are 64 bytes; numpy's default 16-byte alignment would split every
    one of their loads and stores across two cache lines.
    """
    n = int(np.prod(shape))
    raw = np.empty(n + align // 4, np.float32)
    start = (-raw.ctypes.data % align) // 4
    return raw[start:start + n].reshape(shape)


def _halves(pool, fn, B):
    """fn(a, b) on two halves of range(B) (the second on `pool`); the two results."""
    h = B // 2
    other = pool.submit(fn, h, B)
    return fn(0, h), other.result()


def _scale(x, g, w0, signs, cells=False, pool=None):
    """Each vector's largest output current, from sampled columns of the start transfer matrix.

    Sampling can only underestimate the largest current, which makes the relative error
    estimates conservative; the start ignores the row-line drop, which is small wherever the
    kernel converges fast. `cells`: the largest current of both polarities' cells added, from
    every column (single-row probes, which need it, vary a lot between columns).
    """
    N = g.shape[2]
    if cells:
        signs, cols = np.abs(signs), np.arange(N)
    else:
        cols = np.unique(np.linspace(0, N - 1, min(N, _SCALE_COLUMNS)).round().astype(np.int64))
    m0 = np.einsum("p,pkc,kc->kc", signs, g[:, :, cols], 1.0 + w0[:, cols]).astype(x.dtype)
    if pool is None:
        s = np.max(np.abs(x @ m0), axis=1)
    else:
        s = np.concatenate(_halves(pool, lambda a, b: np.max(np.abs(x[a:b] @ m0), axis=1),
                                   x.shape[0]))
    missing = (s == 0) & np.any(x != 0, axis=1)
    if np.any(missing):  # no current in the sampled columns: use all of them
        m_all = np.einsum("p,pkn,kn->kn", signs, g, 1.0 + w0).astype(x.dtype)
        s[missing] = np.max(np.abs(x[missing] @ m_all), axis=1)
    return s


def _host_transfer(g, x, r_a, r_a_end, r_b, r_b_end, *, tol, max_iters, cells=False):
    """Numpy in, numpy out: (M (N, K), iterations, error, ok); float32."""
    import numba

    common, lanes = _kernels()
    with _LOCK, _slp(numba), _one_blas_thread():
        return _solve_blocks(common, lanes, g, x, r_a, r_a_end, r_b, r_b_end, tol, max_iters,
                             cells)


def read_only(a: np.ndarray, dtype=np.float32) -> np.ndarray:
    """A C-contiguous, read-only view (or copy) of `a` in `dtype`.

    numba compiles a kernel once per argument type, and an array's writeability is part of
    it: the arrays a callback receives are read-only, arrays from NumPy code are not. The
    kernels see one type either way, so each compiles once (about 30 s for a lane kernel).
    """
    a = np.ascontiguousarray(a, dtype)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _solve_blocks(common, lanes, g, x, r_a, r_a_end, r_b, r_b_end, tol, max_iters, cells):
    g, x = read_only(g), read_only(x)
    P, K, N = g.shape
    B = x.shape[0]
    L = lanes.LANES
    signs = np.asarray([1.0, -1.0][:P])
    # One pool for the setup (two independent halves at a time) and the workers.
    with ThreadPoolExecutor(max(2, threads())) as pool:
        nnz = int(np.count_nonzero(np.any(g != 0, axis=0)))  # nodes with a conducting cell
        rp, col, gq, rho, rrp, jr, cab, ccd, w0, tmp = _scratch_views(
            0, [(K + 1,), (nnz + 1,), (P, nnz), (P, nnz), (P, nnz), (P, K), (2, 2, nnz),
                (2, 1 + P, nnz), (K, N), (8 * nnz,)])
        rp, col, tmp = rp.view(np.int32), col.view(np.int32), tmp.view(np.float64)
        common.compact_pattern(g, rp, col)
        col = col[:nnz]
        qhat = common.prepare_compact(g, rp, col, float(r_a), float(r_a_end), float(r_b),
                                      float(r_b_end), gq, rho, rrp, jr, cab, ccd, w0,
                                      tmp.reshape(4, nnz), run=pool.submit)
        if not np.isfinite(qhat):  # rows attenuate too strongly for Gauss-Seidel passes
            return (np.zeros((N, K), np.float32), np.int32(0), np.float32(np.inf),
                    np.bool_(False))
        eye = np.eye(L, dtype=np.float32).ravel()
        head = [g, rp, col, gq, rho, rrp, jr, cab, ccd, w0, eye]
        fn = getattr(lanes, f"block_p{P}")
        shapes = _work_shapes(P, nnz, K, N, L)
        field_bytes = (2 + P) * nnz * L * 4  # F, and W, D once relaxed
        s = _scale(x, g, w0, signs, cells, pool)
        xs = np.empty((B, K), np.float32)  # inputs relative to each vector's largest current
        norms = _halves(pool, lambda a, b: common.scaled_inputs(x[a:b], s[a:b], xs[a:b]), B)
        cx2, cxi = (max(c) for c in zip(*norms, strict=True))
        head.append(xs)
        tail = [float(tol), cx2, cxi, qhat, int(max_iters)]
        starts = range(0, N, L)
        results = {}
        queue = iter(starts)
        # Each worker holds one block's elimination field; more workers only while they fit.
        n_workers = max(1, min(threads(), len(starts), _WORKER_BYTES // max(field_bytes, 1)))
        lock = threading.Lock()
        for f in [pool.submit(_worker, i, fn, L, K, head, tail, shapes, queue, lock, results)
                  for i in range(n_workers)]:
            f.result()
    results = [results[j0] for j0 in starts]
    M = np.concatenate([out for _, _, out, _ in results])[:N]
    err = np.concatenate([e for _, _, _, e in results])[:N]
    passes = max(p for p, _, _, _ in results)
    ok = all(st == 0 for _, st, _, _ in results)
    return M, np.int32(passes), np.float32(np.max(err)), np.bool_(ok)


def transfer(g_stack, x, res, tol, max_iters, cells=False):
    """Transfer matrix of an input-source array by the CPU kernel (inside jit, via a callback).

    Args:
      g_stack: (P, K, N) conductances (P = 2: interleaved negative cells, driven by -v).
      x: (B, K) the input vectors the currents are converged on.
      res: (r_a, r_a_end, r_b, r_b_end) row segment, first row segment (with the driver), bit-line
        segment, last bit-line segment (with unused rows and the integrator).
      tol: the solver's tolerance.
      max_iters: the solver's pass limit.
      cells: converge relative to the currents of both polarities added (`error_scale`).

    Returns:
      (M (N, K), iterations, error, ok): `ok` False when the kernel gave up (slow contraction
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
    host = functools.partial(_host_transfer, tol=tol, max_iters=max_iters, cells=cells)
    return jax.pure_callback(host, shapes, g_stack.astype(f32), x.astype(f32),
                             *(jnp.asarray(r, f32) for r in res), vmap_method="sequential")
