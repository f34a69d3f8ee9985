"""Tests of the low-depth line eliminations (`jaxbar.core.ir.line_scan`) and their use.

The scans are checked against NumPy loops written here from the recurrences of
docs/ir_solver.md ("Line solves"); the solver forced to the scans against the same solver with
its loops, against the dense circuit reference, and in its gradients.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from jaxbar.core import ir as par
from jaxbar.core.ir import line_scan

from .circuit_reference import reference_currents
from .ir_problems import TERMINALS, problem, rel_err


@pytest.fixture(autouse=True)
def _float64():
    """float64 available in this module (arrays keep the dtype they are given)."""
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------------------------
# The recurrences against NumPy loops (float64 references).

L, M = 65, 5  # nodes per line (odd: the scan's odd/even split has a remainder), lines

# (r_seg, r_end, G scale): R G about 0.1, none (R = 0), 1e3 (a product of the factors
# 1 + R G along the line overflows float32 unless rescaled) and 1e-9; G = 0.
CASES = {
    "moderate": (0.1, 0.3, 1.0),
    "r_zero": (0.0, 0.0, 1.0),
    "rg_large": (1e3, 2e3, 1.0),
    "rg_small": (1e-9, 1e-9, 1.0),
    "g_zero": (0.1, 0.3, 0.0),
}


def _loop_factor(G, R):
    """rho along axis 0, boundary at node 0: Y_j = G_j + rho_(j+1) Y_(j+1) from the open end."""
    rho = np.empty_like(G)
    carry = np.zeros(G.shape[1:])
    for j in range(G.shape[0] - 1, -1, -1):
        Y = G[j] + carry
        rho[j] = 1.0 / (1.0 + R[j] * Y)
        carry = rho[j] * Y
    return rho


def _loop_solve(rho, c, R):
    """Drops and boundary current, boundary at node 0 (axis 0)."""
    H = np.empty_like(c)
    carry = np.zeros(c.shape[1:])
    for j in range(c.shape[0] - 1, -1, -1):
        H[j] = c[j] + carry
        carry = rho[j] * H[j]
    d = np.empty_like(c)
    prev = np.zeros(c.shape[1:])
    for j in range(c.shape[0]):
        prev = d[j] = rho[j] * (prev + R[j] * H[j])
    return d, carry


def _line_inputs(case, seed=0):
    r_seg, r_end, g_scale = CASES[case]
    rng = np.random.default_rng(seed)
    G = g_scale * rng.uniform(0.5, 1.0, (L, M))
    G[rng.uniform(size=G.shape) < 0.2] = 0.0  # some nodes without a cell
    c = rng.uniform(-1.0, 1.0, (L, M))
    R = np.full(L, r_seg)
    R[0] = r_end
    return G, c, R, r_seg, r_end


def _orient(x, axis, boundary_first):
    """The (L, M) reference layout (boundary at 0, line along axis 0) as the scan sees it."""
    x = x if boundary_first else x[::-1]
    return x if axis == 0 else x.T


def _unorient(x, axis, boundary_first):
    """The inverse of `_orient`."""
    x = x if axis == 0 else x.T
    return x if boundary_first else x[::-1]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _factor_and_solve(G, c, axis, boundary_first, r_end, r_seg):
    rho = line_scan.line_factor(G, axis, boundary_first, r_end, r_seg)
    return rho, *line_scan.line_solve(rho, c, axis, boundary_first, r_end, r_seg)


# (line axis, boundary first): both axes and both scan directions, one per dtype (a compile
# each; the solver tests below run both directions along both axes).
ORIENTATION = {np.float32: (1, False), np.float64: (0, True)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_line_factor_and_solve_match_loops(case, dtype):
    G, c, R, r_seg, r_end = _line_inputs(case)
    rho_ref = _loop_factor(G, R)
    d_ref, J_ref = _loop_solve(rho_ref, c, R)
    rtol = 2e-5 if dtype == np.float32 else 1e-12
    for axis, first in [ORIENTATION[dtype]]:
        Gs, cs = (jnp.asarray(_orient(x, axis, first), dtype) for x in (G, c))
        rho, d, J = _factor_and_solve(Gs, cs, axis, first, dtype(r_end), dtype(r_seg))
        assert rho.dtype == dtype and d.dtype == dtype
        rho, d = (_unorient(np.asarray(x), axis, first) for x in (rho, d))
        assert np.all(np.isfinite(rho)) and np.all(np.isfinite(d))
        np.testing.assert_allclose(rho, rho_ref, rtol=rtol, atol=0)
        # The drops are signed sums: relative to each line's largest drop.
        scale = np.maximum(np.max(np.abs(d_ref), axis=0), np.finfo(float).tiny)
        assert np.max(np.abs(d - d_ref) / scale) <= 10 * rtol, (axis, first)
        np.testing.assert_allclose(J, J_ref, rtol=0, atol=10 * rtol * np.max(np.abs(J_ref)))
    if case == "r_zero":  # no drop anywhere; every node sees the whole line
        np.testing.assert_array_equal(rho, 1.0)
    if case == "g_zero":
        np.testing.assert_array_equal(rho, 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_recurrence_matches_loop(dtype):
    rng = np.random.default_rng(1)
    a = rng.uniform(0.0, 1.0, (L, M))
    a[5] = 0.0  # a reset in the middle
    b = rng.uniform(-1.0, 1.0, (L, M))
    both = jax.jit(lambda a, b: [line_scan.affine_recurrence(a, b, 0, rev)
                                 for rev in (False, True)])(a.astype(dtype), b.astype(dtype))
    for reverse, got in zip((False, True), both, strict=True):
        order = range(L - 1, -1, -1) if reverse else range(L)
        ref = np.empty_like(b)
        x = np.zeros(M)
        for t in order:
            x = ref[t] = a[t] * x + b[t]
        tol = 1e-5 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol * np.max(np.abs(ref)))


def test_float32_drops_along_a_long_line_are_refined():
    """1152 nodes in float32: the factor scan's rounding, shared by many nodes, would shift the
    drops by about 6e-6 (r = 1e-5) and 4e-6 (r = 1e-3) of the largest; refined, they are within
    about 2.5e-6 and 1e-6, as the loops (float64 reference)."""
    length, lines = 1152, 16
    rng = np.random.default_rng(2)
    solve = jax.jit(lambda G, c, r: line_scan.line_solve(
        line_scan.line_factor(G, 0, True, r, r), c, 0, True, r, r)[0])
    for r, bound in ((1e-5, 4e-6), (1e-3, 2e-6)):
        G = rng.uniform(0.0, 1.0, (length, lines))
        c = rng.uniform(0.0, 1.0, (length, lines))
        R = np.full(length, r)
        d_ref, _ = _loop_solve(_loop_factor(G, R), c, R)
        d = solve(G.astype(np.float32), c.astype(np.float32), np.float32(r))
        assert np.max(np.abs(d - d_ref)) / np.max(np.abs(d_ref)) <= bound, r


# ---------------------------------------------------------------------------------------------
# The solver with either form.

R_ROW, R_COL = 0.08, 0.12


def _solve(topology, lines, g, gn, inp, tol=1e-12):
    solve = par.solve_input_source if topology == "input_source" else par.solve_gated_source
    return solve(g, inp, R_ROW, R_COL, g_neg=gn, tol=tol, cpu_kernel=False, lines=lines,
                 **TERMINALS)


@pytest.mark.parametrize(("b", "interleaved"), [  # N = 6 columns: direct and transfer paths
    (3, True), pytest.param(8, False, marks=pytest.mark.slow),
    pytest.param(3, False, marks=pytest.mark.slow), pytest.param(8, True, marks=pytest.mark.slow),
], ids=["direct-interleaved", "transfer-single", "direct-single", "transfer-interleaved"])
def test_input_source_parallel_equals_sequential_and_reference(b, interleaved):
    g, g_neg, v = problem("input_source", signed=True, seed=41, b=b)
    gn = g_neg if interleaved else None
    ref = reference_currents(g, v, R_ROW, R_COL, g_neg=gn, **TERMINALS)
    seq, info_s = _solve("input_source", "sequential", g, gn, v)
    par_, info_p = _solve("input_source", "parallel", g, gn, v)
    assert int(info_s.lines) == par.LINES_SEQUENTIAL and int(info_p.lines) == par.LINES_PARALLEL
    assert int(info_p.path) == (par.PATH_TRANSFER if b == 8 else par.PATH_DIRECT)
    assert bool(info_p.converged)
    assert rel_err(par_, ref) <= 1e-10
    assert rel_err(par_, seq) <= 1e-11


@pytest.mark.parametrize("interleaved", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["single", "interleaved"])
def test_gated_source_sweeps_in_parallel_form_match_reference(interleaved):
    """Gated-source sweeps (node voltages) with bits that switch rows off, against the dense
    reference; the sequential form against the same reference is in test_parasitics.py, and
    both forms of the gradient's gated sweeps are compared below."""
    g, g_neg, bits = problem("gated_source", signed=True, seed=43)
    gn = g_neg if interleaved else None
    ref = reference_currents(g, bits, R_ROW, R_COL, topology="gated_source", g_neg=gn,
                             **TERMINALS)
    pll = par.gated_source_nodes(g, bits, R_ROW, R_COL, g_neg=gn, tol=1e-12, lines="parallel",
                                 **TERMINALS)
    assert int(pll.info.lines) == par.LINES_PARALLEL and bool(pll.info.converged)
    assert rel_err(pll.currents, ref) <= 1e-10


def _grads(topology, lines, g, gn, inp, weights):
    def loss(g, gn, r_row, r_col):
        solve = par.solve_input_source if topology == "input_source" else par.solve_gated_source
        currents, _ = solve(g, inp, r_row, r_col, g_neg=gn, tol=1e-12, cpu_kernel=False,
                            lines=lines, **TERMINALS)
        return jnp.sum(currents * weights)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(g, gn, R_ROW, R_COL)


@pytest.mark.parametrize("topology", [pytest.param("input_source", marks=pytest.mark.slow),
                                      "gated_source"])
def test_gradients_parallel_equal_sequential(topology):
    g, g_neg, inp = problem(topology, signed=True, seed=47)
    weights = np.random.default_rng(48).standard_normal((inp.shape[0], g.shape[1]))
    seq = _grads(topology, "sequential", g, g_neg, inp, weights)
    pll = _grads(topology, "parallel", g, g_neg, inp, weights)
    for a, b in zip(pll, seq, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.max(np.abs(b)))


def _primitives(jaxpr, seen=None):
    """Count of every primitive in a jaxpr, sub-jaxprs (loop bodies, branches, calls) included."""
    seen = collections.Counter() if seen is None else seen
    for eqn in jaxpr.eqns:
        seen[eqn.primitive.name] += 1
        for sub in jaxprs_in_params(eqn.params):
            _primitives(sub, seen)
    return seen


def test_parallel_form_has_no_loop_along_the_lines():
    """Forced to the scans, the only loop left is the sweeps' while loop (no step per node)."""
    g, _, v = problem("input_source", signed=False)
    g, v = g.astype(np.float32), v.astype(np.float32)

    def jaxpr(lines):
        return jax.make_jaxpr(lambda g, v: _solve("input_source", lines, g, None, v,
                                                  tol=1e-5))(g, v).jaxpr

    seq, pll = _primitives(jaxpr("sequential")), _primitives(jaxpr("parallel"))
    assert seq["scan"] >= 3  # fori_loops along the lines (factors, Norton currents, drops)
    assert pll["scan"] == 0
    assert pll["while"] == 1  # the sweeps


def test_cpu_default_is_the_sequential_form():
    """`lines="auto"` lowered for a CPU runs the loops (reported in `SolveInfo.lines`)."""
    assert jax.default_backend() == "cpu"
    g, g_neg, v = problem("input_source", signed=True, seed=53)
    g, g_neg, v = (x.astype(np.float32) for x in (g, g_neg, v))
    currents, info = par.solve_input_source(g, v, R_ROW, R_COL, g_neg=g_neg, cpu_kernel=False)
    assert int(info.lines) == par.LINES_SEQUENTIAL and int(info.path) == par.PATH_DIRECT
    ref = reference_currents(g, v, R_ROW, R_COL, g_neg=g_neg)
    assert bool(info.converged) and rel_err(currents, ref) <= 1e-5


def test_unknown_line_form_is_rejected():
    g, _, v = problem("input_source", signed=False)
    with pytest.raises(ValueError, match="lines must be one of"):
        par.solve_input_source(g, v, 0.1, 0.1, lines="cyclic")
