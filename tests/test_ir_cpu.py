"""Tests of the CPU (numba) kernel of the input-source transfer solve against the dense circuit
reference and the XLA solver."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.core import ir as par
from jaxbar.core.ir import circuit, convergence
from jaxbar.core.ir import cpu_kernel as ir_cpu

from .circuit_reference import reference_currents

pytestmark = pytest.mark.skipif(not ir_cpu.available(), reason="numba is not installed")

ROOT = pathlib.Path(__file__).resolve().parent.parent
TERMINALS = dict(r_driver=0.04, r_integrator=0.06, extra_rows=2)
NONE = dict(r_driver=0.0, r_integrator=0.0, extra_rows=0)


def _rel_err(x, ref):
    """Per input vector: max |x - ref| / max |ref|; the worst vector."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.max(np.abs(x - ref), -1) / np.max(np.abs(ref), -1)))


def _problem(k, n, interleaved, signed, seed, b=None):
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.0, 1.0, (k, n))
    g_neg = rng.uniform(0.0, 1.0, (k, n)) if interleaved else None
    v = rng.uniform(-1.0 if signed else 0.0, 1.0, (b or 2 * n, k))
    return g, g_neg, v


def _kernel(g, g_neg, v, r_row, r_col, tol=1e-6, max_iters=200, **terminals):
    """The host side of the kernel: (currents, iterations, error, ok)."""
    g_stack = np.stack([g] if g_neg is None else [g, g_neg]).astype(np.float32)
    res = circuit.resistances(r_row, r_col, terminals["r_driver"], terminals["r_integrator"],
                              terminals["extra_rows"])
    v32 = v.astype(np.float32)
    M, iterations, error, ok = ir_cpu._host_transfer(
        g_stack, v32, *res, tol=tol, max_iters=max_iters)
    assert M.dtype == np.float32 and M.shape == (g.shape[1], g.shape[0])
    return v32.astype(np.float64) @ M.T.astype(np.float64), int(iterations), float(error), ok


def test_generated_kernel_module_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen_ir_kernel", ROOT / "tools" /
                                                  "gen_ir_kernel.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    common = gen.target().parent / "kernel_common.py"
    assert common.read_text() == gen.common_stamped(), "run python tools/gen_ir_kernel.py"
    assert gen.target().read_text() == gen.generate(), "run python tools/gen_ir_kernel.py"


# Row-line coupling weak enough for Gauss-Seidel passes (the kernel's domain; r N^2 g << 1).
CASES = [
    # (K, N, interleaved, terminals, signed, r_row, r_col)
    (8, 6, False, NONE, False, 0.004, 0.05),
    (9, 6, True, TERMINALS, True, 0.002, 0.02),  # interleaved pairs, odd K, terminal resistances
    (13, 20, False, TERMINALS, True, 5e-4, 0.01),  # two lane blocks, the second partial
    (12, 17, True, NONE, False, 0.0, 0.1),  # ideal row lines
    (10, 5, False, NONE, True, 0.1, 0.0),  # ideal bit lines: zero impedance to the integrator
    (31, 16, False, NONE, False, 0.001, 0.001),  # one full block
]


@pytest.mark.parametrize("k,n,interleaved,terminals,signed,r_row,r_col", CASES)
def test_kernel_matches_dense_reference(k, n, interleaved, terminals, signed, r_row, r_col):
    g, g_neg, v = _problem(k, n, interleaved, signed, seed=k * n)
    ref = reference_currents(g, v, r_row, r_col, g_neg=g_neg, **terminals)
    currents, iterations, error, ok = _kernel(g, g_neg, v, r_row, r_col, **terminals)
    assert ok and error <= 1e-6 and iterations >= 2
    # float32: the transfer matrix is rounded to ~1e-7 relative, the product adds sqrt(K) eps.
    assert _rel_err(currents, ref) <= 3e-6
    assert _rel_err(currents, ref) < 0.1 * _rel_err(v @ (g if g_neg is None else g - g_neg), ref)


def test_zero_resistance_gives_the_ideal_product():
    g, g_neg, v = _problem(11, 7, True, True, seed=3)
    currents, _, error, ok = _kernel(g, g_neg, v, 0.0, 0.0, **NONE)
    assert ok and error <= 1e-6
    assert _rel_err(currents, v @ (g - g_neg)) <= 1e-6


def test_kernel_gives_up_on_slow_convergence():
    """Strong row-line coupling contracts slowly under Gauss-Seidel passes: the kernel reports
    it (ok False) instead of returning an unconverged matrix."""
    g, _, v = _problem(24, 16, False, False, seed=5)
    _, _, _, ok_fast = _kernel(g, None, v, 1e-4, 1e-4, **NONE)
    _, _, _, ok_slow = _kernel(5.0 * g, None, v, 0.3, 0.3, **NONE)
    _, iterations, _, ok_short = _kernel(g, None, v, 0.05, 0.05, max_iters=1, **NONE)
    assert ok_fast and not ok_slow and not ok_short and iterations == 1


def _f32(*arrays):
    return [None if a is None else jnp.asarray(a, jnp.float32) for a in arrays]


def test_solver_uses_the_kernel_and_agrees_with_xla():
    g, g_neg, v = _problem(40, 12, True, False, seed=7)
    ref = reference_currents(g, v, 0.001, 0.002, g_neg=g_neg, **TERMINALS)
    g32, gn32, v32 = _f32(g, g_neg, v)
    fast, info = par.solve_input_source(g32, v32, 0.001, 0.002, g_neg=gn32, **TERMINALS)
    assert int(info.path) == par.PATH_KERNEL
    slow, info_xla = par.solve_input_source(g32, v32, 0.001, 0.002, g_neg=gn32,
                                            cpu_kernel=False, **TERMINALS)
    assert int(info_xla.path) == par.PATH_TRANSFER
    assert bool(info.converged) and bool(info_xla.converged)
    assert fast.dtype == jnp.float32 and info.error.dtype == jnp.float32
    assert _rel_err(fast, ref) <= 3e-6 and _rel_err(slow, ref) <= 1e-5


def test_fallback_is_the_xla_solve():
    g, _, v = _problem(24, 16, False, False, seed=5)
    g32, v32 = _f32(5.0 * g, v)
    fast, info = par.solve_input_source(g32, v32, 0.3, 0.3)
    slow, info_xla = par.solve_input_source(g32, v32, 0.3, 0.3, cpu_kernel=False)
    assert int(info.path) == par.PATH_KERNEL_THEN_XLA
    assert int(info_xla.path) == par.PATH_TRANSFER
    np.testing.assert_array_equal(fast, slow)
    for field in ("iterations", "error", "converged", "tol", "lines"):  # all but the path
        np.testing.assert_array_equal(getattr(info, field), getattr(info_xla, field))
    # Not converging within max_iters is reported by the fallback, as without the kernel.
    _, short = par.solve_input_source(g32, v32, 0.3, 0.3, max_iters=2)
    assert not bool(short.converged) and int(short.iterations) == 2


def test_float64_and_numba_less_runs_use_xla(monkeypatch):
    g, _, v = _problem(20, 8, False, False, seed=9)
    with jax.enable_x64(True):
        _, info = par.solve_input_source(jnp.asarray(g), jnp.asarray(v), 0.01, 0.01)
    assert int(info.path) == par.PATH_TRANSFER
    monkeypatch.setattr(ir_cpu, "available", lambda: False)
    g32, v32 = _f32(g, v)
    _, info = par.solve_input_source(g32, v32, 0.01, 0.01)
    assert int(info.path) == par.PATH_TRANSFER


def test_vmap_over_arrays_and_gradients():
    rng = np.random.default_rng(13)
    gs = jnp.asarray(rng.uniform(0.0, 1.0, (3, 18, 9)), jnp.float32)
    v = jnp.asarray(rng.uniform(0.0, 1.0, (20, 18)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((20, 9)), jnp.float32)

    def loss(gs, v, cpu_kernel):
        solve = lambda g: par.solve_input_source(g, v, 0.001, 0.02, cpu_kernel=cpu_kernel)[0]  # noqa: E731
        return jnp.sum(jax.vmap(solve)(gs) * weights)

    currents, info = jax.jit(jax.vmap(lambda g: par.solve_input_source(g, v, 0.001, 0.02)))(gs)
    assert np.asarray(info.path).tolist() == [par.PATH_KERNEL] * 3  # the kernel, per array
    for i in range(3):
        ref = reference_currents(np.asarray(gs[i], np.float64), np.asarray(v, np.float64),
                                 0.001, 0.02)
        assert _rel_err(currents[i], ref) <= 3e-6
    grads = jax.grad(loss, argnums=(0, 1))(gs, v, True)
    grads_xla = jax.grad(loss, argnums=(0, 1))(gs, v, False)
    for a, b in zip(grads, grads_xla, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("interleaved", [False, True], ids=["single", "interleaved"])
def test_work_arrays_need_no_initialization(interleaved):
    """Solves reuse their scratch (factors and work arrays) without clearing it: garbage left
    there must not matter."""
    g, g_neg, v = _problem(13, 20, interleaved, False, seed=31)
    g[2, 3] = g[5, :] = 0.0  # a non-conducting cell and row (the single kernel skips them)
    first = _kernel(g, g_neg, v, 0.001, 0.01, **NONE)
    for buf in ir_cpu._SCRATCH:
        buf[:] = np.nan
    second = _kernel(g, g_neg, v, 0.001, 0.01, **NONE)
    assert first[3] and second[3]
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1:] == second[1:]


def _numpy_prepare(g, r_a, r_a_end, r_b, r_b_end):
    """Line factors and start fields written from their definitions (float64, no kernel code)."""
    P, K, N = g.shape
    ra = np.full(N, r_a)
    ra[0] = r_a_end
    rb = np.full(K, r_b)
    rb[-1] = r_b_end
    rho_a = np.zeros((P, K, N))
    for p in range(P):
        carry = np.zeros(K)
        for n in reversed(range(N)):
            y = g[p, :, n] + carry
            rho_a[p, :, n] = 1 / (1 + ra[n] * y)
            carry = rho_a[p, :, n] * y
    gs = g.sum(0)
    rho_f = np.zeros((K, N))
    carry = np.zeros(N)
    for k in range(K):
        y = gs[k] + carry
        rho_f[k] = 1 / (1 + rb[k] * y)
        carry = rho_f[k] * y
    z = np.zeros((K, N))  # impedance below each node, through its segment
    for k in reversed(range(K)):
        below = 0.0 if k == K - 1 else z[k + 1] / (1 + gs[k + 1] * z[k + 1])
        z[k] = rb[k] + below
    sig = 1 / (1 + gs * z)
    coef = np.zeros((2, 4, K, N))
    coef[0, 0], coef[0, 1], coef[0, 3], coef[1, 3] = rho_f * rb[:, None], rho_f, z, 1.0
    coef[0, 2, :-1] = sig[1:]
    coef[1, 0, 0] = sig[0]
    kappa = z[1:] / z[:-1]
    coef[1, 0, 1:] = sig[1:] * (1 - sig[1:] * kappa)
    coef[1, 1, 1:] = sig[1:] * kappa
    coef[1, 2, 1:] = rho_f[:-1]
    # Start: each bit line driven by -1 through its own cells, row lines ideal (dense solve).
    w0 = np.zeros((K, N))
    for n in range(N):
        A = np.diag(gs[:, n])
        for k in range(K):  # segment k joins node k to node k + 1 (the integrator below K - 1)
            A[k, k] += 1 / rb[k]
            if k + 1 < K:
                A[k + 1, k + 1] += 1 / rb[k]
                A[k, k + 1] = A[k + 1, k] = -1 / rb[k]
        w0[:, n] = np.linalg.solve(A, -gs[:, n])
    return rho_a, ra, coef, w0


@pytest.mark.parametrize("P", [1, 2])
def test_line_factors_match_their_definitions_whatever_the_outputs_held(P):
    """prepare_compact writes every entry of its (reused, so arbitrary) outputs: from NaN-filled
    arrays, on an array where every cell conducts, it gives the factors computed from their
    definitions (the distances from 1 and the weights from the factors)."""
    rng = np.random.default_rng(5)
    g = rng.uniform(0.1, 1.0, (P, 9, 7))
    r = (0.01, 0.03, 0.02, 0.05)
    _, _, (gq, rho, rrp, jr, cab, ccd, w0), _ = _compact(g, r)
    rho_a, ra, coef, w0_ref = _numpy_prepare(g.astype(np.float32).astype(np.float64), *r)
    flat = lambda a: a.reshape(*a.shape[:-2], -1)  # noqa: E731  (K, N) -> compact order
    beyond = np.cumprod(rho_a[..., ::-1], axis=-1)[..., ::-1]  # product over m >= n
    beyond = np.concatenate([beyond[..., 1:], np.ones(beyond.shape[:-1] + (1,))], axis=-1)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-12)
    close(rho, flat(rho_a))
    close(gq, flat(g / beyond))
    close(rrp, flat(rho_a * ra * beyond))
    close(jr, np.prod(rho_a, axis=-1))
    close(cab[:, 0], flat(coef[:, 0]))
    close(cab[:, 1], flat(1.0 - coef[:, 1]))
    close(ccd[:, 0], flat(1.0 - coef[:, 2]))
    for p in range(P):
        close(ccd[:, 1 + p], flat(-g[p] * coef[:, 3]))
    close(w0, w0_ref)


def test_scaled_inputs_and_their_norms():
    common, _ = ir_cpu._kernels()
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.0, 1.0, (5, 11)).astype(np.float32)
    s = np.asarray([2.0, 0.0, 0.5, 3.0, 1.0])
    xs = np.full_like(x, np.nan)
    cx2, cxi = common.scaled_inputs(x, s, xs)
    want = np.where(s[:, None] > 0, x / np.where(s > 0, s, 1.0)[:, None], 0.0)
    np.testing.assert_allclose(xs, want, rtol=1e-6)
    assert cx2 == pytest.approx(np.max(np.linalg.norm(want, axis=1)), rel=1e-6)
    assert cxi == pytest.approx(np.max(np.abs(want)), rel=1e-6)


def test_scratch_is_reused_aligned_and_shape_independent():
    """Solves reuse the scratch buffers across shapes (grown as needed); results do not depend
    on what an earlier solve left there, and every work array starts on a cache line."""
    problems = [_problem(13, 20, False, True, seed=s) for s in (1, 2)] + [
        _problem(31, 40, True, False, seed=3), _problem(7, 9, False, False, seed=4)]
    fresh = []
    for g, g_neg, v in problems:
        ir_cpu.release_scratch()
        fresh.append(_kernel(g, g_neg, v, 1e-3, 1e-2, **NONE)[0])
    for (g, g_neg, v), want in zip(problems, fresh, strict=True):
        np.testing.assert_array_equal(_kernel(g, g_neg, v, 1e-3, 1e-2, **NONE)[0], want)
    assert ir_cpu._SCRATCH
    for view in ir_cpu._scratch_views(1, ir_cpu._work_shapes(2, 13, 5, 3, 16)):
        assert view.ctypes.data % 64 == 0


def test_error_estimate_matches_the_xla_control():
    """The kernel's error estimate is the XLA solver's, also at the rounding level."""
    from jaxbar.core.ir import kernel_common

    eps = float(np.finfo(np.float32).eps)
    noise = 16 * eps
    for d_prev, d in [(1e-3, 0.5 * noise), (1.1 * noise, 0.9 * noise), (0.9 * noise, 0.5 * noise),
                      (1e-2, 1e-4), (1e-3, 0.0)]:
        ctl = convergence.control_init(1, np.float32)
        for t, change in enumerate((d_prev, d)):
            ctl = convergence.control_step(ctl, t, jnp.asarray([change], np.float32))
        err = np.zeros(1)
        rate = np.asarray([d / d_prev])
        kernel_common._estimate(np.asarray([d]), rate, 2, eps, err, True)
        assert err[0] == pytest.approx(float(ctl.err[0]), rel=1e-4, abs=1e-12)


def test_blas_runs_on_one_thread_during_the_kernel(monkeypatch):
    """OpenBLAS threads spin after each call on the cores the kernel's workers need: the kernel
    holds every BLAS library to one thread while it runs, and restores them after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [(info["filepath"], info["num_threads"])
                for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]

    seen = []
    real = ir_cpu._solve_blocks

    def wrapped(*args):
        seen.append(blas_threads())
        return real(*args)

    monkeypatch.setattr(ir_cpu, "_solve_blocks", wrapped)
    g, _, v = _problem(12, 8, False, False, seed=21)
    _kernel(g, None, v, 1e-3, 1e-3, **NONE)
    before = dict(blas_threads())
    assert seen and seen[0] and all(n == 1 for _, n in seen[0])
    assert {path for path, _ in seen[0]} == set(before)
    assert dict(blas_threads()) == before


def test_cells_error_scale_in_the_kernel():
    """The kernel converges relative to both polarities' currents added when asked: where the
    differential outputs nearly cancel, their error is within tol of that scale."""
    from .test_parasitics import _cancelling_pair

    K, N, r, tol = 40, 12, 2e-3, 1e-5
    g, g_neg = _cancelling_pair(K, N, seed=22)
    v = np.eye(K + 1, K) + 10.0 / K
    ref = reference_currents(g, v, r, r, g_neg=g_neg)
    cells = np.max(np.abs(v) @ (g + g_neg), axis=1)
    g32, gn32, v32 = _f32(g, g_neg, v)
    I, info = par.solve_input_source(g32, v32, r, r, g_neg=gn32, tol=tol, error_scale="cells")
    assert int(info.path) == par.PATH_KERNEL and bool(info.converged)
    assert np.max(np.max(np.abs(np.asarray(I, np.float64) - ref), axis=1) / cells) <= tol
    # The scale itself: the start transfer with the polarities added, over every column.
    g_stack = np.stack([g, g_neg]).astype(np.float32)
    w0 = _compact(g_stack, (r, r, r, r))[2][-1]
    m0 = (g + g_neg) * (1.0 + w0.astype(np.float64))
    s = ir_cpu._scale(np.asarray(v32), g_stack, w0, np.array([1.0, -1.0]), cells=True)
    np.testing.assert_allclose(s, np.max(np.abs(v @ m0), axis=1), rtol=1e-5)


# Single arrays: the kernel works on the conducting cells only (g = 0 joins segments in series).
SPARSE_CASES = [
    # (K, N, terminals, signed, r_row, r_col, fraction of cells conducting)
    (12, 9, NONE, False, 0.002, 0.02, 0.5),
    (17, 20, TERMINALS, True, 5e-4, 0.01, 0.3),  # two lane blocks, terminal resistances
    (9, 6, TERMINALS, False, 0.004, 0.05, 0.15),  # mostly empty rows and bit lines
]


def _sparse(k, n, fraction, seed):
    rng = np.random.default_rng(seed)
    g = rng.uniform(0.0, 1.0, (k, n)) * (rng.uniform(size=(k, n)) < fraction)
    g[1, :] = 0.0  # a non-conducting row
    g[:, 2] = 0.0  # a non-conducting bit line
    g[0, 2] = 0.7  # ... but for its first cell
    return g


@pytest.mark.parametrize("k,n,terminals,signed,r_row,r_col,fraction", SPARSE_CASES)
def test_kernel_on_partly_conducting_arrays(k, n, terminals, signed, r_row, r_col, fraction):
    g = _sparse(k, n, fraction, seed=k + n)
    v = np.random.default_rng(k).uniform(-1.0 if signed else 0.0, 1.0, (2 * n, k))
    ref = reference_currents(g, v, r_row, r_col, **terminals)
    currents, iterations, error, ok = _kernel(g, None, v, r_row, r_col, **terminals)
    assert ok and error <= 1e-6 and iterations >= 2
    assert _rel_err(currents, ref) <= 3e-6
    assert _rel_err(currents, ref) < 0.1 * _rel_err(v @ g, ref)


def test_kernel_on_an_array_without_conducting_cells():
    v = np.random.default_rng(1).uniform(0.0, 1.0, (8, 10))
    currents, _, error, ok = _kernel(np.zeros((10, 7)), None, v, 0.01, 0.01, **NONE)
    assert ok and error == 0.0 and not np.any(currents)


def _compact(g, r):
    """prepare_compact's outputs for a (P, K, N) or (K, N) array, from NaN-filled arrays."""
    common, _ = ir_cpu._kernels()
    # Read-only, as the solver passes it: the kernels' compiled versions are reused.
    g = ir_cpu.read_only(np.reshape(g, (-1,) + np.shape(g)[-2:]))
    P, K, N = g.shape
    nnz = int(np.count_nonzero(np.any(g != 0, axis=0)))
    rp, col = np.full(K + 1, -1, np.int32), np.full(nnz + 1, -1, np.int32)
    assert common.compact_pattern(g, rp, col) == nnz
    out = [np.full(shape, np.nan, np.float32) for shape in
           [(P, nnz), (P, nnz), (P, nnz), (P, K), (2, 2, nnz), (2, 1 + P, nnz), (K, N)]]
    qhat = common.prepare_compact(g, rp, col[:nnz], *r, *out, np.full((4, nnz), np.nan))
    return rp, col[:nnz], out, qhat


def test_compact_pattern_start_and_contraction_estimate():
    """The compact pattern lists the conducting cells; the start (bit lines driven through their
    own cells, row lines ideal) and the contraction estimate (largest row voltage with every bit
    line at 1 times largest bit-line voltage with every row line at 1) match dense solves."""
    g = _sparse(11, 8, 0.4, seed=3)
    r = (0.01, 0.03, 0.02, 0.05)  # r_a, r_a_end, r_b, r_b_end
    rp, col, out, qhat = _compact(g, r)
    rows, cols = np.nonzero(g)
    np.testing.assert_array_equal(col, cols)
    np.testing.assert_array_equal(rp, np.searchsorted(rows, np.arange(12)))
    w0_ref = _numpy_prepare(g[None], *r)[3]
    np.testing.assert_allclose(out[-1], np.where(g != 0, w0_ref, 0.0), rtol=2e-6, atol=1e-7)

    def line_voltages(gl, r_seg, r_end):
        """Voltages of a line grounded through r_end at node 0, cells to sources at 1."""
        n = len(gl)
        A = np.diag(gl.astype(np.float64))
        segs = [r_end] + [r_seg] * (n - 1)  # segment before node i
        for i, rs in enumerate(segs):
            A[i, i] += 1 / rs
            if i:
                A[i - 1, i - 1] += 1 / rs
                A[i, i - 1] = A[i - 1, i] = -1 / rs
        return np.linalg.solve(A, gl)

    a = max(np.max(line_voltages(row, r[0], r[1])) for row in g)
    b = max(np.max(line_voltages(column[::-1], r[2], r[3])) for column in g.T)
    assert qhat == pytest.approx(a * b, rel=1e-5)


def test_first_at_least():
    common, _ = ir_cpu._kernels()
    col = np.asarray([0, 3, 3, 7, 9], np.int32)
    for n, want in [(-1, 1), (0, 1), (3, 1), (4, 3), (8, 4), (9, 4), (10, 5)]:
        assert common.first_at_least(col, 1, 5, n) == want


def test_a_pass_predicted_last_is_run_again_when_it_does_not_converge(monkeypatch):
    """A pass predicted to converge skips the bit-line elimination; when the prediction fails
    it is run again in full. Forcing the prediction (a contraction estimate of 0) must then give
    exactly the solve that never predicts (an estimate of 1)."""
    from jaxbar.core.ir import kernel_common

    g, _, v = _problem(30, 16, False, False, seed=41)
    real = kernel_common.prepare_compact
    runs = {}
    for qhat in (0.0, 1.0):
        def forced(*args, q=qhat, **kwargs):
            est = real(*args, **kwargs)
            return q if np.isfinite(est) else est

        monkeypatch.setattr(kernel_common, "prepare_compact", forced)
        runs[qhat] = _kernel(g, None, v, 0.004, 0.004, **NONE)
    assert runs[0.0][3] and runs[0.0][1] >= 4  # slow enough that the forced prediction fails
    np.testing.assert_array_equal(runs[0.0][0], runs[1.0][0])
    assert runs[0.0][1:] == runs[1.0][1:]
    ref = reference_currents(g, v, 0.004, 0.004)
    assert _rel_err(runs[0.0][0], ref) <= 3e-6


def test_rows_too_attenuated_for_the_kernel_fall_back():
    """A row whose factors would overflow the kernel's weights is left to the XLA solver."""
    g = np.full((4, 200), 5.0)
    _, _, _, ok = _kernel(g, None, np.ones((3, 4)), 1.0, 1e-3, **NONE)
    assert not ok


@pytest.mark.parametrize("interleaved,r", [(False, 0.04), (True, 0.01)],
                         ids=["single", "interleaved"])
def test_large_wire_resistance_is_solved_by_the_kernel_with_over_relaxation(interleaved, r):
    """Wire resistance at which Gauss-Seidel passes contract by more than half per pass (the
    kernel without relaxation gives up after 3): the kernel switches on block SOR, converges
    itself (no hand-over to XLA) and agrees with the dense reference, for a single array and
    for an interleaved pair (whose outputs, differences of the two polarities' currents, are
    sixteen times smaller than the IR loss here)."""
    g, g_neg, v = _problem(48, 16, interleaved, False, seed=17)
    ref = reference_currents(g, v, r, r, g_neg=g_neg, **TERMINALS)
    ideal = v @ g if g_neg is None else v @ (g - g_neg)
    currents, iterations, error, ok = _kernel(g, g_neg, v, r, r, tol=1e-5, **TERMINALS)
    assert ok and error <= 1e-5 and iterations > 3
    assert _rel_err(currents, ref) <= 2e-5
    assert _rel_err(currents, ref) < 0.01 * _rel_err(ideal, ref)
    g32, v32 = _f32(g, v)
    g_neg32 = None if g_neg is None else jnp.asarray(g_neg, jnp.float32)
    solved, info = par.solve_input_source(g32, v32, r, r, g_neg=g_neg32, tol=1e-5, **TERMINALS)
    assert int(info.path) == par.PATH_KERNEL and bool(info.converged)
    assert _rel_err(solved, ref) <= 2e-5
