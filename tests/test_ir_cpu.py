"""Tests of the CPU (numba) kernel of the input-source transfer solve against the dense circuit
reference and the XLA solver."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.core import ir_cpu
from jaxbar.core import parasitics as par

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
    res = par._resistances(r_row, r_col, terminals["r_driver"], terminals["r_integrator"],
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


@pytest.fixture
def spy(monkeypatch):
    """Records the ``ok`` flag of every kernel run traced after it is installed."""
    calls = []
    real = ir_cpu._host_transfer

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(bool(out[3]))
        return out

    monkeypatch.setattr(ir_cpu, "_host_transfer", wrapped)
    return calls


def _f32(*arrays):
    return [None if a is None else jnp.asarray(a, jnp.float32) for a in arrays]


def test_solver_uses_the_kernel_and_agrees_with_xla(spy):
    g, g_neg, v = _problem(40, 12, True, False, seed=7)
    ref = reference_currents(g, v, 0.001, 0.002, g_neg=g_neg, **TERMINALS)
    g32, gn32, v32 = _f32(g, g_neg, v)
    fast, info = par.solve_input_source(g32, v32, 0.001, 0.002, g_neg=gn32, **TERMINALS)
    assert spy == [True]
    slow, info_xla = par.solve_input_source(g32, v32, 0.001, 0.002, g_neg=gn32,
                                            cpu_kernel=False, **TERMINALS)
    assert spy == [True]  # the XLA path did not call the kernel
    assert bool(info.converged) and bool(info_xla.converged)
    assert fast.dtype == jnp.float32 and info.error.dtype == jnp.float32
    assert _rel_err(fast, ref) <= 3e-6 and _rel_err(slow, ref) <= 1e-5


def test_fallback_is_the_xla_solve(spy):
    g, _, v = _problem(24, 16, False, False, seed=5)
    g32, v32 = _f32(5.0 * g, v)
    fast, info = par.solve_input_source(g32, v32, 0.3, 0.3)
    slow, info_xla = par.solve_input_source(g32, v32, 0.3, 0.3, cpu_kernel=False)
    assert spy == [False]
    np.testing.assert_array_equal(fast, slow)
    for a, b in zip(info, info_xla, strict=True):
        np.testing.assert_array_equal(a, b)
    # Not converging within max_iters is reported by the fallback, as without the kernel.
    _, short = par.solve_input_source(g32, v32, 0.3, 0.3, max_iters=2)
    assert not bool(short.converged) and int(short.iterations) == 2


def test_float64_and_numba_less_runs_use_xla(spy, monkeypatch):
    g, _, v = _problem(20, 8, False, False, seed=9)
    with jax.enable_x64(True):
        par.solve_input_source(jnp.asarray(g), jnp.asarray(v), 0.01, 0.01)
    assert spy == []
    monkeypatch.setattr(ir_cpu, "available", lambda: False)
    g32, v32 = _f32(g, v)
    par.solve_input_source(g32, v32, 0.01, 0.01)
    assert spy == []


def test_vmap_over_arrays_and_gradients(spy):
    rng = np.random.default_rng(13)
    gs = jnp.asarray(rng.uniform(0.0, 1.0, (3, 18, 9)), jnp.float32)
    v = jnp.asarray(rng.uniform(0.0, 1.0, (20, 18)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((20, 9)), jnp.float32)

    def loss(gs, v, cpu_kernel):
        solve = lambda g: par.solve_input_source(g, v, 0.001, 0.02, cpu_kernel=cpu_kernel)[0]  # noqa: E731
        return jnp.sum(jax.vmap(solve)(gs) * weights)

    currents = jax.jit(jax.vmap(lambda g: par.solve_input_source(g, v, 0.001, 0.02)[0]))(gs)
    assert spy == [True, True, True]  # one kernel run per array (a sequential map)
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
    """Workers reuse their work arrays across blocks: garbage in them must not matter."""
    common, lanes = ir_cpu._kernels()
    g, g_neg, v = _problem(13, 20, interleaved, False, seed=31)
    g_stack = np.stack([g] if g_neg is None else [g, g_neg])
    rho_a, r_a, coef, w0 = common.prepare(g_stack, 0.001, 0.002, 0.01, 0.02)
    P, K, N = g_stack.shape
    L = lanes.LANES
    xs = (v / np.max(np.abs(v @ g))).astype(np.float32)
    args = (g_stack.astype(np.float32), rho_a, r_a, coef, w0, xs, 16, 1e-6, 1.0, 1.0, 50)
    shapes = [((K + 2) * N * L,), (2, N * L), (2, P, N * L), (N * L,), (P, K, L), (P, K, L),
              (L, K), (L, K)]
    outs = []
    for fill in (0.0, np.nan):
        work = [np.full(s, fill, np.float32) for s in shapes]
        out, err = np.zeros((L, K), np.float32), np.full(L, np.inf)
        fn = getattr(lanes, f"block_p{P}")
        status = fn(*args[:6], args[6], *args[7:], *work, ir_cpu._control_state(L), out, err)
        outs.append((status, out, err))
    assert outs[0][0] == outs[1][0] and outs[0][0][1] == 0
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    np.testing.assert_array_equal(outs[0][2], outs[1][2])


def test_error_estimate_matches_the_xla_control():
    """The kernel's error estimate is the XLA solver's, also at the rounding level."""
    from jaxbar.core import _ir_common

    eps = float(np.finfo(np.float32).eps)
    noise = 16 * eps
    for d_prev, d in [(1e-3, 0.5 * noise), (1.1 * noise, 0.9 * noise), (0.9 * noise, 0.5 * noise),
                      (1e-2, 1e-4), (1e-3, 0.0)]:
        ctl = par._control_init(1, np.float32)
        for t, change in enumerate((d_prev, d)):
            ctl = par._control_step(ctl, t, jnp.asarray([change], np.float32))
        err = np.zeros(1)
        rate = np.asarray([d / d_prev])
        _ir_common._estimate(np.asarray([d]), rate, 2, eps, err)
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
