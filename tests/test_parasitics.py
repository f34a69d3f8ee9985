"""Tests of the IR-drop solver against an independent dense circuit solve (PHYSICS.md §6)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbar.core import ir as par
from jaxbar.core.ir import circuit, convergence, sweeps

from .circuit_reference import reference_currents
from .ir_problems import NO_TERMINALS, TERMINALS, B, K, N
from .ir_problems import problem as _problem
from .ir_problems import rel_err as _rel_err


@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module only: a global switch would change every other test's dtypes."""
    with jax.enable_x64(True):
        yield

SOLVERS = {"input_source": par.solve_input_source, "gated_source": par.solve_gated_source}
NODES = {"input_source": par.input_source_nodes, "gated_source": par.gated_source_nodes}


@jax.jit
def _jit_input(g, g_neg, v, r_row, r_col, r_driver, r_integrator, extra_rows):
    return par.solve_input_source(g, v, r_row, r_col, g_neg=g_neg, r_driver=r_driver,
                                  r_integrator=r_integrator, extra_rows=extra_rows)


@jax.jit
def _jit_input_tight(g, g_neg, v, r_row, r_col, r_driver, r_integrator, extra_rows):
    return par.solve_input_source(g, v, r_row, r_col, g_neg=g_neg, r_driver=r_driver,
                                  r_integrator=r_integrator, extra_rows=extra_rows, tol=1e-12)


@jax.jit
def _jit_gated(g, g_neg, b, r_row, r_col, r_driver, r_integrator, extra_rows):
    return par.solve_gated_source(g, b, r_row, r_col, g_neg=g_neg, r_driver=r_driver,
                                  r_integrator=r_integrator, extra_rows=extra_rows)


@jax.jit
def _jit_gated_tight(g, g_neg, b, r_row, r_col, r_driver, r_integrator, extra_rows):
    return par.solve_gated_source(g, b, r_row, r_col, g_neg=g_neg, r_driver=r_driver,
                                  r_integrator=r_integrator, extra_rows=extra_rows, tol=1e-12)


JITTED = {
    ("input_source", False): _jit_input,
    ("input_source", True): _jit_input_tight,
    ("gated_source", False): _jit_gated,
    ("gated_source", True): _jit_gated_tight,
}


# ---------------------------------------------------------------------------------------------
# Agreement with the dense nodal reference.

R_PAIRS = [(0.02, 0.05), (0.1, 0.1), (0.0, 0.1), (0.1, 0.0), (0.3, 0.2)]


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("terminals", [False, True], ids=["plain", "terminals"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["single", "interleaved"])
@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_matches_dense_reference(topology, interleaved, terminals, signed):
    g, g_neg, inp = _problem(topology, signed)
    gn = g_neg if interleaved else None
    extra = TERMINALS if terminals else NO_TERMINALS
    for r_row, r_col in R_PAIRS:
        ref = reference_currents(g, inp, r_row, r_col, topology=topology, g_neg=gn, **extra)
        args = (g, gn, inp, r_row, r_col, extra["r_driver"], extra["r_integrator"],
                extra["extra_rows"])
        currents, info = JITTED[(topology, False)](*args)  # default tol = 1e-6
        assert bool(info.converged)
        assert _rel_err(currents, ref) <= 1e-6, (r_row, r_col, float(info.error))
        tight, info = JITTED[(topology, True)](*args)
        assert bool(info.converged)
        assert _rel_err(tight, ref) <= 1e-10, (r_row, r_col)


def test_transfer_path_matches_reference_and_direct_gradients():
    """Input-source batches with >= N vectors use the transfer matrix (N adjoint solves)."""
    g, g_neg, v = _problem("input_source", signed=True, seed=17, b=2 * N)
    weights = np.random.default_rng(18).standard_normal((v.shape[0], N))
    for r_row, r_col in ((0.05, 0.1), (0.0, 0.2), (0.3, 0.0)):  # interleaved: signed drives
        ref = reference_currents(g, v, r_row, r_col, g_neg=g_neg, **TERMINALS)
        currents, info = par.solve_input_source(g, v, r_row, r_col, g_neg=g_neg, **TERMINALS)
        assert bool(info.converged)
        assert _rel_err(currents, ref) <= 1e-6

    @functools.partial(jax.jit, static_argnums=3)
    @functools.partial(jax.value_and_grad, argnums=(0, 1, 2))
    def loss(g, v, r, quarters):
        parts = [
            par.solve_input_source(g, vc, r, 2 * r, tol=1e-13, **TERMINALS)[0]
            for vc in (jnp.split(v, 4) if quarters else [v])
        ]
        return jnp.sum(jnp.concatenate(parts) * weights)

    value_t, grads_t = loss(g, v, 0.07, False)  # 2N vectors: transfer path
    value_d, grads_d = loss(g, v, 0.07, True)  # N/2 vectors per call: direct path
    np.testing.assert_allclose(value_t, value_d, rtol=1e-11)
    for a, b in zip(grads_t, grads_d, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_transfer_chunks_with_padding_match_reference():
    """Column chunks of the transfer path (with an undriven padding column) stay exact."""
    n = 7
    g, g_neg, v = _problem("input_source", signed=True, seed=23, n=n, b=2 * n)
    ref = reference_currents(g, v, 0.05, 0.1, g_neg=g_neg, **TERMINALS)
    currents, info = par.solve_input_source(g, v, 0.05, 0.1, g_neg=g_neg, tol=1e-12,
                                            batch_chunk=4, **TERMINALS)
    assert bool(info.converged)
    assert _rel_err(currents, ref) <= 1e-10


@pytest.mark.parametrize("lines", ["sequential", pytest.param("parallel", marks=pytest.mark.slow)])
def test_transfer_start_equals_general_start(lines):
    """The transfer path's start (one (K, N) bit-line family spread to the driven columns) is the
    general start (bit lines solved with ideal row lines) of the same one-hot column drives."""
    g, g_neg, _ = _problem("input_source", signed=True, seed=29)
    g_stack = jnp.stack([jnp.asarray(g), jnp.asarray(g_neg)])
    res = circuit.resistances(0.05, 0.1, 0.04, 0.06, 2.0)
    cir = circuit.shared_circuit("input_source", g_stack, res, lines)
    cols = jnp.array([4, 0, 5, N])  # N: a padding vector, not driven
    e_col = -(jnp.arange(N)[:, None] == cols[None, :]).astype(g_stack.dtype)[None, :, None, :]
    fast = sweeps.start_fields(cir, None, e_col, cols.size, True, lines, cols)
    general = sweeps.start_fields(cir, None, e_col, cols.size, True, lines)
    for a, b in zip(fast, general, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert float(jnp.max(jnp.abs(general[1][..., 3]))) == 0.0  # padding: no drive, no voltage


@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_zero_resistance_is_ideal_product(topology):
    g, g_neg, inp = _problem(topology, signed=True)
    for gn, g_eff in ((None, g), (g_neg, g - g_neg)):
        ideal = inp @ g_eff
        currents, info = JITTED[(topology, False)](g, gn, inp, 0.0, 0.0, 0.0, 0.0, 0)
        np.testing.assert_allclose(currents, ideal, rtol=0, atol=1e-12)
        assert bool(info.converged)
        currents, _ = JITTED[(topology, True)](g, gn, inp, 1e-10, 1e-10, 0.0, 0.0, 0)
        assert _rel_err(currents, ideal) <= 1e-7


@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_currents_decrease_with_resistance(topology):
    g, _, inp = _problem(topology, signed=False, seed=3)
    rs = jnp.concatenate([jnp.zeros(1), jnp.geomspace(1e-4, 1.0, 9)])
    solve = JITTED[(topology, True)]
    currents, info = jax.vmap(lambda r: solve(g, None, inp, r, r, 0.0, 0.0, 1))(rs)
    assert bool(jnp.all(info.converged))
    steps = np.diff(np.asarray(currents), axis=0)  # (len(rs) - 1, B, N)
    assert np.all(steps <= 1e-12)
    assert np.all(steps[-1] < 0)  # strictly, where resistance matters
    # Each line type alone also only reduces the currents.
    for r_row, r_col in ((0.05, 0.0), (0.0, 0.05)):
        lone, _ = solve(g, None, inp, r_row, r_col, 0.0, 0.0, 0)
        both, _ = solve(g, None, inp, 0.05, 0.05, 0.0, 0.0, 0)
        assert np.all(np.asarray(lone) <= np.asarray(currents[0]) + 1e-12)
        assert np.all(np.asarray(both) <= np.asarray(lone) + 1e-12)


# ---------------------------------------------------------------------------------------------
# Kirchhoff's current law at every node of the converged solution.


def _kcl_residuals(topology, g, g_neg, inp, nodes, r_row, r_col, r_driver, r_integrator, extra):
    """KCL residual (sum of currents leaving) at every node, and the current scale."""
    line, bit = np.asarray(nodes.line), np.asarray(nodes.bit)  # (B, P, K, N), (B, K, N)
    gs = [g] + ([g_neg] if g_neg is not None else [])
    signs = [1.0, -1.0]
    res = []
    cell_sum = np.zeros_like(bit)
    scale = 0.0
    r_last = (extra + 1) * r_col + r_integrator
    for p, gp in enumerate(gs):
        u = line[:, p]
        if topology == "input_source":
            drive = signs[p] * inp[:, :, None]  # (B, K, 1)
            cell = gp * (u - bit)
            # Row segments: left of column n (driver side), right of column n.
            left = np.concatenate([drive, u[:, :, :-1]], axis=2)
            r_left = np.full(u.shape[2], r_row)
            r_left[0] += r_driver
            into = (left - u) / r_left
            out_right = np.concatenate([(u[:, :, :-1] - u[:, :, 1:]) / r_row,
                                        np.zeros_like(u[:, :, :1])], axis=2)
        else:
            bits = inp[:, :, None]
            cell = np.abs(bits) * gp * (signs[p] * bits + u - bit)
            above = np.concatenate([np.zeros_like(u[:, :1]), u[:, :-1]], axis=1)
            r_above = np.full((u.shape[1], 1), r_row)
            r_above[0] += r_driver
            into = (above - u) / r_above
            out_right = np.concatenate([(u[:, :-1] - u[:, 1:]) / r_row,
                                        np.zeros_like(u[:, :1])], axis=1)
        res.append(into - out_right - cell)
        cell_sum += cell
        scale = max(scale, float(np.max(np.abs(cell))))
    from_above = np.concatenate([np.zeros_like(bit[:, :1]), (bit[:, :-1] - bit[:, 1:]) / r_col],
                                axis=1)
    to_below = np.concatenate([(bit[:, :-1] - bit[:, 1:]) / r_col, bit[:, -1:] / r_last], axis=1)
    res.append(cell_sum + from_above - to_below)
    integrator = bit[:, -1] / r_last
    return res, scale, integrator


@pytest.mark.parametrize("interleaved", [False, True], ids=["single", "interleaved"])
@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_kirchhoff_current_law_at_every_node(topology, interleaved):
    g, g_neg, inp = _problem(topology, signed=True, seed=5)
    gn = g_neg if interleaved else None
    r_row, r_col = 0.07, 0.11
    nodes = NODES[topology](g, inp, r_row, r_col, g_neg=gn, tol=1e-13, **TERMINALS)
    assert bool(nodes.info.converged)
    res, scale, integrator = _kcl_residuals(
        topology, g, gn, inp, nodes, r_row, r_col, TERMINALS["r_driver"],
        TERMINALS["r_integrator"], TERMINALS["extra_rows"],
    )
    for r in res:
        assert np.max(np.abs(r)) <= 1e-10 * scale
    np.testing.assert_allclose(integrator, nodes.currents, rtol=0, atol=1e-10 * scale)
    ref = reference_currents(g, inp, r_row, r_col, topology=topology, g_neg=gn, **TERMINALS)
    assert _rel_err(nodes.currents, ref) <= 1e-10


# ---------------------------------------------------------------------------------------------
# Gradients (implicit differentiation) against central finite differences.


@pytest.mark.parametrize("interleaved", [False, True], ids=["single", "interleaved"])
@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_gradients_match_finite_differences(topology, interleaved):
    g, g_neg, inp = _problem(topology, signed=True, seed=7)
    if topology == "gated_source":
        inp = np.where(inp == 0, 1.0, inp)  # the formal gradient in b exists for b != 0
    gn = g_neg if interleaved else None
    weights = np.random.default_rng(8).standard_normal((inp.shape[0], g.shape[1]))
    solve = SOLVERS[topology]
    terminals = (TERMINALS["r_driver"], TERMINALS["r_integrator"])

    def loss(g, gn, inp, r_row, r_col, r_driver, r_integrator):
        currents, _ = solve(g, inp, r_row, r_col, g_neg=gn, r_driver=r_driver,
                            r_integrator=r_integrator, extra_rows=TERMINALS["extra_rows"],
                            tol=1e-12)
        return jnp.sum(currents * weights)

    args = [g, gn, inp, 0.06, 0.09, *terminals]
    argnums = tuple(i for i, a in enumerate(args) if a is not None)
    grads = dict(zip(argnums, jax.jit(jax.grad(loss, argnums=argnums))(*args), strict=True))
    solve_tight = JITTED[(topology, True)]  # already compiled: same shapes and tolerance

    def loss_fd(*a):
        return float(np.sum(np.asarray(solve_tight(*a, TERMINALS["extra_rows"])[0]) * weights))

    # Central differences along random directions (arrays) or the value itself (scalars):
    # truncation error O(h^2); the solver error (<= 1e-12) divided by h stays small.
    h = 1e-5
    rng = np.random.default_rng(9)
    for i, grad in grads.items():
        base = np.asarray(args[i], float)
        for direction in rng.standard_normal((4,) + base.shape) if base.ndim else [1.0]:
            a_up, a_down = list(args), list(args)
            a_up[i], a_down[i] = base + h * direction, base - h * direction
            fd = (loss_fd(*a_up) - loss_fd(*a_down)) / (2 * h)
            np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), fd, rtol=1e-6,
                                       atol=1e-9, err_msg=f"argument {i}")


def test_gradients_finite_at_zero_resistance():
    g, _, v = _problem("input_source", signed=False)

    @jax.jit
    def loss(g, v, r_row, r_col):
        return jnp.sum(par.solve_input_source(g, v, r_row, r_col, r_driver=0.02, tol=1e-12)[0])

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(g, v, 0.0, 0.0)
    for grad in grads:
        assert np.all(np.isfinite(grad))
    # One-sided derivatives at r = 0 match forward differences.
    h = 1e-7
    base = loss(g, v, 0.0, 0.0)
    np.testing.assert_allclose(grads[2], (loss(g, v, h, 0.0) - base) / h, rtol=1e-4)
    np.testing.assert_allclose(grads[3], (loss(g, v, 0.0, h) - base) / h, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Convergence reporting.


def _huge(topology):
    g, _, inp = _problem(topology, signed=False)
    return g * 50.0, inp


def test_nonconvergence_is_reported():
    g, inp = _huge("input_source")
    _, info = par.solve_input_source(g, inp, 5.0, 5.0, max_iters=3)
    assert not bool(info.converged)
    assert int(info.iterations) == 3
    assert float(info.error) > 1e-6
    with pytest.raises(par.ConvergenceError, match="3 iterations"):
        par.check_convergence(info)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        par.check_convergence(info, mode="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        par.check_convergence(info, mode="ignore")
    with pytest.raises(ValueError):
        par.check_convergence(info, mode="loud")


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["kernel", "xla"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("interleaved", [False, True], ids=["single", "interleaved"])
def test_gated_ladder_is_exact_with_rows_switched_off(interleaved, dtype, cpu_kernel):
    """Gated-source columns are eliminated exactly: no sweeps, any r, rows off in any pattern."""
    k, n = 11, 5
    rng = np.random.default_rng(21)
    g = rng.uniform(0.0, 1.0, (k, n))
    gn = rng.uniform(0.0, 1.0, (k, n)) if interleaved else None
    bits = rng.choice([-1.0, 0.0, 0.0, 1.0], (6, k))
    bits[0] = 0.0  # no row on: no current
    bits[1] = 0.0
    bits[1, -1] = 1.0  # only the row next to the integrator
    bits[2] = 0.0
    bits[2, 0] = -1.0  # only the row next to the source
    for r_row, r_col in ((0.0, 0.0), (1e-3, 2e-3), (0.3, 0.1), (5.0, 5.0)):
        ref = reference_currents(g, bits, r_row, r_col, topology="gated_source", g_neg=gn,
                                 **TERMINALS)
        currents, info = par.solve_gated_source(
            g.astype(dtype), bits.astype(dtype), dtype(r_row), dtype(r_col),
            g_neg=None if gn is None else gn.astype(dtype), cpu_kernel=cpu_kernel,
            **{**TERMINALS, "r_driver": dtype(0.04), "r_integrator": dtype(0.06)})
        assert currents.dtype == dtype
        assert bool(info.converged) and int(info.iterations) == 0
        expected = par.PATH_LADDER_KERNEL if cpu_kernel else par.PATH_LADDER
        assert int(info.path) == expected
        np.testing.assert_array_equal(np.asarray(currents[0]), 0.0)
        # float32: relative to the currents of the cells of both polarities added (the scale
        # of the rounding; the output may be a small difference or a small remainder).
        cells = np.abs(bits) @ (g + (0.0 if gn is None else gn))
        scale = np.max(np.abs(ref) if dtype == np.float64 else cells, axis=1, keepdims=True)
        err = np.max(np.abs(np.asarray(currents, float)[1:] - ref[1:]) / scale[1:])
        assert err <= (1e-6 if dtype == np.float32 else 1e-12), (r_row, r_col, err)


@pytest.mark.parametrize("cpu_kernel", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["kernel", "xla"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["single", "interleaved"])
def test_gated_per_read_conductances_match_reference(interleaved, cpu_kernel):
    """Read noise: every read solved with its own perturbed cells, as the dense reference."""
    k, n, b = 9, 4, 5
    rng = np.random.default_rng(31)
    bits = rng.choice([-1.0, 0.0, 1.0], (b, k))
    g = rng.uniform(0.0, 1.0, (b, k, n))
    gn = rng.uniform(0.0, 1.0, (b, k, n)) if interleaved else None
    currents, info = par.solve_gated_source_per_read(
        g, bits, 0.05, 0.08, g_neg=gn, cpu_kernel=cpu_kernel, **TERMINALS)
    assert bool(info.converged)
    for i in range(b):
        ref = reference_currents(g[i], bits[i:i + 1], 0.05, 0.08, topology="gated_source",
                                 g_neg=None if gn is None else gn[i], **TERMINALS)
        np.testing.assert_allclose(np.asarray(currents[i]), ref[0], rtol=1e-11, atol=1e-13)
    for dtype, tol in ((np.float32, 1e-5),):
        c32, _ = par.solve_gated_source_per_read(
            g.astype(dtype), bits.astype(dtype), dtype(0.05), dtype(0.08),
            g_neg=None if gn is None else gn.astype(dtype), cpu_kernel=cpu_kernel)
        c64, _ = par.solve_gated_source_per_read(g, bits, 0.05, 0.08, g_neg=gn,
                                                 cpu_kernel=cpu_kernel)
        assert c32.dtype == dtype
        np.testing.assert_allclose(np.asarray(c32), np.asarray(c64), rtol=0,
                                   atol=tol * float(np.abs(c64).max()))
    with pytest.raises(NotImplementedError, match="not differentiable"):
        jax.grad(lambda g: jnp.sum(par.solve_gated_source_per_read(
            g, bits, 0.05, 0.08, cpu_kernel=cpu_kernel)[0]))(g)


@functools.partial(jax.jit, static_argnames=("mode", "max_iters"))
def _solve_and_check(g, v, r, *, mode, max_iters):
    currents, info = par.solve_input_source(g, v, r, r, max_iters=max_iters)
    par.check_convergence(info, mode=mode)
    return currents


def test_check_convergence_under_jit():
    g, inp = _huge("input_source")

    def run(mode, max_iters, r=5.0):
        return jax.block_until_ready(_solve_and_check(g, inp, r, mode=mode, max_iters=max_iters))

    with pytest.raises(Exception, match=r"did not converge: 3 iterations.*tol 1e-06"):
        run("error", 3)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        run("warn", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run("error", 1000, r=0.02)  # converges: no exception, no warning


# ---------------------------------------------------------------------------------------------
# Transformations, batching and precision.


def test_jit_and_vmap_over_arrays():
    rng = np.random.default_rng(11)
    gs = rng.uniform(0, 1, (3, K, N))
    vs = rng.uniform(0, 1, (3, B, K))
    rs = np.array([0.01, 0.05, 0.2])

    @jax.jit
    def batched(gs, vs, rs):
        return jax.vmap(lambda g, v, r: par.solve_input_source(g, v, r, 2 * r))(gs, vs, rs)

    currents, info = batched(gs, vs, rs)
    assert currents.shape == (3, B, N) and info.converged.shape == (3,)
    assert bool(jnp.all(info.converged))
    for i in range(3):
        ref = reference_currents(gs[i], vs[i], rs[i], 2 * rs[i])
        assert _rel_err(currents[i], ref) <= 1e-6
    # Gradients through vmap.
    grad = jax.grad(lambda gs: jnp.sum(batched(gs, vs, rs)[0]))(gs)
    assert grad.shape == gs.shape and np.all(np.isfinite(grad))


@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_batch_chunks_and_leading_axes(topology):
    g, g_neg, inp = _problem(topology, signed=True)
    # Chunks stop independently, so compare converged answers (tol far below the check).
    whole, _ = JITTED[(topology, True)](g, g_neg, inp, 0.05, 0.08, 0.0, 0.0, 0)
    shaped, info = SOLVERS[topology](g, inp.reshape(B, 1, K), 0.05, 0.08, g_neg=g_neg,
                                     batch_chunk=2, tol=1e-12)
    assert shaped.shape == (B, 1, N)
    assert bool(info.converged)
    np.testing.assert_allclose(np.asarray(shaped).reshape(B, N), whole, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("topology", ["input_source", "gated_source"])
def test_float32(topology):
    g, g_neg, inp = _problem(topology, signed=False, seed=13)
    solve = SOLVERS[topology]
    ref, _ = JITTED[(topology, True)](g, g_neg, inp, 0.02, 0.03, 0.0, 0.0, 0)
    currents, info = solve(
        g.astype(np.float32), inp.astype(np.float32), np.float32(0.02), np.float32(0.03),
        g_neg=g_neg.astype(np.float32),
    )
    assert currents.dtype == jnp.float32 and info.error.dtype == jnp.float32
    assert bool(info.converged)
    assert _rel_err(currents, ref) <= 1e-5
    grad = jax.grad(lambda g: jnp.sum(solve(g, inp.astype(np.float32), 0.02, 0.03)[0]))(
        g.astype(np.float32)
    )
    assert grad.dtype == jnp.float32 and np.all(np.isfinite(grad))


def _errors_after(changes, dtype=np.float32):
    """The control's error estimate after each of the given readout changes (Gauss-Seidel)."""
    ctl = convergence.control_init(1, dtype)
    errs = []
    for t, d in enumerate(changes):
        ctl = convergence.control_step(ctl, t, jnp.asarray([d], dtype))
        errs.append(float(ctl.err[0]))
    return errs


def test_error_estimate_at_the_rounding_level():
    noise = 16 * float(np.finfo(np.float32).eps)
    # A change of a few ulps right after a large one: the rate is at most (d + noise) / d_prev,
    # so the geometric tail (safety factor 4) bounds the error.
    d_prev, d = 1e-3, 0.5 * noise
    hi = d + noise
    rate = hi / d_prev
    assert _errors_after([d_prev, d])[-1] == pytest.approx(4 * hi * rate / (1 - rate), rel=1e-4)
    # A tail above the change itself is capped at the change.
    assert _errors_after([1.1 * noise, 0.9 * noise])[-1] == pytest.approx(0.9 * noise, rel=1e-5)
    # Two changes at the rounding level carry no rate: the error is the change.
    assert _errors_after([1e-3, 0.9 * noise, 0.5 * noise])[-1] == pytest.approx(0.5 * noise)
    # Above the noise, the plain tail with the observed rate.
    assert _errors_after([1e-2, 1e-4])[-1] == pytest.approx(4 * 1e-4 * 0.01 / 0.99, rel=1e-4)


def test_default_tolerance_follows_the_dtype():
    """float32 cannot resolve 1e-6 on large arrays at large r: its default tolerance is 1e-5."""
    assert par.default_tol(jnp.float32) == 1e-5 and par.default_tol(jnp.float64) == 1e-6
    g, _, inp = _problem("input_source", signed=False, seed=3)
    _, info32 = par.solve_input_source(g.astype(np.float32), inp.astype(np.float32), 0.01, 0.01)
    _, info64 = par.solve_input_source(g, inp, 0.01, 0.01)
    assert float(info32.tol) == pytest.approx(1e-5) and float(info64.tol) == 1e-6
    assert bool(info32.converged) and float(info32.error) <= 1e-5
    nodes = par.input_source_nodes(g, inp, 0.01, 0.01)
    assert float(nodes.info.tol) == 1e-6


def _cancelling_pair(K, N, seed):
    """Interleaved conductances on a baseline whose outputs nearly cancel: zero-mean columns."""
    rng = np.random.default_rng(seed)
    w = rng.laplace(size=(K, N))
    w -= w.mean(axis=0)
    w /= np.abs(w).max()
    return 0.1 + 0.9 * np.maximum(w, 0.0), 0.1 + 0.9 * np.maximum(-w, 0.0)


@pytest.mark.parametrize("B", [8, 41])  # fewer vectors than columns: direct; more: transfer
def test_cells_error_scale_where_the_outputs_cancel(B):
    """``error_scale="cells"``: the error is within tol of each vector's currents of both
    polarities added, also where the differential outputs are a few percent of them
    (``program``'s single-row probes of a layer of zero-mean weights)."""
    K, N, r, tol = 40, 12, 2e-3, 1e-5
    g, g_neg = _cancelling_pair(K, N, seed=21)
    v = np.eye(B, K) + 10.0 / K  # rows driven one by one on a uniform drive (and it alone)
    ref = reference_currents(g, v, r, r, g_neg=g_neg)
    cells = np.max(np.abs(v) @ (g + g_neg), axis=1)  # ideal currents of both polarities
    assert np.max(np.max(np.abs(ref), axis=1) / cells) < 0.2  # the outputs do cancel
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    I, info = par.solve_input_source(f32(g), f32(v), r, r, g_neg=f32(g_neg), tol=tol,
                                     cpu_kernel=False, error_scale="cells")
    assert bool(info.converged)
    err = np.max(np.abs(np.asarray(I, np.float64) - ref), axis=1) / cells
    assert np.max(err) <= tol
    with pytest.raises(ValueError, match="error_scale"):
        par.solve_input_source(g, v, r, r, g_neg=g_neg, error_scale="differential")


@pytest.mark.parametrize("B", [3, 8])  # direct and transfer paths (N = 5)
def test_cells_error_scale_gradients(B):
    """The gradient solves of a cells-scaled solve converge on the same scale: the gradients
    match central differences."""
    rng = np.random.default_rng(31)
    K, N, r = 12, 5, 0.02
    g, g_neg = rng.uniform(0.1, 1.0, (K, N)), rng.uniform(0.1, 1.0, (K, N))
    v, weights = rng.uniform(0.0, 1.0, (B, K)), rng.standard_normal((B, N))

    def loss(g):
        currents, _ = par.solve_input_source(g, v, r, r, g_neg=g_neg, tol=1e-10,
                                             error_scale="cells")
        return jnp.sum(weights * currents)

    grad = np.asarray(jax.grad(loss)(jnp.asarray(g)))
    h, direction = 1e-6, rng.standard_normal((K, N))
    fd = (float(loss(g + h * direction)) - float(loss(g - h * direction))) / (2 * h)
    np.testing.assert_allclose(np.sum(grad * direction), fd, rtol=1e-6)
